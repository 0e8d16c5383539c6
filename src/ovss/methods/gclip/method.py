"""GCLIP (spec §4.6): ClearCLIP's last block with Attention Map Fusion (AMF) and Channel Suppression (CS).

AMF finds, per window, the first block g whose q-k attention has a *global token* (a patch key that every
patch query attends to) and averages the maps of blocks g .. g + l with the last block's q-q map:
A_f = (A_g + ... + A_{g+l} + A^qq_f) / (l + 2). CS (:mod:`ovss.methods.gclip.channel_suppression`) rescales the
dominant fc2 channel of the late FFNs. The output is z = OutProj(A_f v): no residual, no FFN.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ovss.errors import OvssError
from ovss.methods.common import Backbones, MethodOutput, WindowBatch, attend, patch_tokens, softmax_attention
from ovss.methods.gclip.channel_suppression import (
    ENTROPIES,
    SCOPES,
    clip_blocks,
    detect_cs_start,
    fc2_statistics,
    forward_streams,
    suppressed_fc2_weights,
)
from ovss.methods.options import GCLIPOptions

logger = logging.getLogger(__name__)

DETECTORS = ("geomean", "product_fp32", "product_fp16", "fixed")
REFERENCE_DEPTH = 12  # fixed_block and an integer cs_start are block indices of a 12-block CLIP (ViT-B/16)
FUSE_HEADS = ("mixed", "averaged", "per_head")
LOG_FLOOR = 1e-30  # floor inside the logarithm of the geometric-mean detector


def has_global_tokens(attn: torch.Tensor, prefix: int, detector: str = "geomean", sigma: float = 100.0) -> torch.Tensor:
    """G(i) of Eq. 2 for every window: does some patch key receive large attention from every patch query?

    "geomean": max_k mean_j ln(max(sigma A[j, k], 1e-30)) > 0, i.e. some key's geometric-mean attention
    exceeds 1 / sigma (the precision-independent reading). "product_fp32" / "product_fp16": the literal
    sequential product over queries of sigma A[j, k] in that precision, tested for > 0 (an underflow test).

    Args:
        attn: (L, n, n) head-averaged q-k attention of one block (softmax over all n keys incl. [CLS]).
        prefix: tokens before the patches ([CLS], registers); excluded as queries and as keys.
        detector: "geomean", "product_fp32" or "product_fp16".
        sigma: the scale sigma of Eq. 2 (> 0).

    Returns:
        (L,) bool.
    """
    a = attn[:, prefix:, prefix:].float()  # (L, np, np) patch queries x patch keys
    if detector == "geomean":
        score = torch.log((sigma * a).clamp_min(LOG_FLOOR)).mean(dim=1)  # (L, np) mean over queries
        return score.amax(dim=-1) > 0  # (L,)
    dtypes = {"product_fp32": torch.float32, "product_fp16": torch.float16}
    if detector not in dtypes:
        raise OvssError(f"gclip detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
    scaled = (sigma * a).to(dtypes[detector])  # (L, np, np)
    product = torch.ones_like(scaled[:, 0])  # (L, np)
    for j in range(scaled.shape[1]):
        product = product * scaled[:, j]  # (L, np) running product over queries 0..j
    return (product > 0).any(dim=-1)  # (L,)


class AttentionFusion:
    """Collects the early-block maps of AMF while the blocks run (a ``visit`` for :func:`forward_streams`).

    Per window it keeps the first block g < f - l with global tokens and sums the maps of blocks g .. g + l;
    it also sums the maps of the fixed blocks, used where no block qualifies (or for detector "fixed").
    """

    def __init__(self, opts: GCLIPOptions, last: int, fixed: int, prefix: int, patch_maps: bool = False) -> None:
        self.opts = opts
        self.patch_maps = patch_maps  # keep patch rows/cols only, each map renormalised to rows summing to 1
        self.last = last  # f, the index of the last block
        self.fixed = fixed  # 0-based fixed g
        self.prefix = prefix  # [CLS] and register tokens before the patches
        self.g: torch.Tensor | None = None  # (L,) long: detected g per window, -1 while none
        self.found: torch.Tensor | None = None  # (L, 1 or H, n, n): sum of the maps of blocks g .. g + l
        self.fixed_sum: torch.Tensor | None = None  # (L, 1 or H, n, n): sum over the fixed blocks

    def __call__(self, b: int, attn: torch.Tensor) -> None:
        """Take block b's (L, H, n, n) q-k map into account."""
        l = self.opts.fuse_layers
        mean = attn.mean(dim=1)  # (L, n, n) head-averaged
        term = attn if self.opts.fuse_heads == "per_head" else mean[:, None]  # (L, H or 1, n, n)
        if self.opts.fuse_cls:
            term = term[:, :, :1].expand_as(term)  # (L, H or 1, n, n) [CLS] query row for every query
        if self.patch_maps:
            term = term[:, :, self.prefix :, self.prefix :]  # (L, H or 1, N, N) [CLS] excluded
            term = term / term.sum(dim=-1, keepdim=True)  # (L, H or 1, N, N) patch weights sum to 1
        if self.fixed <= b <= self.fixed + l:
            self.fixed_sum = term if self.fixed_sum is None else self.fixed_sum + term
        if self.opts.detector == "fixed":
            return
        if self.g is None:
            self.g = torch.full((attn.shape[0],), -1, dtype=torch.long, device=attn.device)  # (L,)
        if b < self.last - l:
            hit = has_global_tokens(mean, self.prefix, self.opts.detector, self.opts.sigma)  # (L,)
            self.g = torch.where((self.g < 0) & hit, b, self.g)  # (L,) first qualifying block
        inside = (self.g >= 0) & (self.g <= b) & (b <= self.g + l)  # (L,) block b is fused for the window
        masked = term * inside[:, None, None, None].to(term.dtype)  # (L, H or 1, n, n)
        self.found = masked if self.found is None else self.found + masked

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The summed early maps (L, 1 or H, n, n), g (L,) long and whether g fell back (L,) bool."""
        if self.fixed_sum is None:
            raise ValueError("gclip: the fixed blocks were never visited (no block ran before the last)")
        L = self.fixed_sum.shape[0]
        fixed_g = torch.full((L,), self.fixed, dtype=torch.long, device=self.fixed_sum.device)  # (L,)
        if self.g is None or self.found is None:  # detector "fixed"
            return self.fixed_sum, fixed_g, torch.zeros(L, dtype=torch.bool, device=fixed_g.device)
        fallback = self.g < 0  # (L,)
        early = torch.where(fallback[:, None, None, None], self.fixed_sum, self.found)  # (L, 1 or H, n, n)
        return early, torch.where(fallback, fixed_g, self.g), fallback


def scale_block(block: int, depth: int, low: int, high: int) -> int:
    """A block index of a 12-block CLIP moved to the same relative depth of a ``depth``-block CLIP.

    ``round(block * depth / 12)`` kept within ``low .. high`` (where the fused blocks or the CS start fit);
    ViT-B/16's blocks 6 and 7 become 3 and 4 of a 6-block model, 12 and 14 of a 24-block ViT-L.
    """
    return min(max(round(block * depth / REFERENCE_DEPTH), low), high)


def resolve_blocks(opts: GCLIPOptions, depth: int) -> tuple[int, int | None]:
    """Check the options against a ``depth``-block CLIP and return the 0-based fixed g and fixed s_cs.

    ``fixed_block`` and an integer ``cs_start`` are the paper's ViT-B/16 indices (12 blocks). For another
    depth they are scaled with :func:`scale_block` (``scale_blocks=True``, default) after being checked
    against 12 blocks, or used as given and checked against ``depth`` (``scale_blocks=False``).

    Returns:
        (fixed g, fixed CS start or None for "auto"). Bad values raise :class:`OvssError`.
    """
    f = depth - 1
    checks = [
        ("detector", opts.detector, DETECTORS),
        ("fuse_heads", opts.fuse_heads, FUSE_HEADS),
        ("entropy", opts.entropy, ENTROPIES),
        ("cs_scope", opts.cs_scope, SCOPES),
    ]
    for name, value, allowed in checks:
        if value not in allowed:
            raise OvssError(f"gclip {name} must be one of {', '.join(allowed)}, got {value!r}")
    if opts.block_index_base not in (0, 1):
        raise OvssError(f"gclip block_index_base must be 0 or 1, got {opts.block_index_base!r}")
    if not opts.sigma > 0:
        raise OvssError(f"gclip sigma must be > 0, got {opts.sigma!r}; use sigma=100")
    l = opts.fuse_layers
    if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l <= f - 1:
        raise OvssError(f"gclip fuse_layers must be an integer in 0..{f - 1} for {depth} blocks, got {l!r}")
    scaled = opts.scale_blocks and depth != REFERENCE_DEPTH
    checked = REFERENCE_DEPTH if scaled else depth  # the depth the given indices refer to
    fixed = opts.fixed_block - opts.block_index_base
    if opts.amf and not 0 <= fixed <= checked - 2 - (0 if scaled else l):
        raise OvssError(
            f"gclip fixed_block {opts.fixed_block} (base {opts.block_index_base}) puts the fused blocks "
            f"outside 0..{checked - 2} of a {checked}-block CLIP; set fixed_block so that fixed_block + l < "
            f"{checked - 1}"
        )
    if scaled:
        fixed = scale_block(fixed, depth, 0, f - 1 - l)
    if opts.cs_start == "auto":
        return fixed, None
    start = opts.cs_start
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start - opts.block_index_base <= checked - 1:
        raise OvssError(
            f"gclip cs_start must be 'auto' or a block in 0..{checked - 1} ({checked} blocks), got {start!r}"
        )
    start -= opts.block_index_base
    return fixed, scale_block(start, depth, 0, f) if scaled else start


@dataclass
class GCLIPStreams:
    """GCLIP's backbone passes for all windows: the last block's inputs and the fused early maps."""

    x: torch.Tensor  # (L, n, D) clean input of the last block (queries and AMF maps come from it)
    xs: torch.Tensor | None  # (L, n, D) channel-suppressed input of the last block (values), None without CS
    grid: tuple[int, int]  # (gr, gc) CLIP grid
    early: torch.Tensor | None  # (L, 1 or H, n, n) summed maps of blocks g .. g + l (None without AMF)
    info: dict[str, Any]  # CS statistics (per image)
    window_info: dict[str, list[Any]]  # detected global-token block, fused blocks, fallback (per window)


def gclip_streams(
    backbones: Backbones, batch: WindowBatch, opts: GCLIPOptions, *, patch_maps: bool = False
) -> GCLIPStreams:
    """Run blocks 0..f-1 with channel suppression and collect the AMF maps (spec §4.6).

    Args:
        patch_maps: keep only patch rows/columns of the early maps, each renormalised (GCLIP + GLA, §4.9).
    """
    clip = backbones.clip
    blocks = clip_blocks(clip)
    f = len(blocks) - 1
    fixed, fixed_start = resolve_blocks(opts, len(blocks))
    info: dict[str, Any] = {}
    fc2: dict[int, torch.Tensor] = {}
    if opts.amf:
        info["fixed_block"] = fixed  # 0-based, after scaling to the depth
    if opts.cs:
        stats = fc2_statistics(clip, opts.entropy)
        start = detect_cs_start([s.entropy for s in stats]) if fixed_start is None else fixed_start
        fc2 = suppressed_fc2_weights(clip, start)  # {b: (D, 4D)} for b = start .. f
        info["cs_start"] = start
        info["cs_entropy"] = [s.entropy for s in stats]
        info["cs_channel"] = [s.channel for s in stats]
        info["cs_norm_ratio"] = [s.ratio for s in stats]
    fusion = AttentionFusion(opts, f, fixed, clip.num_prefix_tokens, patch_maps) if opts.amf else None

    x, grid = clip.embed(batch.pixels)  # (L, n, D)
    x, xs = forward_streams(clip, x, fc2, opts.cs_scope, fusion)  # (L, n, D), (L, n, D) or None
    early = None
    windows: dict[str, list[Any]] = {}
    if fusion is not None:
        early, g, fallback = fusion.result()  # (L, 1 or H, n, n), (L,), (L,)
        windows["global_block"] = g.tolist()
        windows["fused_blocks"] = [list(range(i, i + opts.fuse_layers + 1)) for i in g.tolist()]
        windows["detector_fallback"] = fallback.tolist()
        if bool(fallback.any()):
            logger.info(
                "gclip: no global-token block before %d in %d of %d windows; using fixed block %d",
                f - opts.fuse_layers,
                int(fallback.sum()),
                len(fallback),
                fixed,
            )
    return GCLIPStreams(x, xs, grid, early, info, windows)


def run_gclip(backbones: Backbones, batch: WindowBatch, opts: GCLIPOptions) -> MethodOutput:
    """GCLIP's last-block output for every window.

    Returns:
        Patch tokens (L, gr * gc, D) = OutProj(A_f v); ``info["gclip"]`` with the CS start block, H_b,
        d_hat_b and N_dhat / N_bar of every block (when ``cs``); ``window_info`` with the global-token block,
        the fused blocks and whether the detector fell back to ``fixed_block``, per window (when ``amf``).
    """
    clip = backbones.clip
    st = gclip_streams(backbones, batch, opts)
    last = clip_blocks(clip)[-1]
    q, _, v = last.attn.qkv(last.ln_1(st.x))  # (L, H, n, d) each, clean stream
    if st.xs is not None:
        _, _, v = last.attn.qkv(last.ln_1(st.xs))  # (L, H, n, d) values from the suppressed stream
    attn = softmax_attention(q, q, last.attn.scale)  # (L, H, n, n) A^qq_f
    if st.early is not None:
        if opts.fuse_heads == "averaged":
            attn = attn.mean(dim=1, keepdim=True)  # (L, 1, n, n)
        attn = (st.early + attn) / (opts.fuse_layers + 2)  # (L, H or 1, n, n) row-stochastic A_f
    z = attend(last, attn, v)  # (L, n, D) no residual, no FFN
    return MethodOutput(patch_tokens(z, clip), st.grid, {"gclip": st.info}, st.window_info)
