"""Trident through the command line with tiny random weights saved in the official file layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import astronaut

import ovss
from ovss.cli.main import main
from test_dino import dino_state_dict
from test_trident_pipeline import tiny_sam
from tiny import save_openai_jit, tiny_clip_state_dict


def save_official_sam(path: Path) -> Path:
    """The tiny SAM in segment-anything's key layout (fused ``attn.qkv``)."""
    sd = {k.replace("attn.in_proj_weight", "attn.qkv.weight").replace("attn.in_proj_bias", "attn.qkv.bias"): v
          for k, v in tiny_sam().state_dict().items()}  # fmt: skip
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("trident-weights")
    dino = folder / "dino_vitb16.pth"
    torch.save(dino_state_dict(seed=2, patch=16, grid=14), dino)
    return {
        "clip": save_openai_jit(tiny_clip_state_dict(seed=0), folder / "tiny-openai.pt"),
        "dino": dino,
        "sam": save_official_sam(folder / "sam_tiny.pth"),
    }


def _model_args(weights: dict[str, Path], bpe_path: Path) -> list[str]:
    return ["--clip", str(weights["clip"]), "--vfm", str(weights["dino"]), "--sam", str(weights["sam"]),
            "--tokenizer", str(bpe_path), "--no-progress"]  # fmt: skip


@pytest.mark.parametrize("method", ["trident", "trident+gla"])
def test_segment_the_example_photo(weights, bpe_path, tmp_path, method):
    out = tmp_path / "out"
    args = ["segment", "--example", "astronaut", "--labels", "sky, person, rocket", "--method", method,
            "--out", str(out), "--short-side", "112", "--crop", "112", "--stride", "56",
            *_model_args(weights, bpe_path)]  # fmt: skip
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["options"]
    labels = np.asarray(Image.open(out / "astronaut.png"))
    # the command's label map is the API's on the same files, image and settings
    seg = ovss.load(method, clip=str(weights["clip"]), vfm=str(weights["dino"]), sam=str(weights["sam"]),
                    tokenizer=str(bpe_path), short_side=112, crop=112, stride=56)  # fmt: skip
    want = seg.predict(astronaut(), [["sky"], ["person"], ["rocket"]]).labels.numpy()  # (512, 512)
    np.testing.assert_array_equal(labels, want)


def test_missing_sam_offline_names_the_flag(weights, bpe_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OVSS_CACHE", str(tmp_path / "empty-cache"))
    args = ["segment", "--example", "astronaut", "--labels", "a, b", "--method", "trident", "--out",
            str(tmp_path / "o"), "--clip", str(weights["clip"]), "--vfm", str(weights["dino"]), "--tokenizer",
            str(bpe_path), "--offline", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--sam PATH" in err and "sam_vit_b_01ec64.pth" in err
    assert not (tmp_path / "o").exists()


def _voc_tree(root: Path, samples: Path, ids: list[str]) -> None:
    base = root / "VOCdevkit" / "VOC2012"
    (base / "JPEGImages").mkdir(parents=True)
    (base / "SegmentationClass").mkdir()
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    for sample_id in ids:
        Image.open(samples / "images" / f"{sample_id}_image.png").convert("RGB").save(
            base / "JPEGImages" / f"{sample_id}.jpg", quality=95
        )
        shutil.copy(samples / "labels" / f"{sample_id}_label.png", base / "SegmentationClass" / f"{sample_id}.png")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{i}\n" for i in ids))


def test_eval_and_report_print_table_six(weights, bpe_path, assets_dir, tmp_path, capsys):
    _voc_tree(tmp_path / "data", assets_dir / "voc2012-val-samples", ["0"])
    folders = []
    for method in ("trident", "trident+gla"):
        out = tmp_path / "runs" / method
        args = [
            "eval",
            "--dataset",
            "voc21",
            "--root",
            str(tmp_path / "data"),
            "--method",
            method,
            "--preset",
            "trident",
            "--out",
            str(out),
            *_model_args(weights, bpe_path),
        ]  # fmt: skip (the preset's 448/336/224)
        assert main(args) == 0
        result = json.loads((out / "result.json").read_text())
        assert result["images"] == 1 and 0 <= result["mIoU"] <= 100
        config = json.loads((out / "config.json").read_text())
        assert config["setting"]["method_options"] == {"coarse_thresh": 0.2, "cos_fac": 1.2}
        assert config["setting"]["bg_threshold"] == 0.2 and config["weights"]["sam"]["path"] == str(weights["sam"])
        folders.append(str(out))
    capsys.readouterr()
    assert main(["report", *folders]) == 0
    text = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| trident")}
    assert "(67.1)" not in rows["trident / trident"]  # a partial split is never printed beside the paper
    assert "(38.6)" in rows["trident / trident"] and "(45.8)" in rows["trident / trident"]
    assert "(38.9)" in rows["trident+gla / trident"] and "(46.1)" in rows["trident+gla / trident"]
    assert "GLA-CLIP Table 6" in text
