"""MaskCLIP (spec §4.2): the last block's value path only."""

from __future__ import annotations

from dataclasses import dataclass

from ovss.methods.common import Backbones, MethodOutput, WindowBatch, patch_tokens, tokens_before_last_block
from ovss.methods.registry import Geometry, MethodSpec, register


@dataclass(frozen=True)
class MaskCLIPOptions:
    """Options of ``maskclip`` / ``maskclip-reimpl``."""

    residual_ffn: bool = True  # keep residual and FFN (MaskCLIP paper); False = later re-implementations


def run_maskclip(backbones: Backbones, batch: WindowBatch, opts: MaskCLIPOptions) -> MethodOutput:
    clip = backbones.clip
    x, grid = tokens_before_last_block(clip, batch.pixels)  # (L, n, D)
    block = clip.blocks[-1]
    _, _, v = block.attn.qkv(block.ln_1(x))  # (L, H, n, d)
    a = block.attn.merge_heads(v)  # (L, n, D) identity attention: OutProj(v)
    if opts.residual_ffn:
        u = x + block.ls_1(a)  # (L, n, D)
        a = u + block.ffn(u)  # (L, n, D)
    return MethodOutput(patch_tokens(a, clip), grid)


register(
    MethodSpec(
        name="maskclip",
        run=run_maskclip,
        options=MaskCLIPOptions(),
        logit_scale=40.0,
        pad_multiple=1,
        geometry=Geometry(336, 224, 112),
        description="MaskCLIP: value path of the last block, residual and FFN kept",
    )
)
register(
    MethodSpec(
        name="maskclip-reimpl",
        run=run_maskclip,
        options=MaskCLIPOptions(residual_ffn=False),
        logit_scale=40.0,
        pad_multiple=16,
        geometry=Geometry(336, 224, 112),
        description="MaskCLIP as re-implemented by ClearCLIP/GLA: OutProj(v), no residual, no FFN",
    )
)
