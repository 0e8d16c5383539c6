"""What every method shares: the window batch it receives, what it returns, and last-block primitives.

Notation (spec §1): ``x`` is the input of the last CLIP block for every window, (L, n, D) with [CLS] at 0;
``q, k, v`` are its per-head projections of ``ln_1(x)``, (L, H, n, d).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ovss.models.vit import ResidualAttentionBlock, VisionTransformer
from ovss.pipeline.windows import Layout, Padding, Window
from ovss.precision import full_precision
from ovss.tuning import DEFAULT_TUNING, Tuning


@dataclass
class Backbones:
    """The frozen networks a method may use, and the Segmenter's speed switches for running them."""

    clip: VisionTransformer  # CLIP image tower
    vfm: VisionTransformer | None = None  # vision foundation model (DINO) for DINO-guided methods
    sam: Any = None  # SAM (ovss.models.sam.SamModel) of SAM-based methods (Trident)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the models run
    dtype: torch.dtype = torch.float32  # backbone precision (bf16 / fp16: autocast, ovss.precision)
    tuning: Tuning = DEFAULT_TUNING  # speed / memory switches; methods pass its fields to the backbone calls


@dataclass
class WindowBatch:
    """Windows of one image (a batch of them), padded to a common size, as fed to the backbones.

    ``predict_many(pool_windows=True)`` also puts windows of several images into one batch, for methods that
    read only ``pixels``, ``windows`` and ``padding`` (see ``MethodSpec.reads_image``).
    """

    pixels: torch.Tensor  # (L, 3, h, w) CLIP-normalised RGB, zero-padded to the method's multiple
    windows: list[Window]  # the L windows in processing pixels (before padding), row-major
    padding: Padding  # symmetric padding applied to every window
    image_size: tuple[int, int]  # processing image (H, W)
    image: torch.Tensor | None = None  # (3, H, W) CLIP-normalised processing image, unpadded (CASS's global view)
    rgb: np.ndarray | None = None  # (H0, W0, 3) uint8 original image (Trident's SAM view)


@dataclass
class MethodOutput:
    """Last-block output of a method for every window."""

    tokens: torch.Tensor  # (L, gr * gc, D) patch tokens entering the dense head (ln_post, proj)
    grid: tuple[int, int]  # (gr, gc) token grid of the logits (CLIP grid, or the DINO grid)
    info: dict[str, Any] = field(default_factory=dict)  # per-image diagnostics (e.g. GCLIP's CS start block)
    window_info: dict[str, list[Any]] = field(default_factory=dict)  # per-window diagnostics, one entry per window
    # What the text stage or the post step reads (MethodSpec.score / .post): per-window tensors (L, ...), concatenated
    # over window batches (CASS), or per-image objects of joint-window methods (Trident's SAM view of the image).
    extras: dict[str, Any] = field(default_factory=dict)
    layout: Layout | None = None  # where the tokens live when not on the input windows (Trident: SAM's grid)


def tokens_before_last_block(
    clip: VisionTransformer, pixels: torch.Tensor, *, block_tokens: int = DEFAULT_TUNING.block_tokens
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Embed windows and run every block but the last, unchanged.

    Args:
        clip: the CLIP image tower.
        pixels: (L, 3, h, w) normalised windows.
        block_tokens: tokens per pass through the blocks (:attr:`ovss.tuning.Tuning.block_tokens`).

    Returns:
        x (L, 1 + gr * gc, D), the input of the last block, and the grid (gr, gc).
    """
    x, grid = clip.embed(pixels)  # (L, n, D)
    return clip.forward_blocks(x, 0, len(clip.blocks) - 1, block_tokens=block_tokens), grid


def softmax_attention(a: torch.Tensor, b: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(a b^T * scale + bias) over the last axis, computed in fp32.

    Args:
        a, b: (L, H, n, d).
        bias: optional additive logits broadcastable to (L, H, n, n).

    Returns:
        (L, H, n, n) row-stochastic attention.
    """
    with full_precision():
        logits = (a.float() @ b.float().transpose(-2, -1)) * scale  # (L, H, n, n)
        if bias is not None:
            logits = logits + bias
        return logits.softmax(dim=-1)


def attend(block: ResidualAttentionBlock, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Apply attention to values, concatenate heads and apply OutProj.

    Args:
        block: the block whose ``attn.out_proj`` is used.
        attn: (L, H or 1, n, n) attention weights (rows need not sum to 1, e.g. SCLIP's sum of two maps).
        v: (L, H, n, d) values.

    Returns:
        (L, n, D) = OutProj(concat_h attn_h v_h).
    """
    y = attn.to(v.dtype) @ v  # (L, H, n, d)
    return block.attn.merge_heads(y)  # (L, n, D)


def residual_ffn(block: ResidualAttentionBlock, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Keep the block's residual and FFN around a replaced attention output: u = x + a; z = u + FFN(ln_2 u)."""
    u = x + block.ls_1(a)  # (L, n, D)
    return u + block.ffn(u)  # (L, n, D)


def patch_tokens(z: torch.Tensor, clip: VisionTransformer) -> torch.Tensor:
    """Drop [CLS] (and registers): (L, n, D) -> (L, gr * gc, D)."""
    return z[:, clip.num_prefix_tokens :]
