"""Big photos without big copies (issue 21, item 9): compact labels, in-place PNG writing, shared images.

Peak memory itself is measured by ``benchmarks/memory_bench.py --cli`` (a benchmark, not a timed test); these
tests pin the mechanisms it relies on: the file writers never build the int64 label copy, the overlay PNG is
written without a second image-sized array, one image row's probabilities come without the whole map, and
the demo's methods share one decoded upload.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import ovss
from ovss.errors import OvssError
from ovss.labels import UNLABELLED
from ovss.pipeline.image import read_image
from ovss.pipeline.maps import FullResolutionMaps, LabelRule
from ovss.pipeline.postprocess import compact_label_dtype, segment_rows
from ovss.prediction import Prediction
from ovss.storage.files import save_rgb_png

LABELS = ["sky", "road", ["person", "pedestrian"]]
SMALL = {"short_side": 48, "crop": 32, "stride": 16}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(61, 93, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("classes", "dtype"),
    [(1, torch.int8), (128, torch.int8), (129, torch.int16), (32768, torch.int16), (32769, torch.int32)],
)
def test_the_compact_dtype_holds_every_class_and_unlabelled(classes, dtype):
    assert compact_label_dtype(classes) == dtype
    info = torch.iinfo(dtype)
    assert info.min <= UNLABELLED and classes - 1 <= info.max


@pytest.mark.parametrize("area_threshold", [None, 0.2])
def test_labels_in_a_compact_dtype_equal_the_int64_ones(area_threshold):
    logits = torch.randn(5, 37, 41)  # (Q, H, W)
    rows = lambda start, stop: logits[:, start:stop]  # noqa: E731
    args = ((37, 41), [0, 1, 1, 2, 3], 4, 2.0, 0.4, area_threshold)
    wide = segment_rows(rows, *args, band_rows=7, bg_label=UNLABELLED)
    small = segment_rows(rows, *args, band_rows=7, bg_label=UNLABELLED, labels_dtype=torch.int8)
    assert wide.dtype == torch.int64 and small.dtype == torch.int8
    assert (wide == UNLABELLED).any() and torch.equal(small.to(torch.int64), wide)


def test_predict_keeps_compact_labels_and_builds_the_int64_copy_once(tiny_clip, bpe_path, image):
    seg = ovss.load("clearclip", clip=tiny_clip, tokenizer=bpe_path, templates="imagenet7", **SMALL)
    result = seg.predict(image, LABELS)
    assert result.compact_labels.dtype == torch.int8 and result.compact_labels.shape == image.shape[:2]
    labels = result.labels
    assert labels.dtype == torch.int64 and torch.equal(labels, result.compact_labels.to(torch.int64))
    assert result.labels is labels  # kept: repeated reads cost nothing


def test_the_writers_never_build_the_int64_labels(tiny_clip, bpe_path, image, tmp_path):
    seg = ovss.load("clearclip", clip=tiny_clip, tokenizer=bpe_path, templates="imagenet7", **SMALL)
    result = seg.predict(image, LABELS, background=None)
    written = result.save(tmp_path / "compact", "a", masks=True, json=True)
    assert result._labels is None  # the 8-bytes-a-pixel copy was never made
    wide = Prediction(result.labels, result.classes, result.config, result.maps, result.image)  # int64 input
    again = wide.save(tmp_path / "wide", "a", masks=True, json=True)
    assert [p.name for p in written] == [p.name for p in again]
    for one, other in zip(written, again, strict=True):
        if one.suffix == ".png":
            assert np.array_equal(np.asarray(Image.open(one)), np.asarray(Image.open(other))), one.name
        else:
            assert one.read_bytes() == other.read_bytes(), one.name


@pytest.mark.parametrize("consume", [False, True])
def test_an_rgb_png_is_written_from_the_array_itself(tmp_path, image, consume):
    rgb = image.copy()
    path = save_rgb_png(tmp_path / "x.png", rgb, consume=consume)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), image)  # the pixels before the call
    assert np.array_equal(rgb, image[:, :, ::-1] if consume else image)  # consumed: left in BGR order
    frozen = image.copy()
    frozen.flags.writeable = False  # cannot be swapped in place: written all the same
    assert np.array_equal(np.asarray(Image.open(save_rgb_png(tmp_path / "y.png", frozen))), image)
    with pytest.raises(OvssError, match=r"\(H, W, 3\)"):
        save_rgb_png(tmp_path / "z.png", image[:, :, :2].copy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png", "y.png"]  # nothing else left behind


@pytest.mark.parametrize("area_threshold", [None, 0.3])
def test_the_probabilities_of_some_rows_equal_those_of_the_whole_map(area_threshold):
    logits = torch.randn(4, 23, 17)  # (Q, H, W)
    rule = LabelRule((0, 1, 1, 2), 3, 20.0, area_threshold=area_threshold)
    rows = FullResolutionMaps(lambda a, b: logits[:, a:b], (23, 17), rule, band_rows=5)
    whole = FullResolutionMaps(lambda a, b: logits[:, a:b], (23, 17), rule, band_rows=5).probs()
    assert torch.equal(rows.probs_of_rows(9, 10), whole[:, 9:10])
    assert torch.equal(rows.probs_of_rows(0, 23), whole)
    assert rows._probs is None  # the whole map was never built


def test_a_read_only_image_is_shared_and_a_writeable_one_copied(image):
    frozen = image.copy()
    frozen.flags.writeable = False
    assert read_image(frozen) is frozen
    copied = read_image(image)
    assert copied is not image and np.array_equal(copied, image) and not np.shares_memory(copied, image)
    assert read_image(frozen[:, ::2]) is not frozen  # not contiguous: copied like any other array


def test_the_demo_methods_share_one_image_and_a_click_builds_no_probability_map(tiny_clip, bpe_path, image):
    from ovss.demo.session import DemoSession, ModelPool, pixel_report

    pool = ModelPool(tiny_clip, tokenizer=bpe_path, short_side=48, crop=32, stride=16, templates="imagenet7")
    session = DemoSession(pool)
    results = session.run(image, "sky, road", ["clearclip", "naclip"])
    first, second = (pool.get(r.method).current_image() for r in results)
    assert first is second and not first.flags.writeable  # one decoded copy for every method
    report = pixel_report(results[0], 5, 7)
    assert results[0].prediction.maps._probs is None
    probs = results[0].prediction.probs[:, 7, 5]  # the whole map, built here for the check only
    best = int(results[0].prediction.labels[7, 5])
    assert f"(p = {float(probs[best]):.2f})" in report
    for r in results:  # the page shows the session's lossless PNG of each overlay
        assert r.overlay_file is not None
        assert np.array_equal(np.asarray(Image.open(r.overlay_file)), r.overlay)


def test_the_sweep_removes_only_files_of_dead_writers_of_this_machine(tmp_path):
    import subprocess
    import sys

    from ovss.storage import files

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a process that has exited
    (tmp_path / "sub").mkdir()
    names = {
        "dead": f".a.png.{files._WRITER}-{dead}.0123abcd.tmp.png",
        "live": f".b.png.{files._WRITER}-{os.getpid()}.0123abcd.tmp.png",
        "other machine": f".c.png.another-host-{dead}.0123abcd.tmp.png",
        "finished": "d.png",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
        (tmp_path / "sub" / name).write_bytes(b"x")
    assert files.sweep_temp_files(tmp_path) == [tmp_path / names["dead"]]
    assert files.sweep_temp_files(tmp_path, recursive=True) == [tmp_path / "sub" / names["dead"]]
    left = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert left == {names["live"], names["other machine"], names["finished"]}
