"""One compact Vision Transformer for CLIP's image tower and for DINO / DINOv2.

Parameter names follow OpenAI CLIP (``conv1``, ``class_embedding``, ``positional_embedding``,
``transformer.resblocks.{i}.attn.in_proj_weight`` ...), so an OpenAI state dict loads as is; other
formats are converted to this layout by :mod:`ovss.models.formats`. The architecture is read off the
weight shapes (:func:`ovss.models.vit_build.build_vit`), never from a config file.

Tokens are batch-first: ``(B, n, D)`` with [CLS] at position 0, then register tokens (DINOv2, DINOv3), then
the ``gr * gc`` patch tokens in row-major order. A ``rope_periods`` buffer in the weights (DINOv3) replaces
the absolute position table by rotary embeddings of the patches' q and k (:mod:`ovss.models.rope`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ovss.models.layers import ACTIVATIONS, LayerNorm, LayerScale, Linear, QuickGELU
from ovss.models.normalization import InputNorm
from ovss.models.rope import apply_rope, rope_tables
from ovss.precision import autocast_weights
from ovss.tuning import DEFAULT_TUNING

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) fp32 tables of the patch tokens, each (P, head_dim)


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names (fused in-projection)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} attention heads")
        self.heads = heads
        self.head_dim = width // heads
        self.scale = self.head_dim**-0.5
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = Linear(width, width)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project normalised tokens to per-head queries, keys and values.

        Args:
            x: (B, n, D) tokens, already passed through the block's ``ln_1``.

        Returns:
            q, k, v, each (B, heads, n, head_dim).
        """
        B, n, _ = x.shape
        weight, bias = autocast_weights(self, self.in_proj_weight, self.in_proj_bias, like=x)
        qkv = F.linear(x, cast(torch.Tensor, weight), bias)  # (B, n, 3D)
        qkv = qkv.view(B, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, n, d)
        return qkv[0], qkv[1], qkv[2]

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """Only the values of :meth:`qkv` (a third of the in-projection), for methods that use no q or k.

        Args:
            x: (B, n, D) tokens, already passed through the block's ``ln_1``.

        Returns:
            v (B, heads, n, head_dim), equal to ``qkv(x)[2]`` up to round-off.
        """
        B, n, D = x.shape
        weight, bias = autocast_weights(self, self.in_proj_weight, self.in_proj_bias, like=x)
        w_v = cast(torch.Tensor, weight)[2 * D :]  # (D, D) the value rows of the fused in-projection
        v = F.linear(x, w_v, None if bias is None else bias[2 * D :])  # (B, n, D)
        return v.view(B, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, n, d)

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """Concatenate heads and apply the output projection: (B, H, n, d) -> (B, n, D)."""
        B, H, n, d = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, n, H * d))  # (B, n, D)

    def attention_map(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The ordinary softmax(q k^T / sqrt(d)) map of normalised tokens ``x``: (B, n, D) -> (B, H, n, n)."""
        q, k, _ = self.qkv(x)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, n, n)
        if attn_mask is not None:
            logits = logits + attn_mask
        return logits.float().softmax(dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, rope: Rope | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x)  # (B, H, n, d) each
        if rope is not None:
            q, k = apply_rope(q, k, *rope)  # (B, H, n, d) each, patches rotated in fp32
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, n, d)
        return self.merge_heads(y)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1 x), then + mlp(ln_2 x) (optionally layer-scaled)."""

    def __init__(
        self, width: int, heads: int, mlp_width: int, act: str, eps: float, layer_scale: bool
    ) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", Linear(width, mlp_width)),
                    ("gelu", ACTIVATIONS[act]()),
                    ("c_proj", Linear(mlp_width, width)),
                ]
            )
        )
        self.ls_1: nn.Module = LayerScale(width) if layer_scale else nn.Identity()
        self.ls_2: nn.Module = LayerScale(width) if layer_scale else nn.Identity()

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP branch including ln_2 and layer scale: (B, n, D) -> (B, n, D)."""
        return self.ls_2(self.mlp_forward(self.ln_2(x)))

    def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``self.mlp(x)`` (fc1, activation, fc2), with QuickGELU computed in place on fc1's fresh output.

        Bit-identical to ``self.mlp(x)`` (tests/test_vit_speed.py). Out of place when autograd records the
        graph (an in-place activation would overwrite a value the backward pass needs).
        """
        fc1, act, fc2 = cast("tuple[Linear, nn.Module, Linear]", tuple(self.mlp))
        h = fc1(x)  # (B, n, 4D)
        if isinstance(act, QuickGELU) and not h.requires_grad:
            h = act.inplace(h)  # (B, n, 4D)
        else:
            h = act(h)  # (B, n, 4D)
        return fc2(h)  # (B, n, D)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, rope: Rope | None = None) -> torch.Tensor:
        # Under autocast the branches return bf16/fp16; adding them to the fp32 stream x promotes to fp32,
        # so the residual stream stays fp32 (only the branches' matrix products are reduced).
        x = x + self.ls_1(self.attn(self.ln_1(x), attn_mask, rope))  # (B, n, D)
        return x + self.ffn(x)  # (B, n, D)


class Transformer(nn.Module):
    """A stack of blocks, named ``resblocks`` as in openai/CLIP."""

    def __init__(
        self, width: int, layers: int, heads: int, act: str, eps: float = 1e-5, layer_scale: bool = False
    ) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, 4 * width, act, eps, layer_scale) for _ in range(layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        *,
        block_tokens: int = DEFAULT_TUNING.block_tokens,
    ) -> torch.Tensor:
        """All blocks on tokens (B, n, D), at most ``block_tokens`` tokens at a time (samples are independent).

        ``block_tokens``: :attr:`ovss.tuning.Tuning.block_tokens` (0: the whole batch in one pass).
        """
        B, n, _ = x.shape
        step = B if block_tokens <= 0 else max(1, block_tokens // n)
        if step < B:
            return torch.cat([self(x[i : i + step], attn_mask, block_tokens=0) for i in range(0, B, step)])  # (B, n, D)
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a :class:`VisionTransformer`; :func:`build_vit` reads it off the weights."""

    patch: int  # patch side p in pixels (16 for ViT-B/16, 8 for DINO ViT-B/8)
    width: int  # token width D (768 for ViT-B)
    layers: int  # number of blocks (12 for ViT-B)
    heads: int  # attention heads (from the checkpoint's config or registry entry; else width // 64)
    grid: int  # side of the pretrained position table (14 for CLIP ViT-B/16 at 224 px; 0: none, RoPE)
    output_dim: int | None  # joint embedding size E of the visual projection (None: no projection, DINO)
    act: str = "quick_gelu"  # MLP activation: "quick_gelu" (OpenAI CLIP) or "gelu" (DINO, most OpenCLIP)
    eps: float = 1e-5  # LayerNorm epsilon (CLIP 1e-5, DINO 1e-6)
    pre_norm: bool = True  # ln_pre after the embeddings (CLIP yes, DINO no)
    patch_bias: bool = False  # bias in the patch-embedding conv (CLIP no, DINO yes)
    registers: int = 0  # register tokens after [CLS] (DINOv2-reg: 4)
    layer_scale: bool = False  # LayerScale on both residual branches (DINOv2)
    pos_offset: float = 0.1  # position-table interpolation uses scale (g + offset) / grid (spec §2.4)
    pos_antialias: bool = False  # antialias in the position-table interpolation (DINOv2-reg release)
    rope: bool = False  # rotary embeddings of the patches' q/k instead of a position table (DINOv3)


class VisionTransformer(nn.Module):
    """ViT image tower: patch embedding, [CLS] (+ registers), position table, blocks, final norm, projection."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_norm = InputNorm()  # RGB statistics of the images it expects (set by the loaders)
        D = cfg.width
        self.conv1 = nn.Conv2d(3, D, kernel_size=cfg.patch, stride=cfg.patch, bias=cfg.patch_bias)
        self.class_embedding = nn.Parameter(torch.zeros(D))
        if cfg.rope:
            self.register_buffer("rope_periods", torch.zeros(D // cfg.heads // 4))  # (d/4,) RoPE periods P_j
        else:
            self.positional_embedding = nn.Parameter(torch.zeros(1 + cfg.grid * cfg.grid, D))
        if cfg.registers:
            self.register_tokens = nn.Parameter(torch.zeros(cfg.registers, D))
        self.ln_pre: nn.Module = LayerNorm(D, eps=cfg.eps) if cfg.pre_norm else nn.Identity()
        self.transformer = Transformer(D, cfg.layers, cfg.heads, cfg.act, cfg.eps, cfg.layer_scale)
        self.ln_post = LayerNorm(D, eps=cfg.eps)
        if cfg.output_dim is not None:
            self.proj = nn.Parameter(torch.zeros(D, cfg.output_dim))

    @property
    def blocks(self) -> list[ResidualAttentionBlock]:
        """The transformer blocks, in order (a typed view of ``transformer.resblocks``)."""
        return cast("list[ResidualAttentionBlock]", list(self.transformer.resblocks))

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: [CLS] plus registers."""
        return 1 + self.cfg.registers

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) of an input of ``height x width`` pixels (the conv floors)."""
        return height // self.cfg.patch, width // self.cfg.patch

    def position_table(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings for a ``rows x cols`` patch grid (spec §2.4).

        The pretrained ``grid x grid`` table is resized by bicubic interpolation (a = -0.75, half-pixel,
        borders clamped) with scale factors ``(rows + 0.1) / grid`` and ``(cols + 0.1) / grid`` (the DINO
        convention: source coordinates use that scale, not ``grid / rows``). The [CLS] entry is unchanged;
        the pretrained grid is returned untouched.

        Returns:
            (1 + rows * cols, D) in the table's dtype.
        """
        table = self.positional_embedding  # (1 + G*G, D)
        G = self.cfg.grid
        if (rows, cols) == (G, G):
            return table
        cls_pos, patch_pos = table[:1], table[1:]
        D = table.shape[1]
        patch_pos = patch_pos.reshape(1, G, G, D).permute(0, 3, 1, 2).float()  # (1, D, G, G)
        offset = self.cfg.pos_offset
        if offset == 0.0:
            patch_pos = F.interpolate(
                patch_pos,
                size=(rows, cols),
                mode="bicubic",
                align_corners=False,
                antialias=self.cfg.pos_antialias,
            )
        else:
            patch_pos = F.interpolate(
                patch_pos,
                scale_factor=((rows + offset) / G, (cols + offset) / G),
                mode="bicubic",
                align_corners=False,
                recompute_scale_factor=False,
                antialias=self.cfg.pos_antialias,
            )  # (1, D, rows, cols)
        if patch_pos.shape[-2:] != (rows, cols):  # scale factors that round the wrong way
            raise RuntimeError(f"position grid {tuple(patch_pos.shape[-2:])} != {(rows, cols)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(rows * cols, D).to(table.dtype)  # (rows*cols, D)
        return torch.cat([cls_pos, patch_pos], dim=0)  # (1 + rows*cols, D)

    def embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch-embed images and add [CLS], position embeddings, registers and ln_pre.

        Args:
            pixels: (B, 3, h, w) normalised images; sides that are not multiples of the patch are floored.

        Returns:
            tokens (B, 1 + registers + gr * gc, D) in the weights' dtype (fp32 also under autocast: the
            residual stream starts, and stays, in fp32) and the grid (gr, gc).
        """
        weight = self.conv1.weight
        x = self.conv1(pixels.to(weight.dtype)).to(weight.dtype)  # (B, D, gr, gc) the weights' dtype (fp32)
        B, D, gr, gc = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, gr*gc, D)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, D)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + gr*gc, D)
        if not self.cfg.rope:  # RoPE models (DINOv3) add no position embedding to any token
            x = x + self.position_table(gr, gc).to(x.dtype)  # (B, 1 + gr*gc, D)
        if self.cfg.registers:
            reg = self.register_tokens.to(x.dtype).expand(B, -1, D)  # (B, R, D)
            x = torch.cat([x[:, :1], reg, x[:, 1:]], dim=1)  # (B, 1 + R + gr*gc, D)
        return self.ln_pre(x), (gr, gc)

    def rotary(self, grid: tuple[int, int] | None) -> Rope | None:
        """The RoPE tables of a patch grid (None for a model with a position table).

        Raises:
            ValueError: a RoPE model is run without its grid.
        """
        if not self.cfg.rope:
            return None
        if grid is None:
            raise ValueError("a RoPE ViT (DINOv3) needs the patch grid that embed() returned")
        return rope_tables(cast("torch.Tensor", self.rope_periods), *grid)  # (gr*gc, d) each, fp32

    def forward_blocks(
        self,
        x: torch.Tensor,
        start: int = 0,
        end: int | None = None,
        grid: tuple[int, int] | None = None,
        *,
        block_tokens: int = DEFAULT_TUNING.block_tokens,
    ) -> torch.Tensor:
        """Run blocks ``start .. end - 1`` unchanged on tokens (B, n, D); ``grid`` (gr, gc) is needed by RoPE.

        A large batch (more than ``block_tokens`` tokens, :attr:`ovss.tuning.Tuning.block_tokens`; 0: no
        limit) runs through the blocks a few samples at a time: every sample is independent, and the
        element-wise passes stay in cache (the products are as efficient on hundreds of tokens as on thousands).
        """
        B, n, _ = x.shape
        step = B if block_tokens <= 0 else max(1, block_tokens // n)
        if step < B:
            slices = [self.forward_blocks(x[i : i + step], start, end, grid, block_tokens=0) for i in range(0, B, step)]
            return torch.cat(slices)  # (B, n, D)
        rope = self.rotary(grid)
        for block in self.blocks[start:end]:
            x = block(x, rope=rope)
        return x  # (B, n, D)

    def forward(self, pixels: torch.Tensor, *, block_tokens: int = DEFAULT_TUNING.block_tokens) -> torch.Tensor:
        """The unmodified tower: all blocks, then ln_post (and the projection if any) on every token.

        Returns:
            (B, n, E) with E = output_dim, or (B, n, D) without a projection.
        """
        x, grid = self.embed(pixels)
        return self.head(self.forward_blocks(x, grid=grid, block_tokens=block_tokens))

    def matmul_weights(self) -> list[torch.Tensor]:
        """The weights and biases of the blocks' matrix products (in-projections, out-projections, MLPs): the
        ones :func:`ovss.precision.autocast_weights` serves, 98 % of a ViT-B's parameters."""
        params: list[torch.Tensor] = []
        for module in self.transformer.modules():
            if isinstance(module, Attention):
                params += [module.in_proj_weight, module.in_proj_bias]
            elif isinstance(module, Linear):
                params += [p for p in (module.weight, module.bias) if p is not None]
        return params

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """ln_post then the visual projection (if any): (B, n, D) -> (B, n, E). Not normalised."""
        z = self.ln_post(z)
        if self.cfg.output_dim is not None:
            z = z @ self.proj.to(z.dtype)
        return z
