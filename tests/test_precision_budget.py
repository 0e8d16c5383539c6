"""The bf16 error-budget script's pieces: its GLA cut-off re-derivation is the float64 reference's, and the
tamed text embeddings hit the requested logit margin."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ovss.gla.config import GLAConfig
from ovss.gla.reference import dense_attention_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from precision_agreement import _flips, cutoffs
from precision_tamed import tamed_text


def _keys(seed: int, m: int = 60, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g) + 1.2 * torch.randn(1, d, generator=g)  # correlated: real proxy sets


def test_cutoffs_reproduce_the_dense_reference():
    keys = _keys(0)
    prior = 0.3 * torch.randn(60, 60, generator=torch.Generator().manual_seed(1))
    for cfg, pri in ((GLAConfig(), None), (GLAConfig(rho=0.55, clamp_mean=True), prior)):
        sets, keep, alpha = cutoffs(keys, keys, 3, cfg, pri, torch.float64)
        want, stats = dense_attention_map(keys, keys, 3, cfg, prior=pri)
        torch.testing.assert_close(alpha, want, atol=1e-12, rtol=0)
        assert torch.equal(sets[-1].sum(dim=1), stats.counts)
        assert 1 < int(stats.counts.median()) < 60  # the sets are neither trivial nor everything
        assert torch.equal(keep, want > 0)


def test_flips_are_zero_for_equal_inputs_and_counted_otherwise():
    keys = _keys(2)
    cfg = GLAConfig()
    a = cutoffs(keys, keys, 2, cfg, None, torch.float64)
    same = _flips(a[0], a[0], a[1], a[1], a[2])
    assert same["mask"]["flips"] == 0 and all(same[f"proxy_step{t}"]["flips"] == 0 for t in range(cfg.steps))
    noisy = keys + 0.05 * torch.randn(keys.shape, generator=torch.Generator().manual_seed(3))
    b = cutoffs(noisy, noisy, 2, cfg, None, torch.float64)
    moved = _flips(a[0], b[0], a[1], b[1], a[2])
    assert moved["proxy_step0"]["flips"] == int((a[0][0] ^ b[0][0]).sum()) > 0


def test_tamed_text_reaches_the_requested_margin():
    feats = F.normalize(_keys(4, m=400, d=32), dim=-1)
    for margin in (0.5, 2.0):
        text, share = tamed_text(feats, 5, 40.0, margin)
        top2 = (40.0 * feats @ text.T).topk(2, dim=1).values
        assert abs(float((top2[:, 0] - top2[:, 1]).median()) - margin) < 1e-3
        assert 0 < share < 1 and torch.allclose(text.norm(dim=1), torch.ones(5))
