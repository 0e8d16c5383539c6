"""SC-CLIP (spec §4.11.1-4.11.3): anomaly detectors against brute force, repair, aggregator, and the whole
method against a float64 reference written here from the spec; options, preset and logit scales."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovss.errors import OvssError
from ovss.eval.presets import default_preset, resolve
from ovss.methods import get_method
from ovss.methods.common import Backbones, WindowBatch
from ovss.methods.options import SCCLIPOptions, resolve_options
from ovss.methods.scclip.anomaly import EPS, anomaly_grid, detect_anomalies, lof_scores, repair
from ovss.methods.scclip.method import aggregator, resolve_blocks
from ovss.models.clip import build_clip
from ovss.pipeline.windows import Padding, Window
from tiny import tiny_clip_state_dict


@pytest.fixture(scope="module")
def deep_clip():
    """A tiny CLIP with ViT-B's 12 blocks, so SC-CLIP's block indices 3 / 8 / 3..9 / 10 are used as given."""
    return build_clip(tiny_clip_state_dict(seed=5, layers=12)).visual


def _batch(pixels: torch.Tensor) -> WindowBatch:
    L, _, h, w = pixels.shape
    return WindowBatch(pixels, [Window(0, 0, h, w)] * L, Padding(0, 0, 0, 0), (h, w))


# ------------------------------------------------------------------ brute force, written from the spec


def _neighbours_by_hand(x: np.ndarray, i: int, k: int, squared: bool) -> tuple[list[int], list[float]]:
    """The k nearest j != i, ordered by (distance, index)."""
    d = [float(((x[i] - x[j]) ** 2).sum()) for j in range(len(x))]
    if not squared:
        d = [v**0.5 for v in d]
    order = sorted((j for j in range(len(x)) if j != i), key=lambda j: (d[j], j))[:k]
    return order, [d[j] for j in order]


def _lof_by_hand(x: np.ndarray, k: int, kind: str) -> np.ndarray:
    n = len(x)
    nb = [_neighbours_by_hand(x, i, k, kind == "lof_release") for i in range(n)]
    kappa = [dists[-1] for _, dists in nb]
    if kind == "lof_release":  # LOF_i = mean_j kappa_i / kappa_j (reachability = own k-distance)
        return np.array([np.mean([(kappa[i] + EPS) / (kappa[j] + EPS) for j in nb[i][0]]) for i in range(n)])
    # standard LOF: reach(i, j) = max(d_ij, kappa_j); lrd = 1 / mean reach; LOF_i = mean_j lrd_j / lrd_i
    lrd = [1.0 / (np.mean([max(d, kappa[j]) for j, d in zip(*nb[i], strict=True)]) + EPS) for i in range(n)]
    return np.array([np.mean([lrd[j] / lrd[i] for j in nb[i][0]]) for i in range(n)])


@pytest.mark.parametrize("kind", ["lof_release", "lof_sklearn"])
def test_lof_matches_brute_force_with_ties(kind: str):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (2, 45, 3), generator=gen).float()  # small integers: many tied distances
    x[0, 7] = x[0, 3]  # exact duplicates too
    x[1, 10:14] = x[1, 20]
    got = lof_scores(x, 8, kind)
    for b in range(2):
        want = _lof_by_hand(x[b].double().numpy(), 8, kind)
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-5)
    assert got.std() > 0.01  # not a degenerate all-ones answer


def test_lof_threshold_is_the_linear_quantile_and_flags_five_percent():
    p = torch.randn(3, 196, 16, generator=torch.Generator().manual_seed(1))
    p[0, 17] += 8.0  # a clear outlier
    found = detect_anomalies(p, "lof_release", 30, 0.05, 10)
    assert found.sum(dim=1).tolist() == [10, 10, 10]  # 5% of 196 without ties: 10
    assert found[0, 17]
    for b in range(3):
        scores = _lof_by_hand(p[b].double().numpy(), 30, "lof_release")
        tau = np.quantile(scores, 0.95)  # linear interpolation between order statistics
        assert np.array_equal(found[b].numpy(), scores > tau)


def test_lof_sklearn_is_scikit_learns_local_outlier_factor():
    """``lof_sklearn`` against scikit-learn itself: LocalOutlierFactor(30, contamination=0.05), Euclidean."""
    from sklearn.neighbors import LocalOutlierFactor

    p = torch.randn(3, 196, 64, generator=torch.Generator().manual_seed(3))  # (L, n, D): ViT-B/16's 14 x 14 window
    p[0, 17] += 6.0  # one clear outlier, and a tight cluster of near-duplicates
    p[1, 40:46] = p[1, 40] + 0.01 * torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
    scores = lof_scores(p, 30, "lof_sklearn")  # (L, n)
    found = detect_anomalies(p, "lof_sklearn", 30, 0.05, 10)  # (L, n)
    for b in range(3):
        lof = LocalOutlierFactor(n_neighbors=30, contamination=0.05)  # default metric: Minkowski p = 2
        labels = lof.fit_predict(p[b].double().numpy())  # -1 = outlier
        np.testing.assert_allclose(scores[b].numpy(), -lof.negative_outlier_factor_, rtol=1e-5)
        assert np.array_equal(found[b].numpy(), labels == -1)
    assert found[0, 17] and found.sum(dim=1).tolist() == [10, 10, 10]


def test_topk_norm_flags_the_largest_norms_and_small_windows_cap_k():
    p = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(2))
    found = detect_anomalies(p, "topk_norm", 30, 0.05, 4)
    for b in range(2):
        assert set(found[b].nonzero().flatten().tolist()) == set(p[b].norm(dim=-1).topk(4).indices.tolist())
    small = torch.randn(1, 4, 8)  # 2x2 window: k is capped at n - 1
    assert torch.isfinite(lof_scores(small, 30)).all()
    assert lof_scores(small[:, :1], 30).tolist() == [[1.0]]


def _repair_by_hand(f: np.ndarray, mask: np.ndarray) -> np.ndarray:
    gr, gc = mask.shape
    grid = f.reshape(gr, gc, -1)
    out = grid.copy()
    for r in range(gr):
        for c in range(gc):
            if not mask[r, c]:
                continue
            nb = [
                grid[r + dr, c + dc]
                for dr in (-1, 0, 1)
                for dc in (-1, 0, 1)
                if (dr, dc) != (0, 0) and 0 <= r + dr < gr and 0 <= c + dc < gc and not mask[r + dr, c + dc]
            ]
            if nb:
                out[r, c] = np.mean(nb, axis=0)
    return out.reshape(gr * gc, -1)


def test_repair_replaces_anomalies_by_their_clean_neighbours_only():
    gr, gc = 4, 5  # non-square grid
    f = torch.randn(1, gr * gc, 6, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, gr, gc, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 0, 1] = True  # corner, next to another anomaly
    mask[0, 2, 2:5] = True  # a run touching the right border
    got = repair(f, mask)
    np.testing.assert_allclose(got[0].numpy(), _repair_by_hand(f[0].numpy(), mask[0].numpy()), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[0].view(gr, gc, 6)[~mask[0]], f[0].view(gr, gc, 6)[~mask[0]])  # the rest is untouched
    isolated = torch.ones(1, 1, 2, dtype=torch.bool)  # no clean neighbour at all: unchanged
    assert torch.equal(repair(f[:, :2], isolated), f[:, :2])


def test_anomaly_index_to_grid_row_major_and_release():
    found = torch.zeros(1, 6, dtype=torch.bool)
    found[0, [1, 4]] = True
    # 2 x 3 grid: row-major puts token 4 at (1, 1); the release divides by the row count: (2, 0), off-grid
    row_major = anomaly_grid(found, (2, 3), "row_major")
    assert row_major[0].nonzero().tolist() == [[0, 1], [1, 1]]
    assert anomaly_grid(found, (2, 3), "release")[0].nonzero().tolist() == [[0, 1]]
    square = torch.zeros(1, 9, dtype=torch.bool)
    square[0, [2, 7]] = True
    assert torch.equal(anomaly_grid(square, (3, 3), "release"), anomaly_grid(square, (3, 3), "row_major"))


def test_aggregator_by_hand():
    f = torch.randn(1, 12, 5, generator=torch.Generator().manual_seed(4))
    g = aggregator(f, 0.4)[0].double().numpy()
    u = F.normalize(f[0].double(), dim=-1).numpy()
    s = u @ u.T
    kept = np.where(s >= 0.4, s, 0.0)
    np.testing.assert_allclose(g, kept / (kept.sum(axis=1, keepdims=True) + 1e-6), rtol=1e-5, atol=1e-7)
    assert (g[s < 0.4] == 0).all() and np.allclose(np.diag(g) > 0, True)


# ------------------------------------------------------------------ the method against a float64 reference


def _block64(blk, x: torch.Tensor) -> torch.Tensor:
    """One pre-norm CLIP block in float64: x + OutProj(MHA(ln_1 x)); x + mlp(ln_2 x) (QuickGELU)."""
    D = x.shape[-1]
    ln1 = F.layer_norm(x, (D,), blk.ln_1.weight.double(), blk.ln_1.bias.double(), blk.ln_1.eps)
    q, k, v = _heads(blk, ln1)
    a = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v
    x = x + _out(blk, a)
    ln2 = F.layer_norm(x, (D,), blk.ln_2.weight.double(), blk.ln_2.bias.double(), blk.ln_2.eps)
    h = F.linear(ln2, blk.mlp.c_fc.weight.double(), blk.mlp.c_fc.bias.double())
    h = h * torch.sigmoid(1.702 * h)
    return x + F.linear(h, blk.mlp.c_proj.weight.double(), blk.mlp.c_proj.bias.double())


def _heads(blk, y: torch.Tensor):
    """q, k, v (B, H, n, d) of normalised tokens y (B, n, D), float64."""
    B, n, D = y.shape
    H = blk.attn.heads
    qkv = F.linear(y, blk.attn.in_proj_weight.double(), blk.attn.in_proj_bias.double())
    q, k, v = qkv.chunk(3, dim=-1)
    return [t.reshape(B, n, H, D // H).transpose(1, 2) for t in (q, k, v)]


def _out(blk, a: torch.Tensor) -> torch.Tensor:
    B, H, n, d = a.shape
    w = blk.attn.out_proj
    return F.linear(a.transpose(1, 2).reshape(B, n, H * d), w.weight.double(), w.bias.double())


def _g(feats: torch.Tensor) -> torch.Tensor:
    u = feats / feats.norm(dim=-1, keepdim=True)
    s = u @ u.transpose(-2, -1)
    s = torch.where(s >= 0.4, s, torch.zeros_like(s))
    return s / (s.sum(dim=-1, keepdim=True) + 1e-6)


def scclip_reference(vit, pixels: torch.Tensor) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Spec §4.11.1 in float64, window by window (blocks 0..10 computed here, LOF and repair by hand)."""
    x, (gr, gc) = vit.embed(pixels)
    x = x.double()
    outs = []
    for blk in vit.blocks[:-1]:
        x = _block64(blk, x)
        outs.append(x)
    last = vit.blocks[-1]
    D = x.shape[-1]
    result, anomalies = [], []
    for b in range(x.shape[0]):
        p11 = outs[10][b, 1:]  # (n, D)
        scores = _lof_by_hand(p11.numpy(), 30, "lof_release")
        bad = scores > np.quantile(scores, 0.95)
        mask = bad.reshape(gr, gc)  # row-major with gc
        anomalies.append(bad)
        x_a = torch.from_numpy(_repair_by_hand(p11.numpy(), mask))
        f8 = torch.from_numpy(_repair_by_hand(outs[8][b, 1:].numpy(), mask))
        x_b = _g(f8) @ x_a
        u8 = f8 / f8.norm(dim=-1, keepdim=True)
        s8 = u8 @ u8.T
        m = 3.0 * (s8 - s8.mean())
        shared = torch.softmax(m.masked_fill(m < 0, -torch.inf), dim=-1)

        def attn(u: torch.Tensor, shared: torch.Tensor = shared) -> torch.Tensor:
            ln = F.layer_norm(u[None], (D,), last.ln_1.weight.double(), last.ln_1.bias.double(), last.ln_1.eps)
            _, k, v = _heads(last, ln)
            kk = torch.softmax(k @ k.transpose(-2, -1) * k.shape[-1] ** -0.5, dim=-1)
            return _out(last, 0.5 * (shared + kk) @ v)[0]

        fused = sum(outs[i][b] for i in range(3, 10))  # outputs of blocks 3..9, [CLS] included
        y1 = attn(x_b) + 0.3 * outs[10][b, :1]
        y2 = attn(fused[1:]) + 0.3 * fused[:1]
        result.append(_g(outs[3][b, 1:]) @ (y1 + y2))
    return torch.stack(result), anomalies


def test_scclip_matches_the_float64_reference(deep_clip):
    pixels = torch.randn(2, 3, 160, 224, generator=torch.Generator().manual_seed(6))  # 10 x 14 grid
    spec = get_method("scclip")
    out = spec.run(Backbones(deep_clip), _batch(pixels), spec.options)
    want, anomalies = scclip_reference(deep_clip, pixels)
    assert out.grid == (10, 14) and out.window_info["anomalies"] == [int(a.sum()) for a in anomalies] == [7, 7]
    torch.testing.assert_close(out.tokens.double(), want, atol=2e-4, rtol=2e-4)
    # every stage matters: without the repair, or with another detector, the result moves
    for change in ({"anomaly": "topk_norm"}, {"res_cls": 0.0}, {"threshold": 0.9}):
        other = spec.run(Backbones(deep_clip), _batch(pixels), dataclasses.replace(spec.options, **change))
        assert (other.tokens - out.tokens).abs().max() > 1e-3, change


def test_batched_windows_equal_one_by_one(deep_clip):
    pixels = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(7))
    spec = get_method("scclip")
    together = spec.run(Backbones(deep_clip), _batch(pixels), spec.options).tokens
    alone = torch.cat([spec.run(Backbones(deep_clip), _batch(p[None]), spec.options).tokens for p in pixels])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ options, blocks, preset


def test_block_indices_scale_with_depth_and_bad_ones_are_one_line_errors():
    assert resolve_blocks(SCCLIPOptions(), 12) == (8, 3, (3, 4, 5, 6, 7, 8, 9))
    assert resolve_blocks(SCCLIPOptions(), 24) == (16, 6, (6, 8, 10, 12, 14, 16, 18))
    assert resolve_blocks(SCCLIPOptions(), 3) == (1, 1, (1,))  # all clamped to the block before the last
    vit_l = SCCLIPOptions(pre_block=16, post_block=6, fusion_blocks=tuple(range(8, 18)), scale_blocks=False)
    assert resolve_blocks(vit_l, 24) == (16, 6, tuple(range(8, 18)))  # the release's ViT-L/14 values
    with pytest.raises(OvssError, match=r"scclip pre_block 11 is not a block .* choose blocks in 0\.\.10"):
        resolve_blocks(SCCLIPOptions(pre_block=11), 12)
    for bad, message in (
        ({"neighbors": 0}, "neighbors must be >= 1"),
        ({"contamination": 1.0}, r"contamination must be in \(0, 1\)"),
        ({"fusion_blocks": ()}, "fusion_blocks is empty"),
        ({"anomaly": "iforest"}, "anomaly='iforest' is invalid"),
    ):
        with pytest.raises(OvssError, match=message):
            resolve_options("scclip", SCCLIPOptions(), bad)


def test_opt_text_of_block_lists_parses():
    from ovss.cli.options import parse_method_options

    assert parse_method_options(["fusion_blocks=3,4,5"], "scclip") == {"fusion_blocks": (3, 4, 5)}
    assert parse_method_options(["fusion_blocks=(3, 4)"], "scclip") == {"fusion_blocks": (3, 4)}


def test_scclip_preset_release_configs():
    assert default_preset("scclip") == "scclip" and default_preset("scclip+gla") == "scclip"
    expected = {"voc21": (50.0, 0.15, 0.1), "pc60": (40.0, 0.15, None), "coco_object": (55.0, 0.35, None)}
    for method in ("scclip", "scclip+gla"):
        for dataset, (tau, bg, area) in expected.items():
            s = resolve("scclip", dataset, method)
            assert (s.logit_scale, s.bg_threshold, s.area_threshold) == (tau, bg, area)
            assert (s.short_side, s.crop, s.stride, s.name_set) == (336, 224, 112, "full-rename")
        city = resolve("scclip", "cityscapes", method)
        assert (city.short_side, city.logit_scale, city.bg_threshold) == (560, 40.0, 0.0)
        assert resolve("scclip", "coco_stuff", method).short_side == 336  # unlike sclip-release
    assert resolve("scclip", "voc21", "sclip").logit_scale == 65.0  # SCLIP keeps its own scales
    assert resolve("scclip", "voc21", "proxyclip+gla").area_threshold is None


def test_bf16_backbone_agrees_with_fp32_and_feeds_the_detector_fp32(tiny_clip, bpe_path, monkeypatch):
    import ovss
    import ovss.methods.scclip.method as scclip

    seen: list[torch.dtype] = []
    real = scclip.detect_anomalies

    def spy(p: torch.Tensor, *args):
        seen.append(p.dtype)
        return real(p, *args)

    monkeypatch.setattr(scclip, "detect_anomalies", spy)
    coarse = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = np.kron(coarse, np.ones((16, 16, 1), np.uint8))  # (80, 112, 3) blocks of colour
    kw = dict(clip=tiny_clip, tokenizer=bpe_path, short_side=None, crop=64, stride=32)
    low = ovss.load("scclip", dtype="bf16", **kw).predict(image, ["sky", "road", "tree"])
    full = ovss.load("scclip", **kw).predict(image, ["sky", "road", "tree"])
    assert seen and set(seen) == {torch.float32}  # the residual stream reaching the detector is fp32
    assert (low.labels == full.labels).float().mean() > 0.9
    assert 0 < (low.logits - full.logits).abs().max() < 0.1
