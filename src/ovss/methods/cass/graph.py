"""CASS's spectral graph distillation (spec §4.10): DINO key graphs fused into CLIP's, head by head.

Per window and head h: the CLIP graph ``G_c = k k^T / sqrt(d)`` and the DINO graph ``G_d = k_d k_d^T / sqrt(d)``
(DINO keys already resized to the CLIP grid and min-max mapped into the CLIP keys' range). Heads are matched
by the 1-Wasserstein distance between their top eigenvalue distributions (Hungarian matching, SciPy); the
matched DINO graph is replaced by a low-rank approximation, its diagonal zeroed and min-max mapped into the
CLIP graph's range, and the two are blended with a weight taken from the matching cost.

Everything here is computed in float64 (the eigen- and singular-value problems are small: N <= a few hundred),
except, with ``release_costs``, the Hungarian costs and the weights: float32, as the release stores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

RELEASE_RANK = 10  # the release's svd_lowrank(q=10): its 95%-energy rank is computed but never used


@dataclass(frozen=True)
class HeadMatch:
    """Which DINO head is fused into each CLIP head, and with what weight."""

    dino_head: tuple[int, ...]  # (H,) DINO head fused into CLIP head c
    weight: tuple[float, ...]  # (H,) w = 1 - cost of the matched pair (the Wasserstein distance)


def top_eigenvalues(graphs: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest eigenvalues of each symmetric graph, in descending order.

    Args:
        graphs: (H, N, N) symmetric matrices.
        k: how many to keep (all N when N < k).

    Returns:
        (H, min(k, N)) float64.
    """
    vals = torch.linalg.eigvalsh(graphs.double())  # (H, N) ascending
    return vals.flip(-1)[:, :k]  # (H, k) descending


def spectral_cost(dino_graphs: torch.Tensor, clip_graphs: torch.Tensor, k: int) -> torch.Tensor:
    """Head-to-head cost ``cost[i, j] = 1 - W1(p_i, p_j)`` of DINO head i and CLIP head j.

    Each head's top-k eigenvalues are L2-normalised, then divided by their L1 norm (a distribution p);
    W1 between two equally weighted k-point distributions is the sum of |differences| of the sorted values.

    Args:
        dino_graphs, clip_graphs: (H, N, N) symmetric graphs.
        k: number of eigenvalues.

    Returns:
        (H, H) float64, rows DINO heads, columns CLIP heads.
    """
    e_d = F.normalize(top_eigenvalues(dino_graphs, k), p=2, dim=-1)  # (H, k)
    e_c = F.normalize(top_eigenvalues(clip_graphs, k), p=2, dim=-1)  # (H, k)
    p_d = F.normalize(e_d, p=1, dim=-1).sort(dim=-1).values  # (H, k) ascending
    p_c = F.normalize(e_c, p=1, dim=-1).sort(dim=-1).values  # (H, k)
    w1 = (p_d[:, None, :] - p_c[None, :, :]).abs().sum(-1)  # (H_dino, H_clip)
    return 1.0 - w1


def match_heads(
    cost: torch.Tensor, pairing: str = "paper", tolerance: float = 0.0, release_costs: bool = False
) -> HeadMatch:
    """Hungarian matching of DINO heads (rows) to CLIP heads (columns) minimising the total cost.

    Exact ties are common: when, position by position, the sorted DINO distributions all lie on the same side
    of the CLIP ones, every assignment has the same total W1, and floating-point noise would pick one. With
    ``tolerance > 0`` every off-diagonal cost is raised by ``tolerance`` before the assignment, so among
    assignments within that margin the one keeping most heads on their own index wins (deterministic,
    independent of batching); the weights use the raw costs.

    ``release_costs``: the costs are rounded to float32 before the assignment and the weights are
    ``1 - cost`` in float32, as the release does (its cost matrix is a float32 tensor filled with float64
    values, handed to SciPy as a float32 array). Costs closer than float32's resolution then tie exactly,
    and SciPy breaks the tie as it does for the release.

    ``paper``: DINO head i is fused into the CLIP head j it is matched to, with w = 1 - cost[i, j].
    ``release``: the release reads the pair the other way round: CLIP head i receives DINO head j = col(i)
    (the CLIP head DINO head i was matched to), still with w = 1 - cost[i, j].

    Args:
        cost: (H, H) cost matrix (``spectral_cost``).
        pairing: ``paper`` or ``release``.
        tolerance: tie margin on the cost (0: plain Hungarian on the raw costs).
        release_costs: match on the costs rounded to float32, weights in float32 (the release).

    Returns:
        The DINO head and weight for every CLIP head.
    """
    dtype = np.float32 if release_costs else np.float64
    c = cost.detach().cpu().double().numpy().astype(dtype)  # (H, H) float64 -> float32: round to nearest
    H = c.shape[0]
    biased = c if tolerance == 0 else c + tolerance * (1.0 - np.eye(H))  # (H, H)
    rows, cols = linear_sum_assignment(biased)  # rows = arange(H): DINO rows[t] <-> CLIP cols[t]
    dino_head = [0] * H
    weight = [0.0] * H
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        w = float(dtype(1.0) - c[i, j])  # in the costs' dtype
        if pairing == "paper":
            dino_head[j], weight[j] = i, w
        else:
            dino_head[i], weight[i] = j, w
    return HeadMatch(tuple(dino_head), tuple(weight))


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values hold at least ``energy`` of their sum (at least 1)."""
    s = singular_values.double()
    total = s.sum()
    if total <= 0:
        return 1
    ratio = s.cumsum(0) / total  # (N,) non-decreasing, last = 1
    r = int(torch.searchsorted(ratio, torch.tensor([energy], dtype=ratio.dtype)).item()) + 1
    return min(max(r, 1), s.numel())


def rescale_singular_values(s: torch.Tensor) -> torch.Tensor:
    """Stretch [min, max] of the kept singular values to [0.5 min, 1.5 max] (release); constant s unchanged."""
    lo, hi = s.min(), s.max()
    if hi <= lo:
        return s
    return (s - lo) / (hi - lo) * (1.5 * hi - 0.5 * lo) + 0.5 * lo


def minmax_map(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Affinely map ``source``'s [min, max] onto ``target``'s; a constant source maps to target's min."""
    s_lo, s_hi = source.min(), source.max()
    t_lo, t_hi = target.min(), target.max()
    if s_hi <= s_lo:
        return torch.full_like(source, float(t_lo))
    return (source - s_lo) / (s_hi - s_lo) * (t_hi - t_lo) + t_lo


def low_rank_graph(graph: torch.Tensor, energy: float, rank: str, rescale: bool) -> tuple[torch.Tensor, int]:
    """The DINO graph's low-rank approximation with a zero diagonal.

    Args:
        graph: (N, N) float64 DINO graph.
        energy: share of the singular-value sum to keep (``rank = "energy"``).
        rank: ``energy`` (paper: smallest rank reaching ``energy``) or ``release`` (the top 10).
        rescale: stretch the kept singular values (:func:`rescale_singular_values`).

    Returns:
        (N, N) float64 approximation and the rank used.
    """
    u, s, vh = torch.linalg.svd(graph, full_matrices=False)  # (N, N), (N,), (N, N); s descending
    r = energy_rank(s, energy) if rank == "energy" else min(RELEASE_RANK, s.numel())
    s_r = rescale_singular_values(s[:r]) if rescale else s[:r]
    approx = (u[:, :r] * s_r) @ vh[:r]  # (N, N)
    approx.fill_diagonal_(0.0)
    return approx, r


def spectral_fusion(
    clip_keys: torch.Tensor,
    dino_keys: torch.Tensor,
    scale: float,
    *,
    eigenvalues: int = 20,
    energy: float = 0.95,
    fusion_scale: float = 10.0,
    rescale: bool = True,
    pairing: str = "paper",
    rank: str = "energy",
    tolerance: float = 0.0,
    release_costs: bool = False,
) -> tuple[torch.Tensor, HeadMatch, list[int]]:
    """The fused key graph of one window, per CLIP head (before the prior and the softmax).

    Args:
        clip_keys: (H, N, d) CLIP last-block keys of the patches.
        dino_keys: (H, N, d) DINO keys on the CLIP grid, already in the CLIP keys' range.
        scale: 1 / sqrt(d).
        release_costs: Hungarian costs and weights in float32, as the release (:func:`match_heads`).

    Returns:
        fused (H, N, N) float64 ``(s w G_d' + G_c) / (s w + 1)``, the head match, and the rank per CLIP head.
    """
    k_c = clip_keys.double()
    k_d = dino_keys.double()
    g_c = (k_c @ k_c.transpose(-2, -1)) * scale  # (H, N, N)
    g_d = (k_d @ k_d.transpose(-2, -1)) * scale  # (H, N, N)
    match = match_heads(spectral_cost(g_d, g_c, eigenvalues), pairing, tolerance, release_costs)
    fused = torch.empty_like(g_c)  # (H, N, N)
    ranks = []
    for c in range(g_c.shape[0]):
        approx, r = low_rank_graph(g_d[match.dino_head[c]], energy, rank, rescale)  # (N, N)
        g_d_c = minmax_map(approx, g_c[c])  # (N, N) in the CLIP graph's range
        sw = fusion_scale * match.weight[c]
        fused[c] = (sw * g_d_c + g_c[c]) / (sw + 1.0)
        ranks.append(r)
    return fused, match, ranks
