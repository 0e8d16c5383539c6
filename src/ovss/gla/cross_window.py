"""The GLA cross-window attention operator (spec §4.8.1-4.8.7, §4.9, §9.2): one path for every base.

The tokens of all L windows of one image form one list of M = L * N tokens, window-major. For every
query row and every key set the operator builds a proxy anchor from the keys of all windows, compares it
with all M keys, normalises the similarities per query (dynamic normalisation), adds an optional prior,
masks and takes a softmax; the maps of the key sets are summed, optionally fused with own-window maps,
and applied to the values. Every step is row-wise given the full keys, so rows are processed in chunks of
R and memory stays O(R * M + M * D); no M x M matrix is held (`ovss.gla.reference` has the readable dense
float64 version the tests compare with).

What a base contributes (`ovss.methods.composed.bases`): ProxyCLIP / ClearCLIP one key set; SCLIP two (q and k, maps
summed, rows sum to 2); NACLIP an additive image-space prior; GCLIP within-window maps fused as
(sum of local maps + alpha) / (l + 2).

All similarities, proxies, statistics and softmaxes are computed in fp32 whatever the input dtype
(spec §2.9); the output takes the values' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ovss.errors import OvssError
from ovss.gla.anchors import SPARSE_BELOW, anchors_and_counts, similarities, unit
from ovss.gla.chunking import Scratch, resolve_chunk_rows
from ovss.gla.config import GLAConfig

PriorFn = Callable[[Tensor], Tensor]  # rows (R,) long -> additive attention logits (R, M)


@dataclass(frozen=True)
class RowStats:
    """Per-query statistics of a set of query rows (for tests, logging and analysis).

    Attributes:
        counts: (R,) long, |P_i^(T-1)| (the empty-set fallback counts as 1); without proxies, the number of
            keys with s_ij > rho (same fallback).
        mean: (R,) fp32, the similarity mean subtracted in the row: mu_i (clamped at 0 when
            ``clamp_mean``) for dynamic / fixed, the block mean m for global_mean; mu_i for none.
        weight: (R,) fp32, the factor in front of (s - shift * mean): w_i (dynamic), gamma (fixed,
            global_mean), 1 (none).
        shift: u (dynamic), beta (fixed, global_mean), 0 (none).
    """

    counts: Tensor
    mean: Tensor
    weight: Tensor
    shift: float


def dynamic_shift(num_windows: int, lam1: float) -> float:
    """Dynamic shift u = 1 + lam1 * ln(1 + L) (Eq. 14; natural logarithm).

    Args:
        num_windows: L, the number of windows whose keys a query attends to (1 without KVE).
        lam1: lambda_1 (0.3).

    Returns:
        u >= 1 (L = 1, lam1 = 0.3: 1 + 0.3 ln 2 = 1.2079).
    """
    return 1.0 + lam1 * math.log1p(num_windows)


def sharpen_weight(counts: Tensor, lam2: float) -> Tensor:
    """Sharpening weight w_i = 1 + lam2 / |P_i| (Eq. 15).

    Args:
        counts: (R,) integer, |P_i| >= 1.
        lam2: lambda_2 (30).

    Returns:
        (R,) fp32 weights in (1, 1 + lam2].
    """
    return 1.0 + lam2 / counts.float()  # (R,)


def _own_window(rows: Tensor, num_tokens: int, window_tokens: int) -> Tensor:
    """(R, M) bool: the keys of each row's own window (L equal window-major blocks of N tokens)."""
    win = torch.arange(num_tokens, device=rows.device) // window_tokens  # (M,)
    return (rows // window_tokens)[:, None] == win[None, :]  # (R, M)


def _row_mean(s: Tensor, own: Tensor | None) -> Tensor:
    if own is None:
        return s.mean(dim=1)  # (R,)
    return s.masked_fill(~own, 0.0).sum(dim=1) / own.sum(dim=1)  # (R,) mean over the own window


def _attention_rows(
    k: Tensor,
    queries: Tensor,
    rows: Tensor,
    num_windows: int,
    cfg: GLAConfig,
    prior: PriorFn | None,
    global_mean: Tensor | None,
    scratch: Scratch | None = None,
    out_name: str = "alpha",
    *,
    sparse_below: int,
) -> tuple[Tensor, RowStats]:
    """`attention_rows` on unit keys k (M, D) fp32; with ``scratch``, alpha is its buffer ``out_name``."""
    own = None if cfg.kve else _own_window(rows, k.shape[0], k.shape[0] // num_windows)  # (R, M)
    q, counts = anchors_and_counts(queries, k, rows, cfg, own, scratch, sparse_below=sparse_below)  # (R, D), (R,)
    s = similarities(q, k, scratch)  # (R, M) S^proxy rows, fp32 in [-1, 1]
    mean = _row_mean(s, own)  # (R,) mu_i
    if cfg.clamp_mean:
        mean = mean.clamp(min=0.0)  # (R,)
    weight = torch.full_like(mean, cfg.gamma)  # (R,)
    shift = cfg.beta
    if cfg.norm == "dynamic":
        shift = dynamic_shift(num_windows if cfg.kve else 1, cfg.lam1)
        weight = sharpen_weight(counts, cfg.lam2)  # (R,)
    elif cfg.norm == "global_mean":
        if global_mean is None:
            raise OvssError("gla_norm = global_mean needs global_mean= from global_similarity_mean()")
        mean = global_mean[rows].float()  # (R,) m, one value per window block
    elif cfg.norm == "none":
        shift, weight = 0.0, torch.ones_like(mean)  # (R,)
    a = s.sub_(shift * mean[:, None]).mul_(weight[:, None])  # (R, M) Attn, in place of s
    if prior is not None:
        a += prior(rows).float()  # (R, M) Z = Attn + prior
    if own is not None:
        a.masked_fill_(~own, -math.inf)  # (R, M) other windows' keys are not attended
    if cfg.norm != "none":
        theta = a.amax(dim=1, keepdim=True).clamp(max=0.0)  # (R, 1) theta_i = min(max_j Z_ij, 0)
        a.masked_fill_(a < theta, -math.inf)  # (R, M)
    if cfg.temperature != 1.0:
        a.div_(cfg.temperature)  # (R, M)
    if scratch is None:
        alpha = torch.softmax(a, dim=1)  # (R, M)
    else:  # the kernel of torch.softmax, writing into a reused buffer
        buffer = scratch.take(out_name, (a.shape[0], a.shape[1]), a.dtype, a.device)  # (R, M)
        alpha = torch.ops.aten._softmax.out(a, 1, False, out=buffer)  # (R, M)
    return alpha, RowStats(counts=counts, mean=mean, weight=weight, shift=shift)


def attention_rows(
    keys: Tensor,
    queries: Tensor,
    rows: Tensor,
    num_windows: int,
    cfg: GLAConfig,
    *,
    prior: PriorFn | None = None,
    global_mean: Tensor | None = None,
    sparse_below: int = SPARSE_BELOW,
) -> tuple[Tensor, RowStats]:
    """GLA attention weights of a chunk of query rows against all M keys of one key set (§4.8.2-4.8.5).

    Attn = w_i (s - u mu_i) (dynamic) | gamma (s - beta mu_i) (fixed) | gamma (s - beta m) (global_mean)
    | s (none); then Z = Attn + prior(rows); entries below theta_i = min(max_j Z_ij, 0) are masked (not
    for none); alpha = softmax(Z / t). Without KVE a row only sees its own window's keys (proxies, mean,
    mask and softmax restricted to them, u with L = 1) and alpha is 0 elsewhere.

    Args:
        keys: (M, D) key features of all L windows, window-major, any float dtype; L2-normalised here.
        queries: (R, D) initial anchors of these rows (raw or smoothed features, usually keys[rows]).
        rows: (R,) long indices of the query tokens in 0..M-1.
        num_windows: L, the number of (equal, window-major) windows of the image.
        cfg: GLA hyper-parameters.
        prior: optional additive logits, prior(rows) -> (R, M), added to Attn before the masking.
        global_mean: (M,) from `global_similarity_mean`; required iff ``cfg.norm == "global_mean"``.
        sparse_below: :attr:`ovss.tuning.Tuning.sparse_below`.

    Returns:
        alpha: (R, M) fp32 in [0, 1], rows sum to 1; 0 at masked keys.
        stats: the rows' `RowStats`.
    """
    return _attention_rows(unit(keys), queries, rows, num_windows, cfg, prior, global_mean, sparse_below=sparse_below)


def _global_similarity_mean(
    k: Tensor, queries: Tensor, num_windows: int, cfg: GLAConfig, chunk_rows: int, *, sparse_below: int
) -> Tensor:
    """`global_similarity_mean` on unit keys k (M, D) fp32."""
    m = k.shape[0]
    n = m // num_windows
    row_means = torch.empty(m, device=k.device)  # (M,)
    for start in range(0, m, chunk_rows):
        rows = torch.arange(start, min(start + chunk_rows, m), device=k.device)  # (R,)
        own = None if cfg.kve else _own_window(rows, m, n)  # (R, M)
        q, _ = anchors_and_counts(queries[rows], k, rows, cfg, own, sparse_below=sparse_below)  # (R, D)
        row_means[rows] = _row_mean(similarities(q, k, None), own)  # (R,) mean of each row's block
    if cfg.kve:
        return row_means.mean().expand(m).clone()  # (M,) every row has M entries
    return row_means.view(num_windows, n).mean(dim=1).repeat_interleave(n)  # (M,) each window's N x N mean


def global_similarity_mean(
    keys: Tensor,
    queries: Tensor,
    num_windows: int,
    cfg: GLAConfig,
    *,
    chunk_rows: int | None = None,
    sparse_below: int = SPARSE_BELOW,
) -> Tensor:
    """Block mean m of S^proxy for ``norm = global_mean`` (a first pass over the row chunks).

    With KVE, m is the scalar mean of the whole M x M matrix of the image; without, the mean of each
    window's N x N block (ProxyCLIP's window mean). Not clamped (the release clamps only mu_i).

    Args:
        keys: (M, D) key features, window-major.
        queries: (M, D) initial anchors of all tokens.
        num_windows: L.
        cfg: GLA hyper-parameters (``kve``, ``proxy``, ``rho``, ``steps`` are used).
        chunk_rows: rows per chunk; default from ``cfg``.
        sparse_below: :attr:`ovss.tuning.Tuning.sparse_below`.

    Returns:
        (M,) fp32, m of the block each token's row belongs to.
    """
    m = keys.shape[0]
    chunk = chunk_rows or resolve_chunk_rows(cfg, m, m // num_windows)
    return _global_similarity_mean(unit(keys), queries, num_windows, cfg, chunk, sparse_below=sparse_below)


def _scatter_own_window(alpha: Tensor, local_maps: Tensor, rows: Tensor) -> None:
    """alpha[r, own-window columns] += local_maps[window of r, token of r], in place: (R, M)."""
    n = local_maps.shape[-1]
    win = rows // n  # (R,)
    cols = win[:, None] * n + torch.arange(n, device=rows.device)[None, :]  # (R, N)
    alpha.scatter_add_(1, cols, local_maps[win, rows % n].float())  # (R, M)


def cross_window_attention(
    keys: Sequence[Tensor],
    queries: Sequence[Tensor],
    values: Tensor,
    num_windows: int,
    cfg: GLAConfig,
    *,
    prior: PriorFn | None = None,
    local_maps: Tensor | None = None,
    local_count: int = 0,
    sparse_below: int = SPARSE_BELOW,
) -> Tensor:
    """GLA cross-window attention of all M tokens of one image, exact and row-chunked (§4.8, §4.9, §9.2).

    For each key set s, alpha^(s) (M, M) is the §4.8 map of `attention_rows` (with the prior added to every
    set); alpha = sum_s alpha^(s) (SCLIP: rows sum to 2). With own-window maps (GCLIP + GLA),
    alpha = (alpha + local_maps placed in the own-window columns) / (local_count + 1). The output is
    alpha @ values, computed R rows at a time; alpha is never materialised beyond R x M.

    Args:
        keys: S >= 1 key sets, each (M, D_s) raw key features of all L windows, window-major (DINO tokens for
            ProxyCLIP, CLIP q and/or k with heads concatenated for the CLIP-internal bases), any float dtype;
            L2-normalised here.
        queries: S initial anchors, each (M, D_s) (the keys themselves or smoothed raw features,
            `ovss.gla_smoothing`).
        values: (M, C) values of all windows, window-major, heads concatenated (one map serves all heads).
        num_windows: L; the M tokens are L equal windows of N = M / L.
        cfg: GLA hyper-parameters; ``cfg.chunk_rows`` or ``cfg.memory_budget_mb`` set R.
        prior: optional additive logits prior(rows) -> (R, M) (NACLIP + GLA's image-space Gaussian).
        local_maps: optional (L, N, N) within-window maps, summed over ``local_count`` maps (rows sum to
            ``local_count``), fused with the cross-window map (GCLIP + GLA).
        local_count: number of maps summed in ``local_maps``.
        sparse_below: :attr:`ovss.tuning.Tuning.sparse_below` (sparse or dense product for the proxy means).

    Returns:
        (M, C) attention output in the values' dtype (before OutProj); products accumulated in fp32.

    Raises:
        ValueError: shapes that do not fit together (a programming error of the caller).
    """
    m, c = values.shape
    if not keys or len(keys) != len(queries) or num_windows < 1 or m % num_windows:
        raise ValueError(f"need S >= 1 key sets and as many queries, M = {m} in L = {num_windows} equal windows")
    for k_raw, q_raw in zip(keys, queries, strict=True):
        if k_raw.shape[0] != m or q_raw.shape != k_raw.shape:
            raise ValueError(f"keys {tuple(k_raw.shape)} and queries {tuple(q_raw.shape)} must be (M={m}, D)")
    n = m // num_windows
    if local_maps is not None and tuple(local_maps.shape) != (num_windows, n, n):
        raise ValueError(f"local_maps must be (L, N, N) = ({num_windows}, {n}, {n}), got {tuple(local_maps.shape)}")
    chunk = resolve_chunk_rows(cfg, m, n)
    sets = []
    for k_raw, q_raw in zip(keys, queries, strict=True):
        k = unit(k_raw)  # (M, D) normalised once for all chunks
        mean = None
        if cfg.norm == "global_mean":
            mean = _global_similarity_mean(k, q_raw, num_windows, cfg, chunk, sparse_below=sparse_below)  # (M,)
        sets.append((k, q_raw, mean))
    v = values.float()  # (M, C)
    out = values.new_empty(m, c)  # (M, C)
    # Reused buffers (out= products) unless autograd must record the step (out= has no derivative).
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (*keys, *queries, values))
    scratch = None if tracked else Scratch()
    for start in range(0, m, chunk):
        rows = torch.arange(start, min(start + chunk, m), device=values.device)  # (R,)
        k0, q0, mean0 = sets[0]
        sparse = sparse_below
        alpha, _ = _attention_rows(k0, q0[rows], rows, num_windows, cfg, prior, mean0, scratch, sparse_below=sparse)
        for k, q, mean in sets[1:]:
            more, _ = _attention_rows(
                k, q[rows], rows, num_windows, cfg, prior, mean, scratch, "alpha_s", sparse_below=sparse
            )  # (R, M)
            alpha += more
        if local_maps is not None:
            _scatter_own_window(alpha, local_maps, rows)  # (R, M) rows sum to S + local_count
            alpha.div_(local_count + 1)  # (R, M)
        if out.dtype == torch.float32 and scratch is not None:
            torch.mm(alpha, v, out=out[start : start + len(rows)])  # (R, C)
        else:
            out[start : start + len(rows)] = (alpha @ v).to(values.dtype)  # (R, C)
    return out
