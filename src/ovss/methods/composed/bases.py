"""What each base method contributes to GLA (spec §4.9): key features, values, residual/FFN, extra terms.

An adapter turns all windows of one image into :class:`CrossWindowParts`; :mod:`ovss.methods.composed.method` then
replaces the base's per-window attention by the one cross-window operator of :mod:`ovss.gla.cross_window`
built from those parts. Each base's difference stays in its own short function here: ProxyCLIP and ClearCLIP
give one key set, SCLIP two, NACLIP adds an image-space prior, GCLIP its own-window AMF maps. The adapters
reuse the bases' own functions, so no method code is copied.

Every adapter has one signature, ``(backbones, batch, options) -> CrossWindowParts``, with the method's
:class:`~ovss.methods.options.ComposedOptions` (``options.base``: the base's options, ``options.extra``: a
variant's own part), and sits in :data:`ADAPTERS` under the composed method's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ovss.errors import OvssError
from ovss.gla.cross_window import PriorFn
from ovss.methods.common import Backbones, WindowBatch, residual_ffn, tokens_before_last_block
from ovss.methods.options import ComposedOptions, NACLIPOptions
from ovss.methods.scclip.method import aggregate, clip_block_outputs, kk_attention, scale_blocks, scclip_streams
from ovss.models.vit import VisionTransformer
from ovss.precision import full_precision
from ovss.tuning import DEFAULT_TUNING


@dataclass
class CrossWindowParts:
    """Per-window ingredients of GLA for one image (L windows, N tokens each on the base's grid)."""

    key_sets: list[torch.Tensor]  # each (L, N, D) raw key features; one attention map per set (SCLIP: q and k)
    values: torch.Tensor  # (L, N, C) values, heads concatenated (C = H * d)
    grid: tuple[int, int]  # (gr, gc) token grid of every window
    patch: int  # processing pixels per token on that grid (CLIP 16, DINO-B/8 8): token positions
    clip_internal: bool  # keys are CLIP-internal features (smoothing `auto` -> Eq. 17) rather than DINO tokens
    out_proj: Callable[..., torch.Tensor]  # (L, N, C) heads concatenated [, extra outputs] -> (L, N, D): OutProj
    finish: Callable[[torch.Tensor], torch.Tensor]  # (L, N, D) OutProj output -> tokens for the dense head
    prior: PriorFn | None = None  # rows (R,) -> (R, M) additive logits (NACLIP + GLA: image-space Gaussian)
    local_maps: torch.Tensor | None = None  # (L, N, N) GCLIP + GLA: summed within-window AMF maps (rows sum l+1)
    local_count: int = 0  # number of maps summed in local_maps (l + 1); the fusion divides by local_count + 1
    info: dict[str, Any] = field(default_factory=dict)  # the base's per-image diagnostics
    window_info: dict[str, list[Any]] = field(default_factory=dict)  # the base's per-window diagnostics
    # More operator calls, one key set each: (keys (L, N, D_s), values (L, N, C_s)); their outputs (L, N, C_s)
    # follow the main one as arguments of out_proj (SC-CLIP + GLA: the k-k maps of its two passes).
    extra_sets: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # the base's MethodOutput.extras (CASS: global)


NACLIP_PRIOR_WEIGHT = 1.0  # kappa, the weight of NACLIP + GLA's image-space prior (spec §4.9)


def _identity(a: torch.Tensor) -> torch.Tensor:
    return a


def _clip_qkv(
    clip: VisionTransformer, pixels: torch.Tensor, *, block_tokens: int = DEFAULT_TUNING.block_tokens
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """x11 (L, n, D) and the last block's q, k, v (L, H, n, d)."""
    x, grid = tokens_before_last_block(clip, pixels, block_tokens=block_tokens)  # (L, n, D)
    block = clip.blocks[-1]
    q, k, v = block.attn.qkv(block.ln_1(x))  # (L, H, n, d) each
    return x, q, k, v, grid


def heads_concat(t: torch.Tensor, prefix: int) -> torch.Tensor:
    """Patch tokens with heads concatenated: (L, H, n, d) -> (L, N, H * d), [CLS]/registers dropped."""
    t = t[:, :, prefix:]  # (L, H, N, d)
    L, H, N, d = t.shape
    return t.transpose(1, 2).reshape(L, N, H * d)  # (L, N, D)


def proxyclip_parts(backbones: Backbones, batch: WindowBatch, opts: ComposedOptions) -> CrossWindowParts:
    """ProxyCLIP base: DINO last-layer normed tokens as keys, CLIP values up-sampled to the DINO grid."""
    from ovss.methods.proxyclip import clip_values_on_grid, vfm_features

    if backbones.vfm is None:
        raise OvssError("proxyclip+gla needs a vision foundation model; load it with vfm='dino-vitb8'")
    block_tokens = backbones.tuning.block_tokens
    features, grid = vfm_features(backbones.vfm, batch.pixels, backbones.clip, block_tokens=block_tokens)  # (L, N, D_v)
    v, _ = clip_values_on_grid(backbones.clip, batch.pixels, grid, block_tokens=block_tokens)  # (L, H, N, d)
    block = backbones.clip.blocks[-1]
    values = heads_concat(v, 0)  # (L, N, C)
    return CrossWindowParts([features], values, grid, backbones.vfm.cfg.patch, False, block.attn.out_proj, _identity)


def clearclip_parts(backbones: Backbones, batch: WindowBatch, opts: ComposedOptions) -> CrossWindowParts:
    """ClearCLIP base: last-block queries (heads concatenated) as keys, CLIP values, no residual/FFN."""
    if opts.base.last_n_layers != 1:
        raise OvssError("clearclip+gla supports last_n_layers = 1 only (GLA replaces the last block)")
    clip = backbones.clip
    _, q, _, v, grid = _clip_qkv(clip, batch.pixels, block_tokens=backbones.tuning.block_tokens)
    p = clip.num_prefix_tokens
    block = clip.blocks[-1]
    return CrossWindowParts(
        [heads_concat(q, p)], heads_concat(v, p), grid, clip.cfg.patch, True, block.attn.out_proj, _identity
    )


def sclip_parts(backbones: Backbones, batch: WindowBatch, opts: ComposedOptions) -> CrossWindowParts:
    """SCLIP base [ovss construction]: two maps with keys q and k, summed; SCLIP's residual and FFN kept."""
    clip = backbones.clip
    x, q, k, v, grid = _clip_qkv(clip, batch.pixels, block_tokens=backbones.tuning.block_tokens)
    p = clip.num_prefix_tokens
    block = clip.blocks[-1]
    x_patches = x[:, p:]  # (L, N, D) each token's own window input for the residual

    def finish(a: torch.Tensor) -> torch.Tensor:
        return a if opts.base.reduced else residual_ffn(block, x_patches, a)  # (L, N, D)

    keys = [heads_concat(q, p), heads_concat(k, p)]
    return CrossWindowParts(keys, heads_concat(v, p), grid, clip.cfg.patch, True, block.attn.out_proj, finish)


def token_origins(batch: WindowBatch, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Top-left processing pixel (y, x) of every token, window-major: (M, 2) float32.

    Padding shifts a window's grid up/left by the padding, so token (0, 0) of window b sits at
    (y1 - top, x1 - left).
    """
    pad = batch.padding
    rows, cols = grid
    r = torch.arange(rows, dtype=torch.float32) * patch  # (rows,)
    c = torch.arange(cols, dtype=torch.float32) * patch  # (cols,)
    yy, xx = torch.meshgrid(r, c, indexing="ij")  # (rows, cols)
    per_window = [
        torch.stack([(yy + w.y1 - pad.top).flatten(), (xx + w.x1 - pad.left).flatten()], dim=1) for w in batch.windows
    ]
    return torch.cat(per_window)  # (M, 2)


def gaussian_prior_rows(origins: torch.Tensor, sigma_px: float, weight: float) -> PriorFn:
    """NACLIP + GLA's image-space prior: rows -> kappa * exp(-|c_i - c_j|^2 / (2 sigma^2)), (R, M).

    Args:
        origins: (M, 2) token positions in processing pixels (`token_origins`; top-left and centre differ
            by the same half patch for every token, so the distances are the same).
        sigma_px: sigma in pixels (NACLIP: sigma * patch).
        weight: kappa.
    """

    def prior(rows: torch.Tensor) -> torch.Tensor:
        o = origins.to(rows.device)  # (M, 2)
        dy = o[rows, 0:1] - o[None, :, 0]  # (R, M)
        dx = o[rows, 1:2] - o[None, :, 1]  # (R, M)
        return weight * torch.exp(-(dy * dy + dx * dx) / (2.0 * sigma_px**2))  # (R, M)

    return prior


def naclip_parts(backbones: Backbones, batch: WindowBatch, opts: ComposedOptions) -> CrossWindowParts:
    """NACLIP base [ovss design]: keys k plus an image-space Gaussian prior of sigma * p pixels."""
    nac = opts.base
    if nac.attn != "naclip":
        raise OvssError("naclip+gla uses NACLIP's k-k attention with its prior; attn must be 'naclip'")
    clip = backbones.clip
    x, _, k, v, grid = _clip_qkv(clip, batch.pixels, block_tokens=backbones.tuning.block_tokens)
    p = clip.num_prefix_tokens
    block = clip.blocks[-1]
    x_patches = x[:, p:]  # (L, N, D)

    def finish(a: torch.Tensor) -> torch.Tensor:
        return a if nac.arch == "reduced" else residual_ffn(block, x_patches, a)  # (L, N, D)

    sigma_px = float(nac.sigma) * clip.cfg.patch  # sigma * p pixels
    prior = gaussian_prior_rows(token_origins(batch, grid, clip.cfg.patch), sigma_px, NACLIP_PRIOR_WEIGHT)
    return CrossWindowParts(
        [heads_concat(k, p)], heads_concat(v, p), grid, clip.cfg.patch, True, block.attn.out_proj, finish, prior
    )


def gclip_parts(backbones: Backbones, batch: WindowBatch, opts: ComposedOptions) -> CrossWindowParts:
    """GCLIP base [ovss design]: clean-stream q as keys, values from the channel-suppressed stream, and the
    within-window AMF maps (patches only, renormalised) fused with the cross-window map: (sum AMF + alpha) / (l + 2).
    """
    from ovss.methods.gclip.method import gclip_streams

    gc = opts.base
    if gc.fuse_heads == "per_head":
        raise OvssError("gclip+gla shares one attention map across heads; use fuse_heads='mixed' or 'averaged'")
    clip = backbones.clip
    st = gclip_streams(backbones, batch, gc, patch_maps=True)
    last = clip.blocks[-1]
    q, _, v = last.attn.qkv(last.ln_1(st.x))  # (L, H, n, d) clean stream
    if st.xs is not None:
        _, _, v = last.attn.qkv(last.ln_1(st.xs))  # (L, H, n, d) values from the suppressed stream
    p = clip.num_prefix_tokens
    local = None if st.early is None else st.early[:, 0]  # (L, N, N) rows sum to l + 1
    count = 0 if st.early is None else gc.fuse_layers + 1
    return CrossWindowParts(
        [heads_concat(q, p)],
        heads_concat(v, p),
        st.grid,
        clip.cfg.patch,
        True,
        last.attn.out_proj,
        _identity,
        local_maps=local,
        local_count=count,
        info={"gclip": st.info},
        window_info=st.window_info,
    )


def trident_parts(backbones: Backbones, batch: WindowBatch, opts: ComposedOptions) -> CrossWindowParts:
    """Trident base (spec §4.12.6): DINO ViT-B/16 keys of all sub-images, CLIP values on the same grid."""
    from ovss.methods.trident.method import check_patch

    check_patch(backbones, "trident+gla")
    return proxyclip_parts(backbones, batch, opts)  # grids agree (patch 16): the values are not resampled


def cass_parts(backbones: Backbones, batch: WindowBatch, opts: ComposedOptions) -> CrossWindowParts:
    """CASS base [ovss design, GLA App. I]: GLA-CLIP's attention (DINO keys, CLIP values on the DINO grid, as
    ProxyCLIP + GLA), or with ``cross_window_keys = naclip`` NACLIP + GLA's (CLIP k + image-space prior);
    CASS adds the global image embeddings its predict-time text adjustment and logit blend need (``extras``).
    """
    from ovss.methods.cass.method import check_vfm, global_embeddings
    from ovss.methods.proxyclip import clip_values_on_grid, vfm_features

    cass, clip, block_tokens = opts.base, backbones.clip, backbones.tuning.block_tokens
    x: torch.Tensor | None = None  # input of the last block, when computed here
    if cass.cross_window_keys == "naclip":
        parts = naclip_parts(backbones, batch, ComposedOptions(NACLIPOptions(sigma=cass.sigma), opts.gla))
    else:
        vfm = check_vfm(clip, backbones.vfm, "cass+gla")
        features, grid = vfm_features(vfm, batch.pixels, clip, block_tokens=block_tokens)  # (L, N, D_v)
        v, x = clip_values_on_grid(clip, batch.pixels, grid, block_tokens=block_tokens)  # (L, H, N, d), (L, n, D)
        block = clip.blocks[-1]
        values = heads_concat(v, 0)  # (L, N, C)
        parts = CrossWindowParts([features], values, grid, vfm.cfg.patch, False, block.attn.out_proj, _identity)
    parts.extras = {"global": global_embeddings(clip, batch, cass.global_embedding, x, block_tokens=block_tokens)}
    return parts


def proxyclip_mlf_parts(backbones: Backbones, batch: WindowBatch, opts: ComposedOptions) -> CrossWindowParts:
    """ProxyCLIP + multi-layer fusion [ovss construction, spec §4.11.4]: the GLA map of the DINO keys applied
    to two value streams in one operator call (channels concatenated), then one OutProj each, summed:
    ``OutProj(alpha V) + OutProj(alpha V')`` with V' from ``ln_1`` of the sum of the fused blocks' outputs.
    ``mlf_res_cls`` adds ``res_cls (c11 + m_c)`` of the token's window. No fused blocks: ``proxyclip+gla``.

    Args:
        opts: composed options whose ``extra`` is :class:`~ovss.methods.options.MLFOptions` (blocks, res_cls,
            scale_blocks).
    """
    from ovss.methods.proxyclip import resize_values, vfm_features

    if backbones.vfm is None:
        raise OvssError("proxyclip+gla+mlf needs a vision foundation model; load it with vfm='dino-vitb8'")
    mlf, clip = opts.extra, backbones.clip
    fuse = scale_blocks(mlf.blocks, len(clip.blocks), mlf.scale_blocks, "mlf_blocks entry")
    features, grid = vfm_features(backbones.vfm, batch.pixels, clip, block_tokens=backbones.tuning.block_tokens)
    out = clip_block_outputs(clip, batch.pixels, (), fuse)  # x11 (L, n, D), fused sum (L, n, D)
    block, p = clip.blocks[-1], clip.num_prefix_tokens
    dtype = out.last_in.dtype

    def values_of(x: torch.Tensor) -> torch.Tensor:
        _, _, v = block.attn.qkv(block.ln_1(x))  # (L, H, n, d)
        return heads_concat(resize_values(v[:, :, p:], out.grid, grid).to(dtype), 0)  # (L, N, C) on the VFM grid

    values = values_of(out.last_in)  # (L, N, C)
    channels = values.shape[-1]
    out_proj: Callable[..., torch.Tensor] = block.attn.out_proj
    cls = out.last_in[:, :1]  # (L, 1, D) c11
    if out.fused is not None:
        values = torch.cat([values, values_of(out.fused)], dim=-1)  # (L, N, 2C): [V | V']

        def out_proj(y: torch.Tensor) -> torch.Tensor:  # b_o counted twice, as SC-CLIP adds two OutProj outputs
            return block.attn.out_proj(y[..., :channels]) + block.attn.out_proj(y[..., channels:])  # (L, N, D)

        cls = cls + out.fused[:, :1]  # (L, 1, D) c11 + m_c

    def finish(a: torch.Tensor) -> torch.Tensor:
        return a + mlf.res_cls * cls if mlf.res_cls else a  # (L, N, D)

    info = {"mlf_blocks": list(fuse)}
    return CrossWindowParts([features], values, grid, backbones.vfm.cfg.patch, False, out_proj, finish, info=info)


def scclip_parts(backbones: Backbones, batch: WindowBatch, opts: ComposedOptions) -> CrossWindowParts:
    """SC-CLIP base [ovss design, spec §4.11.5]: SC-CLIP's steps 1-5 per window, then three cross-window maps
    shared by all heads: alpha8 (keys: repaired block-8 features), alpha_k (k of x_b), alpha_k' (k of m_P).
    ``y1 = OutProj(1/2 (alpha8 + alpha_k) V) + 0.3 c11``, ``y2 = OutProj(1/2 (alpha8 + alpha_k') V') + 0.3 m_c``,
    ``z = G(S3) (y1 + y2)`` per window. alpha8 serves both value streams in one call ([V | V']).
    ``scclip_gla_kk = window``: the k-k halves are SC-CLIP's own per-head maps inside the window.

    Args:
        opts: composed options: ``base`` SC-CLIP's, ``extra`` :class:`~ovss.methods.options.SCCLIPGLAOptions`.
    """
    sc, clip = opts.base, backbones.clip
    st = scclip_streams(clip, batch.pixels, sc)
    block = clip.blocks[-1]
    _, k1, v1 = block.attn.qkv(block.ln_1(st.pre_adjusted))  # (L, H, n, d) first pass
    _, k2, v2 = block.attn.qkv(block.ln_1(st.fused))  # (L, H, n, d) second pass
    values, values2 = heads_concat(v1, 0), heads_concat(v2, 0)  # (L, n, C) each
    channels = values.shape[-1]
    res1, res2 = sc.res_cls * st.cls, sc.res_cls * st.fused_cls  # (L, 1, D) each
    extra: list[tuple[torch.Tensor, torch.Tensor]] = []
    if opts.extra.kk == "cross":
        extra = [(heads_concat(k1, 0), values), (heads_concat(k2, 0), values2)]
        own: tuple[torch.Tensor, ...] = ()
    else:
        kk1, kk2 = kk_attention(block, st.pre_adjusted)[0], kk_attention(block, st.fused)[0]  # (L, H, n, n)
        with full_precision():
            own = (heads_concat(kk1 @ v1.float(), 0), heads_concat(kk2 @ v2.float(), 0))  # (L, n, C) each

    def out_proj(y8: torch.Tensor, *kk: torch.Tensor) -> torch.Tensor:
        yk, yk2 = kk or own  # (L, n, C) each: alpha_k V, alpha_k' V'
        y1 = block.attn.out_proj(0.5 * (y8[..., :channels] + yk)) + res1  # (L, n, D)
        y2 = block.attn.out_proj(0.5 * (y8[..., channels:] + yk2)) + res2  # (L, n, D)
        return y1 + y2  # (L, n, D)

    def finish(a: torch.Tensor) -> torch.Tensor:
        return aggregate(st.post, a)  # (L, n, D) post-adjustment, per window

    return CrossWindowParts(
        [st.f8],
        torch.cat([values, values2], dim=-1),  # (L, n, 2C): [V | V']
        st.grid,
        clip.cfg.patch,
        True,
        out_proj,
        finish,
        info={"scclip_blocks": st.blocks},
        window_info={"anomalies": [int(m.sum()) for m in st.anomalies]},
        extra_sets=extra,
    )


Adapter = Callable[[Backbones, WindowBatch, ComposedOptions], CrossWindowParts]

# composed method name -> its adapter (every method registered with ovss.methods.registry.register_gla)
ADAPTERS: dict[str, Adapter] = {
    "proxyclip+gla": proxyclip_parts,
    "clearclip+gla": clearclip_parts,
    "sclip+gla": sclip_parts,
    "naclip+gla": naclip_parts,
    "gclip+gla": gclip_parts,
    "trident+gla": trident_parts,
    "cass+gla": cass_parts,
    "scclip+gla": scclip_parts,
    "proxyclip+gla+mlf": proxyclip_mlf_parts,
}
