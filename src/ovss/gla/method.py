"""GLA as an operator on methods: ``X+gla`` runs base X with the cross-window attention of spec §4.8.

All windows of an image are processed jointly: blocks 0..10 (and the VFM) are ordinary batched passes over
the L windows; the last block's attention of every window sees the keys and values of all windows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ovss.gla.bases import ADAPTERS, CrossWindowParts
from ovss.gla.config import GLAConfig, GLAMethodOptions
from ovss.gla.cross_window import attend_chunked, attention_rows, choose_chunk_rows, global_similarity_mean
from ovss.gla.smoothing import resolve_smoothing, smooth_queries, smoothing_index
from ovss.methods.common import Backbones, MethodOutput, WindowBatch
from ovss.precision import full_precision


def token_origins(batch: WindowBatch, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Top-left processing pixel (y, x) of every token, window-major: (M, 2) float32.

    Padding shifts a window's grid up/left by the padding, so token (0, 0) of window b sits at
    (y1 - top, x1 - left).
    """
    pad = batch.padding
    rows, cols = grid
    r = torch.arange(rows, dtype=torch.float32) * patch
    c = torch.arange(cols, dtype=torch.float32) * patch
    yy, xx = torch.meshgrid(r, c, indexing="ij")  # (rows, cols)
    per_window = [
        torch.stack([(yy + w.y1 - pad.top).flatten(), (xx + w.x1 - pad.left).flatten()], dim=1) for w in batch.windows
    ]
    return torch.cat(per_window)  # (M, 2)


def gaussian_prior_rows(origins: torch.Tensor, sigma_px: float, weight: float) -> Any:
    """NACLIP + GLA's image-space prior: rows -> kappa * exp(-|c_i - c_j|^2 / (2 sigma^2)), (R, M)."""

    def prior(rows: torch.Tensor) -> torch.Tensor:
        o = origins.to(rows.device)
        dy = o[rows, 0:1] - o[None, :, 0]  # (R, M)
        dx = o[rows, 1:2] - o[None, :, 1]  # (R, M)
        return weight * torch.exp(-(dy * dy + dx * dx) / (2.0 * sigma_px**2))  # (R, M)

    return prior


def cross_window_tokens(parts: CrossWindowParts, batch: WindowBatch, cfg: GLAConfig) -> tuple[torch.Tensor, dict]:
    """Replace the base's per-window attention by GLA's cross-window attention (statistics in fp32).

    Returns:
        tokens (L, N, D) for the dense head, and diagnostics (L, M, chunk rows, smoothing).
    """
    L, H, N, d = parts.values.shape
    M = L * N
    values = parts.values.float().transpose(0, 1).reshape(H, M, d)  # (H, M, d) fp32, window-major
    smoothing = resolve_smoothing(cfg.smoothing, parts.clip_internal)
    index = None
    if smoothing != "off":
        pad = batch.padding
        boxes = [(w.y1 - pad.top, w.x1 - pad.left, w.y2 + pad.bottom, w.x2 + pad.right) for w in batch.windows]
        index = smoothing_index(boxes, parts.grid, parts.patch)
    chunk = cfg.chunk_rows or choose_chunk_rows(M, N, cfg.memory_budget_mb)
    prior = None
    if parts.prior_sigma_px is not None:
        prior = gaussian_prior_rows(
            token_origins(batch, parts.grid, parts.patch), parts.prior_sigma_px, parts.prior_weight
        )
    maps = []
    for raw in parts.key_sets:
        keys = raw.reshape(M, -1)  # (M, D)
        queries = keys if index is None else smooth_queries(keys, index, smoothing)  # (M, D) initial anchors
        unit_keys = F.normalize(keys.float(), dim=-1)  # (M, D)
        mean = None
        if cfg.norm == "global_mean":
            mean = global_similarity_mean(unit_keys, queries, L, cfg, chunk_rows=chunk)  # (M,)
        maps.append((unit_keys, queries, mean))

    def probs(rows: torch.Tensor) -> torch.Tensor:
        alpha = torch.zeros(len(rows), M, device=values.device)  # (R, M)
        for unit_keys, queries, mean in maps:
            a, _ = attention_rows(unit_keys, queries[rows], rows, L, cfg, prior=prior, global_mean=mean)
            alpha += a  # (R, M) SCLIP: rows sum to 2
        if parts.local_maps is not None:
            alpha = (alpha + _own_window_rows(parts.local_maps, rows, N, M)) / (parts.local_count + 1)
        return alpha

    out = attend_chunked(values, probs, chunk)  # (H, M, d)
    y = out.reshape(H, L, N, d).transpose(0, 1)  # (L, H, N, d)
    tokens = parts.finish(parts.merge_heads(y))  # (L, N, D)
    info = {**parts.info, "gla": {"windows": L, "tokens": M, "chunk_rows": chunk, "smoothing": smoothing}}
    return tokens, info


def _own_window_rows(local_maps: torch.Tensor, rows: torch.Tensor, N: int, M: int) -> torch.Tensor:
    """Within-window maps (L, N, N) placed in the own-window columns of query rows: (R, M), zeros elsewhere."""
    win = rows // N  # (R,)
    out = torch.zeros(len(rows), M, dtype=torch.float32, device=local_maps.device)  # (R, M)
    cols = win[:, None] * N + torch.arange(N, device=rows.device)[None, :]  # (R, N)
    out.scatter_(1, cols, local_maps[win, rows % N].float())  # (R, M)
    return out


def run_gla(base: str, backbones: Backbones, batch: WindowBatch, opts: GLAMethodOptions) -> MethodOutput:
    parts = ADAPTERS[base](backbones, batch, opts.base)  # backbone passes (autocast if reduced precision)
    with full_precision():  # similarities, proxies, normalisation and softmax in fp32 (spec §2.9)
        tokens, info = cross_window_tokens(parts, batch, opts.gla)
    info["gla"]["u"] = 1.0 + opts.gla.lam1 * math.log(1 + (len(batch.windows) if opts.gla.kve else 1))
    return MethodOutput(tokens, parts.grid, info, parts.window_info)
