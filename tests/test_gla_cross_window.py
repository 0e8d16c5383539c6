"""The GLA operator (spec §4.8, §4.9, §9.2): chunked == float64 dense for every base, brute force, by hand."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ovss.errors import OvssError
from ovss.gla import (
    GLA_RELEASE,
    GLAConfig,
    attention_rows,
    choose_chunk_rows,
    cross_window_attention,
    dense_attention_map,
    dense_cross_window_attention,
    dynamic_shift,
    global_similarity_mean,
    proxy_anchors,
    sharpen_weight,
)
from ovss.gla.chunking import BYTES_PER_ENTRY


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """The tensors here are tiny: extra intra-op threads only add contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


L, N, D, C = 3, 12, 12, 8  # windows, tokens per window, key width, value width (heads x head size)
M = L * N


def _keys(g: torch.Generator, m: int, bias: float) -> Tensor:
    """Clustered keys sharing a common direction of random strength: (m, D)."""
    centres = torch.randn(4, D, generator=g)  # (4, D)
    labels = torch.randint(0, 4, (m,), generator=g)  # (m,)
    common = torch.randn(D, generator=g)  # (D,)
    strength = torch.rand(m, 1, generator=g) * 2 * bias  # (m, 1)
    return centres[labels] + strength * common + 0.8 * torch.randn(m, D, generator=g)  # (m, D)


def _problem(seed: int = 2, bias: float = 2.0, windows: int = L) -> tuple[Tensor, Tensor, Tensor]:
    """Clustered keys, noisy queries (e.g. smoothed features, not the keys), random values (M, C).

    With rho = 0.8 this input has rows whose proxy set becomes empty and rows whose dynamic logits are all
    negative (checked by `test_problem_has_empty_proxy_sets_and_all_negative_rows`).
    """
    g = torch.Generator().manual_seed(seed)
    m = windows * N
    keys = _keys(g, m, bias)  # (M, D)
    queries = keys + torch.randn(m, D, generator=g)  # (M, D)
    values = torch.randn(m, C, generator=g)  # (M, C)
    return keys, queries, values


def _prior_matrix(windows: int, seed: int = 5) -> Tensor:
    """An image-space Gaussian over random token centres (like NACLIP + GLA): (M, M)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(windows * N, 2, generator=g) * 64  # (M, 2) pixels
    return torch.exp(-(torch.cdist(centres, centres) ** 2) / (2 * 20.0**2))  # (M, M)


def _local_maps(windows: int, count: int, seed: int = 6) -> Tensor:
    """`count` row-stochastic within-window maps summed, like GCLIP's AMF maps: (L, N, N), rows sum to count."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.softmax(3 * torch.randn(count, windows, N, N, generator=g), dim=-1)  # (count, L, N, N)
    return maps.sum(dim=0)  # (L, N, N)


BASES = ("proxyclip", "clearclip", "sclip", "naclip", "gclip")


def _base_inputs(base: str, windows: int) -> dict:
    """The operator's inputs shaped like each base's (spec §4.9): key sets, queries, prior, own-window maps."""
    keys, queries, values = _problem(windows=windows)
    kw: dict = {"keys": [keys], "queries": [queries], "values": values}
    if base == "proxyclip":  # DINO keys, no smoothing: Q0 = K
        kw["queries"] = [keys]
    elif base == "sclip":  # two key sets (q and k), each with its own anchors
        keys2, queries2, _ = _problem(seed=9, windows=windows)
        kw["keys"], kw["queries"] = [keys, keys2], [queries, queries2]
    elif base == "naclip":
        kw["prior"] = _prior_matrix(windows)
    elif base == "gclip":
        kw["local_maps"], kw["local_count"] = _local_maps(windows, 2), 2
    return kw


def _brute_force_proxies(q0: Tensor, keys: Tensor, rho: float, steps: int) -> tuple[Tensor, list[int], int]:
    """Eq. 10-11 with python sets, float64: anchors (M, D), |P^(T-1)_i|, and how many sets were empty."""
    k = F.normalize(keys.double(), dim=-1)  # (M, D)
    anchors, counts, empties = [], [], 0
    for i in range(k.shape[0]):
        q = q0[i].double()  # (D,)
        for _ in range(steps):
            q_hat = q / q.norm()
            chosen = {j for j in range(k.shape[0]) if float(q_hat @ k[j]) > rho}
            if not chosen:
                empties += 1
                chosen = {i}
            q = sum((k[j] for j in sorted(chosen)), torch.zeros_like(q)) / len(chosen)
        anchors.append(q)
        counts.append(len(chosen))
    return torch.stack(anchors), counts, empties


def test_problem_has_empty_proxy_sets_and_all_negative_rows() -> None:
    keys, queries, _ = _problem()
    anchors, counts, empties = _brute_force_proxies(queries, keys, 0.8, 2)
    s = F.normalize(anchors, dim=-1) @ F.normalize(keys.double(), dim=-1).T  # (M, M)
    w = 1 + 30.0 / torch.tensor(counts, dtype=torch.float64)  # (M,)
    attn = w[:, None] * (s - dynamic_shift(L, 0.3) * s.mean(1, keepdim=True))  # (M, M)
    all_negative = int((attn.max(1).values < 0).sum())
    assert empties > 0
    assert 0 < all_negative < M


CONFIGS = [
    GLAConfig(rho=0.8, norm=norm, kve=kve, proxy=proxy)
    for norm in ("dynamic", "fixed", "global_mean", "none")
    for kve in (True, False)
    for proxy in (True, False)
] + [replace(GLA_RELEASE, rho=0.8), GLAConfig(rho=0.8, steps=3, temperature=0.5, lam1=0.5, lam2=10.0)]


def _cfg_id(c: GLAConfig) -> str:
    return f"{c.norm}-kve{int(c.kve)}-proxy{int(c.proxy)}-clamp{int(c.clamp_mean)}-T{c.steps}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("base", BASES)
def test_operator_matches_float64_dense_reference(base: str, cfg: GLAConfig) -> None:
    for windows in (1, 2, 3):  # windows of different counts
        kw = _base_inputs(base, windows)
        prior = kw.pop("prior", None)
        dense = dense_cross_window_attention(**kw, num_windows=windows, cfg=cfg, prior=prior)  # (M, C) float64
        assert dense.dtype == torch.float64 and torch.isfinite(dense).all()
        prior_fn = None if prior is None else (lambda rows, p=prior: p[rows])  # (R, M)
        for chunk in (1, 7, N, 100):  # single rows, non-divisor, one window, all at once
            out = cross_window_attention(
                **kw, num_windows=windows, cfg=replace(cfg, chunk_rows=chunk), prior=prior_fn
            )  # (M, C)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out.double(), dense, rtol=1e-5, atol=2e-5)


def test_base_inputs_exercise_every_feature() -> None:
    """The inputs above do differ per base: each feature changes the dense result."""
    cfg = GLAConfig(rho=0.8)
    outs = {}
    for base in BASES:
        kw = _base_inputs(base, L)
        outs[base] = dense_cross_window_attention(**kw, num_windows=L, cfg=cfg)
    plain = outs["clearclip"]
    for base in ("proxyclip", "sclip", "naclip", "gclip"):
        assert (outs[base] - plain).abs().max() > 1e-2, base


@pytest.mark.parametrize("cfg", CONFIGS[:8], ids=_cfg_id)
def test_row_stats_match_dense(cfg: GLAConfig) -> None:
    keys, queries, _ = _problem()
    _, dense = dense_attention_map(keys, queries, L, cfg)
    rows = torch.tensor([0, 35, 13, 7, 20])
    gm = global_similarity_mean(keys, queries, L, cfg, chunk_rows=5) if cfg.norm == "global_mean" else None
    alpha, st = attention_rows(keys, queries[rows], rows, L, cfg, global_mean=gm)
    assert torch.equal(st.counts, dense.counts[rows])
    torch.testing.assert_close(st.mean.double(), dense.mean[rows])
    torch.testing.assert_close(st.weight.double(), dense.weight[rows])
    assert st.shift == pytest.approx(dense.shift)
    torch.testing.assert_close(alpha.sum(1), torch.ones(5))
    if not cfg.kve:  # other windows' keys get exactly zero weight
        own = (rows // N)[:, None] == (torch.arange(M) // N)[None, :]  # (R, M)
        assert (alpha[~own] == 0).all()


@pytest.mark.parametrize("masked", [False, True])
def test_proxy_anchors_match_brute_force_sets(masked: bool) -> None:
    keys, queries, _ = _problem()
    rows = torch.tensor([4, 0, 33, 17, 35, 21])
    if masked:  # own window only: brute force on each window's keys alone
        own = (rows // N)[:, None] == (torch.arange(M) // N)[None, :]  # (R, M)
        q, counts = proxy_anchors(queries[rows], keys, 0.8, 2, rows, key_mask=own)
        for r, i in enumerate(rows.tolist()):
            b = i // N
            ref, ref_counts, _ = _brute_force_proxies(queries[b * N : (b + 1) * N], keys[b * N : (b + 1) * N], 0.8, 2)
            assert int(counts[r]) == ref_counts[i - b * N]
            torch.testing.assert_close(q[r].double(), ref[i - b * N], rtol=1e-5, atol=1e-6)
    else:
        q, counts = proxy_anchors(queries[rows], keys, 0.8, 2, rows)
        ref, ref_counts, _ = _brute_force_proxies(queries, keys, 0.8, 2)
        assert counts.tolist() == [ref_counts[i] for i in rows.tolist()]
        torch.testing.assert_close(q.double(), ref[rows], rtol=1e-5, atol=1e-6)
    assert q.dtype == torch.float32 and counts.dtype == torch.long


def test_empty_proxy_set_falls_back_to_own_key() -> None:
    keys = torch.eye(4)[:3] * 2.0  # (3, D=4) orthogonal keys
    q0 = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])  # (2, 4): row 0 sees no key
    q, counts = proxy_anchors(q0, keys, 0.6, 1, torch.tensor([2, 0]))
    torch.testing.assert_close(q, torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 0.0]]))
    assert counts.tolist() == [1, 2]  # fallback {self} counts as 1; cos 45 deg = 0.707 > 0.6 twice


def _two_window_example() -> tuple[Tensor, Tensor]:
    """Unit keys at 0 and 20 degrees (window 0), 10 and 100 degrees (window 1); values = token ids."""
    angles = torch.tensor([0.0, 20.0, 10.0, 100.0]).deg2rad()  # (4,)
    keys = torch.stack([angles.cos(), angles.sin()], dim=1)  # (M=4, D=2)
    values = torch.arange(4.0).reshape(4, 1)  # (M, C=1)
    return keys, values


def test_hand_computed_two_window_example() -> None:
    # rho = 0.6: tokens 0, 1, 2 select each other (cos 10 deg, cos 20 deg > 0.6), token 3 only itself
    # (cos 80 deg = 0.17). Proxy of 0, 1, 2: mean of 0/20/10 deg -> 10 deg, same set again: |P| = 3.
    keys, values = _two_window_example()
    cos10 = math.cos(math.radians(10))
    u = 1 + 0.3 * math.log(3)  # L = 2
    _, st = attention_rows(keys, keys, torch.arange(4), 2, GLAConfig())
    assert st.counts.tolist() == [3, 3, 3, 1]
    assert st.shift == pytest.approx(1.3295837, abs=1e-7) and st.shift == pytest.approx(u)
    torch.testing.assert_close(st.weight, torch.tensor([11.0, 11.0, 11.0, 31.0]))  # 1 + 30 / |P|
    # S rows: tokens 0-2: [cos10, cos10, 1, cos90]; token 3: [cos100, cos80, cos90, 1]
    torch.testing.assert_close(st.mean, torch.tensor([(2 * cos10 + 1) / 4] * 3 + [0.25]))
    # Row 0: u * mu = 1.3296 * 0.7424 = 0.9871 > cos10 = 0.9848, so only the key at 10 deg (s = 1)
    # survives the mask; row 3: 31 * (s - 0.332) > 0 only for itself.
    out = cross_window_attention([keys], [keys], values, 2, GLAConfig(chunk_rows=3))
    torch.testing.assert_close(out.flatten(), torch.tensor([2.0, 2.0, 2.0, 3.0]))

    # Without KVE: window 0 = {0, 20 deg}: |P| = 2, mu = cos10, u = 1 + 0.3 ln 2; window 1 = {10, 100 deg}:
    # singletons, mu = (1 + cos 90) / 2 = 0.5, each token attends only to itself.
    alpha, st = attention_rows(keys, keys, torch.arange(4), 2, GLAConfig(kve=False))
    assert st.counts.tolist() == [2, 2, 1, 1]
    assert st.shift == pytest.approx(1 + 0.3 * math.log(2))
    torch.testing.assert_close(st.weight, torch.tensor([16.0, 16.0, 31.0, 31.0]))
    torch.testing.assert_close(st.mean, torch.tensor([cos10, cos10, 0.5, 0.5]))
    torch.testing.assert_close(alpha[2:], torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
    assert (alpha[:2, 2:] == 0).all()


def test_dynamic_shift_and_sharpen_weight() -> None:
    assert dynamic_shift(1, 0.3) == pytest.approx(1 + 0.3 * math.log(2))
    assert dynamic_shift(1, 0.3) == pytest.approx(1.2079, abs=1e-4)  # ~ ProxyCLIP's beta = 1.2
    assert dynamic_shift(36, 0.3) == pytest.approx(1 + 0.3 * math.log(37))
    torch.testing.assert_close(sharpen_weight(torch.tensor([1, 2, 30]), 30.0), torch.tensor([31.0, 16.0, 2.0]))


def _proxyclip_window(keys: Tensor, values: Tensor, per_row_mean: bool) -> Tensor:
    """ProxyCLIP's window attention (§4.7): A = 3 (S - 1.2 mean), negatives masked (row max kept)."""
    k = F.normalize(keys, dim=-1)
    s = k @ k.T  # (N, N)
    a = 3.0 * (s - 1.2 * (s.mean(1, keepdim=True) if per_row_mean else s.mean()))  # (N, N)
    keep = (a >= 0) | (a == a.max(1, keepdim=True).values)  # (N, N)
    alpha = torch.softmax(a.masked_fill(~keep, -math.inf), dim=1)  # (N, N)
    return alpha @ values  # (N, C)


@pytest.mark.parametrize("norm", ["global_mean", "fixed"])
def test_proxyclip_window_attention_is_the_no_kve_no_proxy_case(norm: str) -> None:
    keys, _, values = _problem(seed=3, bias=0.5)
    cfg = GLAConfig(kve=False, proxy=False, norm=norm, beta=1.2, gamma=3.0, chunk_rows=7)
    out = cross_window_attention([keys[:N]], [keys[:N]], values[:N], 1, cfg)  # L = 1
    torch.testing.assert_close(out, _proxyclip_window(keys[:N], values[:N], norm == "fixed"))
    out = cross_window_attention([keys], [keys], values, L, cfg)  # L = 3, each window with its own mean
    for b in range(L):
        sl = slice(b * N, (b + 1) * N)
        torch.testing.assert_close(out[sl], _proxyclip_window(keys[sl], values[sl], norm == "fixed"))


def test_norm_none_is_plain_softmax_of_cosine_similarity() -> None:
    keys, _, values = _problem()
    k = F.normalize(keys, dim=-1)
    ref = torch.softmax(k @ k.T / 0.1, dim=1) @ values  # (M, C)
    cfg = GLAConfig(proxy=False, norm="none", temperature=0.1, chunk_rows=8)
    torch.testing.assert_close(cross_window_attention([keys], [keys], values, L, cfg), ref)


def test_sum_of_key_sets_and_own_window_fusion_by_hand() -> None:
    """SCLIP's two maps add (rows sum to 2); GCLIP's local maps fuse as (local + alpha) / (count + 1)."""
    keys, queries, values = _problem()
    keys2, queries2, _ = _problem(seed=9)
    cfg = GLAConfig(rho=0.8, chunk_rows=5)
    one = cross_window_attention([keys], [queries], values, L, cfg)  # (M, C)
    two = cross_window_attention([keys2], [queries2], values, L, cfg)  # (M, C)
    both = cross_window_attention([keys, keys2], [queries, queries2], values, L, cfg)  # (M, C)
    torch.testing.assert_close(both, one + two)
    local = _local_maps(L, 2)  # (L, N, N)
    fused = cross_window_attention([keys], [queries], values, L, cfg, local_maps=local, local_count=2)
    own = torch.cat([local[b] @ values[b * N : (b + 1) * N] for b in range(L)])  # (M, C)
    torch.testing.assert_close(fused, (one + own) / 3)
    with pytest.raises(ValueError, match="local_maps"):
        cross_window_attention([keys], [queries], values, L, cfg, local_maps=local[:, :5], local_count=2)


def test_reduced_precision_inputs_use_fp32_statistics() -> None:
    keys, queries, values = _problem()
    k16, q16, v16 = keys.bfloat16(), queries.bfloat16(), values.bfloat16()
    cfg = GLAConfig(rho=0.8, chunk_rows=10)
    out = cross_window_attention([k16], [q16], v16, L, cfg)
    assert out.dtype == torch.bfloat16
    # Same as the fp32 computation on the bf16-rounded inputs, only the final cast to bf16 differs.
    ref = cross_window_attention([k16.float()], [q16.float()], v16.float(), L, cfg)
    torch.testing.assert_close(out, ref.bfloat16(), rtol=0.0, atol=0.0)
    alpha, st = attention_rows(k16, q16[:10], torch.arange(10), L, cfg)
    alpha32, st32 = attention_rows(k16.float(), q16[:10].float(), torch.arange(10), L, cfg)
    assert alpha.dtype == st.mean.dtype == st.weight.dtype == torch.float32
    assert torch.equal(st.counts, st32.counts) and torch.equal(alpha, alpha32)
    # ... and close to the run on the original fp32 inputs.
    full = cross_window_attention([keys], [queries], values, L, cfg)
    assert (out.float() - full).abs().mean() < 0.05


def test_choose_chunk_rows() -> None:
    m, n = 28224, 784  # Cityscapes `gla`: 36 windows of 28 x 28 DINO tokens
    assert choose_chunk_rows(m, n, 1024.0) == n == 784  # one window per chunk (spec §9.2 default)
    budget = (500 * m * BYTES_PER_ENTRY + 10) / 2**20  # 500 rows fit, less than one window
    assert choose_chunk_rows(m, n, budget) == 392  # the largest divisor of 784 <= 500
    assert choose_chunk_rows(m, n, 1e-3) == 1
    assert choose_chunk_rows(4704, 784, 1e6) == 784  # a huge budget does not make chunks larger


def test_global_mean_needs_the_first_pass() -> None:
    keys, queries, _ = _problem()
    with pytest.raises(OvssError):
        attention_rows(keys, queries[:3], torch.arange(3), L, GLAConfig(norm="global_mean"))
    gm = global_similarity_mean(keys, queries, L, GLAConfig(norm="global_mean", proxy=False), chunk_rows=4)
    k = F.normalize(keys, dim=-1)
    q = F.normalize(queries, dim=-1)
    torch.testing.assert_close(gm, (q @ k.T).mean().expand(M))


def test_config_validation_and_release_preset() -> None:
    assert GLA_RELEASE.rho == 0.55 and GLA_RELEASE.clamp_mean
    assert GLAConfig().rho == 0.6 and not GLAConfig().clamp_mean and GLAConfig().steps == 2
    bad: list[dict[str, object]] = [
        {"norm": "per_token"},
        {"smoothing": "on"},
        {"rho": 1.5},
        {"steps": 0},
        {"lam1": -0.1},
        {"gamma": 0.0},
        {"temperature": 0.0},
        {"chunk_rows": 0},
        {"memory_budget_mb": -1.0},
    ]
    for kwargs in bad:
        with pytest.raises(OvssError):
            GLAConfig(**kwargs)  # type: ignore[arg-type]


def test_sparse_and_dense_proxy_means_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Few selected keys take the sparse CSR product, many the dense one: the same means either way."""
    from ovss.gla.anchors import mean_of_selected
    from ovss.tuning import Tuning

    made: list[int] = []  # one entry per sparse CSR mask built
    real_csr = torch.sparse_csr_tensor
    monkeypatch.setattr(torch, "sparse_csr_tensor", lambda *a, **kw: (made.append(1), real_csr(*a, **kw))[1])
    g = torch.Generator().manual_seed(4)
    k = F.normalize(torch.randn(64, D, generator=g), dim=-1)  # (M, D)
    for density in (0.02, 0.5):
        selected = torch.rand(10, 64, generator=g) < density  # (R, M)
        selected[:, 0] = True  # every row non-empty
        counts = selected.sum(dim=1)  # (R,)
        expected = (selected.double() @ k.double()) / counts[:, None]  # (R, D)
        # the default picks by density (sparse at <= 1/8 selected); 1: always sparse; 0: always dense
        for sparse_below, sparse in ((Tuning().sparse_below, density < 0.1), (1, True), (0, False)):
            made.clear()
            got = mean_of_selected(selected, k, counts, sparse_below)  # (R, D)
            assert bool(made) == sparse, (density, sparse_below)
            torch.testing.assert_close(got.double(), expected)


@pytest.mark.parametrize("base", BASES)
def test_reused_buffers_give_bit_identical_rows(base: str) -> None:
    """The operator writes its products and softmax into buffers reused across steps and chunks: every output
    row equals, bit for bit, the public per-row computation with fresh tensors (`attention_rows`, then @ V)."""
    kw = _base_inputs(base, L)
    prior = kw.pop("prior", None)
    prior_fn = None if prior is None else (lambda rows, p=prior: p[rows])  # (R, M)
    for chunk in (5, N, M):  # buffers shrink for the last, shorter chunk and are reused for all the others
        cfg = GLAConfig(rho=0.8, chunk_rows=chunk)
        out = cross_window_attention(**kw, num_windows=L, cfg=cfg, prior=prior_fn)  # (M, C)
        for start in range(0, M, chunk):
            rows = torch.arange(start, min(start + chunk, M))  # (R,)
            sets = zip(kw["keys"], kw["queries"], strict=True)
            alpha = sum(attention_rows(k, q[rows], rows, L, cfg, prior=prior_fn)[0] for k, q in sets)  # (R, M)
            if "local_maps" in kw:
                n = kw["local_maps"].shape[-1]
                for r, row in enumerate(rows.tolist()):
                    alpha[r, row // n * n : (row // n + 1) * n] += kw["local_maps"][row // n, row % n]
                alpha = alpha / (kw["local_count"] + 1)
            assert torch.equal(out[rows], alpha @ kw["values"]), (base, chunk, start)


def test_the_operator_is_differentiable_when_inputs_require_grad() -> None:
    keys, queries, values = _problem()
    values = values.clone().requires_grad_(True)
    cfg = GLAConfig(rho=0.8, chunk_rows=N)
    out = cross_window_attention([keys], [queries], values, L, cfg)  # (M, C)
    out.sum().backward()
    assert values.grad is not None and torch.isfinite(values.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(out, cross_window_attention([keys], [queries], values, L, cfg), rtol=0, atol=0)
