"""Reduced precision end to end (spec §2.9): matrix products in bf16, residual stream, norms and statistics in fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ovss
import ovss.gla.cross_window as cross_window
from ovss.tuning import Tuning

LABELS = ["sky", "road", ["person", "pedestrian"], "tree"]
GEOMETRY = {"short_side": 96, "crop": 64, "stride": 32}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A smooth random image (blocks of colour), so labels form regions rather than noise."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.kron(coarse, np.ones((16, 16, 1), dtype=np.uint8))  # (96, 128, 3)


def test_bf16_runs_products_reduced_and_statistics_fp32(
    tiny_clip, bpe_path: Path, image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, set[Any]] = {"block": set(), "ln": set(), "fc": set(), "gla_in": set(), "gla_out": set()}
    seen["gla_autocast"] = set()
    real_rows = cross_window._attention_rows

    def spy_rows(keys: torch.Tensor, queries: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen["gla_in"] |= {keys.dtype, queries.dtype}
        seen["gla_autocast"].add(torch.is_autocast_enabled("cpu"))
        probs, stats = real_rows(keys, queries, *args, **kwargs)
        seen["gla_out"].add(probs.dtype)
        return probs, stats

    monkeypatch.setattr(cross_window, "_attention_rows", spy_rows)  # what the one GLA operator calls
    visual = tiny_clip.visual
    hooks = [b.register_forward_hook(lambda m, a, out: seen["block"].add(out.dtype)) for b in visual.blocks]
    hooks.append(visual.blocks[0].ln_1.register_forward_hook(lambda m, a, out: seen["ln"].add(out.dtype)))
    hooks.append(visual.blocks[0].mlp.c_fc.register_forward_hook(lambda m, a, out: seen["fc"].add(out.dtype)))
    try:
        reduced = ovss.load("clearclip+gla", clip=tiny_clip, tokenizer=bpe_path, dtype="bf16", **GEOMETRY)
        low = reduced.predict(image, LABELS)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen["fc"] == {torch.bfloat16}  # autocast really ran the matrix products in bf16
    assert seen["block"] == {torch.float32}  # ... while the residual stream stayed fp32
    assert seen["ln"] == {torch.float32}
    assert seen["gla_in"] == seen["gla_out"] == {torch.float32} and seen["gla_autocast"] == {False}
    assert low.logits.dtype == low.probs.dtype == torch.float32 and low.labels.dtype == torch.int64
    assert low.config["dtype"] == "bfloat16"

    full = ovss.load("clearclip+gla", clip=tiny_clip, tokenizer=bpe_path, **GEOMETRY).predict(image, LABELS)
    agreement = (low.labels == full.labels).float().mean().item()
    assert agreement > 0.9, agreement
    assert 0 < (low.logits - full.logits).abs().max() < 0.1  # reduced, but close


@pytest.mark.parametrize("method", ["proxyclip+gla", "gclip"])
def test_reduced_weight_copies_equal_plain_autocast_bit_for_bit(
    method: str, tiny_clip, tiny_dino, bpe_path: Path, image: np.ndarray
) -> None:
    kw = dict(clip=tiny_clip, vfm=tiny_dino, tokenizer=bpe_path, dtype="bf16", **GEOMETRY)
    text = torch.nn.functional.normalize(torch.randn(5, tiny_clip.visual.cfg.output_dim), dim=-1)
    modules = [*tiny_clip.visual.modules(), *tiny_dino.modules()]
    for module in modules:  # copies left by earlier tests on these shared models
        module.__dict__.pop("_reduced_weight_copies", None)
    plain_seg = ovss.load(method, tuning=Tuning(keep_reduced_copies=False), **kw)
    plain = plain_seg.predict(image, LABELS, text_embeddings=text)
    assert not any("_reduced_weight_copies" in module.__dict__ for module in modules)  # autocast cast every call
    seg = ovss.load(method, **kw)
    cached = seg.predict(image, LABELS, text_embeddings=text)
    torch.testing.assert_close(cached.logits, plain.logits, rtol=0, atol=0)
    fc = tiny_clip.visual.blocks[0].mlp.c_fc
    copy = fc.__dict__["_reduced_weight_copies"][torch.bfloat16][2][0]
    assert copy.dtype == torch.bfloat16 and torch.equal(copy, fc.weight.to(torch.bfloat16))
    seg.predict(image, LABELS, text_embeddings=text)
    assert fc.__dict__["_reduced_weight_copies"][torch.bfloat16][2][0] is copy  # cast once, reused


def test_reduced_weight_copies_follow_in_place_weight_changes() -> None:
    from ovss.models.layers import Linear

    layer = Linear(8, 4).requires_grad_(False)
    x = torch.randn(3, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = layer(x)
        with torch.no_grad():
            layer.weight.mul_(2.0)
        after = layer(x)
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)  # plain autocast
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    assert not torch.equal(before, after)
