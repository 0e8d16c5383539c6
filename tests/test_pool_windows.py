"""``predict_many(..., pool_windows=True)`` (issue 22, item 2): consecutive images' windows share backbone
forwards, and every prediction equals a ``predict`` loop's (labels and record bit for bit, logits within the
backend's rounding of a batch of another size) for every per-window method in fp32 and bf16; methods that need
an image's windows together run image by image; bad images keep their place; with batches that round alike the
CLI flag changes no output byte."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ovss
from ovss.cli.main import main
from ovss.errors import OvssError
from ovss.methods.registry import METHODS
from ovss.predictor import Segmenter

LABELS = ["sky", "road", ["person", "pedestrian"]]
# No resize, 48-px windows at stride 32: the images below have 4, 4, 6, 1 (a 30x41 window: another crop shape,
# which flushes the pool), 4 and 9 windows; with 8 windows per forward, forwards span two and three images.
GEOMETRY = {"short_side": None, "crop": 48, "stride": 32}
SIZES = [(50, 70), (64, 64), (60, 100), (30, 41), (70, 50), (90, 90)]


def _pooled_methods() -> list[str]:
    ovss.available_methods()  # registers the built-in methods
    return [name for name, spec in METHODS.items() if spec.pools_images]


def _rgb(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [_rgb(seed, h, w) for seed, (h, w) in enumerate(SIZES)]


@pytest.fixture
def forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of windows of every backbone forward, in order (``Segmenter._forward`` recorded)."""
    sizes: list[int] = []
    forward = Segmenter._forward

    def recording(self: Segmenter, backbones: object, batch: object) -> object:
        sizes.append(len(batch.windows))  # type: ignore[attr-defined]
        return forward(self, backbones, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(Segmenter, "_forward", recording)
    return sizes


def _load(tiny_clip, tiny_dino, bpe_path, method: str = "clearclip", **kw) -> Segmenter:
    settings = {**GEOMETRY, "window_batch": 8, **kw}
    return ovss.load(method, clip=tiny_clip, vfm=tiny_dino, tokenizer=bpe_path, **settings)


def _assert_same(got: object, expected: object, *, exact: bool = False) -> None:
    """Labels and record equal; logits bit for bit when ``exact``, else within 1e-6.

    Why a bound: a window's fp32 products round differently in a batch of another size on the CPU backend (the
    9-window image's last window is alone in the loop's second forward and one of 5 pooled: 6.7e-8 here, the
    same difference as ``window_batch`` 8 vs 5 without pooling); batches of 4, 6, 8 or 10 windows round alike.
    """
    assert isinstance(got, ovss.Prediction) and isinstance(expected, ovss.Prediction)
    assert torch.equal(got.labels, expected.labels)
    if exact:
        assert torch.equal(got.logits, expected.logits)
    else:
        assert float((got.logits - expected.logits).abs().max()) <= 1e-6
    assert got.config == expected.config  # per-window diagnostics split back to their image, per-image ones kept


def test_every_per_window_method_is_pooled() -> None:
    methods = _pooled_methods()
    assert {"vanilla", "maskclip", "sclip", "clearclip", "naclip", "gclip", "proxyclip", "scclip"} <= set(methods)
    assert not {"cass", "trident", "clearclip+gla", "proxyclip+gla+mlf"} & set(methods)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", _pooled_methods())
def test_pooled_predictions_equal_a_predict_loop(
    tiny_clip, tiny_dino, bpe_path, images: list[np.ndarray], forwards: list[int], method: str, dtype: str
) -> None:
    segmenter = _load(tiny_clip, tiny_dino, bpe_path, method, dtype=dtype)
    expected = [segmenter.predict(image, LABELS) for image in images]
    per_image = list(forwards)
    forwards.clear()
    got = list(segmenter.predict_many(images, LABELS, pool_windows=True))
    assert per_image == [4, 4, 6, 1, 4, 8, 1]  # the loop: one image per forward (9 windows: 8 + 1)
    assert forwards == [8, 6, 1, 8, 5]  # pooled: 4 + 4 | 6, flushed by the 30x41 window | 1 | 4 + 4 | 5 (last 5 of 9)
    assert len(got) == len(expected)
    for one, other in zip(got, expected, strict=True):
        _assert_same(one, other)


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_a_forward_spans_three_images_with_read_ahead(
    tiny_clip, tiny_dino, bpe_path, forwards: list[int], readers: list[str], read_ahead: int
) -> None:
    segmenter = _load(tiny_clip, tiny_dino, bpe_path, "naclip", window_batch=10, short_side=64)
    images = [_rgb(20 + seed, 50, 70) for seed in range(7)]  # 64 x 89 after the resize: 2 x 3 = 6 windows each
    expected = [segmenter.predict(image, LABELS) for image in images]
    forwards.clear()
    got = list(segmenter.predict_many(images, LABELS, pool_windows=True, read_ahead=read_ahead))
    assert forwards == [10, 10, 10, 10, 2]  # 42 windows: the second forward holds windows of images 1, 2 and 3
    for one, other in zip(got, expected, strict=True):
        _assert_same(one, other)
    worker = "ovss-read-ahead" if read_ahead else threading.main_thread().name
    assert all(name.startswith(worker) for name in readers[len(images) :])


@pytest.mark.parametrize("method", ["clearclip+gla", "proxyclip+gla", "cass"])
def test_methods_that_need_an_image_at_once_run_image_by_image(
    tiny_clip, tiny_dino, bpe_path, images: list[np.ndarray], forwards: list[int], method: str
) -> None:
    segmenter = _load(tiny_clip, tiny_dino, bpe_path, method)
    assert not segmenter.method.pools_images  # all windows of an image in one run (GLA), or the whole image (CASS)
    expected = [segmenter.predict(image, LABELS) for image in images]
    per_image = list(forwards)
    forwards.clear()
    got = list(segmenter.predict_many(images, LABELS, pool_windows=True))
    assert forwards == per_image  # the same forwards as the loop: no windows of two images together
    for one, other in zip(got, expected, strict=True):
        _assert_same(one, other, exact=True)


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_a_bad_image_in_the_middle_of_a_pool_keeps_its_place(
    tiny_clip, tiny_dino, bpe_path, images: list[np.ndarray], forwards: list[int], tmp_path: Path, read_ahead: int
) -> None:
    bad = tmp_path / "broken.png"
    bad.write_text("not an image\n")
    segmenter = _load(tiny_clip, tiny_dino, bpe_path)
    with pytest.raises(OvssError) as direct:
        segmenter.predict(bad, LABELS)
    sequence = [images[0], bad, images[1], None, images[2], images[4], bad]
    forwards.clear()
    got = list(segmenter.predict_many(sequence, LABELS, pool_windows=True, errors="yield", read_ahead=read_ahead))
    assert forwards[0] == 8  # images 0 and 1 share the first forward, across the bad file
    assert [type(r).__name__ for r in got] == ["Prediction", "OvssError", "Prediction", "OvssError", "Prediction",
                                               "Prediction", "OvssError"]  # fmt: skip
    assert str(got[1]) == str(direct.value) == str(got[6]) and "got None for an image" in str(got[3])
    for position in (0, 2, 4, 5):
        _assert_same(got[position], segmenter.predict(sequence[position], LABELS))


def test_a_bad_image_raises_in_its_turn_by_default(
    tiny_clip, tiny_dino, bpe_path, images: list[np.ndarray], tmp_path: Path
) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"")
    segmenter = _load(tiny_clip, tiny_dino, bpe_path)
    results = segmenter.predict_many([images[0], bad, images[1]], LABELS, pool_windows=True)
    _assert_same(next(results), segmenter.predict(images[0], LABELS))  # the image before the bad one comes first
    with pytest.raises(OvssError, match=r"broken\.jpg"):
        next(results)
    with pytest.raises(StopIteration):
        next(results)


def _readers_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("ovss-read-ahead")]


def test_stopping_early_or_on_an_error_ends_the_reader_thread(
    tiny_clip, tiny_dino, bpe_path, images: list[np.ndarray], tmp_path: Path
) -> None:
    segmenter = _load(tiny_clip, tiny_dino, bpe_path)
    results = segmenter.predict_many(images, LABELS, pool_windows=True, read_ahead=2)
    next(results)  # images 0 and 1 encoded, image 2 held in the pool, the reader ahead of it
    assert _readers_alive()
    results.close()  # type: ignore[attr-defined]  # the consumer stops: the pool's generator closes the reader
    assert not _readers_alive()
    bad = tmp_path / "broken.png"
    bad.write_text("not an image\n")
    results = segmenter.predict_many([images[0], bad, *images[1:]], LABELS, pool_windows=True, read_ahead=2)
    next(results)
    with pytest.raises(OvssError, match=r"broken\.png"):
        next(results)
    assert not _readers_alive()  # the raised error ended the iterator and its reader


def test_an_error_of_a_forward_fails_the_images_in_it_only(
    tiny_clip, tiny_dino, bpe_path, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    segmenter = _load(tiny_clip, tiny_dino, bpe_path)
    expected = [segmenter.predict(image, LABELS) for image in images]
    forward = Segmenter._forward
    calls = []

    def failing_second(self: Segmenter, backbones: object, batch: object) -> object:
        calls.append(1)
        if len(calls) == 2:  # the 6 windows of image 2
            raise OvssError("out of memory in this forward")
        return forward(self, backbones, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(Segmenter, "_forward", failing_second)
    got = list(segmenter.predict_many(images, LABELS, pool_windows=True, errors="yield"))
    assert isinstance(got[2], OvssError) and "out of memory" in str(got[2])
    for position in (0, 1, 3, 4, 5):
        _assert_same(got[position], expected[position])


def test_a_method_with_per_image_outputs_stops_a_pooled_run_with_one_line(
    tiny_clip, tiny_dino, bpe_path, images: list[np.ndarray]
) -> None:
    segmenter = _load(tiny_clip, tiny_dino, bpe_path)
    run = segmenter.method.run

    def per_image(backbones: object, batch: object, options: object) -> object:
        out = run(backbones, batch, options)
        out.extras["view"] = "the whole image"  # a plugin's per-image object: it should have set reads_image
        return out

    segmenter.method = dataclasses.replace(segmenter.method, run=per_image)
    assert isinstance(segmenter.predict(images[0], LABELS), ovss.Prediction)  # image by image it works
    with pytest.raises(OvssError, match=r"clearclip returned per-image outputs .*without --pool-windows"):
        list(segmenter.predict_many(images, LABELS, pool_windows=True, errors="yield"))


def test_images_are_taken_lazily_as_the_pool_needs_windows(tiny_clip, tiny_dino, bpe_path) -> None:
    segmenter = _load(tiny_clip, tiny_dino, bpe_path, window_batch=8)
    taken: list[int] = []

    def source() -> Iterator[np.ndarray]:
        for number in range(6):
            taken.append(number)
            yield _rgb(number, 50, 70)  # 4 windows each

    results = segmenter.predict_many(source(), LABELS, pool_windows=True)
    assert taken == []
    next(results)
    assert taken == [0, 1]  # one forward of 8 windows: images 0 and 1, nothing more read
    next(results)
    assert taken == [0, 1]  # image 1 was encoded with image 0
    assert len(list(results)) == 4 and taken == list(range(6))


def test_progress_reports_the_image_being_yielded(tiny_clip, tiny_dino, bpe_path, images: list[np.ndarray]) -> None:
    segmenter = _load(tiny_clip, tiny_dino, bpe_path)
    calls: list[tuple[int, int]] = []
    results = segmenter.predict_many(images, LABELS, pool_windows=True, progress=lambda d, t: calls.append((d, t)))
    for result in results:  # as ovss segment does: the calls during one next() are that image's bar
        assert isinstance(result, ovss.Prediction)
        windows = len(segmenter.current_windows()[0])
        assert calls[0] == (0, windows) and calls[-1] == (windows, windows)
        assert [d for d, _ in calls] == sorted({d for d, _ in calls}) and {t for _, t in calls} == {windows}
        calls.clear()


def test_pool_windows_must_be_a_bool(tiny_clip, tiny_dino, bpe_path) -> None:
    segmenter = _load(tiny_clip, tiny_dino, bpe_path)
    with pytest.raises(OvssError, match="pool_windows must be True or False"):
        segmenter.predict_many([], LABELS, pool_windows="yes")  # type: ignore[arg-type]


def test_the_cli_flag_changes_no_output_byte(
    clip_file: Path, bpe_path: Path, tmp_path: Path, forwards: list[int]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for number, (height, width) in enumerate([(50, 70), (64, 64), (30, 41), (70, 50), (80, 80)]):
        Image.fromarray(_rgb(number, height, width)).save(folder / f"p{number}.png")
    (folder / "p2b.png").write_bytes(b"broken")  # between two images, in the middle of a pool
    outputs = {}
    for flag in ([], ["--pool-windows"]):
        out = tmp_path / ("pooled" if flag else "loop")
        args = ["segment", str(folder), "--labels", "sky, person|pedestrian, dog", "--method", "naclip",
                "--clip", str(clip_file), "--tokenizer", str(bpe_path), "--out", str(out), "--crop", "48",
                "--stride", "32", "--short-side", "64", "--window-batch", "16", "--save-logits", "-q",
                *flag]  # fmt: skip
        forwards.clear()
        assert main(args) == 1  # the broken file fails, every other image is written
        outputs[bool(flag)] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        if flag:
            assert max(forwards) == 16  # windows of several images per forward
        else:
            assert max(forwards) < 16
    assert len(outputs[False]) > 10 and outputs[True] == outputs[False]
