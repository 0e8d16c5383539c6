"""The unchunked GLA attention that materialises the M x M matrices: a readable reference for the tests.

It follows spec §4.8.8 line by line; :func:`ovss.gla.cross_window.cross_window_attention` must agree with it
to fp32 round-off. Without KVE it runs each window alone with L = 1, an independent path from the chunked
code's own-window masks.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from ovss.gla.config import GLAConfig
from ovss.gla.cross_window import PriorFn, RowStats, _unit, dynamic_shift


def dense_cross_window_attention(
    keys: Tensor,
    values: Tensor,
    queries: Tensor | None,
    num_windows: int,
    cfg: GLAConfig,
    *,
    prior: PriorFn | None = None,
) -> tuple[Tensor, RowStats]:
    """Unchunked reference of `cross_window_attention` that materialises M x M (§4.8.8 pseudocode).

    For tests and reading only (memory O(M^2)). Windows are L equal window-major blocks; without KVE each
    window is run alone with L = 1.

    Args:
        keys, values, queries, num_windows, cfg, prior: as in `cross_window_attention`.

    Returns:
        out: (H, M, d) in the values' dtype.
        stats: `RowStats` of all M rows.
    """
    m = keys.shape[0]
    q0 = keys if queries is None else queries  # (M, D)
    if not cfg.kve:
        n = m // num_windows
        runs = []
        for b in range(num_windows):
            sl = slice(b * n, (b + 1) * n)
            sub_prior = None if prior is None else (lambda r, sl=sl: prior(r + sl.start)[:, sl])  # (n, n)
            runs.append(
                dense_cross_window_attention(
                    keys[sl], values[:, sl], q0[sl], 1, replace(cfg, kve=True), prior=sub_prior
                )
            )
        stats = [st for _, st in runs]
        return torch.cat([o for o, _ in runs], dim=1), RowStats(
            counts=torch.cat([st.counts for st in stats]),
            mean=torch.cat([st.mean for st in stats]),
            weight=torch.cat([st.weight for st in stats]),
            shift=stats[0].shift,
        )
    k = _unit(keys)  # (M, D)
    q = q0.float()  # (M, D)
    diag = torch.arange(m, device=k.device)  # (M,)
    if cfg.proxy:
        for _ in range(cfg.steps):
            p = _unit(q) @ k.T > cfg.rho  # (M, M) P^(t-1)
            p[diag, diag] |= ~p.any(dim=1)  # empty set -> {i}
            counts = p.sum(dim=1)  # (M,)
            q = p.float() @ k / counts[:, None]  # (M, D) Q^(t)
    else:
        counts = (_unit(q) @ k.T > cfg.rho).sum(dim=1).clamp(min=1)  # (M,)
    s = _unit(q) @ k.T  # (M, M) S^proxy
    mu = s.mean(dim=1)  # (M,)
    if cfg.clamp_mean:
        mu = mu.clamp(min=0.0)
    ones = torch.ones_like(mu)  # (M,)
    if cfg.norm == "dynamic":
        u = dynamic_shift(num_windows, cfg.lam1)
        w = 1.0 + cfg.lam2 / counts.float()  # (M,)
        a = w[:, None] * (s - u * mu[:, None])  # (M, M)
        row_stats = RowStats(counts, mu, w, u)
    elif cfg.norm == "fixed":
        a = cfg.gamma * (s - cfg.beta * mu[:, None])  # (M, M)
        row_stats = RowStats(counts, mu, cfg.gamma * ones, cfg.beta)
    elif cfg.norm == "global_mean":
        mbar = s.mean()  # () scalar mean of the whole matrix
        a = cfg.gamma * (s - cfg.beta * mbar)  # (M, M)
        row_stats = RowStats(counts, mbar * ones, cfg.gamma * ones, cfg.beta)
    else:
        a = s  # (M, M) plain cosine similarity
        row_stats = RowStats(counts, mu, ones, 0.0)
    if prior is not None:
        a = a + prior(diag).float()  # (M, M)
    if cfg.norm != "none":
        theta = a.max(dim=1).values.clamp(max=0.0)  # (M,)
        a = a.masked_fill(a < theta[:, None], -math.inf)  # (M, M)
    alpha = torch.softmax(a / cfg.temperature, dim=1)  # (M, M)
    out = torch.einsum("ij,hjd->hid", alpha, values.float())  # (H, M, d)
    return out.to(values.dtype), row_stats
