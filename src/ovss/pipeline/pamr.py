"""Pixel-adaptive mask refinement, PAMR (Araslanov & Roth, CVPR 2020), as used by SCLIP/NACLIP (spec §2.7).

The reference implementation builds the 8 neighbours per dilation with a convolution of one-hot 3x3
kernels over a replicate-padded input. Here each neighbour is a shifted view of one replicate-padded
tensor: the affinity costs (N, H, W) with N = 8 per dilation, and the logits are propagated in chunks of
names so the working memory stays at a few (chunk, H, W) buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def neighbour_offsets(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """The (dy, dx) offsets of the neighbourhood: for each dilation d, ``{-d, 0, d}^2 minus (0, 0)``.

    Row-major within a dilation, dilations in the given order (the reference kernel order).
    """
    if not dilations or any(d < 1 for d in dilations):
        raise ValueError(f"dilations must be positive integers, got {dilations}")
    return [
        (dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
    ]


def _shifted(
    padded: torch.Tensor, margin: int, offset: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """View of ``x(p + offset)`` for every p, from ``x`` replicate-padded by ``margin`` on each side.

    Args:
        padded: (K, H + 2 * margin, W + 2 * margin).
        margin: padding width, >= max(|dy|, |dx|).
        offset: (dy, dx) in pixels.
        size: (H, W).

    Returns:
        (K, H, W) view (no copy).
    """
    dy, dx = offset
    height, width = size
    return padded[:, margin + dy : margin + dy + height, margin + dx : margin + dx + width]


def pamr_affinity(image: torch.Tensor, dilations: tuple[int, ...] = (8, 16)) -> torch.Tensor:
    """PAMR neighbour weights ``alpha_n(x)`` from image differences scaled by the local spread.

    ``sigma_ch(x)`` is the unbiased std of channel ``ch`` over the centre and its 8 neighbours for every
    dilation (the centre counted once per dilation: 18 values for two dilations);
    ``a_n(x) = mean_ch -|I_ch(x) - I_ch(x + n)| / (1e-8 + 0.1 sigma_ch(x))``; ``alpha = softmax_n a``.
    Out-of-image neighbours use replicate padding.

    Args:
        image: (3, H, W) float image (CLIP-normalised RGB in ovss; any channel count works).
        dilations: neighbourhood dilations in pixels.

    Returns:
        (N, H, W) weights in [0, 1] summing to 1 over the N = 8 * len(dilations) neighbours, ordered as
        :func:`neighbour_offsets`; dtype ``promote_types(image dtype, float32)``.
    """
    if image.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got {tuple(image.shape)}")
    offsets = neighbour_offsets(dilations)
    margin = max(dilations)
    size = (image.shape[1], image.shape[2])
    dtype = torch.promote_types(image.dtype, torch.float32)
    img = image.to(dtype)  # (3, H, W)
    padded = F.pad(img[None], [margin] * 4, mode="replicate")[0]  # (3, H + 2m, W + 2m)

    # Local std over the 9 positions of each dilation (centre included once per dilation), two-pass.
    samples = [(0, 0)] * len(dilations) + offsets  # 9 * len(dilations) positions
    mean = torch.zeros_like(img)  # (3, H, W)
    for offset in samples:
        mean += _shifted(padded, margin, offset, size)
    mean /= len(samples)
    var = torch.zeros_like(img)  # (3, H, W)
    for offset in samples:
        var += (_shifted(padded, margin, offset, size) - mean).square()
    var /= len(samples) - 1
    inv_scale = (1e-8 + 0.1 * var.sqrt()).reciprocal_()  # (3, H, W)
    del mean, var

    affinity = torch.empty(len(offsets), *size, dtype=dtype, device=img.device)  # (N, H, W)
    for n, offset in enumerate(offsets):
        diff = (img - _shifted(padded, margin, offset, size)).abs_()  # (3, H, W)
        affinity[n] = -(diff * inv_scale).mean(dim=0)  # (H, W)
    return torch.softmax(affinity, dim=0)  # (N, H, W)


def pamr(
    image: torch.Tensor,
    logits: torch.Tensor,
    steps: int = 10,
    dilations: tuple[int, ...] = (8, 16),
    *,
    chunk: int = 16,
    inplace: bool = False,
) -> torch.Tensor:
    """Refine logits by ``steps`` rounds of image-adaptive averaging over the dilated neighbourhood.

    Every round replaces ``logits_j(x)`` by ``sum_n alpha_n(x) * logits_j(x + n)`` (the centre pixel is
    not in the sum; replicate padding at the borders), with ``alpha`` from :func:`pamr_affinity`.
    The reference first resizes the logits to the image size with ``align_corners=True``; in ovss both
    are already at the original resolution, so sizes must match.

    Args:
        image: (3, H, W) CLIP-normalised RGB image at the logits' resolution.
        logits: (Q, H, W) logits (before the softmax); not modified unless ``inplace``.
        steps: number of refinement rounds K >= 0 (0 returns a copy of the logits).
        dilations: neighbourhood dilations in pixels (spec: 8 and 16).
        chunk: names refined together (bounds memory to a few (chunk, H, W) buffers).
        inplace: refine ``logits`` itself (fp32/fp64 only) instead of a copy, so the only (Q, H, W)
            buffer is the caller's.

    Returns:
        (Q, H, W) refined logits, dtype ``promote_types(logits dtype, float32)``, on the logits' device
        (``logits`` itself when ``inplace``).

    Raises:
        ValueError: if image and logits differ in spatial size or have the wrong rank.
    """
    if image.dim() != 3 or logits.dim() != 3:
        raise ValueError(
            f"expected image (3, H, W) and logits (Q, H, W), got {tuple(image.shape)}, {tuple(logits.shape)}"
        )
    if image.shape[1:] != logits.shape[1:]:
        raise ValueError(
            f"image size {tuple(image.shape[1:])} differs from logits size "
            f"{tuple(logits.shape[1:])}; resize the logits to the image first"
        )
    if steps < 0 or chunk < 1:
        raise ValueError(f"steps must be >= 0 and chunk >= 1, got steps={steps}, chunk={chunk}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if inplace and logits.dtype != dtype:
        raise ValueError(f"in-place PAMR needs fp32 or fp64 logits, got {logits.dtype}")
    out = logits if inplace else logits.to(dtype, copy=True)  # (Q, H, W)
    if steps == 0:
        return out
    offsets = neighbour_offsets(dilations)
    margin = max(dilations)
    size = (logits.shape[1], logits.shape[2])
    alpha = pamr_affinity(image.to(logits.device), dilations).to(dtype)  # (N, H, W)

    for start in range(0, out.shape[0], chunk):
        block = out[start : start + chunk]  # (q, H, W) view into the output
        for _ in range(steps):
            padded = F.pad(block[None], [margin] * 4, mode="replicate")[0]  # (q, H + 2m, W + 2m)
            block.zero_()
            for n, offset in enumerate(offsets):
                block.addcmul_(_shifted(padded, margin, offset, size), alpha[n][None])  # (q, H, W)
    return out
