"""``ovss.load(..., tokenizer=False)``: users who bring their own text embeddings need no BPE vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ovss
from ovss.errors import OvssError
from ovss.storage import hub

LABELS = ["sky", "road", ["person", "pedestrian"]]
IMAGE = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
GEOMETRY = {"short_side": 32, "crop": 32, "stride": 16, "templates": "imagenet7"}


@pytest.fixture
def no_vocabulary(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, with an empty cache and no OVSS_BPE_PATH: no vocabulary can be found. Returns the cache folder."""
    monkeypatch.delenv("OVSS_BPE_PATH", raising=False)
    monkeypatch.setenv("OVSS_OFFLINE", "1")
    return hub.cache_dir()


def _embeddings(E: int) -> torch.Tensor:
    return torch.randn(4, E, generator=torch.Generator().manual_seed(0))  # (Q, E): 4 names in label order


@pytest.mark.parametrize("method", ["clearclip", "cass"])
def test_load_without_tokenizer_predicts_with_given_embeddings(
    method: str, tiny_clip, tiny_dino, bpe_path: Path, no_vocabulary: Path
) -> None:
    vfm = tiny_dino if method == "cass" else None
    with pytest.raises(OvssError, match=r"^Tokenizer vocabulary 'clip-bpe' is not cached"):
        ovss.load(method, clip=tiny_clip, vfm=vfm, **GEOMETRY)  # the default still fails fast at load
    seg = ovss.load(method, clip=tiny_clip, vfm=vfm, tokenizer=False, **GEOMETRY)
    text = _embeddings(tiny_clip.visual.cfg.output_dim)
    got = seg.predict(IMAGE, LABELS, text_embeddings=text)
    with_vocabulary = ovss.load(method, clip=tiny_clip, vfm=vfm, tokenizer=bpe_path, **GEOMETRY)
    expected = with_vocabulary.predict(IMAGE, LABELS, text_embeddings=text)
    assert torch.equal(got.logits, expected.logits) and np.array_equal(got.labels, expected.labels)
    # without embeddings: one line saying what is missing and how to fix it, from predict and encode_names
    for call in (lambda: seg.predict(labels=LABELS), lambda: seg.encode_names(["sky"]), lambda: seg.tokenizer):
        with pytest.raises(OvssError) as error:
            call()
        message = str(error.value)
        assert "\n" not in message and "tokenizer=False" in message and "text_embeddings=(Q, E)" in message
    assert list(no_vocabulary.glob("*bpe*")) == []  # nothing was looked for or fetched


def test_check_offline_needs_no_vocabulary_without_tokenizer(no_vocabulary: Path) -> None:
    clip_entry, bpe = hub.REGISTRY["ViT-B/16"], hub.REGISTRY["clip-bpe"]
    no_vocabulary.mkdir(parents=True, exist_ok=True)
    (no_vocabulary / clip_entry.filename).write_bytes(b"cached weights")  # only the vocabulary is missing
    with pytest.raises(OvssError, match=rf"^1 file\(s\) needed .*{bpe.filename}"):
        hub.check_offline([("ViT-B/16", "clip")], download=False, vocabulary=True)
    hub.check_offline([("ViT-B/16", "clip")], download=False, vocabulary=False)  # nothing missing: no error


def test_load_offline_without_tokenizer_lists_only_the_weights(no_vocabulary: Path) -> None:
    with pytest.raises(OvssError) as error:
        ovss.load("proxyclip", tokenizer=False)
    message = str(error.value)
    assert message.startswith("2 file(s) needed") and hub.REGISTRY["clip-bpe"].filename not in message
    for name in ("ViT-B/16", "dino-vitb8"):
        assert f"{hub.REGISTRY[name].filename} <- " in message
    with pytest.raises(OvssError, match=r"^3 file\(s\) needed"):  # the default also needs the vocabulary
        ovss.load("proxyclip")


def test_tokenizer_true_is_a_one_line_error(tiny_clip) -> None:
    with pytest.raises(OvssError, match=r"^tokenizer=True is not a tokenizer; .* False \(none\)$"):
        ovss.load("clearclip", clip=tiny_clip, tokenizer=True)  # type: ignore[arg-type]
