"""GLA cross-window attention as pure tensor functions (spec §4.8.1-4.8.7, §9.2).

The tokens of all L windows of one image form one list of M = L * N tokens, window-major. For every
query row the operator builds a proxy anchor from the keys of all windows, compares it with all M keys,
normalises the similarities per query (dynamic normalisation), masks and takes a softmax. Every step is
row-wise given the full keys, so rows are processed in chunks of R and memory stays O(R * M + M * D); no
M x M matrix is held (`ovss.gla.reference` has the readable dense version the tests compare with).

All similarities, proxies, statistics and softmaxes are computed in fp32 whatever the input dtype
(spec §2.9); the output takes the values' dtype.

Composition for the other bases (§4.9): `attention_rows` gives the weights alpha (R, M) of one chunk of
query rows, and `attend_chunked` multiplies any per-chunk combination of weights with the values, e.g.
SCLIP + GLA (alpha^(q) + alpha^(k), rows sum to 2)::

    def probs(rows):
        alpha_q, _ = attention_rows(q_feats, q_smooth[rows], rows, L, cfg)
        alpha_k, _ = attention_rows(k_feats, k_smooth[rows], rows, L, cfg)
        return alpha_q + alpha_k  # (R, M)

    out = attend_chunked(values, probs, chunk_rows)  # (H, M, d)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ovss.errors import OvssError
from ovss.gla.config import GLAConfig

PriorFn = Callable[[Tensor], Tensor]  # rows (R,) long -> additive attention logits (R, M)
ProbsFn = Callable[[Tensor], Tensor]  # rows (R,) long -> attention weights (R, M) or per head (H, R, M)

# Bytes per entry of an R x M chunk at the step's peak: similarity/Attn fp32 (4), proxy mask bool (1) and its
# fp32 copy for the mean (4), masking bool (1), softmax output (4), allocator slack. The spec's estimate is 9
# (§9.2); 18 is what the GLA step measured on CPU (benchmarks/gla_bench.py memory: 17 bytes per entry).
BYTES_PER_ENTRY = 18


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


def window_index(num_tokens: int, num_windows: int, device: torch.device | None = None) -> Tensor:
    """Window of every token of a window-major list of L equal windows: (M,) long, token // N."""
    if num_windows < 1 or num_tokens % num_windows != 0:
        raise ValueError(f"M={num_tokens} tokens do not split into L={num_windows} equal windows; pass window_of")
    return torch.arange(num_tokens, device=device) // (num_tokens // num_windows)  # (M,)


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)  # (..., D) fp32, unit rows


def _high_confidence(q: Tensor, keys: Tensor, rho: float, self_index: Tensor, key_mask: Tensor | None) -> Tensor:
    """P = {j : <q_hat, K_j> > rho} (within key_mask), an empty row falls back to its own key."""
    selected = _unit(q) @ keys.T > rho  # (R, M) bool
    if key_mask is not None:
        selected &= key_mask  # (R, M)
    empty = (~selected.any(dim=1)).nonzero().squeeze(1)  # (E,) rows with no key above rho
    selected[empty, self_index[empty]] = True
    return selected


def proxy_anchors(
    q0: Tensor, keys: Tensor, rho: float, steps: int, self_index: Tensor, *, key_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Proxy anchors Q^(T) of a set of query rows (Eq. 10-12, §4.8.2, §9.2).

    For t = 1..T: P^(t-1)_i = {j : <Q^(t-1)_i / |Q^(t-1)_i|, K_j> > rho} (strict), replaced by {self_i}
    when empty; Q^(t)_i = mean of K_j over P^(t-1)_i.

    Args:
        q0: (R, D) initial anchors Q^(0) (raw or smoothed features; normalised before the first
            similarity), any float dtype.
        keys: (M, D) key features of all windows; L2-normalised here (in fp32).
        rho: threshold on cosine similarity in [-1, 1].
        steps: T >= 1.
        self_index: (R,) long, index in 0..M-1 of each row's own key (the empty-set fallback).
        key_mask: optional (R, M) bool, the keys a row may select (own window without KVE).

    Returns:
        q: (R, D) fp32, Q^(T), un-normalised (a mean of unit vectors, norm <= 1).
        counts: (R,) long, |P^(T-1)_i| >= 1.
    """
    if steps < 1:
        raise OvssError(f"proxy anchors need steps >= 1, got {steps}")
    k = _unit(keys)  # (M, D)
    q = q0.float()  # (R, D)
    counts = torch.ones(q.shape[0], dtype=torch.long, device=q.device)  # (R,)
    for _ in range(steps):
        selected = _high_confidence(q, k, rho, self_index, key_mask)  # (R, M) bool
        counts = selected.sum(dim=1)  # (R,)
        q = (selected.float() @ k) / counts[:, None]  # (R, D)
    return q, counts


def _anchors_and_counts(
    queries: Tensor, k: Tensor, rows: Tensor, cfg: GLAConfig, own: Tensor | None
) -> tuple[Tensor, Tensor]:
    if cfg.proxy:
        return proxy_anchors(queries, k, cfg.rho, cfg.steps, rows, key_mask=own)  # (R, D), (R,)
    # No-proxy ablation: S = q_hat K^T itself; |P_i| for w_i is the size of the first set
    # {j : s_ij > rho} (with the same {i} fallback), i.e. what T = 1 would average.
    selected = _high_confidence(queries, k, cfg.rho, rows, own)  # (R, M) bool
    return queries.float(), selected.sum(dim=1)  # (R, D), (R,)


def _row_mean(s: Tensor, own: Tensor | None) -> Tensor:
    if own is None:
        return s.mean(dim=1)  # (R,)
    return s.masked_fill(~own, 0.0).sum(dim=1) / own.sum(dim=1)  # (R,) mean over the own window


def attention_rows(
    keys: Tensor,
    queries: Tensor,
    rows: Tensor,
    num_windows: int,
    cfg: GLAConfig,
    *,
    window_of: Tensor | None = None,
    prior: PriorFn | None = None,
    global_mean: Tensor | None = None,
) -> tuple[Tensor, RowStats]:
    """GLA attention weights of a chunk of query rows against all M keys (§4.8.2-4.8.5).

    Attn = w_i (s - u mu_i) (dynamic) | gamma (s - beta mu_i) (fixed) | gamma (s - beta m) (global_mean)
    | s (none); then Z = Attn + prior(rows); entries below theta_i = min(max_j Z_ij, 0) are masked (not
    for none); alpha = softmax(Z / t). Without KVE a row only sees its own window's keys (proxies, mean,
    mask and softmax restricted to them, u with L = 1) and alpha is 0 elsewhere.

    Args:
        keys: (M, D) key features of all windows, window-major, any float dtype; L2-normalised here.
        queries: (R, D) initial anchors of these rows (raw or smoothed features, usually keys[rows]).
        rows: (R,) long indices of the query tokens in 0..M-1.
        num_windows: L, the number of windows of the image.
        cfg: GLA hyper-parameters.
        window_of: (M,) long window of every token (only used without KVE); default equal windows.
        prior: optional additive logits, prior(rows) -> (R, M), added to Attn before the masking.
        global_mean: (M,) from `global_similarity_mean`; required iff ``cfg.norm == "global_mean"``.

    Returns:
        alpha: (R, M) fp32 in [0, 1], rows sum to 1; 0 at masked keys.
        stats: the rows' `RowStats`.
    """
    k = _unit(keys)  # (M, D)
    own = None
    if not cfg.kve:
        win = window_of if window_of is not None else window_index(k.shape[0], num_windows, k.device)  # (M,)
        own = win[rows][:, None] == win[None, :]  # (R, M) keys of the row's own window
    q, counts = _anchors_and_counts(queries, k, rows, cfg, own)  # (R, D), (R,)
    s = _unit(q) @ k.T  # (R, M) S^proxy rows, fp32 in [-1, 1]
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
            raise OvssError("gla.norm = global_mean needs global_mean= from global_similarity_mean()")
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
    alpha = torch.softmax(a.div_(cfg.temperature), dim=1)  # (R, M)
    return alpha, RowStats(counts=counts, mean=mean, weight=weight, shift=shift)


def global_similarity_mean(
    keys: Tensor,
    queries: Tensor,
    num_windows: int,
    cfg: GLAConfig,
    *,
    window_of: Tensor | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """Block mean m of S^proxy for ``norm = global_mean`` (a first pass over the row chunks).

    With KVE, m is the scalar mean of the whole M x M matrix of the image; without, the mean of each
    window's N x N block (ProxyCLIP's window mean). Not clamped (the release clamps only mu_i).

    Args:
        keys: (M, D) key features, window-major.
        queries: (M, D) initial anchors of all tokens.
        num_windows: L.
        cfg: GLA hyper-parameters (``kve``, ``proxy``, ``rho``, ``steps`` are used).
        window_of: (M,) long window of every token; default equal windows.
        chunk_rows: rows per chunk; default from ``cfg``.

    Returns:
        (M,) fp32, m of the block each token's row belongs to.
    """
    k = _unit(keys)  # (M, D)
    m = k.shape[0]
    win = window_of if window_of is not None else window_index(m, num_windows, k.device)  # (M,)
    step = chunk_rows or cfg.chunk_rows or choose_chunk_rows(m, -(-m // num_windows), cfg.memory_budget_mb)
    row_means = torch.empty(m, device=k.device)  # (M,)
    for start in range(0, m, step):
        rows = torch.arange(start, min(start + step, m), device=k.device)  # (R,)
        own = None if cfg.kve else win[rows][:, None] == win[None, :]  # (R, M)
        q, _ = _anchors_and_counts(queries[rows], k, rows, cfg, own)  # (R, D)
        row_means[rows] = _row_mean(_unit(q) @ k.T, own)  # (R,) mean of each row's block
    if cfg.kve:
        return row_means.mean().expand(m).clone()  # (M,) every row has M entries
    sums = torch.zeros(int(win.max()) + 1, device=k.device).index_add_(0, win, row_means)  # (L,)
    return (sums / torch.bincount(win).float())[win]  # (M,) every row of a window has N_b entries


def choose_chunk_rows(num_tokens: int, window_tokens: int, budget_mb: float) -> int:
    """Rows per chunk R from a memory budget for the O(R * M) buffers (§9.2).

    Peak of the row-chunk buffers is about R * M * BYTES_PER_ENTRY bytes (measured). If one window (R = N)
    fits, R is the largest number of whole windows that fits (at most M); otherwise the largest divisor of N
    that fits, at least 1. The
    O(M * D) inputs (keys, anchors, values) do not depend on R and are not counted.

    Args:
        num_tokens: M = L * N.
        window_tokens: N, tokens per window.
        budget_mb: budget in MiB (2**20 bytes).

    Returns:
        R in 1..M (Cityscapes `gla`, M = 28,224, N = 784, 1024 MiB: 1,568 = 2 windows).
    """
    fit = int(budget_mb * 2**20) // (num_tokens * BYTES_PER_ENTRY)  # rows that fit
    if fit >= window_tokens:
        return min(fit // window_tokens * window_tokens, num_tokens)
    divisors = [r for r in range(1, window_tokens + 1) if window_tokens % r == 0 and r <= fit]
    return max(divisors, default=1)


def attend_chunked(values: Tensor, probs_for_rows: ProbsFn, chunk_rows: int) -> Tensor:
    """out[:, rows] = alpha(rows) @ V_h for every head, chunk by chunk (alpha never exceeds R x M).

    Args:
        values: (H, M, d) values of all windows, window-major, any float dtype.
        probs_for_rows: rows (R,) long -> (R, M) weights shared by all heads, or (H, R, M) per head.
        chunk_rows: R >= 1.

    Returns:
        (H, M, d) in the values' dtype (products accumulated in fp32).
    """
    h, m, d = values.shape
    v = values.float()  # (H, M, d)
    v_flat = v.permute(1, 0, 2).reshape(m, h * d)  # (M, H*d) one GEMM for head-shared weights
    out = values.new_empty(h, m, d)  # (H, M, d)
    for start in range(0, m, chunk_rows):
        stop = min(start + chunk_rows, m)
        alpha = probs_for_rows(torch.arange(start, stop, device=values.device)).float()  # (R, M) | (H, R, M)
        if alpha.dim() == 2:
            o = (alpha @ v_flat).view(stop - start, h, d).permute(1, 0, 2)  # (H, R, d)
        else:
            o = torch.bmm(alpha, v)  # (H, R, d)
        out[:, start:stop] = o.to(values.dtype)
    return out


def cross_window_attention(
    keys: Tensor,
    values: Tensor,
    queries: Tensor | None,
    num_windows: int,
    cfg: GLAConfig,
    *,
    window_of: Tensor | None = None,
    prior: PriorFn | None = None,
) -> Tensor:
    """GLA cross-window attention output of all M tokens, exact and row-chunked (§4.8, §9.2).

    Args:
        keys: (M, D) key features of all L windows, window-major (DINO tokens for ProxyCLIP, CLIP q or k
            for the CLIP-internal bases), any float dtype; L2-normalised here.
        values: (H, M, d) values per head, window-major.
        queries: (M, D) initial anchors (e.g. smoothed raw features, `ovss.gla.smoothing`); None: the keys.
        num_windows: L.
        cfg: GLA hyper-parameters; ``cfg.chunk_rows`` or ``cfg.memory_budget_mb`` set R.
        window_of: (M,) long window of every token; default L equal windows of N = M / L tokens.
        prior: optional additive logits prior(rows) -> (R, M) (NACLIP + GLA's image-space Gaussian).

    Returns:
        (H, M, d) attention output per head in the values' dtype (before OutProj).
    """
    m = keys.shape[0]
    q0 = keys if queries is None else queries  # (M, D)
    if values.dim() != 3 or values.shape[1] != m or q0.shape != keys.shape:
        raise ValueError(
            f"expected keys (M, D), queries (M, D), values (H, M, d); got {tuple(keys.shape)}, "
            f"{tuple(q0.shape)}, {tuple(values.shape)}"
        )
    k = _unit(keys)  # (M, D) normalised once for all chunks
    chunk = cfg.chunk_rows or choose_chunk_rows(m, -(-m // num_windows), cfg.memory_budget_mb)
    global_mean = None
    if cfg.norm == "global_mean":
        global_mean = global_similarity_mean(k, q0, num_windows, cfg, window_of=window_of, chunk_rows=chunk)

    def probs(rows: Tensor) -> Tensor:
        alpha, _ = attention_rows(
            k, q0[rows], rows, num_windows, cfg, window_of=window_of, prior=prior, global_mean=global_mean
        )
        return alpha  # (R, M)

    return attend_chunked(values, probs, chunk)
