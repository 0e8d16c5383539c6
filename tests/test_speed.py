"""Speed changes keep results: token-sliced block passes, the window cap, values-only projections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ovss
from ovss.tuning import Tuning

LABELS = ["sky", "road", ["person", "pedestrian"], "tree"]
GEOMETRY = {"short_side": 96, "crop": 64, "stride": 32}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)


@pytest.mark.parametrize("method", ["proxyclip+gla", "clearclip+gla", "sclip"])
def test_sliced_block_passes_equal_whole_batch(
    method: str, tiny_clip, tiny_dino, bpe_path: Path, image: np.ndarray
) -> None:
    text = torch.nn.functional.normalize(torch.randn(5, tiny_clip.visual.cfg.output_dim), dim=-1)
    kw = dict(clip=tiny_clip, vfm=tiny_dino, tokenizer=bpe_path, window_batch=16, **GEOMETRY)
    whole = ovss.load(method, tuning=Tuning(block_tokens=0), **kw).predict(image, LABELS, text_embeddings=text)
    # one or two windows per slice for these tiny grids
    sliced = ovss.load(method, tuning=Tuning(block_tokens=40), **kw).predict(image, LABELS, text_embeddings=text)
    torch.testing.assert_close(sliced.logits, whole.logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(sliced.labels, whole.labels)


def test_sliced_text_tower_equals_whole_batch(tiny_clip) -> None:
    tokens = torch.randint(1, 1000, (7, 77), generator=torch.Generator().manual_seed(0))  # (B, 77)
    tokens[:, 9] = tokens.max() + 1  # EOT (argmax) at position 9
    with torch.inference_mode():
        whole = tiny_clip.encode_text(tokens, block_tokens=0)
        sliced = tiny_clip.encode_text(tokens, block_tokens=160)  # two prompts per slice, a remainder of one
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)


def test_segmenter_text_tower_uses_its_block_tokens(tiny_clip, bpe_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """encode_names passes the Segmenter's block_tokens to the text tower: sliced and whole agree."""
    monkeypatch.setenv("OVSS_TEXT_CACHE", "0")  # the second segmenter encodes too, it does not read the first's
    names = ["sky", "road", "person"]  # 3 names x 80 templates: 240 prompts, many slices at 160 tokens
    kw = dict(clip=tiny_clip, tokenizer=bpe_path)
    whole = ovss.load("clearclip", tuning=Tuning(block_tokens=0), **kw).encode_names(names)
    sliced = ovss.load("clearclip", tuning={"block_tokens": 160}, **kw).encode_names(names)
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)


def test_window_cap_counts_tokens_of_the_largest_grid(tiny_clip, tiny_dino, bpe_path: Path) -> None:
    clip_only = ovss.load("clearclip", clip=tiny_clip, tokenizer=bpe_path, window_batch=16)
    assert clip_only._windows_per_forward((448, 448)) == 1  # 785 tokens
    assert clip_only._windows_per_forward((224, 224)) == 5  # 197 tokens: 5 fit the default 1024
    assert clip_only._windows_per_forward((64, 64)) == 16  # 17 tokens: window_batch bounds it
    with_dino = ovss.load("proxyclip", clip=tiny_clip, vfm=tiny_dino, tokenizer=bpe_path, window_batch=16)
    assert with_dino._windows_per_forward((224, 224)) == 1  # DINO /8: 785 tokens
    kw = dict(clip=tiny_clip, tokenizer=bpe_path, window_batch=16)
    wider = ovss.load("clearclip", tuning=Tuning(window_tokens=600), **kw)
    assert wider._windows_per_forward((224, 224)) == 3  # 600 // 197
    uncapped = ovss.load("clearclip", tuning=Tuning(window_tokens=0), **kw)
    assert uncapped._windows_per_forward((448, 448)) == 16  # window_batch alone


def test_values_projection_equals_fused_qkv(tiny_clip) -> None:
    attn = tiny_clip.visual.blocks[-1].attn
    x = torch.randn(3, 17, tiny_clip.visual.cfg.width)  # (B, n, D)
    with torch.inference_mode():
        torch.testing.assert_close(attn.values(x), attn.qkv(x)[2], rtol=1e-6, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v_low, v_ref = attn.values(x), attn.qkv(x)[2]
    assert v_low.dtype == torch.bfloat16
    torch.testing.assert_close(v_low, v_ref, rtol=0.02, atol=0.02)


def test_text_tower_stops_at_the_last_eot_like_the_full_context(tiny_clip) -> None:
    text = tiny_clip.text
    tokens = torch.zeros(4, 77, dtype=torch.long)  # (B, 77) [SOT] words [EOT] then zero padding
    for row, length in enumerate((3, 9, 5, 12)):
        tokens[row, :length] = torch.randint(1, 1000, (length,), generator=torch.Generator().manual_seed(row))
        tokens[row, length] = 49407  # [EOT], the highest id
    with torch.inference_mode():
        x = text.token_embedding(tokens) + text.positional_embedding  # (B, 77, W) all 77 positions
        x = text.ln_final(text.transformer(x, text.attn_mask))  # (B, 77, W)
        full = x[torch.arange(4), tokens.argmax(dim=-1)] @ text.text_projection  # (B, E)
        short = tiny_clip.encode_text(tokens)  # runs positions 0..12 only
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)
