"""ClearCLIP (spec §4.4): q-q attention, no residual, no FFN."""

from __future__ import annotations

import torch

from ovss.errors import OvssError
from ovss.methods.common import Backbones, MethodOutput, WindowBatch, attend, patch_tokens, softmax_attention
from ovss.methods.options import ClearCLIPOptions
from ovss.models.vit import ResidualAttentionBlock


def qq_attention_output(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """ClearCLIP's block output OutProj(softmax(q q^T / sqrt(d)) v) for block input x: (L, n, D) -> (L, n, D)."""
    q, _, v = block.attn.qkv(block.ln_1(x))  # (L, H, n, d)
    return attend(block, softmax_attention(q, q, block.attn.scale), v)  # (L, n, D)


def run_clearclip(backbones: Backbones, batch: WindowBatch, opts: ClearCLIPOptions) -> MethodOutput:
    clip = backbones.clip
    depth = len(clip.blocks)
    if not 1 <= opts.last_n_layers <= depth:
        raise OvssError(f"clearclip last_n_layers must be in 1..{depth}, got {opts.last_n_layers}")
    x, grid = clip.embed(batch.pixels)  # (L, n, D)
    first = depth - opts.last_n_layers
    x = clip.forward_blocks(x, 0, first, block_tokens=backbones.tuning.block_tokens)
    z = torch.zeros_like(x)
    for block in clip.blocks[first:-1]:
        z = z + qq_attention_output(block, x)  # (L, n, D)
        x = block(x)
    z = z + qq_attention_output(clip.blocks[-1], x)  # the last block's own output is not needed
    return MethodOutput(patch_tokens(z, clip), grid)
