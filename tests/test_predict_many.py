"""``Segmenter.predict_many`` (issue 22, item 2) equals a ``predict`` loop bit for bit, reads ahead on a worker
thread, and reports bad images in input order (raised or yielded), with the messages of ``predict``."""

from __future__ import annotations

import io
import struct
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ovss
from ovss.errors import OvssError
from ovss.predictor import Segmenter

LABELS = ["sky", "road", ["person", "pedestrian"]]


@pytest.fixture(scope="module")
def segmenter(tiny_clip, bpe_path) -> Segmenter:
    return ovss.load("clearclip", clip=tiny_clip, tokenizer=bpe_path, short_side=64, crop=48, stride=32)


def _rgb(seed: int, height: int = 50, width: int = 70) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _damaged_png(pixels: np.ndarray) -> bytes:
    """A PNG whose extra tEXt chunk has a wrong CRC: libpng complains, the pixels decode intact."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    png = buffer.getvalue()
    data = b"key\x00value"
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", 0)
    at = png.index(b"IDAT") - 4
    return png[:at] + chunk + png[at:]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[object]:
    """Paths (str and Path, PNG and JPEG), an array and a PIL image, of different sizes."""
    folder = tmp_path_factory.mktemp("many")
    Image.fromarray(_rgb(0)).save(folder / "a.png")
    Image.fromarray(_rgb(1, 90, 40)).save(folder / "b.jpg", quality=90)
    Image.fromarray(_rgb(2, 33, 61)).save(folder / "c.png")
    pil = Image.fromarray(_rgb(4, 45, 80))
    return [folder / "a.png", str(folder / "b.jpg"), _rgb(3, 64, 64), pil, folder / "c.png"]


def _assert_same(got: object, expected: object) -> None:
    assert isinstance(got, ovss.Prediction) and isinstance(expected, ovss.Prediction)
    assert torch.equal(got.labels, expected.labels)
    assert torch.equal(got.logits, expected.logits)  # bit-identical: the same predict, only the read moves


@pytest.mark.parametrize("read_ahead", [0, 1, 2, 5])
def test_predict_many_equals_a_predict_loop(segmenter: Segmenter, inputs: list[object], read_ahead: int) -> None:
    expected = [segmenter.predict(image, LABELS, background=None) for image in inputs]
    got = list(segmenter.predict_many(inputs, LABELS, background=None, read_ahead=read_ahead))
    assert len(got) == len(expected)
    for one, other in zip(got, expected, strict=True):
        _assert_same(one, other)


def test_the_next_images_are_read_on_a_worker_thread_and_lazily(
    segmenter: Segmenter, inputs: list[object], readers: list[str]
) -> None:
    taken: list[int] = []

    def images() -> Iterator[object]:
        for number, image in enumerate(inputs):
            taken.append(number)
            yield image

    results = segmenter.predict_many(images(), LABELS, read_ahead=2)
    assert taken == []  # nothing is read before the first prediction is asked for
    next(results)
    assert len(taken) <= 3  # the current image and at most two ahead
    rest = list(results)
    assert len(rest) == len(inputs) - 1 and len(readers) == len(inputs)
    assert all(name.startswith("ovss-read-ahead") for name in readers)
    assert not [t for t in threading.enumerate() if t.name.startswith("ovss-read-ahead")]  # the reader has ended


def test_on_the_cpu_the_default_reads_in_the_callers_thread(
    segmenter: Segmenter, inputs: list[object], readers: list[str]
) -> None:
    assert len(list(segmenter.predict_many(inputs, LABELS))) == len(inputs)
    assert readers == [threading.main_thread().name] * len(inputs)  # no reader thread beside the CPU's model


def test_stopping_early_ends_the_reader_thread(segmenter: Segmenter, inputs: list[object]) -> None:
    results = segmenter.predict_many(inputs, LABELS, read_ahead=3)
    next(results)
    results.close()  # type: ignore[attr-defined]
    assert not [t for t in threading.enumerate() if t.name.startswith("ovss-read-ahead")]


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_a_bad_image_raises_in_its_turn_with_predicts_message(
    segmenter: Segmenter, inputs: list[object], tmp_path: Path, read_ahead: int
) -> None:
    bad = tmp_path / "broken.png"
    bad.write_text("not an image\n")
    with pytest.raises(OvssError) as direct:
        segmenter.predict(bad, LABELS)
    results = segmenter.predict_many([inputs[0], bad, inputs[2]], LABELS, read_ahead=read_ahead)
    _assert_same(next(results), segmenter.predict(inputs[0], LABELS))  # the image before the bad one comes first
    with pytest.raises(OvssError) as many:
        next(results)
    assert str(many.value) == str(direct.value) and "broken.png" in str(many.value)
    with pytest.raises(StopIteration):
        next(results)  # errors="raise" ends the iteration


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_errors_yield_puts_the_error_in_place_and_goes_on(
    segmenter: Segmenter, inputs: list[object], tmp_path: Path, read_ahead: int
) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"")
    sequence = [inputs[0], bad, inputs[2], bad, inputs[4]]
    got = list(segmenter.predict_many(sequence, LABELS, read_ahead=read_ahead, errors="yield"))
    assert [type(r).__name__ for r in got] == ["Prediction", "OvssError", "Prediction", "OvssError", "Prediction"]
    assert "broken.jpg" in str(got[1]) and "empty" in str(got[1])
    for position in (0, 2, 4):
        _assert_same(got[position], segmenter.predict(sequence[position], LABELS))


def test_decoder_warnings_arrive_with_their_image_in_order(segmenter: Segmenter, tmp_path: Path) -> None:
    paths = []
    for number in range(3):
        path = tmp_path / f"damaged{number}.png"
        path.write_bytes(_damaged_png(_rgb(10 + number)))
        paths.append(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for number, result in enumerate(segmenter.predict_many(paths, LABELS, read_ahead=2)):
            assert isinstance(result, ovss.Prediction)
            # image number's warning is out, the later ones (already read ahead) are not yet
            assert [f"damaged{n}.png" in str(w.message) for n, w in enumerate(caught)] == [True] * (number + 1)
    assert len(caught) == 3 and all("CRC error" in str(w.message) for w in caught)


def test_label_errors_come_at_the_call_before_any_image_is_read(segmenter: Segmenter, inputs: list[object]) -> None:
    def never() -> Iterator[object]:
        raise AssertionError("an image was read")
        yield  # pragma: no cover

    with pytest.raises(OvssError, match="background"):
        segmenter.predict_many(never(), LABELS, background=7)
    with pytest.raises(OvssError, match="text_embeddings"):
        segmenter.predict_many(never(), LABELS, text_embeddings=np.ones((2, 3), dtype=np.float32))
    with pytest.raises(OvssError, match="errors must be"):
        segmenter.predict_many(never(), LABELS, errors="skip")  # type: ignore[arg-type]
    with pytest.raises(OvssError, match="read_ahead"):
        segmenter.predict_many(never(), LABELS, read_ahead=-1)


def test_a_single_image_is_refused_not_read_letter_by_letter(segmenter: Segmenter, tmp_path: Path) -> None:
    Image.fromarray(_rgb(0)).save(tmp_path / "a.png")
    for single in (str(tmp_path), tmp_path / "a.png", _rgb(0), Image.fromarray(_rgb(0))):
        with pytest.raises(OvssError, match="predict_many takes a collection of images") as raised:
            segmenter.predict_many(single, LABELS)  # type: ignore[arg-type]
        assert "pass [" in str(raised.value) and "\n" not in str(raised.value)
    assert [r.labels.shape for r in segmenter.predict_many([tmp_path / "a.png"], LABELS)] == [(50, 70)]


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_none_in_the_images_is_an_error_in_its_place_not_the_previous_image_again(
    segmenter: Segmenter, read_ahead: int
) -> None:
    results = list(segmenter.predict_many([_rgb(0), None, _rgb(1)], LABELS, errors="yield", read_ahead=read_ahead))
    assert isinstance(results[0], ovss.Prediction) and isinstance(results[2], ovss.Prediction)
    assert isinstance(results[1], OvssError) and "got None for an image" in str(results[1])
    with pytest.raises(OvssError, match="got None for an image"):
        list(segmenter.predict_many([_rgb(0), None], LABELS))
