"""`ovss segment` as a careful user meets it: data safety, errors found once and early, readable outputs.

Each test reproduces an observed problem (issue 9) through the command line with a tiny random CLIP file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovss.cli.main import main


def _photo(path: Path, seed: int, size: tuple[int, int] = (48, 64)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path)
    return path


def _segment(clip_file: Path, bpe_path: Path, out: Path, *extra: str) -> int:
    args = ["segment", *extra, "--clip", str(clip_file), "--tokenizer", str(bpe_path), "--out", str(out)]
    return main([*args, "--templates", "imagenet7", "--short-side", "32", "--crop", "32", "--stride", "16"])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(err: str, text: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ovss: error:")]
    assert len(errors) == 1 and text in errors[0], err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------ data safety


def test_out_equal_to_the_input_folder_never_replaces_an_input(clip_file, bpe_path, tmp_path, capsys):
    photos = tmp_path / "photos"
    _photo(photos / "chelsea.png", 0)
    _photo(photos / "street.jpg", 1)
    before = _snapshot(photos)
    code = _segment(clip_file, bpe_path, photos, str(photos), "--labels", "cat, sofa", "--overwrite")
    _one_error_line(capsys.readouterr().err, "would replace the input image")
    assert code == 2 and _snapshot(photos) == before  # chelsea.png intact, nothing added


def test_outputs_of_an_earlier_run_need_overwrite(clip_file, bpe_path, tmp_path, capsys):
    image, out = _photo(tmp_path / "a.jpg", 0), tmp_path / "out"
    assert _segment(clip_file, bpe_path, out, str(image), "--labels", "cat, sofa") == 0
    first = _snapshot(out)
    capsys.readouterr()
    assert _segment(clip_file, bpe_path, out, str(image), "--labels", "dog, lawn") == 2
    err = capsys.readouterr().err
    _one_error_line(err, "exists from an earlier run")
    assert "--overwrite" in err and _snapshot(out) == first  # refused before any work
    assert _segment(clip_file, bpe_path, out, str(image), "--labels", "dog, lawn", "--overwrite") == 0
    assert json.loads((out / "config.json").read_text())["classes"] == [["dog"], ["lawn"]]


def test_a_run_that_segments_nothing_leaves_the_output_folder_as_it_was(clip_file, bpe_path, tmp_path, capsys):
    broken = tmp_path / "in" / "broken.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "new"
    assert _segment(clip_file, bpe_path, out, str(broken), "--labels", "a, b") == 1
    assert "broken.jpg" in capsys.readouterr().err
    assert not out.exists()  # not even created
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    assert _segment(clip_file, bpe_path, empty, str(tmp_path / "in"), "--labels", "a, b") == 1
    assert list(empty.iterdir()) == []  # no config.json


def test_a_coco_json_already_in_out_is_not_replaced_without_overwrite(clip_file, bpe_path, tmp_path, capsys):
    image, out = _photo(tmp_path / "a.jpg", 0), tmp_path / "out"
    out.mkdir()
    (out / "coco.json").write_text('{"mine": true}')
    assert _segment(clip_file, bpe_path, out, str(image), "--labels", "cat, sofa", "--save-coco") == 2
    _one_error_line(capsys.readouterr().err, f"'{out / 'coco.json'}' exists from an earlier run")
    assert (out / "coco.json").read_text() == '{"mine": true}' and sorted(os.listdir(out)) == ["coco.json"]
    assert _segment(clip_file, bpe_path, out, str(image), "--labels", "cat, sofa") == 0  # not written: no clash
    assert (out / "coco.json").read_text() == '{"mine": true}'
    coco = _photo(tmp_path / "in" / "coco.png", 1)  # its --save-json file is the run's coco.json
    code = _segment(clip_file, bpe_path, tmp_path / "o2", str(coco), "--labels", "a, b", "--save-json", "--save-coco")
    assert code == 2
    _one_error_line(capsys.readouterr().err, f"would both write '{tmp_path / 'o2' / 'coco.json'}'")


def test_out_pointing_at_a_file_is_one_line(clip_file, bpe_path, tmp_path, capsys):
    image = _photo(tmp_path / "a.jpg", 0)
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert _segment(clip_file, bpe_path, target, str(image), "--labels", "a, b") == 2
    _one_error_line(capsys.readouterr().err, "is a file")
    assert target.read_text() == "mine"


def test_inputs_sharing_a_stem_are_named_with_the_fix(clip_file, bpe_path, tmp_path, capsys):
    a, b = _photo(tmp_path / "x" / "cat.png", 0), _photo(tmp_path / "y" / "cat.jpg", 1)
    assert _segment(clip_file, bpe_path, tmp_path / "out", str(a), str(b), "--labels", "a, b") == 2
    _one_error_line(capsys.readouterr().err, f"inputs {a}, {b} share the file name stem 'cat',")
    assert _segment(clip_file, bpe_path, tmp_path / "out", str(a.parent), str(a.parent), "--labels", "a, b") == 2
    err = capsys.readouterr().err
    _one_error_line(err, f"inputs {a}, {a} share")
    assert "give each image once" in err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ fail fast


def test_an_error_that_holds_for_every_image_is_reported_once_before_any_image(clip_file, tmp_path, capsys):
    photos = tmp_path / "photos"
    for i in range(3):
        _photo(photos / f"{i}.png", i)
    out = tmp_path / "out"
    code = _segment(clip_file, tmp_path / "missing-vocab.txt.gz", out, str(photos), "--labels", "a, b")
    _one_error_line(capsys.readouterr().err, "tokenizer vocabulary not found")
    assert code == 2 and not out.exists()


def test_a_label_longer_than_the_context_is_truncated_with_one_warning(clip_file, bpe_path, tmp_path, capsys):
    photos = tmp_path / "photos"
    for i in range(2):
        _photo(photos / f"{i}.png", i)
    long_label = "very " * 80 + "long cat"
    out = tmp_path / "out"
    assert _segment(clip_file, bpe_path, out, str(photos), "--labels", f"dog, {long_label}") == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("ovss: warning:")]
    assert len(warnings) == 1 and "'very very" in warnings[0] and "77-token" in warnings[0]
    assert (out / "0.png").exists() and (out / "1.png").exists()


def test_device_cuda_without_cuda_is_one_line(clip_file, bpe_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    image = _photo(tmp_path / "a.jpg", 0)
    assert _segment(clip_file, bpe_path, tmp_path / "out", str(image), "--labels", "a, b", "--device", "cuda") == 2
    _one_error_line(capsys.readouterr().err, "needs CUDA")
    assert not (tmp_path / "out").exists()


def test_an_example_scikit_image_lacks_is_one_line(clip_file, bpe_path, tmp_path, capsys):
    code = _segment(clip_file, bpe_path, tmp_path / "out", "--example", "motorcycle_left", "--labels", "a, b")
    _one_error_line(capsys.readouterr().err, "unknown example 'motorcycle_left'")
    assert code == 2 and not (tmp_path / "out").exists()


def test_every_listed_example_loads() -> None:
    from ovss.cli.segment import EXAMPLES, example_image

    for name in EXAMPLES:
        image = example_image(name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


# ------------------------------------------------------------------------------------------ memory, progress


def test_more_than_255_classes_give_a_16_bit_label_map(clip_file, bpe_path, tmp_path, capsys):
    photos = tmp_path / "photos"
    _photo(photos / "a.png", 0)
    _photo(photos / "b.png", 1)
    labels = ", ".join(f"thing{i}" for i in range(300))
    out = tmp_path / "out"
    common = ["--labels", labels, "--templates", "maskclip5"]
    assert _segment(clip_file, bpe_path, out, str(photos), *common) == 0
    for stem in ("a", "b"):
        label_map = np.asarray(Image.open(out / f"{stem}.png"))
        assert label_map.dtype == np.uint16 and label_map.shape == (48, 64) and label_map.max() < 300


def test_many_windows_warn_once_per_image_naming_the_count_and_flags(clip_file, bpe_path, tmp_path, capsys):
    image = _photo(tmp_path / "big.png", 0, size=(176, 176))
    out = tmp_path / "out"
    args = ["segment", str(image), "--labels", "a, b", "--clip", str(clip_file), "--tokenizer", str(bpe_path)]
    args += ["--out", str(out), "--templates", "maskclip5", "--short-side", "none", "--crop", "16", "--stride", "16"]
    assert main(args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ovss: warning:")]
    assert len(warnings) == 1 and "121 windows" in warnings[0]  # 176 / 16 = 11 per side
    assert "--short-side" in warnings[0] and "--crop" in warnings[0]


# ------------------------------------------------------------------------------------------ readable output


def test_uncertain_pixels_stay_unlabelled_unless_a_background_class_is_named(clip_file, bpe_path, tmp_path):
    image = _photo(tmp_path / "a.png", 0)
    runs = {
        "plain": ["--labels", "cat, dog, tree"],
        "named": ["--labels", "cat, dog, tree", "--background", "dog"],
        "literal": ["--labels", "cat, background, tree"],
        "none": ["--labels", "cat, dog, tree"],
        "literal_none": ["--labels", "cat, background, tree"],
    }
    maps = {}
    for name, extra in runs.items():
        threshold = [] if name.endswith("none") else ["--bg-threshold", "0.6"]
        assert _segment(clip_file, bpe_path, tmp_path / name, str(image), *extra, *threshold) == 0
        maps[name] = np.asarray(Image.open(tmp_path / name / "a.png")).astype(np.int64)
    unsure = maps["plain"] == 255
    assert unsure.any() and (~unsure).any() and not (maps["none"] == 255).any()
    np.testing.assert_array_equal(maps["plain"][~unsure], maps["none"][~unsure])
    np.testing.assert_array_equal(maps["named"], np.where(unsure, 1, maps["none"]))
    changed = maps["literal"] != maps["literal_none"]
    assert changed.any() and (maps["literal"][changed] == 1).all()  # a class named "background" takes them
    overlay = np.asarray(Image.open(tmp_path / "plain" / "a_overlay.png").convert("RGB"))[:48, :64]
    original = np.asarray(Image.open(image).convert("RGB"))
    np.testing.assert_array_equal(overlay[unsure], original[unsure])  # unlabelled pixels are not tinted
    assert json.loads((tmp_path / "named" / "config.json").read_text())["background"] == 1


def test_an_unknown_background_name_is_one_line(clip_file, bpe_path, tmp_path, capsys):
    image = _photo(tmp_path / "a.png", 0)
    code = _segment(clip_file, bpe_path, tmp_path / "o", str(image), "--labels", "cat, dog", "--background", "sky")
    _one_error_line(capsys.readouterr().err, "background class 'sky' is not one of the labels")
    assert code == 2


def test_the_first_class_is_drawn_in_a_visible_colour(clip_file, bpe_path, tmp_path):
    image = _photo(tmp_path / "a.png", 0)
    assert _segment(clip_file, bpe_path, tmp_path / "out", str(image), "--labels", "cat, dog") == 0
    written = Image.open(tmp_path / "out" / "a.png")
    colours = np.array(written.getpalette()[:6], dtype=np.int64).reshape(2, 3)  # (2, 3) classes 0 and 1
    assert colours.max(axis=1).min() >= 150  # neither class is black or dark


def test_a_comma_list_line_in_a_labels_file_warns(clip_file, bpe_path, tmp_path, capsys):
    image = _photo(tmp_path / "a.png", 0)
    labels = tmp_path / "labels.txt"
    labels.write_text("sky, road, car\nperson, pedestrian\n")
    assert _segment(clip_file, bpe_path, tmp_path / "out", str(image), "--labels-file", str(labels)) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ovss: warning:")]
    assert len(warnings) == 1 and "line 1" in warnings[0] and "3 synonyms" in warnings[0]


def test_masks_and_json_agree_with_the_label_map(clip_file, bpe_path, tmp_path):
    image = _photo(tmp_path / "a.png", 0)
    out = tmp_path / "out"
    assert _segment(clip_file, bpe_path, out, str(image), "--labels", "cat, dog|puppy, traffic light",
                    "--save-masks", "--save-json") == 0  # fmt: skip
    label_map = np.asarray(Image.open(out / "a.png")).astype(np.int64)
    names = ["0_cat.png", "1_dog.png", "2_traffic_light.png"]
    assert sorted(p.name for p in (out / "a_masks").iterdir()) == names
    for class_id, name in enumerate(names):
        mask = np.asarray(Image.open(out / "a_masks" / name))
        np.testing.assert_array_equal(mask, np.where(label_map == class_id, 255, 0))
    record = json.loads((out / "a.json").read_text())
    counts = np.bincount(label_map.reshape(-1), minlength=3)
    assert [c["pixels"] for c in record["classes"]] == counts.tolist()
    assert record["classes"][1]["synonyms"] == ["dog", "puppy"] and (record["height"], record["width"]) == (48, 64)
    assert sum(c["area"] for c in record["classes"]) == pytest.approx(1.0)


def test_an_empty_input_path_is_refused_not_read_as_the_current_folder(tmp_path, capsys, monkeypatch):
    from ovss.cli.main import main

    (tmp_path / "holiday.png").write_bytes(b"not read")  # would be picked up if "" meant "."
    monkeypatch.chdir(tmp_path)
    assert main(["segment", "", "--labels", "sky", "--out", str(tmp_path / "out")]) == 2
    assert "input path is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
