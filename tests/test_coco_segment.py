"""`ovss segment --save-coco/--save-geojson/--save-scores` on tiny weights (issue 22, item 3): coco.json holds
the label maps the run wrote, the resume marker covers the new files, and a cut part is redone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from ovss.cli.main import main
from ovss.output.collection import part_path
from ovss.output.resume import marker_path
from ovss.predictor import Segmenter

# pycocotools <= 2.0.11 under NumPy 2 warns in its own decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
STEMS = ["c", "a", "b"]  # written as c.png, a.png, b.png: the job list is sorted by file name


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for seed, stem in enumerate(STEMS):
        pixels = np.random.default_rng(seed).integers(0, 256, size=(40 + seed, 56 - 3 * seed, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{stem}.png")
    return folder


def segment(clip_file: Path, bpe_path: Path, photos: Path, out: Path, *extra: str) -> int:
    args = ["segment", str(photos), "--labels", "background, cat, sofa|couch", "--clip", str(clip_file)]
    args += ["--tokenizer", str(bpe_path), "--out", str(out), "--templates", "imagenet7", "--short-side", "32"]
    return main([*args, "--crop", "32", "--stride", "16", "--bg-threshold", "0.4", "--no-progress", *extra])


def _label_map(path: Path) -> np.ndarray:
    ids = np.array(Image.open(path)).astype(np.int64)  # (H, W) palette indices
    ids[ids == 255] = -1
    return ids


def test_segment_writes_a_coco_json_of_its_label_maps(
    clip_file: Path, bpe_path: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert segment(clip_file, bpe_path, photos, out, "--save-coco", "--save-geojson", "--save-scores", "png") == 0
    coco = COCO(str(out / "coco.json"))
    assert [c["name"] for c in coco.dataset["categories"]] == ["background", "cat", "sofa"]
    assert coco.dataset["categories"][0]["background"] is True
    assert coco.dataset["categories"][2]["synonyms"] == ["sofa", "couch"]
    assert coco.dataset["info"]["method"] == "clearclip"  # the default method
    assert [coco.imgs[i]["file_name"] for i in (1, 2, 3)] == ["a.png", "b.png", "c.png"]
    for image_id, stem in enumerate(["a", "b", "c"], start=1):
        expected = _label_map(out / f"{stem}.png")
        assert (coco.imgs[image_id]["height"], coco.imgs[image_id]["width"]) == expected.shape
        back = np.full(expected.shape, -1, dtype=np.int64)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            back[coco.annToMask(annotation).astype(bool)] = annotation["category_id"] - 1
        assert np.array_equal(back, expected)
        geojson = json.loads((out / f"{stem}.geojson").read_text())
        assert sorted(f["properties"]["class_id"] for f in geojson["features"]) == sorted(set(expected[expected >= 0]))
        scores = sorted((out / f"{stem}_scores").iterdir())
        assert [p.name for p in scores] == ["0_background.png", "1_cat.png", "2_sofa.png"]
        marker = json.loads(marker_path(out, stem).read_text())
        assert f".ovss/coco/{stem}.json" in marker["files"] and f"{stem}.geojson" in marker["files"]
        assert f"{stem}_scores/1_cat.png" in marker["files"]
    config = json.loads((out / "config.json").read_text())
    assert config["inputs"] == ["a", "b", "c"]


def test_resume_redoes_an_image_whose_part_was_cut_and_keeps_coco_json(
    clip_file: Path, bpe_path: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    assert segment(clip_file, bpe_path, photos, out, "--save-coco", "--coco-polygons") == 0
    whole = (out / "coco.json").read_bytes()
    part = part_path(out, "b")
    part.write_bytes(part.read_bytes()[:40])  # half-written
    (out / "coco.json").unlink()
    calls: list[str] = []
    predict = Segmenter.predict

    def counting(self: Segmenter, image: object, *args: object, **kwargs: object) -> object:
        calls.append(Path(str(image)).stem)
        return predict(self, image, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "predict", counting)
    assert segment(clip_file, bpe_path, photos, out, "--save-coco", "--coco-polygons", "--resume") == 0
    assert calls == ["b"]
    assert (out / "coco.json").read_bytes() == whole


def test_resume_with_other_output_flags_is_refused(
    clip_file: Path, bpe_path: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert segment(clip_file, bpe_path, photos, out, "--save-coco") == 0
    capsys.readouterr()
    assert segment(clip_file, bpe_path, photos, out, "--save-coco", "--save-scores", "npy", "--resume") == 2
    assert "another configuration" in capsys.readouterr().err


def test_overwrite_without_coco_removes_the_earlier_runs_coco_json_only(
    clip_file: Path, bpe_path: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert segment(clip_file, bpe_path, photos, out, "--save-coco") == 0
    assert segment(clip_file, bpe_path, photos, out, "--overwrite") == 0
    assert not (out / "coco.json").exists()  # it described the earlier run
    mine = b'{"info": {"description": "my own labels"}, "images": [], "annotations": [], "categories": []}'
    (out / "coco.json").write_bytes(mine)
    assert segment(clip_file, bpe_path, photos, out, "--overwrite") == 0
    assert (out / "coco.json").read_bytes() == mine  # a coco.json ovss did not write is never removed


def test_an_overwrite_that_fails_before_any_image_keeps_the_earlier_coco_json(
    clip_file: Path, bpe_path: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert segment(clip_file, bpe_path, photos, out, "--save-coco") == 0
    before = (out / "coco.json").read_bytes()
    missing = str(tmp_path / "no-such-weights.pt")  # a typo: the run ends at loading, nothing is redone
    assert segment(clip_file, bpe_path, photos, out, "--overwrite", "--clip", missing) == 2
    assert (out / "coco.json").read_bytes() == before  # the earlier run is whole, its coco.json included


def test_no_coco_json_and_no_folder_when_no_image_was_segmented(
    clip_file: Path, bpe_path: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    assert segment(clip_file, bpe_path, broken, out, "--save-coco") == 1
    assert not out.exists()
