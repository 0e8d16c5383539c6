"""The unchunked GLA attention that materialises the M x M matrices in float64: a readable reference.

It follows spec §4.8.8 and §4.9 line by line and shares no code with :mod:`ovss.gla.cross_window`, whose
row-chunked operator must agree with it to fp32 round-off. Without KVE it runs each window alone with L = 1,
an independent path from the chunked code's own-window masks. For tests and reading only (memory O(M^2)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ovss.gla.config import GLAConfig


@dataclass(frozen=True)
class DenseStats:
    """Per-query statistics of all M rows of one key set (float64; see `ovss.gla.cross_window.RowStats`)."""

    counts: Tensor  # (M,) long, |P_i^(T-1)|
    mean: Tensor  # (M,) the subtracted mean (mu_i, or the block mean m for global_mean)
    weight: Tensor  # (M,) w_i | gamma | 1
    shift: float  # u | beta | 0


def _l2(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)  # (..., D) float64 unit rows


def dense_attention_map(
    keys: Tensor, queries: Tensor, num_windows: int, cfg: GLAConfig, *, prior: Tensor | None = None
) -> tuple[Tensor, DenseStats]:
    """The (M, M) attention map of one key set (§4.8.2-4.8.5), in float64.

    Args:
        keys: (M, D) raw key features of L equal windows, window-major.
        queries: (M, D) initial anchors (the keys or smoothed features).
        num_windows: L.
        cfg: GLA hyper-parameters (``chunk_rows`` / ``memory_budget_mb`` are ignored).
        prior: optional (M, M) additive logits.

    Returns:
        alpha (M, M) float64, rows sum to 1; and the `DenseStats` of the M rows.
    """
    m = keys.shape[0]
    if not cfg.kve:  # each window alone, L = 1, placed on the block diagonal
        n = m // num_windows
        alpha = torch.zeros(m, m, dtype=torch.float64)
        parts = []
        for b in range(num_windows):
            sl = slice(b * n, (b + 1) * n)
            sub = None if prior is None else prior[sl, sl]
            a, st = dense_attention_map(keys[sl], queries[sl], 1, replace(cfg, kve=True), prior=sub)
            alpha[sl, sl] = a
            parts.append(st)
        return alpha, DenseStats(
            torch.cat([p.counts for p in parts]),
            torch.cat([p.mean for p in parts]),
            torch.cat([p.weight for p in parts]),
            parts[0].shift,
        )
    k = _l2(keys.double())  # (M, D)
    q = queries.double()  # (M, D)
    eye = torch.eye(m, dtype=torch.bool)  # (M, M)
    if cfg.proxy:
        for _ in range(cfg.steps):
            p = _l2(q) @ k.T > cfg.rho  # (M, M) P^(t-1)
            p |= eye & ~p.any(dim=1, keepdim=True)  # empty set -> {i}
            counts = p.sum(dim=1)  # (M,)
            q = p.double() @ k / counts[:, None]  # (M, D) Q^(t)
    else:
        p = _l2(q) @ k.T > cfg.rho  # (M, M)
        counts = (p | (eye & ~p.any(dim=1, keepdim=True))).sum(dim=1)  # (M,)
    s = _l2(q) @ k.T  # (M, M) S^proxy
    mu = s.mean(dim=1)  # (M,)
    if cfg.clamp_mean:
        mu = mu.clamp(min=0.0)
    ones = torch.ones(m, dtype=torch.float64)  # (M,)
    if cfg.norm == "dynamic":
        u = 1.0 + cfg.lam1 * math.log(1.0 + num_windows)
        w = 1.0 + cfg.lam2 / counts.double()  # (M,)
        a = w[:, None] * (s - u * mu[:, None])  # (M, M)
        stats = DenseStats(counts, mu, w, u)
    elif cfg.norm == "fixed":
        a = cfg.gamma * (s - cfg.beta * mu[:, None])  # (M, M)
        stats = DenseStats(counts, mu, cfg.gamma * ones, cfg.beta)
    elif cfg.norm == "global_mean":
        mbar = s.mean()  # () the whole matrix (the window's block without KVE)
        a = cfg.gamma * (s - cfg.beta * mbar)  # (M, M)
        stats = DenseStats(counts, mbar * ones, cfg.gamma * ones, cfg.beta)
    else:
        a = s  # (M, M) plain cosine similarity
        stats = DenseStats(counts, mu, ones, 0.0)
    if prior is not None:
        a = a + prior.double()  # (M, M) Z = Attn + prior
    if cfg.norm != "none":
        theta = a.max(dim=1, keepdim=True).values.clamp(max=0.0)  # (M, 1)
        a = a.masked_fill(a < theta, -math.inf)  # (M, M)
    return torch.softmax(a / cfg.temperature, dim=1), stats


def dense_cross_window_attention(
    keys: Sequence[Tensor],
    queries: Sequence[Tensor],
    values: Tensor,
    num_windows: int,
    cfg: GLAConfig,
    *,
    prior: Tensor | None = None,
    local_maps: Tensor | None = None,
    local_count: int = 0,
) -> Tensor:
    """Unchunked float64 reference of `ovss.gla.cross_window.cross_window_attention`.

    Args:
        keys, queries: S key sets and their initial anchors, each (M, D_s).
        values: (M, C) values, heads concatenated.
        num_windows: L.
        cfg: GLA hyper-parameters.
        prior: optional (M, M) additive logits, added to every key set's map.
        local_maps: optional (L, N, N) within-window maps summed over ``local_count`` maps.
        local_count: number of maps in ``local_maps``.

    Returns:
        (M, C) float64: (sum_s alpha^(s) [+ block_diag(local_maps)]) [/ (local_count + 1)] @ values.
    """
    alpha = sum(
        (dense_attention_map(k, q, num_windows, cfg, prior=prior)[0] for k, q in zip(keys, queries, strict=True)),
        torch.zeros(values.shape[0], values.shape[0], dtype=torch.float64),
    )  # (M, M)
    if local_maps is not None:
        alpha = (alpha + torch.block_diag(*local_maps.double())) / (local_count + 1)  # (M, M)
    return alpha @ values.double()  # (M, C)
