"""ovss.tuning: the speed switches are checked at load, recorded in the config, and reach every place they act."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ovss
import ovss.gla.anchors as anchors
import ovss.methods.trident.sam as trident_sam
from ovss.errors import OvssError
from ovss.models.sam.image_encoder import SamAttention
from ovss.models.vit import Transformer, VisionTransformer
from ovss.tuning import Tuning, resolve_tuning
from test_trident_pipeline import tiny_sam

GEOMETRY = {"short_side": 112, "crop": 112, "stride": 56}
LABELS = ["background", "cat", ["dog", "puppy"]]
# Values no default has, so a call that did not receive the Segmenter's tuning shows up.
ODD = Tuning(
    block_tokens=10**6,  # larger than any batch here: no slicing, so every recorded call is a top-level one
    window_tokens=3000,
    attention_chunk=999,
    fold_positions=False,
    aggregation_rows=5,
    keep_reduced_copies=False,
    sparse_below=3,
)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"block_tokens": -1}, "tuning block_tokens must be an integer >= 0"),
        ({"window_tokens": 1.5}, "tuning window_tokens must be an integer >= 0"),
        ({"attention_chunk": True}, "tuning attention_chunk must be an integer >= 0"),
        ({"sparse_below": "8"}, "tuning sparse_below must be an integer >= 0"),
        ({"fold_positions": 1}, "tuning fold_positions must be true or false"),
        ({"keep_reduced_copies": None}, "tuning keep_reduced_copies must be true or false"),
        ({"block_token": 0}, "unknown tuning field(s) block_token; known: aggregation_rows"),
    ],
)
def test_bad_tuning_fails_at_load_with_one_line(tiny_clip, bpe_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(OvssError) as err:
        ovss.load("clearclip", clip=tiny_clip, tokenizer=bpe_path, tuning=fields)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_tuning_is_a_frozen_dataclass_or_a_mapping() -> None:
    assert resolve_tuning(None) == Tuning() == resolve_tuning({})
    assert resolve_tuning({"block_tokens": 0, "fold_positions": False}) == Tuning(block_tokens=0, fold_positions=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Tuning().block_tokens = 0  # type: ignore[misc]
    with pytest.raises(OvssError, match=r"tuning must be an ovss\.Tuning or a dict of its fields, got list"):
        resolve_tuning([("block_tokens", 0)])  # type: ignore[arg-type]
    assert ovss.Tuning is Tuning


def test_config_records_the_tuning(tiny_clip, bpe_path: Path) -> None:
    default = ovss.load("clearclip", clip=tiny_clip, tokenizer=bpe_path)
    assert default.tuning == Tuning()
    assert default.config["tuning"] == {
        "block_tokens": 1024,
        "window_tokens": 1024,
        "attention_chunk": 2097152,
        "fold_positions": True,
        "aggregation_rows": 512,
        "keep_reduced_copies": True,
        "reduced_weights": True,
        "sparse_below": 8,
        "band_elements": 4194304,
    }
    tuned = ovss.load("clearclip", clip=tiny_clip, tokenizer=bpe_path, tuning=ODD, short_side=32, crop=0)
    assert tuned.config["tuning"] == dataclasses.asdict(ODD)
    image = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    text = torch.nn.functional.normalize(torch.randn(4, tiny_clip.visual.cfg.output_dim), dim=-1)  # (Q, E)
    prediction = tuned.predict(image, LABELS, text_embeddings=text)
    assert prediction.config["tuning"]["sparse_below"] == 3  # the prediction's record too


@pytest.fixture(scope="module")
def sam():
    return tiny_sam()


@pytest.fixture(scope="module")
def dino16():
    from ovss.models.dino import build_vfm, convert_vfm_state_dict
    from test_dino import dino_state_dict

    return build_vfm(*convert_vfm_state_dict(dino_state_dict(12, patch=16, grid=4)))


def _spy(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, seen: list, pick) -> None:
    """Wrap ``owner.name`` so each call appends ``pick(args, kwargs)`` to ``seen``, then runs the original."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        seen.append(pick(args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize("method", ovss.available_methods())
def test_every_method_passes_the_segmenters_tuning_on(
    method: str, tiny_clip, tiny_dino, dino16, sam, bpe_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every backbone pass, SAM attention, aggregation and proxy mean gets the Segmenter's Tuning values."""
    blocks: list = []
    sam_attention: list = []
    sam_logits: list = []
    slabs: list = []
    sparse: list = []
    _spy(monkeypatch, VisionTransformer, "forward_blocks", blocks, lambda a, k: k.get("block_tokens"))
    _spy(monkeypatch, SamAttention, "forward", sam_attention, lambda a, k: (k["attention_chunk"], k["fold_positions"]))
    _spy(monkeypatch, SamAttention, "logits", sam_logits, lambda a, k: k["fold_positions"])
    _spy(monkeypatch, trident_sam, "aggregation_weights", slabs, lambda a, k: a[5])
    _spy(monkeypatch, anchors, "mean_of_selected", sparse, lambda a, k: a[3])
    vfm = dino16 if method.startswith("trident") else tiny_dino
    seg = ovss.load(method, clip=tiny_clip, vfm=vfm, sam=sam, tokenizer=bpe_path, tuning=ODD, **GEOMETRY)
    image = np.random.default_rng(0).integers(0, 256, (75, 100, 3), dtype=np.uint8)
    text = torch.nn.functional.normalize(torch.randn(4, tiny_clip.visual.cfg.output_dim), dim=-1)  # (Q, E)
    seg.predict(image, LABELS, text_embeddings=text)
    assert set(blocks) <= {ODD.block_tokens}
    assert blocks or method.startswith(("gclip", "scclip"))  # these two run CLIP's blocks one by one themselves
    if method.startswith("trident"):
        assert sam_attention and set(sam_attention) == {(ODD.attention_chunk, ODD.fold_positions)}
        assert sam_logits and set(sam_logits) == {ODD.fold_positions}
        assert slabs and set(slabs) == {ODD.aggregation_rows}
    else:
        assert not sam_attention and not slabs
    if "+gla" in method:
        assert sparse and set(sparse) == {ODD.sparse_below}


def test_text_tower_gets_the_block_tokens(tiny_clip, bpe_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list = []
    _spy(monkeypatch, Transformer, "forward", seen, lambda a, k: k.get("block_tokens"))
    ovss.load("clearclip", clip=tiny_clip, tokenizer=bpe_path, tuning=ODD).encode_names(["cat"])  # 80 prompts
    assert seen and set(seen) == {ODD.block_tokens}


def test_window_tokens_reach_the_window_batches(tiny_clip, bpe_path: Path) -> None:
    """The Segmenter batches windows by its own window_tokens: 5 windows of 5 tokens (2 x 2 patches + [CLS])."""
    image = np.random.default_rng(0).integers(0, 256, (32, 160, 3), dtype=np.uint8)
    steps: dict[int, list[int]] = {}
    for budget in (10, 5, 0):
        seen: list[int] = []
        seg = ovss.load(
            "maskclip", clip=tiny_clip, tokenizer=bpe_path, short_side=32, crop=32, stride=32, window_batch=16,
            tuning=Tuning(window_tokens=budget),
        )  # fmt: skip
        seg.set_image(image, progress=lambda done, total, seen=seen: seen.append(done))
        steps[budget] = [b - a for a, b in itertools.pairwise(seen)]
    assert steps == {10: [2, 2, 1], 5: [1, 1, 1, 1, 1], 0: [5]}  # 0: window_batch alone
