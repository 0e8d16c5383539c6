"""SAM's two-way transformer: prompt tokens and image tokens attend to each other (segment-anything semantics).

Each of the ``depth`` blocks runs (1) self-attention of the tokens, (2) tokens -> image cross-attention,
(3) an MLP on the tokens, (4) image -> tokens cross-attention, each followed by a residual and a LayerNorm
(eps 1e-5, ``nn.LayerNorm``'s default, as the official code); the first block's self-attention skips the
positional embedding and the residual. A final tokens -> image attention and LayerNorm close the stack.
Cross-attentions project to ``E / downsample_rate`` channels (128 for SAM).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ovss.models.sam.common import MLPBlock

__all__ = ["Attention", "TwoWayAttentionBlock", "TwoWayTransformer"]


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections to ``E / downsample_rate`` channels."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the attention width {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (b, h, n, c / h)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (b, nq, E), k and v (b, nk, E) -> (b, nq, E)."""
        q = self._heads(self.q_proj(q))  # (b, h, nq, c)
        k = self._heads(self.k_proj(k))  # (b, h, nk, c)
        v = self._heads(self.v_proj(v))  # (b, h, nk, c)
        attn = q @ k.permute(0, 1, 3, 2)  # (b, h, nq, nk)
        attn = torch.softmax(attn / math.sqrt(q.shape[-1]), dim=-1)  # (b, h, nq, nk)
        out = attn @ v  # (b, h, nq, c)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))  # (b, nq, E)


class TwoWayAttentionBlock(nn.Module):
    """Self-attention, tokens -> image, MLP, image -> tokens; each with a residual and a LayerNorm."""

    def __init__(
        self, embedding_dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        """queries (b, nq, E), keys (b, HW, E) and their positional embeddings -> updated queries and keys."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)  # (b, nq, E), no residual
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)  # (b, nq, E)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))  # (b, nq, E)
        queries = self.norm3(queries + self.mlp(queries))  # (b, nq, E)
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))  # (b, HW, E)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks and a final tokens -> image attention (SAM: depth 2, 8 heads, MLP 2048)."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, downsample_rate: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """Run the stack.

        Args:
            image_embedding: (b, E, h, w) image tokens.
            image_pe: (b, E, h, w) their positional encoding.
            point_embedding: (b, nq, E) output and prompt tokens (also their positional embedding).

        Returns:
            ``(queries, keys)``: (b, nq, E) processed tokens and (b, h * w, E) processed image tokens.
        """
        keys = image_embedding.flatten(2).permute(0, 2, 1)  # (b, hw, E)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)  # (b, hw, E)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))  # (b, nq, E)
        return queries, keys
