"""SAM's image encoder: a ViTDet-style ViT with windowed and global blocks and decomposed relative positions.

Follows segment-anything ``modeling/image_encoder.py``: patch embedding (conv p x p, stride p), a learned
absolute position table of the pretraining grid (64 x 64 for 1024 px), pre-norm blocks (LayerNorm eps 1e-6,
GELU MLP) that attend inside non-overlapping ``window x window`` squares (the grid zero-padded to a multiple
of the window) except the global blocks, a decomposed relative position bias in every block, and a neck
(1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) to the 256-channel image embedding.

Parameter names are the official ones (``patch_embed.proj``, ``pos_embed``, ``blocks.i.norm1``,
``blocks.i.attn.rel_pos_h`` ...) except the fused q/k/v projection, ``attn.qkv.{weight,bias}`` in the official
checkpoint, which is ``attn.in_proj_{weight,bias}`` here (as in :mod:`ovss.models.vit`) so that ``qkv`` can be
the method returning per-head queries, keys and values. Tokens are (B, Hg, Wg, D), row-major.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovss.errors import OvssError
from ovss.models.sam.common import LayerNorm2d, MLPBlock
from ovss.tuning import DEFAULT_TUNING

# Defaults of the two attention keywords, :class:`ovss.tuning.Tuning`'s (read once, when the functions are defined).
_CHUNK = DEFAULT_TUNING.attention_chunk  # logits per attention pass (one head, a slab of query rows); 0: whole map
_FOLD = DEFAULT_TUNING.fold_positions  # relative position terms folded into the q.k product (<= d columns)

__all__ = ["SamAttention", "SamBlock", "SamEncoderConfig", "SamImageEncoder", "window_partition", "window_unpartition"]


@dataclass(frozen=True)
class SamEncoderConfig:
    """Architecture of a :class:`SamImageEncoder`, read off the weight shapes by :func:`encoder_config`."""

    patch: int  # patch side p in pixels (16)
    width: int  # token width D (768 for ViT-B)
    depth: int  # number of blocks (12 for ViT-B)
    heads: int  # attention heads (12 for ViT-B; D / head width of the relative position tables)
    grid: int  # side G of the absolute position table; the input is G * p pixels square (64 -> 1024)
    window: int  # side of the attention windows of the non-global blocks (14)
    global_blocks: tuple[int, ...]  # blocks that attend over the whole grid ((2, 5, 8, 11) for ViT-B)
    mlp_dim: int  # hidden width of the block MLPs (3072 = 4 D)
    out_chans: int  # channels of the image embedding after the neck (256)
    qkv_bias: bool = True  # bias in the fused q/k/v projection
    eps: float = 1e-6  # LayerNorm epsilon of the blocks

    @property
    def image_size(self) -> int:
        """Side of the square input in pixels (1024 for SAM)."""
        return self.grid * self.patch


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """Split a token grid into non-overlapping windows, zero-padding it bottom/right to a multiple of ``window``.

    Args:
        x: (B, H, W, C) tokens.
        window: window side w.

    Returns:
        (B * nW, w, w, C) windows in row-major window order, and the padded size (Hp, Wp).
    """
    B, H, W, C = x.shape
    pad_h = (window - H % window) % window
    pad_w = (window - W % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window, window, Wp // window, window, C)  # (B, nh, w, nw, w, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window, window, C)  # (B * nh * nw, w, w, C)
    return windows, (Hp, Wp)


def window_unpartition(windows: Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: (B * nW, w, w, C) windows -> (B, H, W, C), padding removed."""
    Hp, Wp = padded
    H, W = size
    B = windows.shape[0] // (Hp * Wp // window // window)
    x = windows.view(B, Hp // window, Wp // window, window, window, -1)  # (B, nh, nw, w, w, C)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, Hp, Wp, -1)  # (B, Hp, Wp, C)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()  # (B, H, W, C)
    return x


class SamAttention(nn.Module):
    """Multi-head self-attention over a square of tokens with a decomposed relative position bias.

    Logits (official ``add_decomposed_rel_pos``, MViTv2): ``(q / sqrt(d)) . k_j + q . Rh[y_i - y_j] +
    q . Rw[x_i - x_j]`` with the unscaled q in the two position terms.
    """

    def __init__(self, width: int, heads: int, size: int, qkv_bias: bool = True) -> None:
        """Args: width D, heads, side ``size`` of the token square it attends over (window or grid)."""
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} attention heads")
        self.heads = heads
        self.head_dim = width // heads
        self.scale = self.head_dim**-0.5
        self.size = size
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width)) if qkv_bias else None
        self.proj = nn.Linear(width, width)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, self.head_dim))

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head queries, keys and values of normalised tokens.

        Args:
            x: (B, H, W, D) or (B, N, D) tokens, already through the block's ``norm1``.

        Returns:
            q, k, v, each (B, heads, N, head_dim) with N = H * W in row-major order.
        """
        B, D = x.shape[0], x.shape[-1]
        x = x.reshape(B, -1, D)  # (B, N, D)
        N = x.shape[1]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3D)
        qkv = qkv.view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        return qkv[0], qkv[1], qkv[2]

    def relative_terms(self, q: Tensor, rows: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The decomposed relative position terms ``q_r . Rh[y_r - y_j]`` and ``q_r . Rw[x_r - x_j]``.

        Each query is multiplied by the whole (2 size - 1, d) table once, then the offsets are picked out,
        instead of materialising an (R, size, d) table of embeddings per query (official code).

        Args:
            q: (B, h, R, d) unscaled queries of the rows ``rows``.
            rows: (R,) int64 row-major indices of those queries on the grid.
            grid: (H, W) of the token square.

        Returns:
            rel_h (B, h, R, H) over key rows y_j and rel_w (B, h, R, W) over key columns x_j.
        """
        H, W = grid
        B, h, R, _ = q.shape
        keys_h = torch.arange(H, device=q.device)  # (H,) key rows y_j
        keys_w = torch.arange(W, device=q.device)  # (W,) key columns x_j
        offset_h = (rows // W)[:, None] - keys_h[None, :] + (H - 1)  # (R, H) index of y_r - y_j in rel_pos_h
        offset_w = (rows % W)[:, None] - keys_w[None, :] + (W - 1)  # (R, W) index of x_r - x_j in rel_pos_w
        all_h = q @ self.rel_pos_h.to(q.dtype).t()  # (B, h, R, 2H - 1) q_r . Rh[o] for every offset o
        all_w = q @ self.rel_pos_w.to(q.dtype).t()  # (B, h, R, 2W - 1)
        rel_h = all_h.gather(-1, offset_h.expand(B, h, R, H))  # (B, h, R, H)
        rel_w = all_w.gather(-1, offset_w.expand(B, h, R, W))  # (B, h, R, W)
        return rel_h, rel_w

    def logits(
        self, q: Tensor, k: Tensor, grid: tuple[int, int], rows: Tensor | None = None, *, fold_positions: bool = _FOLD
    ) -> Tensor:
        """Attention logits with the decomposed relative position terms, for all or some query rows.

        Args:
            q: (B, heads, N, d) queries (unscaled), N = grid[0] * grid[1].
            k: (B, heads, N, d) keys.
            grid: (H, W) of the token square; both equal to this layer's ``size``.
            rows: optional (R,) int64 row-major indices of the query tokens wanted; None = all N.
            fold_positions: see :meth:`row_logits`.

        Returns:
            (B, heads, R, N) logits (R = N when ``rows`` is None); row r equals row ``rows[r]`` of the full map.
        """
        H, W = grid
        if self.size != H or self.size != W:
            raise ValueError(f"this attention layer attends over {self.size}x{self.size} tokens, got {H}x{W}")
        if rows is None:
            rows = torch.arange(q.shape[2], device=q.device)
        # a head sliced out of qkv() is strided: a contiguous k lets the product read k^T without a gather
        return self.row_logits(q[:, :, rows], k.contiguous(), rows, grid, fold_positions=fold_positions)  # (B, h, R, N)

    def row_logits(
        self, qr: Tensor, k: Tensor, rows: Tensor, grid: tuple[int, int], *, fold_positions: bool = _FOLD
    ) -> Tensor:
        """:meth:`logits` of the query rows ``rows`` given their queries ``qr`` (B, h, R, d): (B, h, R, N).

        The position terms are added to the q.k logits in place, or, when they add at most ``d`` columns
        (the 14 x 14 windows: 28 <= 64) and ``fold_positions`` is on, folded into one product: the
        "augmented" query ``[q / sqrt(d), rel_h, rel_w]`` times the key ``[k, onehot(y_j), onehot(x_j)]``
        is exactly the logit (multiplications by 1 and 0), with one rounding in bf16 instead of three.
        """
        H, W = grid
        B, h, R, d = qr.shape
        rel_h, rel_w = self.relative_terms(qr, rows, grid)  # (B, h, R, H), (B, h, R, W)
        if fold_positions and d >= H + W:
            N = k.shape[2]
            keys = torch.arange(N, device=k.device)  # (N,) row-major key indices
            onehot = torch.zeros(N, H + W, dtype=k.dtype, device=k.device)  # (N, H + W)
            onehot[keys, keys // W] = 1  # key row y_j
            onehot[keys, H + keys % W] = 1  # key column x_j
            q_aug = torch.cat([qr * self.scale, rel_h.to(qr.dtype), rel_w.to(qr.dtype)], dim=-1)  # (B, h, R, d+H+W)
            k_aug = torch.cat([k, onehot.expand(B, h, N, H + W)], dim=-1)  # (B, h, N, d + H + W)
            return q_aug @ k_aug.transpose(-2, -1)  # (B, h, R, N)
        attn = (qr * self.scale) @ k.transpose(-2, -1)  # (B, h, R, N)
        grid_view = attn.view(B, h, R, H, W)  # (B, h, R, H, W) the same storage
        grid_view += rel_h[..., :, None]  # in place: no second (B, h, R, N) map
        grid_view += rel_w[..., None, :]
        return attn  # (B, h, R, N)

    def forward(self, x: Tensor, *, attention_chunk: int = _CHUNK, fold_positions: bool = _FOLD) -> Tensor:
        """(B, H, W, D) normalised tokens -> (B, H, W, D) attention output (after ``proj``).

        One head and at most ``attention_chunk`` logits at a time (0: a head's whole map): the logit map is
        built, softmaxed and multiplied by the values while it is in cache, with the same operations as the
        whole map at once. ``fold_positions``: see :meth:`row_logits`.
        """
        B, H, W, D = x.shape
        q, k, v = self.qkv(x)  # (B, h, N, d) each
        N = H * W
        rows_per_pass = N if attention_chunk <= 0 else max(1, attention_chunk // (B * N))
        y = torch.empty_like(v)  # (B, h, N, d)
        for head in range(self.heads):
            # contiguous per-head keys: the products read k^T as a transposed matrix, not a strided gather
            qh, kh, vh = (t[:, head : head + 1].contiguous() for t in (q, k, v))  # (B, 1, N, d) each
            for start in range(0, N, rows_per_pass):
                rows = torch.arange(start, min(N, start + rows_per_pass), device=x.device)  # (R,)
                qr = qh[:, :, start : start + rows_per_pass]  # (B, 1, R, d) a view
                logits = self.row_logits(qr, kh, rows, (H, W), fold_positions=fold_positions)  # (B, 1, R, N)
                attn = logits.softmax(dim=-1)  # (B, 1, R, N)
                y[:, head : head + 1, start : start + rows_per_pass] = attn @ vh  # (B, 1, R, d)
        y = y.transpose(1, 2).reshape(B, H, W, D)  # (B, H, W, D), heads concatenated
        return self.proj(y)  # (B, H, W, D)


class SamBlock(nn.Module):
    """Pre-norm block: windowed (``window > 0``) or global attention, then a GELU MLP; both residual."""

    def __init__(self, cfg: SamEncoderConfig, window: int) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = SamAttention(cfg.width, cfg.heads, window if window > 0 else cfg.grid, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLPBlock(cfg.width, cfg.mlp_dim, nn.GELU)

    def forward(self, x: Tensor, *, attention_chunk: int = _CHUNK, fold_positions: bool = _FOLD) -> Tensor:
        """(B, Hg, Wg, D) -> (B, Hg, Wg, D); the switches as in :meth:`SamAttention.forward`."""
        shortcut = x
        x = self.norm1(x)  # (B, Hg, Wg, D)
        if self.window > 0:
            size = (x.shape[1], x.shape[2])
            x, padded = window_partition(x, self.window)  # (B * nW, w, w, D)
            x = self.attn(x, attention_chunk=attention_chunk, fold_positions=fold_positions)  # (B * nW, w, w, D)
            x = window_unpartition(x, self.window, padded, size)  # (B, Hg, Wg, D)
        else:
            x = self.attn(x, attention_chunk=attention_chunk, fold_positions=fold_positions)  # (B, Hg, Wg, D)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))  # (B, Hg, Wg, D)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches to D channels, channels last."""

    def __init__(self, patch: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.proj(pixels).permute(0, 2, 3, 1)  # (B, Hg, Wg, D)


class SamImageEncoder(nn.Module):
    """SAM's ViT image encoder: (B, 3, S, S) normalised, padded pixels -> (B, 256, S/16, S/16) embedding."""

    def __init__(self, cfg: SamEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid, cfg.grid, cfg.width))
        self.blocks = nn.ModuleList(
            SamBlock(cfg, 0 if i in cfg.global_blocks else cfg.window) for i in range(cfg.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.width, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    @property
    def img_size(self) -> int:
        """Side of the square input in pixels (1024 for the released SAM)."""
        return self.cfg.image_size

    def block(self, i: int) -> SamBlock:
        """Block ``i`` (typed access to ``blocks``)."""
        block = self.blocks[i]
        if not isinstance(block, SamBlock):  # pragma: no cover - the list holds only SamBlock
            raise TypeError(type(block).__name__)
        return block

    def embed(self, pixels: Tensor) -> Tensor:
        """Patch embedding plus the absolute position table.

        Args:
            pixels: (B, 3, S, S) normalised and zero-padded images, S = ``img_size``.

        Returns:
            (B, Hg, Wg, D) tokens, Hg = Wg = S / p.
        """
        S = self.cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, S, S):
            raise OvssError(
                f"SAM's image encoder takes (B, 3, {S}, {S}) normalised, zero-padded images, got "
                f"{tuple(pixels.shape)}; resize the long side to {S} and pad with ovss.models.sam.transforms"
            )
        return self.patch_embed(pixels) + self.pos_embed  # (B, Hg, Wg, D)

    def forward(self, pixels: Tensor, *, attention_chunk: int = _CHUNK, fold_positions: bool = _FOLD) -> Tensor:
        """(B, 3, S, S) -> (B, out_chans, S/p, S/p) image embedding (neck output).

        ``attention_chunk`` and ``fold_positions`` are :class:`ovss.tuning.Tuning`'s (see :meth:`SamAttention.forward`).
        """
        x = self.embed(pixels)  # (B, Hg, Wg, D)
        for block in self.blocks:
            x = block(x, attention_chunk=attention_chunk, fold_positions=fold_positions)  # (B, Hg, Wg, D)
        return self.neck(x.permute(0, 3, 1, 2))  # (B, out_chans, Hg, Wg)

    def forward_with_block_input(
        self, pixels: Tensor, block: int, *, attention_chunk: int = _CHUNK, fold_positions: bool = _FOLD
    ) -> tuple[Tensor, Tensor]:
        """The image embedding and the tokens entering block ``block`` (before its ``norm1``).

        Args:
            pixels: (B, 3, S, S) normalised, zero-padded images.
            block: index of the block whose input is returned, 0 <= block < depth.
            attention_chunk, fold_positions: :class:`ovss.tuning.Tuning`'s (see :meth:`SamAttention.forward`).

        Returns:
            ``(embedding, x_in)``: (B, out_chans, Hg, Wg) and (B, Hg, Wg, D).
        """
        if not 0 <= block < self.cfg.depth:
            raise ValueError(f"block {block} out of range: the encoder has {self.cfg.depth} blocks")
        x = self.embed(pixels)  # (B, Hg, Wg, D)
        x_in = x
        for i, b in enumerate(self.blocks):
            if i == block:
                x_in = x
            x = b(x, attention_chunk=attention_chunk, fold_positions=fold_positions)  # (B, Hg, Wg, D)
        return self.neck(x.permute(0, 3, 1, 2)), x_in  # (B, out_chans, Hg, Wg), (B, Hg, Wg, D)
