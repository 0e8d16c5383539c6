"""Window stitching (spec §2.5): up-sampling, padding crop, overlap averaging, coverage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovss.pipeline.merge import (
    StitchedLogits,
    bilinear_taps,
    merge_window_logits,
    resize_logits,
    resize_rows,
    source_span,
)
from ovss.pipeline.windows import Padding, Window, sliding_windows, symmetric_padding

NO_PAD = Padding(0, 0, 0, 0)


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


# PyTorch's CPU kernel fuses some multiply-adds, so ovss's band-wise bilinear agrees with it to float
# round-off (a few ulp), not bit for bit; band vs whole computations of ovss itself are bit-exact.
ROUND_OFF = {"rtol": 1e-6, "atol": 1e-6}


def test_single_whole_image_window_is_plain_bilinear_upsample() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 3, 4)  # (L, Q, gr, gc)
    merged = merge_window_logits(logits, [Window(0, 0, 48, 64)], NO_PAD, (48, 64), (48, 64))
    torch.testing.assert_close(merged, _bilinear(logits[0], (48, 64)), **ROUND_OFF)
    # A sequence of per-window tensors is the same thing.
    merged_seq = merge_window_logits([logits[0]], [Window(0, 0, 48, 64)], [NO_PAD], [(48, 64)], (48, 64))
    torch.testing.assert_close(merged_seq, merged, rtol=0, atol=0)


def test_two_overlapping_constant_windows_average_on_overlap() -> None:
    # Image 4x6; window A covers cols 0..3 with logits (1, 10), window B cols 2..5 with logits (3, 20).
    logits = torch.tensor([[1.0, 10.0], [3.0, 20.0]])[:, :, None, None].expand(2, 2, 2, 2)  # (L, Q, 2, 2)
    windows = [Window(0, 0, 4, 4), Window(0, 2, 4, 6)]
    merged = merge_window_logits(logits, windows, NO_PAD, (4, 4), (4, 6))
    expected_q0 = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0]).expand(4, 6)
    expected_q1 = torch.tensor([10.0, 10.0, 15.0, 15.0, 20.0, 20.0]).expand(4, 6)
    torch.testing.assert_close(merged, torch.stack([expected_q0, expected_q1]), rtol=0, atol=0)


def test_asymmetric_padding_is_cropped_away_exactly() -> None:
    # Window 5x4 padded (top 1, bottom 2, left 0, right 3) to 8x7; the grid equals the padded size so the
    # up-sampling is the identity. Padding cells hold -1, content cells hold 100*row + col.
    pad = Padding(top=1, bottom=2, left=0, right=3)
    padded = torch.full((1, 8, 7), -1.0)  # (Q, 8, 7)
    content = (100 * torch.arange(5.0)[:, None] + torch.arange(4.0)[None, :])[None]  # (1, 5, 4)
    padded[:, 1:6, 0:4] = content
    merged = merge_window_logits(padded[None], [Window(0, 0, 5, 4)], pad, (8, 7), (5, 4))
    torch.testing.assert_close(merged, content, rtol=0, atol=0)


def test_padding_crop_after_upsampling_matches_manual_path() -> None:
    # Grid 4x4 up-sampled to the padded 56x56, then cropped (window 50x52 -> padding from the helper).
    torch.manual_seed(1)
    pad = symmetric_padding(50, 52, 56)
    assert pad == Padding(3, 3, 2, 2)
    logits = torch.randn(1, 3, 4, 4)  # (L, Q, gr, gc)
    merged = merge_window_logits(logits, [Window(0, 0, 50, 52)], pad, (56, 56), (50, 52))
    expected = _bilinear(logits[0], (56, 56))[:, 3:53, 2:54]
    torch.testing.assert_close(merged, expected, **ROUND_OFF)
    # Up-sampling to the window size instead (GLA release convention) gives something else here.
    assert not torch.allclose(merged, _bilinear(logits[0], (50, 52)), atol=1e-3)


def test_cityscapes_geometry_36_windows_cover_every_pixel() -> None:
    height, width = 560, 1120
    windows = sliding_windows(height, width, 224, 112)
    assert len(windows) == 36
    num = len(windows)
    # Window b has constant logits (b, 1): channel 0 averages window indices, channel 1 must be all ones.
    values = torch.stack([torch.arange(num, dtype=torch.float32), torch.ones(num)], dim=1)  # (L, 2)
    logits = values[:, :, None, None].expand(num, 2, 14, 14)  # (L, Q, 14, 14)
    merged = merge_window_logits(logits, windows, NO_PAD, (224, 224), (height, width))
    assert merged.shape == (2, height, width)
    torch.testing.assert_close(merged[1], torch.ones(height, width), rtol=0, atol=1e-6)
    # Independent count/sum by membership tests at a few pixels (borders, overlaps, shifted last row).
    for y, x in [(0, 0), (559, 1119), (111, 111), (112, 112), (335, 900), (340, 1000), (450, 1119)]:
        covering = [b for b, w in enumerate(windows) if w.y1 <= y < w.y2 and w.x1 <= x < w.x2]
        assert covering, (y, x)
        assert merged[0, y, x].item() == pytest.approx(sum(covering) / len(covering), abs=1e-5)


def test_windows_of_different_sizes_with_per_window_padding() -> None:
    # Two windows of different sizes and grids (e.g. a caller mixing whole-image and crop windows).
    torch.manual_seed(2)
    windows = [Window(0, 0, 6, 5), Window(0, 3, 6, 8)]
    paddings = [Padding(1, 1, 0, 1), Padding(0, 0, 0, 0)]
    sizes = [(8, 6), (6, 5)]
    logits = [torch.randn(2, 4, 3), torch.randn(2, 3, 5)]  # (Q, gr_b, gc_b)
    merged = merge_window_logits(logits, windows, paddings, sizes, (6, 8))
    first = _bilinear(logits[0], (8, 6))[:, 1:7, 0:5]  # (2, 6, 5)
    second = _bilinear(logits[1], (6, 5))  # (2, 6, 5)
    canvas = torch.zeros(2, 6, 8)
    count = torch.zeros(6, 8)
    canvas[:, 0:6, 0:5] += first
    count[0:6, 0:5] += 1
    canvas[:, 0:6, 3:8] += second
    count[0:6, 3:8] += 1
    torch.testing.assert_close(merged, canvas / count, **ROUND_OFF)
    # Spot check by hand: cols 3..4 average the two windows, col 7 is the second window alone.
    torch.testing.assert_close(merged[:, 3, 4], (first[:, 3, 4] + second[:, 3, 1]) / 2, **ROUND_OFF)
    torch.testing.assert_close(merged[:, 2, 7], second[:, 2, 4], **ROUND_OFF)


def test_uncovered_pixel_and_inconsistent_sizes_raise() -> None:
    logits = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="uncovered"):
        merge_window_logits(logits, [Window(0, 0, 4, 4)], NO_PAD, (4, 4), (4, 5))
    with pytest.raises(ValueError, match="does not match"):
        merge_window_logits(logits, [Window(0, 0, 4, 4)], NO_PAD, (6, 4), (4, 4))
    with pytest.raises(ValueError, match="2 windows"):
        merge_window_logits(logits, [Window(0, 0, 4, 4), Window(0, 0, 4, 4)], NO_PAD, (4, 4), (4, 4))


def test_merge_keeps_float64_and_promotes_half() -> None:
    logits = torch.ones(1, 2, 2, 2, dtype=torch.float64)
    assert merge_window_logits(logits, [Window(0, 0, 4, 4)], NO_PAD, (4, 4), (4, 4)).dtype == torch.float64
    half = torch.ones(1, 2, 2, 2, dtype=torch.bfloat16)
    assert merge_window_logits(half, [Window(0, 0, 4, 4)], NO_PAD, (4, 4), (4, 4)).dtype == torch.float32


def test_resize_logits_is_bilinear_half_pixel_and_noop_at_same_size() -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, 7, 9)
    assert resize_logits(logits, (7, 9)) is logits
    resized = resize_logits(logits, (14, 18))
    torch.testing.assert_close(resized, _bilinear(logits, (14, 18)), **ROUND_OFF)
    # Hand check of the half-pixel convention on a 1x2 ramp resized to 1x4: [0, .25, .75, 1].
    ramp = torch.tensor([[[0.0, 1.0]]])
    torch.testing.assert_close(resize_logits(ramp, (1, 4)), torch.tensor([[[0.0, 0.25, 0.75, 1.0]]]))


def _bands(height: int, sizes: list[int]) -> list[tuple[int, int]]:
    """Split rows 0..height-1 into consecutive bands of the given sizes (cycled)."""
    bands, start, k = [], 0, 0
    while start < height:
        stop = min(height, start + sizes[k % len(sizes)])
        bands.append((start, stop))
        start, k = stop, k + 1
    return bands


def test_bilinear_taps_by_hand() -> None:
    # 2 -> 4 (scale 0.5): sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (upper index clamped to 1).
    i0, i1, w0, w1 = bilinear_taps(2, 4, 0, 4, torch.float32)
    assert i0.tolist() == [0, 0, 0, 1] and i1.tolist() == [1, 1, 1, 1]
    torch.testing.assert_close(w1, torch.tensor([0.0, 0.25, 0.75, 0.25]))
    torch.testing.assert_close(w0 + w1, torch.ones(4))
    # 5 -> 2 (scale 2.5): sources 0.75 and 3.25.
    i0, _, _, w1 = bilinear_taps(5, 2, 0, 2, torch.float64)
    assert i0.tolist() == [0, 3] and w1.tolist() == [0.75, 0.25]
    assert source_span(5, 2, 1, 2) == (3, 5) and source_span(448, 2000, 0, 5) == (0, 2)


@pytest.mark.parametrize(
    "in_size, out_size, dtype",
    [((7, 9), (13, 31), torch.float32), ((33, 17), (101, 55), torch.float32), ((448, 300), (223, 999), torch.float32),
     ((5, 6), (5, 11), torch.float32), ((9, 4), (61, 3), torch.float64)],
)
def test_resize_bands_equal_whole_resize_and_match_torch(in_size, out_size, dtype) -> None:
    gen = torch.Generator().manual_seed(sum(in_size) + sum(out_size))
    x = torch.randn(3, *in_size, generator=gen, dtype=dtype)  # (C, h, w)
    whole = resize_logits(x, out_size)  # (C, H, W)
    torch.testing.assert_close(whole, _bilinear(x, out_size), **ROUND_OFF)
    pieces = []
    for start, stop in _bands(out_size[0], [1, 5, 2, 7]):
        first, last = source_span(in_size[0], out_size[0], start, stop, dtype)
        # only the source rows of the band are passed: a wrong index would read outside them and fail
        pieces.append(resize_rows(x[:, first:last].clone(), first, in_size[0], out_size, start, stop))
    assert torch.equal(torch.cat(pieces, dim=1), whole)
    with pytest.raises(ValueError, match="source rows"):
        first, last = source_span(in_size[0], out_size[0], 0, out_size[0])
        resize_rows(x[:, first + 1 : last], first + 1, in_size[0], out_size, 0, out_size[0])


def _reference_stitch(logits, windows, paddings, sizes, image_size, output_size):
    """The untiled computation written with F.interpolate: whole windows, whole canvas, whole resize."""
    canvas = torch.zeros(logits[0].shape[0], *image_size, dtype=torch.float64)
    count = torch.zeros(image_size, dtype=torch.float64)
    for lg, win, pad, size in zip(logits, windows, paddings, sizes, strict=True):
        up = _bilinear(lg.double(), size)[:, pad.top : pad.top + win.height, pad.left : pad.left + win.width]
        canvas[:, win.y1 : win.y2, win.x1 : win.x2] += up
        count[win.y1 : win.y2, win.x1 : win.x2] += 1
    return _bilinear(canvas / count, output_size).float()


@pytest.mark.parametrize("output_size", [(131, 197), (47, 61), (71, 93)])
def test_stitched_row_bands_equal_whole_map_and_reference(output_size) -> None:
    # Processing image 71x93 (odd), windows 32x32 with stride 24 padded to 48 (grid 3x3), plus output
    # sizes above, below and equal to the processing size.
    torch.manual_seed(4)
    height, width = 71, 93
    windows = sliding_windows(height, width, 32, 24)
    pad = symmetric_padding(32, 32, 48)
    logits = torch.randn(len(windows), 6, 3, 3)  # (L, Q, gr, gc)
    stitched = StitchedLogits(logits, windows, pad, (48, 48), (height, width), output_size)
    whole = stitched.full()  # (Q, H0, W0)
    assert whole.shape == (6, *output_size)
    bands = [stitched.rows(a, b) for a, b in _bands(output_size[0], [3, 1, 8])]
    assert torch.equal(torch.cat(bands, dim=1), whole)
    n = len(windows)
    reference = _reference_stitch(list(logits), windows, [pad] * n, [(48, 48)] * n, (height, width), output_size)
    torch.testing.assert_close(whole, reference, rtol=1e-5, atol=1e-5)
    # merged rows of the processing image are those of merge_window_logits
    merged = merge_window_logits(logits, windows, pad, (48, 48), (height, width))
    assert torch.equal(stitched.merged_rows(10, 37), merged[:, 10:37])
