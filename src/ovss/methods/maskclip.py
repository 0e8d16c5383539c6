"""MaskCLIP (spec §4.2): the last block's value path only."""

from __future__ import annotations

from ovss.methods.common import Backbones, MethodOutput, WindowBatch, patch_tokens, tokens_before_last_block
from ovss.methods.options import MaskCLIPOptions


def run_maskclip(backbones: Backbones, batch: WindowBatch, opts: MaskCLIPOptions) -> MethodOutput:
    clip = backbones.clip
    x, grid = tokens_before_last_block(clip, batch.pixels, block_tokens=backbones.tuning.block_tokens)  # (L, n, D)
    block = clip.blocks[-1]
    v = block.attn.values(block.ln_1(x))  # (L, H, n, d): q and k are not used
    a = block.attn.merge_heads(v)  # (L, n, D) identity attention: OutProj(v)
    if opts.residual_ffn:
        u = x + block.ls_1(a)  # (L, n, D)
        a = u + block.ffn(u)  # (L, n, D)
    return MethodOutput(patch_tokens(a, clip), grid)
