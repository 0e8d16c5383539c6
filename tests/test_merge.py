"""Window stitching (spec §2.5): up-sampling, padding crop, overlap averaging, coverage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovss.pipeline.merge import merge_window_logits, resize_logits
from ovss.pipeline.windows import Padding, Window, sliding_windows, symmetric_padding

NO_PAD = Padding(0, 0, 0, 0)


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def test_single_whole_image_window_is_plain_bilinear_upsample() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 3, 4)  # (L, Q, gr, gc)
    merged = merge_window_logits(logits, [Window(0, 0, 48, 64)], NO_PAD, (48, 64), (48, 64))
    torch.testing.assert_close(merged, _bilinear(logits[0], (48, 64)), rtol=0, atol=0)
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
    torch.testing.assert_close(merged, expected, rtol=0, atol=0)
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
    torch.testing.assert_close(merged, canvas / count, rtol=0, atol=1e-6)
    # Spot check by hand: cols 3..4 average the two windows, col 7 is the second window alone.
    torch.testing.assert_close(merged[:, 3, 4], (first[:, 3, 4] + second[:, 3, 1]) / 2)
    torch.testing.assert_close(merged[:, 2, 7], second[:, 2, 4])


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
    torch.testing.assert_close(resized, _bilinear(logits, (14, 18)), rtol=0, atol=0)
    # Hand check of the half-pixel convention on a 1x2 ramp resized to 1x4: [0, .25, .75, 1].
    ramp = torch.tensor([[[0.0, 1.0]]])
    torch.testing.assert_close(resize_logits(ramp, (1, 4)), torch.tensor([[[0.0, 0.25, 0.75, 1.0]]]))
