"""CASS (spec §4.10): NACLIP's reduced last block whose key graph is distilled from DINO's, per head.

Per window: CLIP's last-block keys give ``G_c = k k^T / sqrt(d)``; DINO ViT-B/8 runs on the window resized
to a square of side min(h, w), and its last-block keys (per head, [CLS] dropped) are bilinearly resized to
the CLIP grid and min-max mapped into the CLIP keys' range. :mod:`ovss.methods.cass.graph` fuses the two
graphs head by head; the attention is ``softmax(fused + Omega)`` (NACLIP's Gaussian prior), no residual, no
FFN. The text side (object-guided adjustment, global logit blend) runs at predict time:
:mod:`ovss.methods.cass.text`, fed by the global image embeddings returned in ``MethodOutput.extras``.
Windows are never padded (spec §2.3): CLIP's patch embedding floors, and so does DINO's on its square.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ovss.errors import OvssError
from ovss.methods.cass.graph import minmax_map, spectral_fusion
from ovss.methods.common import Backbones, MethodOutput, WindowBatch, attend, tokens_before_last_block
from ovss.methods.naclip import gaussian_prior
from ovss.methods.options import CASSOptions, ComposedOptions
from ovss.models.normalization import IMAGENET_MEAN, IMAGENET_STD, InputNorm
from ovss.models.vit import VisionTransformer
from ovss.pipeline.image import imagenet_from_clip
from ovss.precision import full_precision
from ovss.tuning import DEFAULT_TUNING

# The release un-normalises the CLIP-normalised window with ImageNet statistics whose blue std is 0.255.
RELEASE_UNNORM_STD = (0.229, 0.224, 0.255)


def _square_resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """Bicubic, anti-aliased resize of (L, 3, h, w) to (L, 3, side, side) (PIL's resize; no-op if square)."""
    if x.shape[-2:] == (side, side):
        return x
    return F.interpolate(x.float(), size=(side, side), mode="bicubic", align_corners=False, antialias=True)


def dino_input(pixels: torch.Tensor, clip_norm: InputNorm, mode: str) -> torch.Tensor:
    """DINO's input for CASS: the windows ImageNet-normalised and resized to a square of side min(h, w).

    Args:
        pixels: (L, 3, h, w) CLIP-normalised windows.
        clip_norm: the statistics that normalised ``pixels``.
        mode: ``pixels`` (the window itself) or ``release`` (the release's 8-bit image from ImageNet
            un-normalisation with blue std 0.255, truncated to uint8, resized and rounded).

    Returns:
        (L, 3, side, side) fp32 ImageNet-normalised.
    """
    side = min(pixels.shape[-2:])
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device)[:, None, None]  # (3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device)[:, None, None]  # (3, 1, 1)
    if mode == "release":
        wrong_std = torch.tensor(RELEASE_UNNORM_STD, device=pixels.device)[:, None, None]  # (3, 1, 1)
        u8 = (255.0 * (pixels.float() * wrong_std + mean)).clamp(0, 255).floor()  # (L, 3, h, w) uint8 values
        if u8.shape[-2:] != (side, side):
            u8 = _square_resize(u8, side).round().clamp(0, 255)  # (L, 3, side, side)
        return (u8 / 255.0 - mean) / std
    return _square_resize(imagenet_from_clip(pixels.float(), clip_norm.mean, clip_norm.std), side)


def dino_keys_on_grid(
    vfm: VisionTransformer, x: torch.Tensor, grid: tuple[int, int], *, block_tokens: int = DEFAULT_TUNING.block_tokens
) -> torch.Tensor:
    """DINO's last-block keys of the patches, per head, bilinearly resized to the CLIP grid.

    Args:
        vfm: DINO-family ViT.
        x: (L, 3, s, s) DINO input.
        grid: CLIP grid (gr, gc).
        block_tokens: tokens per pass through the blocks (:attr:`ovss.tuning.Tuning.block_tokens`).

    Returns:
        (L, H, gr * gc, d) keys (``align_corners=False``), fp32.
    """
    tokens, (hr, hc) = vfm.embed(x)  # (L, n_d, D_v)
    tokens = vfm.forward_blocks(tokens, 0, len(vfm.blocks) - 1, block_tokens=block_tokens)  # DINO's last block input
    block = vfm.blocks[-1]
    _, k, _ = block.attn.qkv(block.ln_1(tokens))  # (L, H, n_d, d)
    k = k[:, :, vfm.num_prefix_tokens :].float()  # (L, H, hr*hc, d)
    L, H, _, d = k.shape
    maps = k.transpose(-2, -1).reshape(L * H, d, hr, hc)  # (L*H, d, hr, hc)
    maps = F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)  # (L*H, d, gr, gc)
    return maps.reshape(L, H, d, grid[0] * grid[1]).transpose(-2, -1)  # (L, H, N, d)


def global_embeddings(
    clip: VisionTransformer,
    batch: WindowBatch,
    mode: str,
    x11: torch.Tensor | None = None,
    *,
    block_tokens: int = DEFAULT_TUNING.block_tokens,
) -> torch.Tensor:
    """The global CLIP image embedding used by CASS's text side, one row per window.

    Args:
        clip: the CLIP image tower.
        batch: the windows; ``batch.image`` (3, H, W) is the processing image.
        mode: ``image`` ([CLS] of the unmodified tower on the whole processing image, repeated for every
            window) or ``window`` (each window's own [CLS], the release's Cityscapes setting).
        x11: (L, n, D) input of the last block for the windows, if already computed (``window`` mode).
        block_tokens: tokens per pass through the blocks (:attr:`ovss.tuning.Tuning.block_tokens`).

    Returns:
        (L, E) fp32 L2-normalised.
    """
    L = len(batch.windows)
    if mode == "window":
        if x11 is None:
            x11, _ = tokens_before_last_block(clip, batch.pixels, block_tokens=block_tokens)  # (L, n, D)
        cls = clip.blocks[-1](x11)[:, 0]  # (L, D) unmodified last block
    else:
        if batch.image is None:
            raise OvssError("CASS's global embedding needs the processing image (WindowBatch.image)")
        tokens, _ = clip.embed(batch.image[None])  # (1, n, D)
        cls = clip.forward_blocks(tokens, block_tokens=block_tokens)[:, 0].expand(L, -1)  # (L, D)
    return F.normalize(clip.head(cls[:, None])[:, 0].float(), dim=-1)  # (L, E)


def check_vfm(clip: VisionTransformer, vfm: VisionTransformer | None, method: str) -> VisionTransformer:
    """The VFM, checked once: present, and with CLIP's head count and head size (keys are compared per head)."""
    if vfm is None:
        raise OvssError(f"{method} needs DINO ViT-B/8; load it with vfm='dino-vitb8' (or --vfm NAME)")
    a, b = clip.blocks[-1].attn, vfm.blocks[-1].attn
    if (a.heads, a.head_dim) != (b.heads, b.head_dim):
        raise OvssError(
            f"{method} pairs CLIP and DINO heads one to one: CLIP has {a.heads} heads of {a.head_dim}, the VFM "
            f"{b.heads} of {b.head_dim}; use DINO ViT-B/8 with CLIP ViT-B/16"
        )
    return vfm


def check_cass(backbones: Backbones, pipeline: object, options: object, name: str) -> None:
    """Errors that hold for every image, raised when the segmenter is built: the VFM's heads (``check_vfm``).

    cass+gla with ``cross_window_keys='naclip'`` reads no DINO tokens and is not checked.
    """
    if isinstance(options, ComposedOptions) and options.base.cross_window_keys == "naclip":
        return
    check_vfm(backbones.clip, backbones.vfm, name)


def run_cass(backbones: Backbones, batch: WindowBatch, opts: CASSOptions) -> MethodOutput:
    """CASS's last block for L windows (one window at a time for the spectral step).

    Returns:
        tokens (L, N, D) on the CLIP grid; ``extras["global"]`` (L, E) for the predict-time text side;
        per-window ``cass_dino_head`` / ``cass_weight`` / ``cass_rank`` (matched DINO head, weight and
        low-rank size for every CLIP head).
    """
    clip = backbones.clip
    vfm = check_vfm(clip, backbones.vfm, "cass")
    block_tokens = backbones.tuning.block_tokens
    x, grid = tokens_before_last_block(clip, batch.pixels, block_tokens=block_tokens)  # (L, n, D)
    block = clip.blocks[-1]
    _, k, v = block.attn.qkv(block.ln_1(x))  # (L, H, n, d)
    p = clip.num_prefix_tokens
    k, v = k[:, :, p:], v[:, :, p:]  # (L, H, N, d): CASS's q, k, v exclude [CLS]
    dino_pixels = dino_input(batch.pixels, clip.input_norm, opts.dino_input)  # (L, 3, s, s)
    dk = dino_keys_on_grid(vfm, dino_pixels, grid, block_tokens=block_tokens)  # (L, H, N, d)
    omega = gaussian_prior(grid[0], grid[1], float(opts.sigma), 0).to(x.device)  # (N, N)
    attn = []
    window_info: dict[str, list] = {"cass_dino_head": [], "cass_weight": [], "cass_rank": []}
    with full_precision():
        for b in range(k.shape[0]):
            kb = k[b].float()  # (H, N, d)
            dkb = minmax_map(dk[b], kb)  # (H, N, d) into the CLIP keys' range (one map over all heads)
            fused, match, ranks = spectral_fusion(
                kb,
                dkb,
                block.attn.scale,
                eigenvalues=opts.eigenvalues,
                energy=opts.energy,
                fusion_scale=opts.fusion_scale,
                rescale=opts.rescale_singular_values,
                pairing=opts.pairing,
                rank=opts.rank,
                tolerance=opts.match_tolerance,
                release_costs=opts.match_tolerance == 0,  # the release's raw Hungarian: its float32 costs
            )  # (H, N, N) float64
            attn.append((fused.float() + omega).softmax(dim=-1))  # (H, N, N)
            window_info["cass_dino_head"].append(list(match.dino_head))
            window_info["cass_weight"].append([round(w, 6) for w in match.weight])
            window_info["cass_rank"].append(ranks)
    z = attend(block, torch.stack(attn), v)  # (L, N, D) no residual, no FFN
    extras = {"global": global_embeddings(clip, batch, opts.global_embedding, x, block_tokens=block_tokens)}
    return MethodOutput(z, grid, window_info=window_info, extras=extras)
