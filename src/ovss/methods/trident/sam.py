"""Trident's global aggregation with SAM's image encoder (spec §4.12.3).

SAM ViT-B's last block (block 11, global attention) gives, per head, attention probabilities Pi_h and
values v_h over its 64 x 64 token grid. Restricted to the valid (unpadded) tokens, the affinity is

    C_h = v_hat_h v_hat_h^T                                   (cosine of values, per head)
    t_i = min(phi * mean_{h, j} C_h[i, j], 0.9)               (one threshold per query)
    W   = rownorm( mean_h Pi_h * [C_h > t_i] )

and the spliced CLIP features X (resized to SAM's valid grid) are aggregated as Z = W X. Only the
valid query rows of Pi are computed (n_s x 4096 logits instead of 4096 x 4096), one head at a time, and
softmax, column selection, mask and accumulation run per slab of ``Tuning.aggregation_rows`` query rows, so
the (12, n_s, n_s) probabilities are never held (805 MB at n_s = 4096).

This module holds the geometry of SAM's input and the aggregation math on given tensors; the SAM
model itself comes from ``ovss.models.sam``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ovss.errors import OvssError
from ovss.precision import full_precision
from ovss.tuning import DEFAULT_TUNING, Tuning

SAM_SIZE = 1024  # SAM's input side (long side resized to it, then zero-padded to a square)
SAM_PATCH = 16  # SAM ViT-B patch size: 64 x 64 tokens
THRESHOLD_CAP = 0.9  # t_i never exceeds this
NEGATIVE_FALLBACK = 0.6  # t_i when it is negative and refine_neg_cos is False


@dataclass(frozen=True)
class SamGeometry:
    """Where an image lands in SAM's 1024 x 1024 input (spec §4.12.3 step 1)."""

    original: tuple[int, int]  # (H0, W0) of the image given to SAM
    rounded: tuple[int, int]  # (H~, W~) = 16 * ceil(H0 / 16), 16 * ceil(W0 / 16): the predictor's image size
    input: tuple[int, int]  # (h_in, w_in): long side 1024, before padding
    grid: tuple[int, int]  # (h_s, w_s) = floor(h_in / 16), floor(w_in / 16): valid token grid
    side: int = SAM_SIZE  # side of SAM's square input in pixels
    patch: int = SAM_PATCH  # SAM's patch side in pixels

    @property
    def mask_side(self) -> int:
        """Side of SAM's low-resolution masks: 4 x the embedding grid (256)."""
        return 4 * (self.side // self.patch)

    @property
    def tokens(self) -> int:
        """n_s, the number of valid tokens."""
        return self.grid[0] * self.grid[1]

    @property
    def valid_rows(self) -> torch.Tensor:
        """(n_s,) long: row-major indices of the valid tokens in SAM's 64 x 64 grid."""
        side = self.side // self.patch
        r = torch.arange(self.grid[0])[:, None] * side  # (h_s, 1)
        c = torch.arange(self.grid[1])[None, :]  # (1, w_s)
        return (r + c).flatten()  # (n_s,)


def long_side_size(height: int, width: int, target: int) -> tuple[int, int]:
    """SAM's ResizeLongestSide size: the long side becomes ``target``, rounded half up (int(x + 0.5))."""
    scale = target / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_geometry(
    height: int, width: int, side: int = SAM_SIZE, patch: int = SAM_PATCH, round_to_patch: bool = True
) -> SamGeometry:
    """SAM's input geometry of an H0 x W0 image (spec §4.12.3 step 1); ``side`` / ``patch`` of the SAM model.

    ``round_to_patch=False``: the image is already the predictor's image (a half of the rounded image).
    Example: VOC 375 x 500 -> rounded 384 x 512 -> input 768 x 1024 -> grid 48 x 64.
    """
    rounded = (height, width)
    if round_to_patch:
        rounded = (SAM_PATCH * math.ceil(height / SAM_PATCH), SAM_PATCH * math.ceil(width / SAM_PATCH))
    size = long_side_size(*rounded, side)
    return SamGeometry((height, width), rounded, size, (size[0] // patch, size[1] // patch), side, patch)


def sam_input_image(rgb: np.ndarray, geometry: SamGeometry) -> np.ndarray:
    """The image handed to SAM's predictor: H0 x W0 uint8 RGB resized (cv2 bilinear) to H~ x W~ (uint8)."""
    import cv2

    h, w = geometry.rounded
    if (h, w) == rgb.shape[:2]:
        return rgb
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)  # (H~, W~, 3) uint8


def valid_attention(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Probabilities of the valid query rows restricted to the valid key columns (spec §4.12.3 step 2).

    Args:
        logits: (H, R, 4096) block-11 logits of valid query rows against all keys (scaled, with the
            relative position terms).
        valid: (n_s,) long indices of the valid keys.

    Returns:
        (H, R, n_s) fp32: softmax over all 4096 keys, then the padded columns dropped (rows sum to <= 1).
    """
    with full_precision():
        return logits.float().softmax(dim=-1)[:, :, valid]  # (H, R, n_s)


def value_thresholds(values: torch.Tensor, cos_fac: float, refine_neg_cos: bool) -> torch.Tensor:
    """Per-query thresholds t_i = min(phi * mean_{h,j} cos(v_hi, v_hj), 0.9) (spec §4.12.3 step 3).

    The row sums of C_h are v_hat_hi . sum_j v_hat_hj, so no n_s x n_s matrix is built here.

    Args:
        values: (H, n_s, d) SAM block-11 values of the valid tokens.
        cos_fac: phi.
        refine_neg_cos: False: a negative t_i becomes 0.6 before the cap.

    Returns:
        (n_s,) fp32 thresholds.
    """
    with full_precision():
        v = F.normalize(values.float(), dim=-1)  # (H, n_s, d)
        H, n, _ = v.shape
        row_sums = (v @ v.sum(dim=1, keepdim=True).transpose(-2, -1))[..., 0]  # (H, n_s) = sum_j C_h[i, j]
        t = cos_fac * row_sums.sum(dim=0) / (H * n)  # (n_s,)
        if not refine_neg_cos:
            t = torch.where(t < 0, torch.full_like(t, NEGATIVE_FALLBACK), t)  # (n_s,)
        return t.clamp(max=THRESHOLD_CAP)  # (n_s,)


@dataclass(frozen=True)
class BlockLogits:
    """Block 11's logits of the valid query rows, made one head at a time: ``logits[h]`` is (n_s, N).

    Indexes like an (H, n_s, N) tensor without holding it; each head is computed in the autocast
    precision that was on when this was made (:func:`encode_sam`), also when indexed outside it.
    """

    attn: Any  # the block's ``SamAttention``
    q: torch.Tensor  # (1, H, N, d) queries of every token
    k: torch.Tensor  # (1, H, N, d) keys of every token
    grid: tuple[int, int]  # the encoder's token grid (64, 64)
    rows: torch.Tensor  # (n_s,) long: the valid query rows
    autocast: torch.dtype | None  # the autocast dtype at creation, None when autocast was off
    fold_positions: bool = DEFAULT_TUNING.fold_positions  # Tuning.fold_positions of the encoder pass

    def __len__(self) -> int:
        return int(self.q.shape[1])

    def __getitem__(self, h: int) -> torch.Tensor:
        """(n_s, N) logits of head ``h``: row r is query ``rows[r]`` against every key."""
        device = self.q.device.type
        with torch.autocast(device, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            q, k = self.q[:, h : h + 1], self.k[:, h : h + 1]  # (1, 1, N, d) each
            logits = self.attn.logits(q, k, self.grid, self.rows, fold_positions=self.fold_positions)
        return logits[0, 0]  # (n_s, N)


def aggregation_weights(
    logits: BlockLogits | torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    cos_fac: float,
    refine_neg_cos: bool,
    rows_per_slab: int = DEFAULT_TUNING.aggregation_rows,
) -> torch.Tensor:
    """Trident's global affinity W = rownorm(mean_h Pi_h * [C_h > t]) (spec §4.12.3 steps 2-4), in fp32.

    One head at a time, and per slab of query rows: softmax over all N keys, the valid columns, the mask
    [C_h > t] and the accumulation into W, so no (H, n_s, n_s) probability map is built. Every operation
    acts row by row on the same head-wide products (logits, C_h), so the result does not depend on the
    slab size: it is bit-identical to building Pi_h whole (checked by ``tests/test_trident.py``).

    Args:
        logits: (H, n_s, N) logits of the valid query rows against all keys (a tensor, or a
            :class:`BlockLogits` that makes each head on demand).
        values: (H, n_s, d) values of the valid tokens.
        valid: (n_s,) long indices of the valid keys among the N.
        cos_fac: phi.
        refine_neg_cos: see :func:`value_thresholds`.
        rows_per_slab: query rows per slab (:attr:`ovss.tuning.Tuning.aggregation_rows`); 0: all n_s rows at once.

    Returns:
        (n_s, n_s) fp32 row-stochastic weights (each row keeps at least its diagonal: C_h[i, i] = 1 > t_i).
    """
    with full_precision():
        t = value_thresholds(values, cos_fac, refine_neg_cos)  # (n_s,)
        v = F.normalize(values.float(), dim=-1)  # (H, n_s, d)
    H, n, _ = v.shape
    slab = n if rows_per_slab <= 0 else rows_per_slab
    b = torch.zeros(n, n, dtype=torch.float32, device=v.device)  # (n_s, n_s)
    for h in range(H):
        head = logits[h]  # (n_s, N) in the encoder's precision
        with full_precision():
            cos = v[h] @ v[h].T  # (n_s, n_s) C_h, whole: a row-slab product may round differently
            for s in range(0, n, slab):
                e = min(s + slab, n)
                probs = valid_attention(head[None, s:e], valid)[0]  # (R, n_s) fp32 Pi_h rows s:e
                b[s:e] += probs * (cos[s:e] > t[s:e, None])  # (R, n_s)
    b /= H
    return b / b.sum(dim=-1, keepdim=True)  # (n_s, n_s) rows sum to 1


def resize_features(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bilinear (half-pixel) resize of a (D, Gr, Gc) feature map to ``grid``, flattened: (h_s * w_s, D) fp32."""
    x = F.interpolate(features[None].float(), size=grid, mode="bilinear", align_corners=False)[0]  # (D, h_s, w_s)
    return x.flatten(1).T  # (n_s, D)


def aggregate(weights: torch.Tensor, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Z = W X (spec §4.12.3 step 5): the spliced features resized to SAM's grid, mixed by W.

    Args:
        weights: (n_s, n_s) row-stochastic SAM affinity.
        features: (D, Gr, Gc) spliced sub-image features Y.
        grid: (h_s, w_s) with h_s * w_s = n_s.

    Returns:
        (n_s, D) fp32 aggregated features, row-major on SAM's valid grid.
    """
    with full_precision():
        return weights.float() @ resize_features(features, grid)  # (n_s, D)


def encode_sam(
    sam: Any, rgb: np.ndarray, round_to_patch: bool = True, tuning: Tuning = DEFAULT_TUNING
) -> tuple[torch.Tensor, BlockLogits, torch.Tensor, SamGeometry]:
    """One pass of SAM's image encoder: neck embedding plus the last block's valid-row logits and values.

    Args:
        sam: an ``ovss.models.sam.SamModel`` (its encoder runs in the caller's autocast precision).
        rgb: (H0, W0, 3) uint8 RGB image, or (``round_to_patch=False``) one half of the rounded image.
        round_to_patch: resize the image to multiples of 16 first (cv2 bilinear), as for the whole image.
        tuning: the encoder's attention switches (``attention_chunk``, ``fold_positions``).

    Returns:
        embedding (1, 256, 64, 64), the valid rows' logits (H, n_s, 4096), made per head when indexed,
        values (H, n_s, d) and the geometry.

    Raises:
        OvssError: the encoder's last block is windowed (Trident needs its global attention, block 11 of ViT-B).
    """
    from ovss.models.sam.transforms import ResizeLongestSide, preprocess

    encoder = sam.image_encoder
    cfg = encoder.cfg
    last = encoder.block(cfg.depth - 1)  # block 11 of SAM ViT-B
    if last.window > 0:
        raise OvssError(f"trident needs a SAM whose last block attends globally; block {cfg.depth - 1} is windowed")
    geometry = sam_geometry(int(rgb.shape[0]), int(rgb.shape[1]), cfg.image_size, cfg.patch, round_to_patch)
    resized = ResizeLongestSide(cfg.image_size).apply_image(sam_input_image(rgb, geometry))  # (h_in, w_in, 3)
    device = next(encoder.parameters()).device
    x = torch.tensor(resized, device=device).permute(2, 0, 1)[None].float()  # (1, 3, h_in, w_in) 0-255
    pixels = preprocess(x, cfg.image_size)  # (1, 3, 1024, 1024) normalised, zero-padded
    chunk, fold = tuning.attention_chunk, tuning.fold_positions
    embedding, x_in = encoder.forward_with_block_input(
        pixels, cfg.depth - 1, attention_chunk=chunk, fold_positions=fold
    )  # (1, 256, 64, 64), (1, 64, 64, C)
    q, k, v = last.attn.qkv(last.norm1(x_in))  # (1, H, 4096, d) each
    rows = geometry.valid_rows.to(device)  # (n_s,)
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    logits = BlockLogits(last.attn, q, k, (cfg.grid, cfg.grid), rows, autocast, fold)  # (H, n_s, 4096) on demand
    return embedding, logits, v[0, :, rows], geometry  # values (H, n_s, d)


def sam_aggregate(backbones: Any, rgb: np.ndarray, spliced: torch.Tensor, opts: Any) -> tuple[
    torch.Tensor, tuple[int, int], Any, dict[str, Any]
]:  # fmt: skip
    """SAM global aggregation of the spliced map (spec §4.12.3), whole image or two halves (Cityscapes).

    Args:
        backbones: :class:`~ovss.methods.common.Backbones` with SAM, the device and the backbone dtype.
        rgb: (H0, W0, 3) uint8 original image.
        spliced: (D, Gr, Gc) spliced sub-image features Y.
        opts: :class:`~ovss.methods.options.TridentOptions`.

    Returns:
        Z (n_s, D) fp32 row-major on the grid (h_s, w_s), the whole image's ``SamImage`` for refinement,
        and diagnostics.
    """
    from ovss.methods.trident.refine import SamImage
    from ovss.precision import backbone_precision

    sam = backbones.sam
    tuning: Tuning = backbones.tuning

    def encode(part: np.ndarray, whole: bool = True) -> tuple[torch.Tensor, BlockLogits, torch.Tensor, SamGeometry]:
        with backbone_precision(backbones.device, backbones.dtype, keep_reduced_copies=tuning.keep_reduced_copies):
            return encode_sam(sam, part, round_to_patch=whole, tuning=tuning)

    def aggregated(logits: BlockLogits, values: torch.Tensor, y: torch.Tensor, g: SamGeometry) -> torch.Tensor:
        slab = tuning.aggregation_rows
        w = aggregation_weights(logits, values, logits.rows, opts.cos_fac, opts.refine_neg_cos, slab)  # (n_s, n_s)
        return aggregate(w, y, g.grid).T.reshape(-1, *g.grid)  # (D, h_s, w_s)

    if not opts.split_halves:
        embedding, logits, values, geometry = encode(rgb)
        z = aggregated(logits, values, spliced, geometry)  # (D, h_s, w_s)
        info = {"sam_grid": list(geometry.grid), "sam_passes": 1}
    else:
        # The release splits the 16-rounded image (H~ x W~) at W~ // 2 and hands each half to SAM as it is.
        rounded = sam_input_image(rgb, sam_geometry(int(rgb.shape[0]), int(rgb.shape[1])))  # (H~, W~, 3)
        half, col = rounded.shape[1] // 2, spliced.shape[-1] // 2
        parts = []
        for image, y in ((rounded[:, :half], spliced[..., :col]), (rounded[:, half:], spliced[..., col:])):
            _, logits, values, g = encode(np.ascontiguousarray(image), whole=False)
            parts.append(aggregated(logits, values, y, g))  # (D, h_s, w_s')
        if parts[0].shape[1] != parts[1].shape[1]:
            raise OvssError(f"split_halves: the two halves have different SAM grids {parts[0].shape[1:]} and "
                            f"{parts[1].shape[1:]}; use split_halves=False for this image size")  # fmt: skip
        z = torch.cat(parts, dim=-1)  # (D, h_s, w_s' + w_s'')
        info = {"sam_grid": list(z.shape[1:]), "sam_passes": 2}
        if not opts.refine:
            return z.flatten(1).T, (int(z.shape[1]), int(z.shape[2])), None, info
        embedding, _, _, geometry = encode(rgb)  # the whole image, for refinement
        info["sam_passes"] = 3
    grid = (int(z.shape[1]), int(z.shape[2]))
    return z.flatten(1).T, grid, SamImage(embedding.float(), geometry), info  # (n_s, D)
