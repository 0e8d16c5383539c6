"""PAMR (spec §2.7) against a re-implementation of the reference conv-with-one-hot-kernels structure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovss.pipeline.pamr import neighbour_offsets, pamr, pamr_affinity

# ---------------------------------------------------------------------------------------------------------
# Reference structure (Araslanov & Roth, models/mods/pamr.py; NACLIP's pamr.py): 3x3 one-hot kernels
# applied with a dilated conv to a replicate-padded input; written here independently of ovss's code.
# ---------------------------------------------------------------------------------------------------------

_EIGHT = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
_NINE = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]


def _kernel_diff() -> torch.Tensor:
    """LocalAffinity: centre minus neighbour, (8, 1, 3, 3)."""
    weight = torch.zeros(8, 1, 3, 3, dtype=torch.float64)
    for i, (r, c) in enumerate(_EIGHT):
        weight[i, 0, 1, 1] = 1
        weight[i, 0, r, c] = -1
    return weight


def _kernel_copy(positions: list[tuple[int, int]]) -> torch.Tensor:
    """LocalAffinityCopy (8 positions) / LocalStDev (9 positions): one-hot copies, (P, 1, 3, 3)."""
    weight = torch.zeros(len(positions), 1, 3, 3, dtype=torch.float64)
    for i, (r, c) in enumerate(positions):
        weight[i, 0, r, c] = 1
    return weight


def _local(x: torch.Tensor, kernel: torch.Tensor, dilations: tuple[int, ...]) -> torch.Tensor:
    """(B, K, H, W) -> (B, K, P * len(dilations), H, W) as the reference LocalAffinity.forward."""
    b, k, h, w = x.shape
    x = x.reshape(b * k, 1, h, w)
    outs = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel.to(x.dtype), dilation=d) for d in dilations]
    return torch.cat(outs, 1).reshape(b, k, -1, h, w)


def _reference_pamr(
    image: torch.Tensor, mask: torch.Tensor, num_iter: int, dilations: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference PAMR.forward on (1, 3, H, W) image and (1, C, H, W) mask."""
    mask = F.interpolate(mask, size=image.shape[-2:], mode="bilinear", align_corners=True)
    x_std = _local(image, _kernel_copy(_NINE), dilations).std(2, keepdim=True)
    x = -_local(image, _kernel_diff(), dilations).abs() / (1e-8 + 0.1 * x_std)
    x = x.mean(1, keepdim=True)
    x = F.softmax(x, 2)
    for _ in range(num_iter):
        m = _local(mask, _kernel_copy(_EIGHT), dilations)
        mask = (m * x).sum(2)
    return mask, x[0, 0]


def _clip_like_image(height: int, width: int, seed: int) -> torch.Tensor:
    """A smooth random image with edges, roughly CLIP-normalised: (3, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 5, 6, generator=gen)
    image = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    image[:, : height // 2] += 1.5  # a horizontal edge
    return image + 0.05 * torch.randn(3, height, width, generator=gen)


# ---------------------------------------------------------------------------------------------------------


def test_neighbour_offsets_match_reference_kernel_order() -> None:
    offsets = neighbour_offsets((8, 16))
    assert len(offsets) == 16
    assert offsets[:8] == [(-8, -8), (-8, 0), (-8, 8), (0, -8), (0, 8), (8, -8), (8, 0), (8, 8)]
    assert offsets[8:] == [(2 * dy, 2 * dx) for dy, dx in offsets[:8]]


@pytest.mark.parametrize(
    ("height", "width", "dilations"), [(40, 37, (8, 16)), (11, 13, (8, 16)), (9, 10, (1, 3))]
)
def test_pamr_matches_reference_structure(height: int, width: int, dilations: tuple[int, ...]) -> None:
    # (11, 13) is smaller than the largest dilation: every neighbour at d = 16 is a replicated border pixel.
    image = _clip_like_image(height, width, seed=height)
    logits = torch.randn(5, height, width, generator=torch.Generator().manual_seed(width))  # (Q, H, W)
    ref_out, ref_alpha = _reference_pamr(image[None], logits[None], 10, dilations)
    alpha = pamr_affinity(image, dilations)
    torch.testing.assert_close(alpha, ref_alpha, rtol=1e-5, atol=1e-6)
    out = pamr(image, logits, steps=10, dilations=dilations, chunk=2)  # chunks of 2, 2, 1 names
    torch.testing.assert_close(out, ref_out[0], rtol=1e-5, atol=1e-5)
    # The refinement actually changed something (the test is not comparing identities).
    assert (out - logits).abs().max() > 1e-2


def test_pamr_in_float64_matches_reference_tightly() -> None:
    image = _clip_like_image(24, 30, seed=7).double()
    logits = torch.randn(3, 24, 30, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ref_out, _ = _reference_pamr(image[None], logits[None], 4, (8, 16))
    out = pamr(image, logits, steps=4)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_out[0], rtol=1e-12, atol=1e-12)


def test_replicate_border_on_constant_image_by_hand() -> None:
    # Constant image -> uniform weights 1/8 for dilation 1; logits L[y, x] = 10 y + x.
    # Corner (0, 0) with replicate padding: neighbours L at (0,0) (0,0) (0,1) (0,0) (0,1) (1,0) (1,0) (1,1)
    # = 0 + 0 + 1 + 0 + 1 + 10 + 10 + 11 = 33 -> 33 / 8 (zero padding would give 23 / 8, and including the
    # centre would give 33 / 9).
    image = torch.full((3, 4, 5), 0.7)
    logits = (10 * torch.arange(4.0)[:, None] + torch.arange(5.0)[None, :])[None]  # (1, 4, 5)
    out = pamr(image, logits, steps=1, dilations=(1,))
    assert out[0, 0, 0].item() == pytest.approx(33 / 8)
    # An interior pixel of a linear function is unchanged by a symmetric uniform average.
    assert out[0, 2, 2].item() == pytest.approx(logits[0, 2, 2].item())
    # Bottom-right corner (3, 4): neighbours (2,3) (2,4) (2,4) (3,3) (3,4) (3,3) (3,4) (3,4).
    expected = (23 + 24 + 24 + 33 + 34 + 33 + 34 + 34) / 8
    assert out[0, 3, 4].item() == pytest.approx(expected)


def test_constant_image_gives_uniform_affinity() -> None:
    alpha = pamr_affinity(torch.full((3, 20, 21), -1.3))
    torch.testing.assert_close(alpha, torch.full((16, 20, 21), 1 / 16), rtol=0, atol=1e-7)


def test_affinity_is_a_distribution_that_avoids_edges() -> None:
    image = torch.zeros(3, 40, 40)
    image[:, 20:] = 2.0  # horizontal edge between rows 19 and 20
    alpha = pamr_affinity(image, (8, 16))  # (16, H, W)
    torch.testing.assert_close(alpha.sum(0), torch.ones(40, 40))
    offsets = neighbour_offsets((8, 16))
    # Pixel (17, 20): neighbours with dy > 0 cross the edge, those with dy <= 0 do not.
    crossing = torch.tensor([dy > 0 for dy, _ in offsets])
    assert alpha[crossing, 17, 20].max() < 1e-3 * alpha[~crossing, 17, 20].min()


def test_steps_zero_is_identity_and_input_untouched() -> None:
    image = _clip_like_image(12, 14, seed=3)
    logits = torch.randn(4, 12, 14, generator=torch.Generator().manual_seed(4))
    original = logits.clone()
    out = pamr(image, logits, steps=0)
    torch.testing.assert_close(out, logits, rtol=0, atol=0)
    assert out.data_ptr() != logits.data_ptr()
    pamr(image, logits, steps=3)
    assert torch.equal(logits, original)


def test_size_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="differs"):
        pamr(torch.zeros(3, 10, 12), torch.zeros(2, 5, 6))


def test_inplace_refinement_equals_the_copy_and_reuses_the_buffer() -> None:
    gen = torch.Generator().manual_seed(7)
    image = torch.randn(3, 23, 29, generator=gen)
    logits = torch.randn(5, 23, 29, generator=gen)
    expected = pamr(image, logits, steps=3, chunk=2)
    buffer = logits.clone()
    out = pamr(image, buffer, steps=3, chunk=2, inplace=True)
    assert out is buffer and torch.equal(out, expected) and not torch.equal(expected, logits)
    with pytest.raises(ValueError, match="fp32 or fp64"):
        pamr(image, logits.half(), steps=1, inplace=True)
