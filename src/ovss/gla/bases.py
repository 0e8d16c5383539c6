"""What each base method contributes to GLA (spec §4.9): key features, values, residual/FFN, extra terms.

An adapter turns all windows of one image into :class:`CrossWindowParts`; :mod:`ovss.gla.method` then
replaces the base's per-window attention by the cross-window attention of §4.8 built from those parts.
The adapters reuse the bases' own functions, so no method code is copied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ovss.errors import OvssError
from ovss.methods.common import Backbones, WindowBatch, residual_ffn, tokens_before_last_block
from ovss.models.vit import VisionTransformer


@dataclass
class CrossWindowParts:
    """Per-window ingredients of GLA for one image (L windows, N tokens each on the base's grid)."""

    key_sets: list[torch.Tensor]  # each (L, N, D) raw key features; one attention map per set (SCLIP: q and k)
    values: torch.Tensor  # (L, H, N, d) values per head
    grid: tuple[int, int]  # (gr, gc) token grid of every window
    patch: int  # processing pixels per token on that grid (CLIP 16, DINO-B/8 8): token positions
    clip_internal: bool  # keys are CLIP-internal features (smoothing `auto` -> Eq. 17) rather than DINO tokens
    merge_heads: Callable[[torch.Tensor], torch.Tensor]  # (L, H, N, d) -> (L, N, D): concat heads + OutProj
    finish: Callable[[torch.Tensor], torch.Tensor]  # (L, N, D) OutProj output -> tokens for the dense head
    prior_sigma_px: float | None = None  # NACLIP + GLA: sigma of the image-space Gaussian prior, in pixels
    prior_weight: float = 1.0  # kappa, the weight of that prior
    local_maps: torch.Tensor | None = None  # (L, N, N) GCLIP + GLA: summed within-window AMF maps (rows sum l+1)
    local_count: int = 0  # number of maps summed in local_maps (l + 1); the fusion divides by local_count + 1
    info: dict[str, Any] = field(default_factory=dict)  # the base's per-image diagnostics
    window_info: dict[str, list[Any]] = field(default_factory=dict)  # the base's per-window diagnostics


def _identity(a: torch.Tensor) -> torch.Tensor:
    return a


def _clip_qkv(
    clip: VisionTransformer, pixels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """x11 (L, n, D) and the last block's q, k, v (L, H, n, d)."""
    x, grid = tokens_before_last_block(clip, pixels)  # (L, n, D)
    block = clip.blocks[-1]
    q, k, v = block.attn.qkv(block.ln_1(x))  # (L, H, n, d) each
    return x, q, k, v, grid


def heads_concat(t: torch.Tensor, prefix: int) -> torch.Tensor:
    """Patch tokens with heads concatenated: (L, H, n, d) -> (L, N, H * d), [CLS]/registers dropped."""
    t = t[:, :, prefix:]  # (L, H, N, d)
    L, H, N, d = t.shape
    return t.transpose(1, 2).reshape(L, N, H * d)  # (L, N, D)


def proxyclip_parts(backbones: Backbones, batch: WindowBatch, opts: Any) -> CrossWindowParts:
    """ProxyCLIP base: DINO last-layer normed tokens as keys, CLIP values up-sampled to the DINO grid."""
    from ovss.methods.proxyclip import clip_values_on_grid, vfm_features

    if backbones.vfm is None:
        raise OvssError("proxyclip+gla needs a vision foundation model; load it with vfm='dino-vitb8'")
    features, grid = vfm_features(backbones.vfm, batch.pixels, backbones.clip)  # (L, N, D_v)
    v, _ = clip_values_on_grid(backbones.clip, batch.pixels, grid)  # (L, H, N, d)
    block = backbones.clip.blocks[-1]
    return CrossWindowParts([features], v, grid, backbones.vfm.cfg.patch, False, block.attn.merge_heads, _identity)


def clearclip_parts(backbones: Backbones, batch: WindowBatch, opts: Any) -> CrossWindowParts:
    """ClearCLIP base: last-block queries (heads concatenated) as keys, CLIP values, no residual/FFN."""
    if getattr(opts, "last_n_layers", 1) != 1:
        raise OvssError("clearclip+gla supports last_n_layers = 1 only (GLA replaces the last block)")
    clip = backbones.clip
    _, q, _, v, grid = _clip_qkv(clip, batch.pixels)
    p = clip.num_prefix_tokens
    block = clip.blocks[-1]
    return CrossWindowParts(
        [heads_concat(q, p)], v[:, :, p:], grid, clip.cfg.patch, True, block.attn.merge_heads, _identity
    )


def sclip_parts(backbones: Backbones, batch: WindowBatch, opts: Any) -> CrossWindowParts:
    """SCLIP base [ovss construction]: two maps with keys q and k, summed; SCLIP's residual and FFN kept."""
    clip = backbones.clip
    x, q, k, v, grid = _clip_qkv(clip, batch.pixels)
    p = clip.num_prefix_tokens
    block = clip.blocks[-1]
    x_patches = x[:, p:]  # (L, N, D) each token's own window input for the residual

    def finish(a: torch.Tensor) -> torch.Tensor:
        return a if opts.reduced else residual_ffn(block, x_patches, a)  # (L, N, D)

    keys = [heads_concat(q, p), heads_concat(k, p)]
    return CrossWindowParts(keys, v[:, :, p:], grid, clip.cfg.patch, True, block.attn.merge_heads, finish)


def naclip_parts(backbones: Backbones, batch: WindowBatch, opts: Any) -> CrossWindowParts:
    """NACLIP base [ovss design]: keys k plus an image-space Gaussian prior of sigma * p pixels."""
    if opts.attn != "naclip":
        raise OvssError("naclip+gla uses NACLIP's k-k attention with its prior; attn must be 'naclip'")
    clip = backbones.clip
    x, _, k, v, grid = _clip_qkv(clip, batch.pixels)
    p = clip.num_prefix_tokens
    block = clip.blocks[-1]
    x_patches = x[:, p:]  # (L, N, D)

    def finish(a: torch.Tensor) -> torch.Tensor:
        return a if opts.arch == "reduced" else residual_ffn(block, x_patches, a)  # (L, N, D)

    sigma_px = float(opts.sigma) * clip.cfg.patch
    return CrossWindowParts(
        [heads_concat(k, p)],
        v[:, :, p:],
        grid,
        clip.cfg.patch,
        True,
        block.attn.merge_heads,
        finish,
        prior_sigma_px=sigma_px,
    )


def gclip_parts(backbones: Backbones, batch: WindowBatch, opts: Any) -> CrossWindowParts:
    """GCLIP base [ovss design]: clean-stream q as keys, values from the channel-suppressed stream, and the
    within-window AMF maps (patches only, renormalised) fused with the cross-window map: (sum AMF + alpha) / (l + 2).
    """
    from ovss.methods.gclip import gclip_streams

    if opts.fuse_heads == "per_head":
        raise OvssError("gclip+gla shares one attention map across heads; use fuse_heads='mixed' or 'averaged'")
    clip = backbones.clip
    st = gclip_streams(backbones, batch, opts, patch_maps=True)
    last = clip.blocks[-1]
    q, _, v = last.attn.qkv(last.ln_1(st.x))  # (L, H, n, d) clean stream
    if st.xs is not None:
        _, _, v = last.attn.qkv(last.ln_1(st.xs))  # (L, H, n, d) values from the suppressed stream
    p = clip.num_prefix_tokens
    local = None if st.early is None else st.early[:, 0]  # (L, N, N) rows sum to l + 1
    count = 0 if st.early is None else opts.fuse_layers + 1
    return CrossWindowParts(
        [heads_concat(q, p)],
        v[:, :, p:],
        st.grid,
        clip.cfg.patch,
        True,
        last.attn.merge_heads,
        _identity,
        local_maps=local,
        local_count=count,
        info={"gclip": st.info},
        window_info=st.window_info,
    )


ADAPTERS: dict[str, Callable[[Backbones, WindowBatch, Any], CrossWindowParts]] = {
    "proxyclip": proxyclip_parts,
    "clearclip": clearclip_parts,
    "sclip": sclip_parts,
    "naclip": naclip_parts,
    "gclip": gclip_parts,
}
