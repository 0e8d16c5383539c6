"""CASS's spectral graph distillation and text side against brute-force references written from the spec."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import wasserstein_distance

from ovss.methods.cass.graph import (
    RELEASE_RANK,
    energy_rank,
    low_rank_graph,
    match_heads,
    minmax_map,
    rescale_singular_values,
    spectral_cost,
    spectral_fusion,
)
from ovss.methods.cass.text import adjusted_text, cass_scores, ward_clusters
from ovss.methods.options import CASSOptions

# ----------------------------------------------------------------------------- brute-force references


def _ref_cost(g_d: np.ndarray, g_c: np.ndarray, k: int) -> np.ndarray:
    """cost[i, j] = 1 - W1 between DINO head i's and CLIP head j's normalised top-k eigenvalues (k samples each)."""

    def dist(g: np.ndarray) -> np.ndarray:
        e = np.sort(np.linalg.eigvalsh(g))[::-1][:k]
        e = e / np.linalg.norm(e)
        return e / np.abs(e).sum()

    H = g_d.shape[0]
    cost = np.zeros((H, H))
    for i in range(H):
        for j in range(H):
            # scipy's W1 of two k-sample empirical distributions is the mean |sorted difference|; the cost uses the sum
            u, v = dist(g_d[i]), dist(g_c[j])
            cost[i, j] = 1.0 - len(u) * wasserstein_distance(u, v)
    return cost


def _ref_assignment(cost: np.ndarray) -> tuple[int, ...]:
    """The permutation perm (DINO head i -> CLIP head perm[i]) of minimal total cost, by enumeration."""
    H = cost.shape[0]
    return min(itertools.permutations(range(H)), key=lambda p: sum(cost[i, p[i]] for i in range(H)))


def _ref_low_rank(g: np.ndarray, energy: float, rescale: bool) -> np.ndarray:
    u, s, vh = np.linalg.svd(g)
    r = next(r for r in range(1, len(s) + 1) if s[:r].sum() >= energy * s.sum() - 1e-12)
    s = s[:r]
    if rescale and s.max() > s.min():
        lo, hi = s.min(), s.max()
        s = (s - lo) / (hi - lo) * (1.5 * hi - 0.5 * lo) + 0.5 * lo
    a = u[:, :r] @ np.diag(s) @ vh[:r]
    np.fill_diagonal(a, 0.0)
    return a


def _ref_fusion(k_c: np.ndarray, k_d: np.ndarray, scale: float, pairing: str, rescale: bool = True) -> np.ndarray:
    g_c = np.einsum("hnd,hmd->hnm", k_c, k_c) * scale
    g_d = np.einsum("hnd,hmd->hnm", k_d, k_d) * scale
    cost = _ref_cost(g_d, g_c, 20)
    perm = _ref_assignment(cost)
    fused = np.zeros_like(g_c)
    for i, j in enumerate(perm):  # DINO head i is matched to CLIP head j
        clip_head, dino_head = (j, i) if pairing == "paper" else (i, j)
        w = 1.0 - cost[i, j]
        a = _ref_low_rank(g_d[dino_head], 0.95, rescale)
        t = g_c[clip_head]
        a = (a - a.min()) / (a.max() - a.min()) * (t.max() - t.min()) + t.min()
        fused[clip_head] = (10.0 * w * a + t) / (10.0 * w + 1.0)
    return fused


def _keys(seed: int, H: int = 3, N: int = 30, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H, N, d, generator=g, dtype=torch.float64), torch.randn(
        H, N, d, generator=g, dtype=torch.float64
    )


# ----------------------------------------------------------------------------- graph


@pytest.mark.parametrize("pairing", ["paper", "release"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectral_fusion_equals_the_brute_force_reference(seed: int, pairing: str) -> None:
    k_c, k_d = _keys(seed)
    fused, match, ranks = spectral_fusion(k_c, k_d, 8**-0.5, pairing=pairing)
    expected = _ref_fusion(k_c.numpy(), k_d.numpy(), 8**-0.5, pairing)
    np.testing.assert_allclose(fused.numpy(), expected, rtol=1e-9, atol=1e-9)
    assert all(1 <= r <= 30 for r in ranks) and sorted(match.dino_head) == [0, 1, 2]


def test_cost_matrix_equals_scipy_wasserstein() -> None:
    k_c, k_d = _keys(3, H=4, N=25)
    g_c = k_c @ k_c.transpose(-2, -1)
    g_d = k_d @ k_d.transpose(-2, -1)
    cost = spectral_cost(g_d, g_c, 20).numpy()
    np.testing.assert_allclose(cost, _ref_cost(g_d.numpy(), g_c.numpy(), 20), rtol=1e-10, atol=1e-12)
    same = spectral_cost(g_c, g_c, 20).numpy()
    np.testing.assert_allclose(np.diag(same), 1.0)  # identical spectra: distance 0, cost 1


def test_hungarian_matching_is_the_brute_force_optimum_and_the_pairings_are_inverse() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        cost = torch.as_tensor(rng.random((4, 4)))
        perm = _ref_assignment(cost.numpy())  # unique optimum almost surely
        paper, release = match_heads(cost, "paper"), match_heads(cost, "release")
        assert all(paper.dino_head[perm[i]] == i for i in range(4))  # CLIP head perm[i] receives DINO head i
        assert release.dino_head == perm  # CLIP head i receives DINO head perm[i] (the release's reading)
        assert paper.weight == tuple(1.0 - float(cost[paper.dino_head[c], c]) for c in range(4))
    # a 3-cycle: the two readings differ, and each is the other's inverse permutation
    cost = torch.ones(3, 3, dtype=torch.float64)
    cost[0, 1] = cost[1, 2] = cost[2, 0] = 0.0
    paper, release = match_heads(cost, "paper"), match_heads(cost, "release")
    assert release.dino_head == (1, 2, 0) and paper.dino_head == (2, 0, 1)
    assert paper.weight == release.weight == (1.0, 1.0, 1.0)


def test_matching_with_ties_is_still_an_optimal_permutation() -> None:
    for cost in (
        torch.zeros(3, 3, dtype=torch.float64),
        torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]),
    ):
        match = match_heads(cost, "paper")
        assert sorted(match.dino_head) == [0, 1, 2]
        total = sum(float(cost[match.dino_head[c], c]) for c in range(3))
        best = _ref_assignment(cost.numpy())
        assert total == pytest.approx(sum(float(cost[i, best[i]]) for i in range(3)))
    single = match_heads(torch.tensor([[0.25]], dtype=torch.float64))
    assert single.dino_head == (0,) and single.weight == (0.75,)


def test_energy_rank_rescale_and_minmax_by_hand() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)  # cumulative shares 0.5, 0.75, 0.875, 1
    assert [energy_rank(s, e) for e in (0.5, 0.75, 0.8, 0.95, 1.0)] == [1, 2, 3, 4, 4]
    assert energy_rank(torch.zeros(3, dtype=torch.float64), 0.95) == 1
    out = rescale_singular_values(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
    np.testing.assert_allclose(out.numpy(), [6.0, 1.0 / 3.0 * 5.5 + 0.5, 0.5])  # [min, max] -> [0.5 min, 1.5 max]
    const = torch.tensor([2.0, 2.0], dtype=torch.float64)
    assert torch.equal(rescale_singular_values(const), const)
    target = torch.tensor([[-1.0, 3.0]], dtype=torch.float64)
    np.testing.assert_allclose(minmax_map(torch.tensor([[0.0, 0.5, 1.0]]), target).numpy(), [[-1.0, 1.0, 3.0]])
    assert torch.equal(minmax_map(torch.ones(2, 2), target), torch.full((2, 2), -1.0))


def test_low_rank_graph_keeps_the_energy_rank_or_the_release_ten() -> None:
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0] + [0.0] * 25, dtype=torch.float64)
    g = (q * s) @ q.T  # PSD, singular values s
    approx, r = low_rank_graph(g, 0.7, "energy", rescale=False)
    assert r == 2  # 12 of 16 >= 0.7 (8 of 16 is not)
    expected = (q[:, :2] * s[:2]) @ q[:, :2].T
    expected.fill_diagonal_(0.0)
    torch.testing.assert_close(approx, expected)
    _, r10 = low_rank_graph(g, 0.75, "release", rescale=False)
    assert r10 == RELEASE_RANK
    _, r_small = low_rank_graph(g[:4, :4], 0.75, "release", rescale=False)
    assert r_small == 4


# ----------------------------------------------------------------------------- text


def _unit_rows_with_gram(gram: np.ndarray, dim: int = 6) -> torch.Tensor:
    rows = np.linalg.cholesky(gram)  # rows[i] . rows[j] = gram[i, j], unit rows
    return torch.as_tensor(np.pad(rows, ((0, 0), (0, dim - rows.shape[1]))), dtype=torch.float32)


def test_ward_clusters_follow_the_ward_heights_by_hand() -> None:
    # cosine distances a-b 0.1, a-c = b-c 0.5: Ward merges a, b at 0.1, then c at
    # sqrt((2 * 0.5^2 + 2 * 0.5^2 - 0.1^2) / 3) = 0.5745
    text = _unit_rows_with_gram(np.array([[1.0, 0.9, 0.5], [0.9, 1.0, 0.5], [0.5, 0.5, 1.0]]))
    assert len(set(ward_clusters(text, 0.05))) == 3
    two = ward_clusters(text, 0.3)
    assert two[0] == two[1] != two[2]
    assert len(set(ward_clusters(text, 0.57))) == 2 and set(ward_clusters(text, 0.58)) == {0}


def test_ward_clusters_single_class_all_in_one_and_duplicates() -> None:
    assert list(ward_clusters(torch.tensor([[1.0, 0.0]]), 0.1)) == [0]
    text = torch.nn.functional.normalize(torch.randn(7, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert set(ward_clusters(text, 100.0)) == {0}  # one cluster
    assert len(set(ward_clusters(text, 1e-6))) == 7  # distinct names: every name alone
    dup = torch.cat([text[:3], text[1:2]])  # name 3 duplicates name 1: distance 0 merges them at any h > 0
    ids = ward_clusters(dup, 1e-6)
    assert ids[1] == ids[3] and len(set(ids)) == 3


def _ref_adjusted(text, clusters, global_sim, patches, m):
    L = patches.shape[0]
    out = text[None].repeat(L, 1, 1).clone()
    for b in range(L):
        for cl in sorted(set(clusters.tolist())):
            members = [i for i in range(len(clusters)) if clusters[i] == cl]
            best = max(members, key=lambda i: (float(global_sim[b, i]), -i))  # ties: lowest index
            sims = [(float(patches[b, n] @ text[best]), -n) for n in range(patches.shape[1])]
            top = [-n for _, n in sorted(sims, reverse=True)[:2]]
            mean = torch.nn.functional.normalize(patches[b, top].mean(0), dim=0)
            out[b, best] = torch.nn.functional.normalize((1 - m) * text[best] + m * mean, dim=0)
    return out


def test_adjusted_text_equals_the_loop_reference_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text[4] = text[2]  # names 2 and 4 identical: same cluster, same global similarity -> name 2 is adjusted
    patches = torch.nn.functional.normalize(torch.randn(3, 10, 8, generator=g), dim=-1)
    patches[:, 7] = patches[:, 3]  # tied patches: the lower index wins the top-2 slot
    global_sim = torch.randn(3, 6, generator=g)
    global_sim[:, 4] = global_sim[:, 2]
    clusters = ward_clusters(text, 0.9)
    out = adjusted_text(text, clusters, global_sim, patches, 0.3)
    torch.testing.assert_close(out, _ref_adjusted(text, clusters, global_sim, patches, 0.3))
    assert clusters[2] == clusters[4] and torch.equal(out[:, 4], text[4].expand(3, -1))
    assert ((out - text).norm(dim=-1) > 1e-6).sum(dim=1).tolist() == [len(set(clusters.tolist()))] * 3


def test_cass_scores_blend_and_reductions() -> None:
    g = torch.Generator().manual_seed(1)
    text = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    feats = torch.nn.functional.normalize(torch.randn(2, 12, 8, generator=g), dim=-1)
    glob = torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=-1)
    extras = {"global": glob}
    plain = cass_scores(extras, feats, text, CASSOptions(global_weight=0.0, text_shift=0.0))
    torch.testing.assert_close(plain, feats @ text.T)  # no shift, no blend: cosine similarities
    opts = CASSOptions(global_weight=0.25, text_shift=0.2, cluster_threshold=0.5)
    got = cass_scores(extras, feats, text, opts)
    adj = _ref_adjusted(text, ward_clusters(text, 0.5), glob @ text.T, feats, 0.2)
    expected = 0.75 * torch.einsum("lne,lqe->lnq", feats, adj) + 0.25 * (glob @ text.T)[:, None]
    torch.testing.assert_close(got, expected)
    # adjust_scope image: one adjusted set from the best patches of all windows and the mean global similarity
    image = cass_scores(extras, feats, text, CASSOptions(adjust_scope="image", text_shift=0.2))
    sim = glob @ text.T  # (2, 5)
    shared = _ref_adjusted(text, ward_clusters(text, 0.1), sim.mean(0, keepdim=True), feats.reshape(1, 24, 8), 0.2)
    torch.testing.assert_close(image, 0.9 * feats @ shared[0].T + 0.1 * sim[:, None])
    assert not torch.allclose(image, cass_scores(extras, feats, text, CASSOptions(text_shift=0.2)))


def test_tied_costs_keep_heads_on_their_own_index_with_the_tolerance() -> None:
    # cost[i, j] = a_i + b_j: every assignment has the same total (what dominating spectra give)
    a = torch.tensor([0.3, 0.1, 0.2, 0.5], dtype=torch.float64)
    b = torch.tensor([0.05, 0.2, 0.0, 0.1], dtype=torch.float64)
    cost = a[:, None] + b[None, :]
    noisy = cost + 1e-12 * torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert match_heads(noisy, "paper", 1e-6).dino_head == (0, 1, 2, 3)
    assert match_heads(noisy, "release", 1e-6).dino_head == (0, 1, 2, 3)
    # a real gap larger than the tolerance still wins
    gap = cost.clone()
    gap[0, 1] -= 1e-3
    gap[1, 0] -= 1e-3
    assert match_heads(gap, "paper", 1e-6).dino_head == (1, 0, 2, 3)


def _release_assignment(cost: torch.Tensor) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The release's matching (CASS clip/model.py, _apply_spectral_strategy), replayed step by step.

    It fills a float32 ``torch.zeros(H, H)`` with the float64 costs, hands ``.numpy()`` of it to SciPy, and
    reads CLIP head i <- DINO head col(i) with ``w_d = 1 - cost_matrix[i, j]`` computed on the float32 tensor.
    """
    H = cost.shape[0]
    cost_matrix = torch.zeros(H, H)
    for i in range(H):
        for j in range(H):
            cost_matrix[i, j] = cost[i, j]  # the release stores its float64 1 - W1 here, rounded to float32
    rows, cols = linear_sum_assignment(cost_matrix.numpy())
    return tuple(int(j) for j in cols), tuple(float(1 - cost_matrix[i, j]) for i, j in zip(rows, cols, strict=True))


def test_release_costs_break_exact_float32_ties_as_the_release() -> None:
    # A 3-cycle cheaper by 1e-9 in float64; in float32 every cost is exactly 0.5, a nine-way tie that the
    # release's SciPy call resolves to the identity.
    cost = torch.full((3, 3), 0.5, dtype=torch.float64)
    cost[0, 1] = cost[1, 2] = cost[2, 0] = 0.5 - 1e-9
    assert match_heads(cost, "release", 0.0).dino_head == (1, 2, 0)  # float64: the cycle wins by 1e-9
    release = match_heads(cost, "release", 0.0, release_costs=True)
    assert release.dino_head == (0, 1, 2) and release.weight == (0.5, 0.5, 0.5)
    assert (release.dino_head, release.weight) == _release_assignment(cost)
    assert match_heads(cost, "paper", 0.0, release_costs=True).dino_head == (0, 1, 2)


def test_release_costs_follow_the_release_on_partial_ties_and_weights_are_float32() -> None:
    # Heads 0 and 1 tie in float32 (their float64 costs differ by 2e-10, which favours swapping them);
    # head 2's costs are far apart, so it keeps its own clear optimum.
    cost = torch.tensor([[0.3, 0.3 - 1e-10, 0.9], [0.3 - 1e-10, 0.3, 0.9], [0.9, 0.9, 0.1 + 1e-3]], dtype=torch.float64)
    assert match_heads(cost, "release", 0.0).dino_head == (1, 0, 2)
    release = match_heads(cost, "release", 0.0, release_costs=True)
    assert (release.dino_head, release.weight) == _release_assignment(cost)
    assert release.dino_head == (0, 1, 2)
    assert release.weight[2] == float(np.float32(1.0) - np.float32(0.1 + 1e-3)) != 1.0 - (0.1 + 1e-3)
    rng = np.random.default_rng(1)
    for _ in range(10):  # without ties the float32 costs pick the float64 optimum; weights are float32 values
        random = torch.as_tensor(rng.random((4, 4)))
        got = match_heads(random, "release", 0.0, release_costs=True)
        assert got.dino_head == match_heads(random, "release", 0.0).dino_head
        assert (got.dino_head, got.weight) == _release_assignment(random)
        assert all(float(np.float32(w)) == w for w in got.weight)


def test_spectral_fusion_passes_release_costs_to_the_matching() -> None:
    k_c, k_d = _keys(4)
    fused64, match64, _ = spectral_fusion(k_c, k_d, 8**-0.5, pairing="release")
    fused32, match32, _ = spectral_fusion(k_c, k_d, 8**-0.5, pairing="release", release_costs=True)
    assert match32.dino_head == match64.dino_head  # no tie here: the same pairs
    assert all(float(np.float32(w)) == w for w in match32.weight)
    assert match32.weight != match64.weight
    torch.testing.assert_close(fused32, fused64, rtol=1e-6, atol=1e-6)  # only the weights' rounding differs
