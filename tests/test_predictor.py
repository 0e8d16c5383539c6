"""End-to-end Segmenter behaviour on a tiny random CLIP: equivalences, caching, shapes, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ovss
from ovss.errors import OvssError


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(200, 300, 3), dtype=np.uint8)


def _load(tiny_clip, bpe_path, method="clearclip", **kw):
    return ovss.load(method, clip=tiny_clip, tokenizer=bpe_path, **kw)


LABELS = ["sky", "road", ["person", "pedestrian"]]


def test_predict_shapes_and_record(tiny_clip, bpe_path, image):
    seg = _load(tiny_clip, bpe_path, short_side=112, crop=64, stride=32)
    r = seg.predict(image, LABELS)
    assert r.logits.shape == (4, 200, 300) and r.logits.dtype == torch.float32
    assert r.probs.shape == (3, 200, 300) and r.labels.shape == (200, 300)
    assert r.labels.dtype == torch.int64 and int(r.labels.max()) <= 2
    assert r.logits.abs().max() <= 1.0 + 1e-5  # cosine similarities
    assert torch.allclose(r.probs.sum(0) <= 1.0 + 1e-5, torch.ones(200, 300, dtype=torch.bool))
    assert r.config["method"] == "clearclip" and r.config["pipeline"]["crop"] == 64
    assert r.config["pipeline"]["logit_scale"] == 50.0 and r.classes == [
        ["sky"],
        ["road"],
        ["person", "pedestrian"],
    ]


def test_single_window_covering_image_equals_whole_image_mode(tiny_clip, bpe_path, image):
    whole = _load(tiny_clip, bpe_path, method="naclip", short_side=None, crop=0, stride=1).predict(
        image, LABELS
    )
    window = _load(tiny_clip, bpe_path, method="naclip", short_side=None, crop=300, stride=150).predict(
        image, LABELS
    )
    torch.testing.assert_close(window.logits, whole.logits)
    assert torch.equal(window.labels, whole.labels)


@pytest.mark.parametrize("method", ["clearclip", "sclip", "naclip", "maskclip", "vanilla"])
def test_batched_windows_equal_one_by_one(tiny_clip, bpe_path, image, method):
    kw = dict(short_side=96, crop=64, stride=40)
    a = _load(tiny_clip, bpe_path, method, window_batch=16, **kw).predict(image, LABELS)
    b = _load(tiny_clip, bpe_path, method, window_batch=1, **kw).predict(image, LABELS)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


def test_second_label_set_skips_image_encoder(tiny_clip, bpe_path, image):
    seg = _load(tiny_clip, bpe_path, short_side=96, crop=64, stride=32)
    calls = []
    run = seg.method.run
    seg.method = type(seg.method)(**{**seg.method.__dict__, "run": lambda *a: calls.append(1) or run(*a)})
    seg.set_image(image)
    first = seg.predict(labels=["sky", "road"])
    second = seg.predict(labels=["tree", "sky", "car"])
    n_windows = len(seg._state.windows)
    assert len(calls) == 1 and n_windows > 1  # one batched call for all windows, none for the second set
    # the shared name "sky" has the same logits in both results
    torch.testing.assert_close(first.logits[0], second.logits[1])


def test_text_embeddings_override_equals_encoded(tiny_clip, bpe_path, image):
    seg = _load(tiny_clip, bpe_path, short_side=96, crop=64, stride=32)
    names = ["sky", "road", "person", "pedestrian"]
    emb = seg.encode_names(names)
    a = seg.predict(image, LABELS)
    b = seg.predict(labels=LABELS, text_embeddings=emb * 3.0)  # rows are re-normalised
    torch.testing.assert_close(a.logits, b.logits)
    with pytest.raises(OvssError, match="one row per name"):
        seg.predict(labels=LABELS, text_embeddings=emb[:3])


def test_image_smaller_than_window(tiny_clip, bpe_path):
    small = np.full((40, 70, 3), 128, dtype=np.uint8)
    r = _load(tiny_clip, bpe_path, short_side=None, crop=224, stride=112).predict(small, ["a", "b"])
    assert r.labels.shape == (40, 70)


@pytest.mark.parametrize(
    "labels, match",
    [([], "empty|no labels|at least one"), (["sky", "sky"], "sky"), (["sky", ""], "empty")],
)
def test_bad_labels(tiny_clip, bpe_path, image, labels, match):
    seg = _load(tiny_clip, bpe_path, short_side=96, crop=64, stride=32)
    with pytest.raises(OvssError, match=match):
        seg.predict(image, labels)


def test_errors_are_clear(tiny_clip, bpe_path):
    with pytest.raises(OvssError, match="unknown method"):
        _load(tiny_clip, bpe_path, method="clearclipp")
    with pytest.raises(OvssError, match="no option"):
        _load(tiny_clip, bpe_path, method="naclip", sgima=3)
    with pytest.raises(OvssError, match="stride"):
        _load(tiny_clip, bpe_path, crop=64, stride=128)
    seg = _load(tiny_clip, bpe_path, method="naclip", short_side=None, crop=0, stride=1)
    with pytest.raises(OvssError, match="patch"):  # naclip does not pad; the conv would see nothing
        seg.predict(np.zeros((8, 8, 3), np.uint8), ["a"])
    padded = _load(tiny_clip, bpe_path, short_side=None, crop=0, stride=1)  # clearclip pads 8x8 to 16x16
    assert padded.predict(np.zeros((8, 8, 3), np.uint8), ["a", "b"]).labels.shape == (8, 8)
    with pytest.raises(OvssError, match="no image"):
        seg.predict(labels=["a"])


def test_background_threshold_and_pamr(tiny_clip, bpe_path, image):
    base = _load(tiny_clip, bpe_path, short_side=96, crop=64, stride=32)
    r = base.predict(image, LABELS)
    thr = float(r.probs.max(0).values.median())
    bg = _load(tiny_clip, bpe_path, short_side=96, crop=64, stride=32, bg_threshold=thr).predict(
        image, LABELS
    )
    low = r.probs.max(0).values < thr
    assert bool((bg.labels[low] == 0).all()) and bool(torch.equal(bg.labels[~low], r.labels[~low]))
    refined = _load(tiny_clip, bpe_path, short_side=96, crop=64, stride=32, pamr_steps=3).predict(
        image, LABELS
    )
    assert refined.logits.shape == r.logits.shape and not torch.allclose(refined.logits, r.logits)


def test_window_info_covers_every_window_across_sub_batches(bpe_path, image):
    from ovss.models.clip import build_clip
    from tiny import tiny_clip_state_dict

    clip12 = build_clip(tiny_clip_state_dict(seed=3, layers=12))
    kw = dict(short_side=96, crop=64, stride=32)
    one = _load(clip12, bpe_path, "gclip", window_batch=1, **kw).predict(image, LABELS).config
    all_ = _load(clip12, bpe_path, "gclip", window_batch=16, **kw).predict(image, LABELS).config
    # 200 x 300 -> 96 x 144 processing image; crop 64 / stride 32 -> 2 x 4 = 8 windows
    assert len(all_["window_info"]["global_block"]) == 8 and len(all_["window_info"]["fused_blocks"]) == 8
    assert one["window_info"] == all_["window_info"]  # 8 sub-batches of one window add up to one batch
    assert "cs_start" in all_["method_info"]["gclip"]


@pytest.mark.parametrize(
    "method, kw",
    [
        ("clearclip", dict(bg_threshold=0.34)),
        ("sclip", dict(area_threshold=0.3)),
        ("naclip", dict(pamr_steps=2)),
    ],
)
def test_row_bands_equal_one_band_end_to_end(tiny_clip, bpe_path, image, method, kw):
    labels = ["sky", ["road", "street"], "person", "tree"]
    geometry = {"short_side": 97, "crop": 64, "stride": 40, **kw}
    seg = _load(tiny_clip, bpe_path, method, tuning={"band_elements": 0}, **geometry)  # one band: the whole image
    whole = seg.predict(image, labels)
    assert whole.maps.band_rows >= 200 and whole.config["tuning"]["band_elements"] == 0
    seg = _load(tiny_clip, bpe_path, method, tuning={"band_elements": 5 * 300 * 3}, **geometry)  # 3-row bands
    banded = seg.predict(image, labels)
    assert banded.maps.band_rows == 3
    assert torch.equal(banded.labels, whole.labels)
    assert torch.equal(banded.logits, whole.logits)
    torch.testing.assert_close(banded.probs, whole.probs, rtol=1e-6, atol=1e-7)
    if "area_threshold" in kw:  # the filter did something: some class lost everywhere
        assert bool((whole.probs.amax(dim=(1, 2)) == 0).any())
    if "bg_threshold" in kw:
        assert bool((whole.labels == 0).any()) and bool((whole.labels != 0).any())


def test_logits_and_probs_are_built_only_when_asked(tiny_clip, bpe_path, image):
    from ovss.pipeline.postprocess import logits_to_labels

    seg = _load(tiny_clip, bpe_path, short_side=96, crop=64, stride=32)
    r = seg.predict(image, LABELS)
    assert r.maps._logits is None and r.maps._probs is None  # labels alone never built (Q, H0, W0)
    half = r.maps.logits(torch.float16)  # built band by band in fp16, not kept
    assert half.dtype == torch.float16 and r.maps._logits is None
    logits = r.logits
    assert logits is r.logits and logits.shape == (4, 200, 300)  # built once, then kept
    assert torch.equal(half, logits.half())
    probs, labels = logits_to_labels(logits, [0, 1, 2, 2], 3, 50.0)  # the untiled computation
    assert torch.equal(r.labels, labels)
    torch.testing.assert_close(r.probs, probs, rtol=1e-6, atol=1e-7)
    assert "maps" not in repr(r)


@pytest.mark.parametrize("kw", [{}, {"pamr_steps": 1}])
def test_rows_progress_reports_every_band_without_changing_labels(tiny_clip, bpe_path, image, kw):
    seg = _load(tiny_clip, bpe_path, tuning={"band_elements": 4 * 300 * 7}, short_side=96, crop=64, stride=32, **kw)
    seg.set_image(image)
    calls: list[tuple[int, int]] = []
    reported = seg.predict(labels=LABELS, rows_progress=lambda done, total: calls.append((done, total)))
    plain = seg.predict(labels=LABELS)
    assert torch.equal(reported.labels, plain.labels)
    assert reported.maps.band_rows == 7
    assert calls == [(min(stop, 200), 200) for stop in range(7, 200 + 7, 7)]  # 29 bands of 7 rows, the last 4


def test_image_state_keeps_one_copy_of_the_image(tiny_clip, bpe_path, tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(2).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    seg = _load(tiny_clip, bpe_path, short_side=64, crop=64, stride=32)
    r = seg.predict(tmp_path / "photo.png", LABELS)
    assert r.image is seg.current_image()  # the prediction shares the decoded image, no copy
    np.testing.assert_array_equal(r.image, pixels)
    assert torch.equal(r.labels, seg.predict(pixels, LABELS).labels)  # file and array paths agree
