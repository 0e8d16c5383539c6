"""`ovss eval --dataset folder` on the user's own labels (issue 22, item 4): the coco.json and the 16-bit label
maps of a `segment` run give 100 % mIoU on the same images; palette, 16-bit and COCO masks are read exactly;
a wrong mask format is one line naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ovss.cli.main import main
from ovss.eval.datasets import FolderDataset
from ovss.output.coco import image_annotations
from tiny import save_openai_jit, tiny_clip_state_dict

FLAGS = ["--templates", "imagenet7", "--short-side", "32", "--crop", "32", "--stride", "16", "--no-progress"]
MANY = [f"thing {i}" for i in range(300)]  # more classes than an 8-bit label map holds


@pytest.fixture(scope="module")
def clip_args(bpe_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    clip = save_openai_jit(tiny_clip_state_dict(seed=0), tmp_path_factory.mktemp("weights") / "tiny-openai.pt")
    return ["--method", "clearclip", "--clip", str(clip), "--tokenizer", str(bpe_path)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for seed, stem in enumerate(["p0", "p1"]):
        pixels = np.random.default_rng(seed).integers(0, 256, size=(36 + seed, 44, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{stem}.png")
    return folder


def _names_file(folder: Path, classes: list[str]) -> Path:
    path = folder / "classes.txt"
    path.write_text("".join(f"{name}\n" for name in classes), encoding="utf-8")
    return path


def _eval(clip_args: list[str], photos: Path, masks: Path, names: Path, out: Path, *extra: str) -> int:
    args = ["eval", "--dataset", "folder", "--images", str(photos), "--masks", str(masks), "--names", str(names)]
    return main([*args, "--out", str(out), *clip_args, *FLAGS, *extra])


def test_eval_on_the_coco_json_of_a_segment_run_gives_100_percent(
    clip_args: list[str], photos: Path, tmp_path: Path
) -> None:
    classes = ["cat", "sofa|couch", "tree", "sky"]
    names = _names_file(tmp_path, classes)
    run = tmp_path / "run"
    assert main(["segment", str(photos), "--labels-file", str(names), "--out", str(run), "--save-coco", *clip_args,
                 *FLAGS]) == 0  # fmt: skip
    coco = json.loads((run / "coco.json").read_text())
    assert len({a["category_id"] for a in coco["annotations"]}) >= 2  # several classes to tell apart
    assert _eval(clip_args, photos, run / "coco.json", names, tmp_path / "eval") == 0
    result = json.loads((tmp_path / "eval" / "result.json").read_text())
    assert result["mIoU"] == 100.0 and result["aAcc"] == 100.0 and result["images"] == 2


def test_eval_on_the_16_bit_label_maps_of_a_segment_run_gives_100_percent(
    clip_args: list[str], photos: Path, tmp_path: Path
) -> None:
    first = tmp_path / "first"  # which names win, and how sure: then they get ids >= 256 and some pixels none
    assert main(["segment", str(photos), "--labels-file", str(_names_file(tmp_path, MANY)), "--out", str(first),
                 "--save-scores", "npy", *clip_args, *FLAGS]) == 0  # fmt: skip
    won = sorted(set(cv2.imread(str(first / "p0.png"), cv2.IMREAD_UNCHANGED).reshape(-1).tolist()))
    order = [MANY[i] for i in range(300) if i not in won] + [MANY[i] for i in won]  # winners last
    threshold = float(np.median(np.load(first / "p0_scores.npy").max(axis=0)))  # half the pixels: unlabelled
    names = _names_file(tmp_path, order)
    run = tmp_path / "run"
    assert main(["segment", str(photos), "--labels-file", str(names), "--out", str(run), "--bg-threshold",
                 str(threshold), *clip_args, *FLAGS]) == 0  # fmt: skip
    label = cv2.imread(str(run / "p0.png"), cv2.IMREAD_UNCHANGED)
    assert label.dtype == np.uint16 and (label == 65535).any() and ((label >= 256) & (label < 300)).any()
    dataset = FolderDataset(photos, run, names)
    assert dataset.ignore_index == 65535 and np.array_equal(dataset[0].label, label)
    assert _eval(clip_args, photos, run, names, tmp_path / "eval") == 0
    result = json.loads((tmp_path / "eval" / "result.json").read_text())
    assert result["mIoU"] == 100.0 and result["aAcc"] == 100.0


def test_palette_16_bit_and_coco_masks_are_read_exactly(photos: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    names = _names_file(tmp_path, MANY)
    wide = rng.integers(0, 300, size=(36, 44)).astype(np.uint16)  # (H, W) ids up to 299
    wide[:3] = 65535  # ignored rows
    (tmp_path / "wide").mkdir()
    cv2.imwrite(str(tmp_path / "wide" / "p0.png"), wide)
    cv2.imwrite(str(tmp_path / "wide" / "p1.png"), np.zeros((37, 44), np.uint16))
    assert np.array_equal(FolderDataset(photos, tmp_path / "wide", names)[0].label, wide)

    few = _names_file(tmp_path / "wide", MANY[:5])
    narrow = rng.integers(0, 5, size=(36, 44)).astype(np.uint8)  # (H, W)
    narrow[0] = 255
    (tmp_path / "palette").mkdir()
    image = Image.fromarray(narrow, mode="P")
    image.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    image.save(tmp_path / "palette" / "p0.png")
    Image.fromarray(np.zeros((37, 44), np.uint8)).save(tmp_path / "palette" / "p1.png")
    assert np.array_equal(FolderDataset(photos, tmp_path / "palette", few)[0].label, narrow)
    sixteen = narrow.astype(np.uint16)
    sixteen[narrow == 255] = 65535  # 16-bit file, few classes: 65535 is ignore (255)
    cv2.imwrite(str(tmp_path / "palette" / "p0.png"), sixteen)
    assert np.array_equal(FolderDataset(photos, tmp_path / "palette", few)[0].label, narrow)

    labels = narrow.astype(np.int64)
    labels[labels == 255] = -1
    coco = {
        "categories": [{"id": 10 + c, "name": name} for c, name in enumerate(MANY[:5])],  # another tool's ids
        "images": [
            {"id": 7, "file_name": "sub/p0.jpg", "height": 36, "width": 44},
            {"id": 8, "file_name": "p1.png", "height": 37, "width": 44},
        ],
        "annotations": [
            {**a, "image_id": 7, "category_id": a["category_id"] + 9} for a in image_annotations(labels, 5, True)
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    dataset = FolderDataset(photos, tmp_path / "c.json", few)
    assert np.array_equal(dataset[0].label, narrow)
    assert (dataset[1].label == 255).all()  # an image without annotations: all ignored


def _one_error(err: str, *texts: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ovss: error:") and all(t in lines[0] for t in texts), err


def test_a_wrong_mask_format_is_one_line_naming_the_fix(
    clip_args: list[str], photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = _names_file(tmp_path, ["cat", "sofa"])
    (tmp_path / "rgb").mkdir()
    for stem in ("p0", "p1"):
        Image.fromarray(np.zeros((36, 44, 3), np.uint8)).save(tmp_path / "rgb" / f"{stem}.png")
    assert _eval(clip_args, photos, tmp_path / "rgb", names, tmp_path / "e1") == 2
    _one_error(capsys.readouterr().err, "is a RGB image", "16-bit", "coco.json")

    (tmp_path / "not-coco.json").write_text('{"images": []}')
    assert _eval(clip_args, photos, tmp_path / "not-coco.json", names, tmp_path / "e2") == 2
    _one_error(capsys.readouterr().err, "is not a COCO JSON", "'categories'")

    coco = {"categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "couch"}], "images": [], "annotations": []}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert _eval(clip_args, photos, tmp_path / "coco.json", names, tmp_path / "e3") == 2
    _one_error(capsys.readouterr().err, "category 'couch'", "not a class of --names", "class file")
    coco["categories"] = coco["categories"][:1]
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert _eval(clip_args, photos, tmp_path / "coco.json", names, tmp_path / "e4") == 2
    _one_error(capsys.readouterr().err, "class 'sofa'", "has no category")
    coco["categories"].append({"id": 2, "name": "sofa"})
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert _eval(clip_args, photos, tmp_path / "coco.json", names, tmp_path / "e5") == 2
    _one_error(capsys.readouterr().err, "2 of 2 images have no entry")
    assert _eval(clip_args, photos, tmp_path / "coco.json", names, tmp_path / "e6", "--reduce-zero-label") == 2
    _one_error(capsys.readouterr().err, "do not apply to a COCO JSON")


def test_a_malformed_coco_entry_is_one_line_before_any_image(
    clip_args: list[str], photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = _names_file(tmp_path, ["cat", "sofa"])
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "sofa"}]
    images = [{"id": k + 1, "file_name": f"p{k}.png", "height": 36 + k, "width": 44} for k in range(2)]
    broken = {
        "images": [{"id": 1, "file_name": "p0.png", "height": 36}, images[1]],  # no width
        "annotations": [{"image_id": 1, "category_id": 1}],  # no segmentation
        "categories": [{"id": 1, "name": "cat"}, "sofa"],  # not an object
    }
    for key, needed in (("images", "width"), ("annotations", "segmentation"), ("categories", "name")):
        coco = {"categories": categories, "images": images, "annotations": [], key: broken[key]}
        (tmp_path / "coco.json").write_text(json.dumps(coco))
        assert _eval(clip_args, photos, tmp_path / "coco.json", names, tmp_path / f"out-{key}") == 2
        _one_error(capsys.readouterr().err, f"malformed entry in '{key}'", needed)
