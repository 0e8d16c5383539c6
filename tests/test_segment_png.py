"""``ovss segment`` writes the label map that ``ovss.load(...).predict(...)`` computes, pixel for pixel.

The command line and the Python API are two paths to one result: same weights file, same image, same labels,
same settings; the PNG read back must equal the API's labels (UNLABELLED written as 255).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ovss
from ovss.cli.main import main
from ovss.labels import UNLABELLED
from tiny import save_openai_jit, tiny_clip_state_dict

SETTINGS = {"short_side": 64, "crop": 32, "stride": 16, "templates": "imagenet7"}
FLAGS = ["--short-side", "64", "--crop", "32", "--stride", "16", "--templates", "imagenet7"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_openai_jit(tiny_clip_state_dict(seed=0), tmp_path_factory.mktemp("weights") / "tiny-ViT.pt")


@pytest.fixture(scope="module")
def photo(assets_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    rgb = Image.open(assets_dir / "voc2012-val-samples" / "images" / "1_image.png").convert("RGB")
    path = tmp_path_factory.mktemp("photo") / "street.png"
    rgb.resize((120, 90), Image.BICUBIC).save(path)  # (90, 120, 3): not a multiple of the window
    return path


@pytest.mark.parametrize(
    ("method", "labels", "classes", "threshold", "background"),
    [
        ("clearclip", "sky, person|pedestrian, road", [["sky"], ["person", "pedestrian"], ["road"]], 0.0, 0),
        ("naclip", "sky, person, road, car", [["sky"], ["person"], ["road"], ["car"]], 0.38, None),  # unlabelled
        ("sclip", "sky, background, road", [["sky"], ["background"], ["road"]], 0.5, 1),  # a class named background
    ],
)
def test_the_written_png_is_the_api_prediction(
    tmp_path: Path,
    weights: Path,
    photo: Path,
    bpe_path: Path,
    method: str,
    labels: str,
    classes: list[list[str]],
    threshold: float,
    background: int | None,
) -> None:
    out = tmp_path / "out"
    argv = ["segment", str(photo), "--labels", labels, "--method", method, "--clip", str(weights)]
    argv += ["--tokenizer", str(bpe_path), "--out", str(out), "--bg-threshold", str(threshold), "-q", *FLAGS]
    assert main(argv) == 0
    written = np.asarray(Image.open(out / "street.png"))  # (H0, W0) uint8 class ids, 255 = unlabelled

    seg = ovss.load(method, clip=str(weights), tokenizer=str(bpe_path), bg_threshold=threshold, **SETTINGS)
    labels_api = seg.predict(str(photo), classes, background=background).labels.numpy()  # (H0, W0) int64
    expected = np.where(labels_api == UNLABELLED, 255, labels_api)

    assert written.shape == (90, 120) and written.dtype == np.uint8
    np.testing.assert_array_equal(written, expected)
    assert len(np.unique(written)) >= 2  # a real label map, not one constant
    if threshold > 0:  # the threshold did something: pixels went to the background class or stayed unlabelled
        low = seg.predict(str(photo), classes, background=None).labels.numpy() == UNLABELLED
        assert low.any() and (written[low] == (255 if background is None else background)).all()
