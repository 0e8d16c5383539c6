"""bf16 segmenters hold one reduced copy of the image tower's product weights, with bit-identical products."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ovss
from ovss.models.clip import CLIP, build_clip
from ovss.tuning import Tuning

GEOMETRY = {"short_side": 96, "crop": 64, "stride": 32}


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory: pytest.TempPathFactory, tiny_state_dict: dict) -> Path:
    from tiny import save_openai_plain

    return save_openai_plain(tiny_state_dict, tmp_path_factory.mktemp("w") / "tiny-clip.pt")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.kron(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), np.ones((16, 16, 1), dtype=np.uint8))


def _product_bytes(model: CLIP) -> dict[torch.dtype, int]:
    """Bytes of the image tower's product weights per dtype, plus those of its reduced-copy caches."""
    out: dict[torch.dtype, int] = {}
    for p in model.visual.matmul_weights():
        out[p.dtype] = out.get(p.dtype, 0) + p.numel() * p.element_size()
    for module in model.visual.modules():
        for _, _, copies in module.__dict__.get("_reduced_weight_copies", {}).values():
            for c in copies:
                if c is not None:
                    out[torch.int8] = out.get(torch.int8, 0) + c.numel() * c.element_size()  # int8: "copies"
    return out


@pytest.mark.parametrize("method", ["naclip", "clearclip", "sclip", "scclip", "maskclip"])
def test_file_loaded_bf16_keeps_one_copy_and_equal_products(
    method: str, clip_file: Path, tiny_state_dict: dict, bpe_path: Path, image: np.ndarray
) -> None:
    text = torch.nn.functional.normalize(torch.randn(5, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    labels = ["a", "b", "c", "d", "e"]
    reduced = ovss.load(method, clip=clip_file, tokenizer=bpe_path, dtype="bf16", **GEOMETRY)
    before = _product_bytes(reduced.clip)
    low = reduced.predict(image, labels, text_embeddings=text)
    after = _product_bytes(reduced.clip)
    fp32_bytes = sum(p.numel() * 4 for p in build_clip(tiny_state_dict).visual.matmul_weights())
    assert before == after == {torch.bfloat16: fp32_bytes // 2}  # one bf16 copy, no fp32, no cached copies

    # the same weights passed in built stay fp32 (never changed) and run through reduced copies: same logits
    given = build_clip(tiny_state_dict)
    copies = ovss.load(method, clip=given, tokenizer=bpe_path, dtype="bf16", **GEOMETRY)
    cached = copies.predict(image, labels, text_embeddings=text)
    assert set(_product_bytes(given)) == {torch.float32, torch.int8}
    torch.testing.assert_close(low.logits, cached.logits, rtol=0, atol=0)
    assert torch.equal(low.labels, cached.labels)

    # the switch: fp32 weights kept
    kept = ovss.load(method, clip=clip_file, tokenizer=bpe_path, dtype="bf16", tuning=Tuning(reduced_weights=False))
    assert {p.dtype for p in kept.clip.visual.matmul_weights()} == {torch.float32}


def test_fp32_products_outside_autocast_use_the_reduced_values(clip_file: Path, tiny_state_dict: dict) -> None:
    seg = ovss.load("clearclip", clip=clip_file, tokenizer=False, dtype="bf16")
    x = torch.randn(2, 5, seg.clip.visual.cfg.width)  # (B, n, D) fp32, no autocast
    block = seg.clip.visual.blocks[0]
    got = block.ffn(x)
    ref = build_clip({k: v.clone() for k, v in tiny_state_dict.items()}).visual  # models share the dict's tensors
    with torch.no_grad():
        for p in ref.matmul_weights():  # fp32 weights holding the bf16-rounded values
            p.copy_(p.to(torch.bfloat16).float())
        expected = ref.blocks[0].ffn(x)
        unrounded = build_clip(tiny_state_dict).visual.blocks[0].ffn(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, unrounded)  # they are the rounded values, not the file's


def test_fp32_segmenters_are_untouched(clip_file: Path) -> None:
    seg = ovss.load("naclip", clip=clip_file, tokenizer=False)
    assert {p.dtype for p in seg.clip.visual.matmul_weights()} == {torch.float32}
