"""SC-CLIP (spec §4.11.1): anomaly repair, mid-layer similarity aggregation and a fused second pass.

Per window, blocks 0 .. depth-2 run unchanged and four things are kept: the outputs of the post-adjustment
block (3), of the pre-adjustment block (8) and of the block before the last (10), and the sum ``m`` of the
outputs of the fusion blocks (3..9). Then:

1. anomaly tokens of the last block's input ``P`` are detected (``ovss.methods.scclip.anomaly``) and repaired
   from their grid neighbours, in ``P`` and in the block-8 features ``f8``;
2. ``x_b = G(S8) x_a`` with ``S8`` the cosine similarity of ``f8`` and ``G`` the thresholded, row-normalised
   aggregator;
3. the last block's attention for an input ``u`` is ``OutProj(concat_h 1/2 (A_bar + softmax(k_h k_h^T /
   sqrt d)) v_h)`` with ``A_bar`` ProxyCLIP's masked softmax of ``3 (S8 - mean S8)``, shared by all heads;
4. two passes ``y1 = a(x_b) + 0.3 c11``, ``y2 = a(m_P) + 0.3 m_c`` and ``z = G(S3) (y1 + y2)``; no FFN.

:func:`scclip_streams` (steps 1-2) and :func:`kk_attention` are shared with ``scclip+gla``;
:func:`resolve_blocks` and :func:`clip_block_outputs` with ``proxyclip+gla+mlf``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ovss.errors import OvssError
from ovss.methods.common import Backbones, MethodOutput, WindowBatch, attend
from ovss.methods.options import SCCLIPOptions
from ovss.methods.proxyclip import proxy_attention
from ovss.methods.scclip.anomaly import anomaly_grid, detect_anomalies, repair
from ovss.models.vit import ResidualAttentionBlock, VisionTransformer
from ovss.precision import full_precision

REFERENCE_DEPTH = 12  # the block indices of the options refer to ViT-B/16's 12 blocks
SHIFT, SCALE = 1.0, 3.0  # A_bar = masked softmax(SCALE * (S8 - SHIFT * mean S8)), hard-coded in the release
AGGREGATOR_EPS = 1e-6  # G(S)_ij = S_ij [S_ij >= t] / (sum_l S_il [S_il >= t] + eps)


def scale_blocks(blocks: Sequence[int], depth: int, scale: bool, what: str) -> tuple[int, ...]:
    """Check block indices and move them to a ``depth``-block CLIP (duplicates merged, order kept).

    Only outputs of blocks 0 .. depth - 2 exist before the last block. With ``scale`` and ``depth != 12`` the
    indices are ViT-B/16's, checked against 12 blocks and moved to ``round(b * depth / 12)`` (clamped to
    0 .. depth - 2); otherwise they are used as given.

    Raises:
        OvssError: an index outside the allowed range (the message names the option and the range).
    """
    scaled = scale and depth != REFERENCE_DEPTH
    top = (REFERENCE_DEPTH if scaled else depth) - 2
    for b in blocks:
        if not 0 <= b <= top:
            raise OvssError(
                f"{what} {b} is not a block whose output precedes the last block (0..{top} of "
                f"{REFERENCE_DEPTH if scaled else depth}); choose blocks in 0..{top}"
            )
    if not scaled:
        return tuple(dict.fromkeys(blocks))
    return tuple(dict.fromkeys(min(max(round(b * depth / REFERENCE_DEPTH), 0), depth - 2) for b in blocks))


def resolve_blocks(opts: SCCLIPOptions, depth: int) -> tuple[int, int, tuple[int, ...]]:
    """(pre-adjustment block, post-adjustment block, fusion blocks) of ``opts`` for a ``depth``-block CLIP."""
    (pre,) = scale_blocks([opts.pre_block], depth, opts.scale_blocks, "scclip pre_block")
    (post,) = scale_blocks([opts.post_block], depth, opts.scale_blocks, "scclip post_block")
    fusion = scale_blocks(opts.fusion_blocks, depth, opts.scale_blocks, "scclip fusion_blocks entry")
    return pre, post, fusion


@dataclass
class BlockOutputs:
    """What a pass over blocks 0 .. depth-2 keeps (all windows; token 0 is [CLS])."""

    last_in: torch.Tensor  # (L, n, D) x^(last): the last block's input (output of block depth - 2)
    kept: dict[int, torch.Tensor]  # block b -> (L, n, D) its output
    fused: torch.Tensor | None  # (L, n, D) sum of the fusion blocks' outputs (None: no fusion blocks)
    grid: tuple[int, int]  # (gr, gc) CLIP grid


def clip_block_outputs(
    clip: VisionTransformer, pixels: torch.Tensor, keep: Sequence[int], fuse: Sequence[int]
) -> BlockOutputs:
    """Embed windows and run every block but the last, keeping some outputs and the sum of others.

    Args:
        clip: the CLIP image tower.
        pixels: (L, 3, h, w) normalised windows.
        keep: blocks whose outputs are returned.
        fuse: blocks whose outputs are summed (in increasing block order, as the release adds them).
    """
    x, grid = clip.embed(pixels)  # (L, n, D)
    kept: dict[int, torch.Tensor] = {}
    fused: torch.Tensor | None = None
    for b, block in enumerate(clip.blocks[:-1]):
        x = block(x)  # (L, n, D) output of block b
        if b in keep:
            kept[b] = x
        if b in fuse:
            fused = x if fused is None else fused + x  # (L, n, D)
    return BlockOutputs(x, kept, fused, grid)


def aggregator(feats: torch.Tensor, threshold: float) -> torch.Tensor:
    """G(S) of the cosine similarity S of ``feats`` (spec §4.11.1 step 4), in fp32.

    Args:
        feats: (L, n, D) features (not normalised).
        threshold: similarities below it are dropped (0.4).

    Returns:
        (L, n, n) fp32 ``S [S >= t] / (sum_l S [S >= t] + 1e-6)``, rows sum to just under 1.
    """
    with full_precision():
        f = F.normalize(feats.float(), dim=-1)  # (L, n, D)
        s = f @ f.transpose(-2, -1)  # (L, n, n)
        s = s.masked_fill(s < threshold, 0.0)  # (L, n, n)
        return s / (s.sum(dim=-1, keepdim=True) + AGGREGATOR_EPS)  # (L, n, n)


def aggregate(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """G x per window in fp32: (L, n, n), (L, n, D) -> (L, n, D) in ``x``'s dtype."""
    with full_precision():
        return (g @ x.float()).to(x.dtype)  # (L, n, D)


@dataclass
class SCCLIPStreams:
    """Steps 1-5 of spec §4.11.1 for all windows of an image (patch tokens row-major on the CLIP grid)."""

    pre_adjusted: torch.Tensor  # (L, n, D) x_b = G(S8) x_a, the first pass's input
    fused: torch.Tensor  # (L, n, D) m_P, the second pass's input
    cls: torch.Tensor  # (L, 1, D) c^(last), [CLS] of the last block's input
    fused_cls: torch.Tensor  # (L, 1, D) m_c, [CLS] of the fused sum
    f8: torch.Tensor  # (L, n, D) repaired pre-adjustment features (raw; S8 is their cosine similarity)
    post: torch.Tensor  # (L, n, n) fp32 G(S3), the post-adjustment aggregator
    anomalies: torch.Tensor  # (L, gr, gc) bool anomaly positions
    grid: tuple[int, int]  # (gr, gc)
    blocks: dict[str, object]  # resolved block indices (diagnostics)


def scclip_streams(clip: VisionTransformer, pixels: torch.Tensor, opts: SCCLIPOptions) -> SCCLIPStreams:
    """Backbone pass, anomaly repair and pre-adjustment of every window (spec §4.11.1 steps 1-5)."""
    depth = len(clip.blocks)
    pre, post, fusion = resolve_blocks(opts, depth)
    out = clip_block_outputs(clip, pixels, (pre, post), fusion)
    if out.fused is None:  # fusion is never empty (SCCLIPOptions checks it)
        raise OvssError("scclip option fusion_blocks is empty; give at least one block")
    p = clip.num_prefix_tokens
    patches = out.last_in[:, p:]  # (L, n, D) P, the raw residual stream
    found = detect_anomalies(patches, opts.anomaly, opts.neighbors, opts.contamination, opts.topk)  # (L, n)
    mask = anomaly_grid(found, out.grid, opts.anomaly_grid)  # (L, gr, gc)
    x_a = repair(patches, mask)  # (L, n, D)
    f8 = repair(out.kept[pre][:, p:], mask)  # (L, n, D)
    x_b = aggregate(aggregator(f8, opts.threshold), x_a)  # (L, n, D)
    blocks = {"pre": pre, "post": post, "fusion": list(fusion)}
    return SCCLIPStreams(
        pre_adjusted=x_b,
        fused=out.fused[:, p:],
        cls=out.last_in[:, :1],
        fused_cls=out.fused[:, :1],
        f8=f8,
        post=aggregator(out.kept[post][:, p:], opts.threshold),
        anomalies=mask,
        grid=out.grid,
        blocks=blocks,
    )


def shared_map(f8: torch.Tensor) -> torch.Tensor:
    """A_bar: masked softmax of 3 (S8 - mean S8), the scalar mean over each window's n x n (ProxyCLIP Eq. 2).

    Returns:
        (L, n, n) fp32 row-stochastic.
    """
    return proxy_attention(f8, SHIFT, SCALE)  # (L, n, n)


def kk_attention(block: ResidualAttentionBlock, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head k-k softmax of patch tokens ``u`` and their values.

    Args:
        block: the last CLIP block.
        u: (L, n, D) patch tokens (no [CLS]), before ``ln_1``.

    Returns:
        softmax(k_h k_h^T / sqrt d) (L, H, n, n) fp32, and v (L, H, n, d).
    """
    _, k, v = block.attn.qkv(block.ln_1(u))  # (L, H, n, d)
    with full_precision():
        logits = (k.float() @ k.float().transpose(-2, -1)) * block.attn.scale  # (L, H, n, n)
        return logits.softmax(dim=-1), v


def sc_attention(block: ResidualAttentionBlock, u: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """a(u) = OutProj(concat_h 1/2 (A_bar + softmax(k_h k_h^T / sqrt d)) v_h) (spec §4.11.1 step 6).

    Args:
        block: the last CLIP block.
        u: (L, n, D) patch tokens.
        shared: (L, n, n) A_bar.

    Returns:
        (L, n, D).
    """
    kk, v = kk_attention(block, u)  # (L, H, n, n), (L, H, n, d)
    return attend(block, 0.5 * (shared[:, None] + kk), v)  # (L, n, D)


def run_scclip(backbones: Backbones, batch: WindowBatch, opts: SCCLIPOptions) -> MethodOutput:
    clip = backbones.clip
    st = scclip_streams(clip, batch.pixels, opts)
    block = clip.blocks[-1]
    shared = shared_map(st.f8)  # (L, n, n) shared by both passes and all heads
    y1 = sc_attention(block, st.pre_adjusted, shared) + opts.res_cls * st.cls  # (L, n, D)
    y2 = sc_attention(block, st.fused, shared) + opts.res_cls * st.fused_cls  # (L, n, D)
    z = aggregate(st.post, y1 + y2)  # (L, n, D)
    window_info = {"anomalies": [int(m.sum()) for m in st.anomalies]}
    return MethodOutput(z, st.grid, {"scclip_blocks": st.blocks}, window_info)
