"""Vanilla CLIP (spec §4.1): the unmodified last block, and its reduced variant (no residual, no FFN)."""

from __future__ import annotations

from ovss.methods.common import (
    Backbones,
    MethodOutput,
    WindowBatch,
    attend,
    patch_tokens,
    softmax_attention,
    tokens_before_last_block,
)
from ovss.methods.options import VanillaOptions


def run_vanilla(backbones: Backbones, batch: WindowBatch, opts: VanillaOptions) -> MethodOutput:
    clip = backbones.clip
    x, grid = tokens_before_last_block(clip, batch.pixels, block_tokens=backbones.tuning.block_tokens)  # (L, n, D)
    block = clip.blocks[-1]
    if opts.reduced:
        q, k, v = block.attn.qkv(block.ln_1(x))  # (L, H, n, d) each
        z = attend(block, softmax_attention(q, k, block.attn.scale), v)  # (L, n, D)
    else:
        z = block(x)  # (L, n, D) residual and FFN kept
    return MethodOutput(patch_tokens(z, clip), grid)
