"""SCLIP (spec §4.3): correlative self-attention softmax(qq^T) + softmax(kk^T), residual and FFN kept."""

from __future__ import annotations

from ovss.methods.common import (
    Backbones,
    MethodOutput,
    WindowBatch,
    attend,
    patch_tokens,
    residual_ffn,
    softmax_attention,
    tokens_before_last_block,
)
from ovss.methods.options import SCLIPOptions


def run_sclip(backbones: Backbones, batch: WindowBatch, opts: SCLIPOptions) -> MethodOutput:
    clip = backbones.clip
    x, grid = tokens_before_last_block(clip, batch.pixels, block_tokens=backbones.tuning.block_tokens)  # (L, n, D)
    block = clip.blocks[-1]
    q, k, v = block.attn.qkv(block.ln_1(x))  # (L, H, n, d) each
    scale = block.attn.scale
    attn = softmax_attention(q, q, scale) + softmax_attention(k, k, scale)  # (L, H, n, n) rows sum to 2
    a = attend(block, attn, v)  # (L, n, D)
    z = a if opts.reduced else residual_ffn(block, x, a)  # (L, n, D)
    return MethodOutput(patch_tokens(z, clip), grid)
