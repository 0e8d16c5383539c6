"""Vanilla CLIP (spec §4.1): the unmodified last block, and its reduced variant (no residual, no FFN)."""

from __future__ import annotations

from dataclasses import dataclass

from ovss.methods.common import (
    Backbones,
    MethodOutput,
    WindowBatch,
    attend,
    patch_tokens,
    softmax_attention,
    tokens_before_last_block,
)
from ovss.methods.registry import Geometry, MethodSpec, register


@dataclass(frozen=True)
class VanillaOptions:
    """Options of ``vanilla`` / ``vanilla-reduced``."""

    reduced: bool = False  # True: q-k attention without residual and FFN (NACLIP's "reduced", Table 4)


def run_vanilla(backbones: Backbones, batch: WindowBatch, opts: VanillaOptions) -> MethodOutput:
    clip = backbones.clip
    x, grid = tokens_before_last_block(clip, batch.pixels)  # (L, n, D)
    block = clip.blocks[-1]
    if opts.reduced:
        q, k, v = block.attn.qkv(block.ln_1(x))  # (L, H, n, d) each
        z = attend(block, softmax_attention(q, k, block.attn.scale), v)  # (L, n, D)
    else:
        z = block(x)  # (L, n, D) residual and FFN kept
    return MethodOutput(patch_tokens(z, clip), grid)


register(
    MethodSpec(
        name="vanilla",
        run=run_vanilla,
        options=VanillaOptions(),
        logit_scale=40.0,
        pad_multiple=1,
        geometry=Geometry(336, 224, 112),
        description="unmodified CLIP last block (q-k attention, residual, FFN)",
    )
)
register(
    MethodSpec(
        name="vanilla-reduced",
        run=run_vanilla,
        options=VanillaOptions(reduced=True),
        logit_scale=40.0,
        pad_multiple=16,
        geometry=Geometry(336, 224, 112),
        description="q-k attention without residual and FFN (the ClearCLIP/GLA releases' 'vanilla')",
    )
)
