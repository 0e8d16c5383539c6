"""SC-CLIP's anomaly tokens (spec §4.11.1 steps 2-3, §10 #28-#30): detect them, then repair a map from its grid.

Three detectors, all on the raw residual stream ``P`` (L, n, D) of every window, all in fp32 (§10 #30):

* ``lof_release`` (default): the release's simplified LOF on *squared* distances. With ``N_i`` the k nearest
  tokens ``j != i`` and ``kappa_i`` the largest squared distance in ``N_i``, ``LOF_i = mean_{j in N_i} kappa_i /
  kappa_j`` (its reachability ``max(D_ij, kappa_i)`` is always ``kappa_i``).
* ``lof_sklearn``: standard LOF (scikit-learn's) on Euclidean distances, reachability ``max(d_ij, kappa_j)``.
* ``topk_norm``: the first release: the ``topk`` tokens of largest L2 norm.

The LOF detectors flag the tokens whose score is above the (1 - contamination)-quantile of the window's
scores (linear interpolation). Neighbours are ordered by distance, ties by lower token index; k is capped
at n - 1. A zero k-distance (k exact duplicates) is guarded by ``EPS`` instead of dividing by zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ovss.precision import full_precision

EPS = 1e-10  # added to k-distances / mean reachabilities (scikit-learn's guard against duplicates)


def _neighbours(x: Tensor, k: int, squared: bool) -> tuple[Tensor, Tensor]:
    """The k nearest other tokens of every token: distances (L, n, k) ascending and indices (L, n, k)."""
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # (L, n, n) exact Euclidean
    if squared:
        d = d * d  # (L, n, n)
    d.diagonal(dim1=1, dim2=2).fill_(torch.inf)  # a token is not its own neighbour
    dist, idx = torch.sort(d, dim=-1, stable=True)  # (L, n, n) ties: lower index first
    return dist[..., :k], idx[..., :k]  # (L, n, k)


def lof_scores(p: Tensor, k: int, kind: str = "lof_release") -> Tensor:
    """Local outlier factor of every token of every window.

    Args:
        p: (L, n, D) token features (any float dtype; computed in fp32).
        k: neighbours per token (capped at n - 1; n = 1 gives 1.0).
        kind: ``lof_release`` (squared distances, reachability kappa_i) or ``lof_sklearn`` (Euclidean,
            reachability max(d_ij, kappa_j)).

    Returns:
        (L, n) fp32 scores; about 1 for inliers, larger for outliers.
    """
    L, n, _ = p.shape
    k = min(k, n - 1)
    if k < 1:
        return torch.ones(L, n, device=p.device)
    with full_precision():
        x = p.float()  # (L, n, D)
        dist, idx = _neighbours(x, k, squared=kind == "lof_release")  # (L, n, k)
        kappa = dist[..., -1]  # (L, n) k-distance
        kappa_nb = torch.gather(kappa, 1, idx.reshape(L, n * k)).reshape(L, n, k)  # (L, n, k) kappa_j
        if kind == "lof_release":
            lrd = 1.0 / (kappa + EPS)  # (L, n): the release's k / (k kappa_i)
        else:
            reach = torch.maximum(dist, kappa_nb)  # (L, n, k) reach-dist(i, j) = max(d_ij, kappa_j)
            lrd = 1.0 / (reach.mean(dim=-1) + EPS)  # (L, n)
        lrd_nb = torch.gather(lrd, 1, idx.reshape(L, n * k)).reshape(L, n, k)  # (L, n, k)
        return (lrd_nb / lrd[..., None]).mean(dim=-1)  # (L, n)


def detect_anomalies(p: Tensor, kind: str, neighbors: int, contamination: float, topk: int) -> Tensor:
    """Anomaly tokens of every window (spec §4.11.1 step 2).

    Args:
        p: (L, n, D) raw residual stream (patch tokens of the last block's input).
        kind: ``lof_release`` | ``lof_sklearn`` | ``topk_norm``.
        neighbors: LOF k.
        contamination: LOF threshold = the (1 - contamination)-quantile of the window's scores.
        topk: tokens flagged by ``topk_norm``.

    Returns:
        (L, n) bool, True for anomaly tokens (10 of 196 for LOF without ties).
    """
    L, n, _ = p.shape
    if kind == "topk_norm":
        with full_precision():
            norms = p.float().norm(dim=-1)  # (L, n)
        order = torch.sort(norms, dim=-1, descending=True, stable=True).indices[:, : min(topk, n)]  # (L, t)
        return torch.zeros(L, n, dtype=torch.bool, device=p.device).scatter_(1, order, True)  # (L, n)
    scores = lof_scores(p, neighbors, kind)  # (L, n)
    tau = torch.quantile(scores, 1.0 - contamination, dim=-1, keepdim=True)  # (L, 1) linear interpolation
    return scores > tau  # (L, n)


def anomaly_grid(anomalies: Tensor, grid: tuple[int, int], mode: str = "row_major") -> Tensor:
    """Grid positions of the anomaly tokens: (L, n) bool -> (L, gr, gc) bool.

    ``row_major``: token i sits at (i // gc, i % gc). ``release`` (§10 #29): (i // gr, i % gr) as the release
    computes it; identical for square grids; positions that fall outside a non-square grid are dropped (the
    release fails there with an index error).
    """
    L = anomalies.shape[0]
    gr, gc = grid
    if mode == "row_major" or gr == gc:
        return anomalies.reshape(L, gr, gc)
    b, i = anomalies.nonzero(as_tuple=True)  # (A,), (A,)
    row, col = i // gr, i % gr  # (A,)
    inside = (row < gr) & (col < gc)  # (A,)
    out = torch.zeros(L, gr, gc, dtype=torch.bool, device=anomalies.device)  # (L, gr, gc)
    out[b[inside], row[inside], col[inside]] = True
    return out


def repair(feats: Tensor, mask: Tensor) -> Tensor:
    """Replace every anomaly token by the mean of its non-anomalous 8-neighbours (spec §4.11.1 step 3).

    Tokens with no such neighbour inside the grid, and every other token, are unchanged.

    Args:
        feats: (L, gr * gc, D) map on the grid, row-major.
        mask: (L, gr, gc) bool anomaly positions (:func:`anomaly_grid`).

    Returns:
        (L, gr * gc, D) repaired map in ``feats``' dtype (means computed in fp32).
    """
    L, gr, gc = mask.shape
    D = feats.shape[-1]
    with full_precision():
        f = feats.float().reshape(L, gr, gc, D)  # (L, gr, gc, D)
        keep = (~mask).float()[..., None]  # (L, gr, gc, 1)
        fp = torch.nn.functional.pad(f * keep, (0, 0, 1, 1, 1, 1))  # (L, gr + 2, gc + 2, D) zeros outside
        kp = torch.nn.functional.pad(keep, (0, 0, 1, 1, 1, 1))  # (L, gr + 2, gc + 2, 1)
        total = torch.zeros_like(f)  # (L, gr, gc, D)
        count = torch.zeros_like(keep)  # (L, gr, gc, 1)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                if (dy, dx) != (1, 1):
                    total += fp[:, dy : dy + gr, dx : dx + gc]  # (L, gr, gc, D)
                    count += kp[:, dy : dy + gr, dx : dx + gc]  # (L, gr, gc, 1)
        update = mask[..., None] & (count > 0)  # (L, gr, gc, 1)
        out = torch.where(update, total / count.clamp(min=1.0), f)  # (L, gr, gc, D)
    return out.reshape(L, gr * gc, D).to(feats.dtype)
