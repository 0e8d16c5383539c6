"""``Prediction.save`` / ``overlay``, ``Segmenter.__repr__``, unlabelled pixels and the window progress hook."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ovss
from ovss.errors import OvssError
from ovss.labels import UNLABELLED
from ovss.output.files import label_map_format, mask_file_name
from ovss.output.overlay import class_palette
from ovss.pipeline.maps import FullResolutionMaps, LabelRule
from ovss.prediction import Prediction

LABELS = ["sky", "road", ["person", "pedestrian"]]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(60, 90, 3), dtype=np.uint8)


def _load(tiny_clip, bpe_path, **kw):
    return ovss.load("clearclip", clip=tiny_clip, tokenizer=bpe_path, templates="imagenet7", **kw)


def _prediction(labels: np.ndarray, num_classes: int, image: np.ndarray | None = None) -> Prediction:
    """A hand-made prediction: one name per class, logits = one-hot of the labels."""
    h, w = labels.shape
    classes = [[f"class {c}"] for c in range(num_classes)]
    t = torch.as_tensor(labels)
    logits = torch.zeros(num_classes, h, w)
    logits[t.clamp(min=0), torch.arange(h)[:, None], torch.arange(w)[None, :]] = 1.0  # (C, h, w)
    rule = LabelRule(tuple(range(num_classes)), num_classes, logit_scale=1.0)
    return Prediction(t, classes, {"method": "hand"}, FullResolutionMaps.from_logits(logits, rule), image)


def test_predict_background_none_leaves_uncertain_pixels_unlabelled(tiny_clip, bpe_path, image):
    base = _load(tiny_clip, bpe_path, short_side=48, crop=32, stride=16).predict(image, LABELS)
    best = base.probs.max(0).values  # (H0, W0)
    threshold = float(best.median())
    seg = _load(tiny_clip, bpe_path, short_side=48, crop=32, stride=16, bg_threshold=threshold)
    papers = seg.predict(image, LABELS)  # default: class 0 takes them (benchmark rule)
    unlabelled = seg.predict(labels=LABELS, background=None)
    second = seg.predict(labels=LABELS, background=2)
    low = best < threshold
    assert bool(low.any()) and bool((~low).any())
    assert bool((papers.labels[low] == 0).all()) and bool((unlabelled.labels[low] == UNLABELLED).all())
    assert bool((second.labels[low] == 2).all())
    for result in (papers, unlabelled, second):
        assert torch.equal(result.labels[~low], base.labels[~low])
    with pytest.raises(OvssError, match="background must be a class index"):
        seg.predict(labels=LABELS, background=3)


def test_save_writes_one_coherent_set_of_files(tiny_clip, bpe_path, image, tmp_path):
    seg = _load(tiny_clip, bpe_path, short_side=48, crop=32, stride=16, bg_threshold=0.5)
    result = seg.predict(image, LABELS, background=None)
    paths = result.save(tmp_path / "out", "photo", logits=True, masks=True, json=True, alpha=1.0)
    assert all(path.is_file() for path in paths)
    assert len(paths) == 3 + len(result.classes) + 1  # label png, overlay, logits, one mask per class, json
    labels = result.labels.numpy()
    label_map = Image.open(paths[0])
    ids = np.asarray(label_map).astype(np.int64)
    np.testing.assert_array_equal(ids, np.where(labels == UNLABELLED, 255, labels))
    assert label_map.mode == "P" and label_map.getpalette()[: 3 * 3] == class_palette(3).reshape(-1).tolist()
    overlay = np.asarray(Image.open(paths[1]))
    np.testing.assert_array_equal(overlay, result.overlay(alpha=1.0))
    np.testing.assert_array_equal(overlay[:60, :90][labels == UNLABELLED], image[labels == UNLABELLED])
    np.testing.assert_array_equal(np.load(paths[2]), result.logits.numpy())
    record = json.loads(paths[-1].read_text())
    assert record["unlabelled"]["pixels"] == int((labels == UNLABELLED).sum())
    assert sum(c["pixels"] for c in record["classes"]) + record["unlabelled"]["pixels"] == 60 * 90
    with pytest.raises(OvssError, match="already exists; pass overwrite=True"):
        result.save(tmp_path / "out", "photo")
    assert result.save(tmp_path / "out", "photo", overwrite=True) == paths[:2]


def test_more_than_255_classes_save_as_16_bit_with_65535_unlabelled(tmp_path):
    labels = (np.arange(20 * 30).reshape(20, 30) % 300).astype(np.int64)
    labels[0, :5] = UNLABELLED
    result = _prediction(labels, 300, np.zeros((20, 30, 3), np.uint8))
    path = result.save(tmp_path, "many")[0]
    stored = np.asarray(Image.open(path))
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, np.where(labels == UNLABELLED, 65535, labels))
    assert label_map_format(255) == (8, 255) and label_map_format(256) == (16, 65535)


def test_a_failed_save_leaves_no_file(tmp_path, monkeypatch):
    import ovss.output.files

    result = _prediction(np.zeros((8, 8), np.int64), 2, np.zeros((8, 8, 3), np.uint8))

    def broken(path, array):
        raise OSError("disk full")

    monkeypatch.setattr(ovss.output.files, "save_npy", broken)
    with pytest.raises(OSError, match="disk full"):
        result.save(tmp_path / "out", "x", logits=True, masks=True)
    assert [p for p in (tmp_path / "out").rglob("*")] == []


def test_overlay_needs_the_image_and_mask_names_are_safe():
    with pytest.raises(OvssError, match="holds no image"):
        _prediction(np.zeros((4, 4), np.int64), 2).overlay()
    assert mask_file_name(3, "traffic light/signal", 12) == "03_traffic_light_signal.png"
    assert mask_file_name(0, "???", 2) == "0_class.png"


def test_progress_reports_every_window_once(tiny_clip, bpe_path, image):
    calls: list[tuple[int, int]] = []
    seg = _load(tiny_clip, bpe_path, short_side=48, crop=32, stride=16, window_batch=2)
    seg.predict(image, LABELS, progress=lambda done, total: calls.append((done, total)))
    windows, _ = seg.current_windows()  # 48 x 72 processing image -> 2 x 4 windows
    assert len(windows) == 8 and calls == [(0, 8), (2, 8), (4, 8), (6, 8), (8, 8)]


def test_segmenter_repr_names_method_weights_and_geometry(tiny_clip, bpe_path, image):
    seg = _load(tiny_clip, bpe_path, short_side=48, crop=32, stride=16)
    text = repr(seg)
    assert text.startswith("Segmenter(method='clearclip'") and "crop=32, stride=16" in text
    assert "image: none" in text and "last_n_layers=1" in text
    seg.set_image(image)
    assert "image: 60x90, 8 windows" in repr(seg)


def test_save_prefers_a_file_path_error_to_a_traceback(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = _prediction(np.zeros((4, 4), np.int64), 2, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(OvssError, match="is a file"):
        result.save(target)
    assert target.read_text() == "x"


def test_output_paths_are_those_written(tmp_path: Path):
    result = _prediction(np.zeros((4, 4), np.int64), 2, np.zeros((4, 4, 3), np.uint8))
    written = result.save(tmp_path, "s", masks=True, json=True)
    assert sorted(written) == sorted(p for p in tmp_path.rglob("*") if p.is_file())
