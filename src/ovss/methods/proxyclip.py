"""ProxyCLIP (spec §4.7): CLIP's last-block values attended with the normalised self-similarity of a VFM.

Per window: DINO's last-block tokens after its final norm give ``F`` (N, D_v) on the VFM grid; the
attention is the masked softmax of ``gamma * (S - beta * mean(S))`` with ``S`` the cosine similarity of
``F``; CLIP's last-block values, bilinearly resized from the CLIP grid to the VFM grid, are attended and
passed through OutProj. No residual, no FFN; the logits live on the VFM grid.

:func:`vfm_features`, :func:`clip_values_on_grid` and :func:`masked_softmax` are shared with GLA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ovss.errors import OvssError
from ovss.methods.common import Backbones, MethodOutput, WindowBatch, attend, tokens_before_last_block
from ovss.methods.options import ProxyCLIPOptions
from ovss.models.normalization import InputNorm
from ovss.models.vit import VisionTransformer
from ovss.pipeline.image import imagenet_from_clip
from ovss.precision import full_precision
from ovss.tuning import DEFAULT_TUNING


def vfm_features(
    vfm: VisionTransformer,
    pixels: torch.Tensor,
    clip: VisionTransformer | None = None,
    *,
    block_tokens: int = DEFAULT_TUNING.block_tokens,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """The VFM's last-block tokens after its final norm, [CLS] and registers dropped (spec §4.7 steps 1-2).

    Args:
        vfm: DINO-family ViT (``ln_post`` is DINO's final ``norm``).
        pixels: (L, 3, h, w) CLIP-normalised, padded windows (``WindowBatch.pixels``); they are
            re-normalised with ImageNet statistics here, padding included (as the release does).
        clip: the CLIP tower whose ``input_norm`` normalised ``pixels`` (None: OpenAI's statistics).
        block_tokens: tokens per pass through the blocks (:attr:`ovss.tuning.Tuning.block_tokens`).

    Returns:
        F (L, hr * hc, D_v) un-normalised features in the VFM's dtype, row-major, and the VFM grid (hr, hc).

    Raises:
        OvssError: a window side is not a multiple of the VFM patch.
    """
    p = vfm.cfg.patch
    h, w = pixels.shape[-2:]
    if h % p or w % p:
        raise OvssError(
            f"padded window {h}x{w} is not a multiple of the VFM patch {p}; pad the windows to a multiple of "
            f"{p} (Segmenter does: window_pad_multiple)"
        )
    norm = clip.input_norm if clip is not None else InputNorm()  # unrounded 0-1 statistics (spec §4.7 step 1)
    x, grid = vfm.embed(imagenet_from_clip(pixels, norm.mean, norm.std))  # (L, 1 + R + hr*hc, D_v)
    x = vfm.ln_post(vfm.forward_blocks(x, grid=grid, block_tokens=block_tokens))  # (L, 1 + R + hr*hc, D_v); grid: RoPE
    return x[:, vfm.num_prefix_tokens :], grid  # (L, hr*hc, D_v)


def window_pad_multiple(multiple: int, vfm: VisionTransformer | None) -> int:
    """The multiple a DINO-guided method pads its windows to: its own, unless the VFM's patch does not divide it.

    ProxyCLIP's 56 (spec §2.3) is the lcm of DINO-B/8's and DINOv2's patches; a VFM whose patch does not
    divide it (DINOv3 and DINO ViT-B/16: 16) pads to its patch instead (spec §4.7.1), which leaves full
    224 / 336 / 448 windows unpadded as before. A method that does not pad (``multiple`` 1: CASS, whose
    DINO sees the window resized to a square, spec §2.3) is never padded, whatever its VFM.

    Args:
        multiple: the method's ``pad_multiple``.
        vfm: the method's VFM; None for methods without one (the multiple is returned unchanged).
    """
    if vfm is None or multiple == 1 or multiple % vfm.cfg.patch == 0:
        return multiple
    return vfm.cfg.patch


def clip_values_on_grid(
    clip: VisionTransformer,
    pixels: torch.Tensor,
    grid: tuple[int, int],
    *,
    block_tokens: int = DEFAULT_TUNING.block_tokens,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's last-block values of the patches, per head, bilinearly resized to ``grid`` (spec §4.7 step 5).

    Args:
        clip: the CLIP image tower.
        pixels: (L, 3, h, w) CLIP-normalised windows.
        grid: target token grid (hr, hc), usually the VFM grid of :func:`vfm_features`.
        block_tokens: tokens per pass through the blocks (:attr:`ovss.tuning.Tuning.block_tokens`).

    Returns:
        v (L, H, hr * hc, d) values from ``ln_1(x11)`` with [CLS] dropped, resized with
        ``align_corners=False`` (computed in fp32, returned in CLIP's dtype; not resampled when ``grid``
        is the CLIP grid), and x11 (L, 1 + gr * gc, D),
        the input of the last block.
    """
    x, clip_grid = tokens_before_last_block(clip, pixels, block_tokens=block_tokens)  # (L, 1 + gr*gc, D)
    block = clip.blocks[-1]
    v = block.attn.values(block.ln_1(x))  # (L, H, 1 + gr*gc, d): q and k are not used
    return resize_values(v[:, :, clip.num_prefix_tokens :], clip_grid, grid).to(x.dtype), x


def resize_values(v: torch.Tensor, clip_grid: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Per-head values bilinearly resized (``align_corners=False``) in fp32: (L, H, gr*gc, d) -> (L, H, hr*hc, d).

    Equal grids return ``v`` itself (no resampling, dtype kept).
    """
    L, H, _, d = v.shape
    (gr, gc), (hr, hc) = clip_grid, grid
    if (hr, hc) == (gr, gc):  # a /16 VFM (DINOv3) on a /16 CLIP: the values are used as they are
        return v  # (L, H, gr*gc, d)
    v_map = v.reshape(L, H, gr, gc, d).permute(0, 1, 4, 2, 3).reshape(L, H * d, gr, gc)  # (L, H*d, gr, gc)
    v_map = F.interpolate(v_map.float(), size=(hr, hc), mode="bilinear", align_corners=False)  # (L, H*d, hr, hc)
    return v_map.reshape(L, H, d, hr * hc).transpose(-2, -1)  # (L, H, hr*hc, d) fp32


def masked_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis of the entries that are >= min(row max, 0) (spec §4.7 step 4, §4.8.5).

    Negative logits are masked to -inf; a row with no non-negative entry keeps only its maximum (ties
    share the weight).

    Args:
        logits: (..., N) attention logits.

    Returns:
        (..., N) fp32 row-stochastic weights, exactly 0 on masked entries.
    """
    a = logits.float()  # (..., N)
    theta = a.amax(dim=-1, keepdim=True).clamp(max=0.0)  # (..., 1)
    return a.masked_fill(a < theta, -math.inf).softmax(dim=-1)  # (..., N)


def proxy_attention(features: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """ProxyCLIP's attention of every window from its VFM features (spec §4.7 steps 3-4), in fp32.

    Args:
        features: (L, N, D_v) VFM features of L windows (not normalised).
        beta: shift of the scalar window mean.
        gamma: scale (> 0).

    Returns:
        (L, N, N) masked softmax of ``gamma * (S - beta * mean(S))``, ``S`` = cosine similarity, the mean a
        scalar over each window's N x N matrix.
    """
    with full_precision():
        f = F.normalize(features.float(), dim=-1)  # (L, N, D_v)
        s = f @ f.transpose(-2, -1)  # (L, N, N) cosine similarity
        s_mean = s.mean(dim=(-2, -1), keepdim=True)  # (L, 1, 1)
        return masked_softmax(gamma * (s - beta * s_mean))  # (L, N, N)


def run_proxyclip(backbones: Backbones, batch: WindowBatch, opts: ProxyCLIPOptions) -> MethodOutput:
    if backbones.vfm is None:
        raise OvssError("proxyclip needs a vision foundation model; load it with vfm='dino-vitb8' (or --vfm NAME)")
    if not opts.gamma > 0:
        raise OvssError(f"proxyclip gamma must be > 0, got {opts.gamma}")
    clip, block_tokens = backbones.clip, backbones.tuning.block_tokens
    features, grid = vfm_features(backbones.vfm, batch.pixels, clip, block_tokens=block_tokens)  # (L, N, D_v)
    v, _ = clip_values_on_grid(clip, batch.pixels, grid, block_tokens=block_tokens)  # (L, H, N, d)
    block = clip.blocks[-1]
    # One window at a time: the (N, N) attention of a 336-px window on a /8 grid is 12 MB in fp32.
    z = torch.cat(
        [
            attend(block, proxy_attention(features[b : b + 1], opts.beta, opts.gamma)[:, None], v[b : b + 1])
            for b in range(features.shape[0])
        ]
    )  # (L, N, D)
    clip_grid = clip.grid_size(*batch.pixels.shape[-2:])
    return MethodOutput(z, grid, {"clip_grid": clip_grid})
