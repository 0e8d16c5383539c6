"""``ovss eval`` for each method family: one plumbing test, and per method the equivalence with the Python API.

For every method the same command runs on a VOC sample (tiny weights saved in their real file layouts), and:

* the run records what ran: method, preset, the preset's own values for this method (hand-copied from the spec's
  §5 tables), and each weights file with its SHA-256;
* every saved prediction equals ``ovss.load(method, <the same files>, **<config.json's pipeline and options>)
  .predict(image, names)``: the evaluation path and the API path give the same labels, and config.json is
  enough to reproduce them;
* the result's counts are those recomputed here in numpy from the saved predictions and the label PNGs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import ovss
from ovss.cli.main import main
from ovss.eval.names import load_names
from ovss.methods.registry import get_method
from test_dino import dino_state_dict
from test_trident_cli import save_official_sam
from tiny import save_openai_jit, tiny_clip_state_dict

NUM_CLASSES = 21
IMAGES = 1  # --limit: the first sample (0_image.png); test_runner.py checks the accumulation over all 14

# method, preset, values the preset gives this method on a custom dataset (spec §5: the generic PC59 row where a
# preset is per dataset), weights roles it reads
CASES = [
    ("clearclip", "clearclip", {"logit_scale": 50.0}, ("clip",)),
    ("scclip", "scclip", {"logit_scale": 40.0}, ("clip",)),
    ("proxyclip+gla+mlf", "gla", {"logit_scale": 40.0, "method_options": {}}, ("clip", "vfm")),
    ("trident", "trident", {"method_options": {"coarse_thresh": 0.15, "cos_fac": 1.2}}, ("clip", "vfm16", "sam")),
    ("cass", "cass", {"logit_scale": 40.0}, ("clip", "vfm")),
    ("cass+gla", "cass", {"logit_scale": 40.0}, ("clip", "vfm")),
]  # fmt: skip
CASS_GENERIC = {"global_weight": 0.25, "cluster_threshold": 0.09}  # CASS's generic (PC59) row


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("eval-weights")
    torch.save(dino_state_dict(seed=2, grid=28), folder / "dino_vitb8.pth")
    torch.save(dino_state_dict(seed=3, patch=16, grid=14), folder / "dino_vitb16.pth")
    return {
        "clip": save_openai_jit(tiny_clip_state_dict(seed=0), folder / "tiny-ViT.pt"),
        "vfm": folder / "dino_vitb8.pth",
        "vfm16": folder / "dino_vitb16.pth",
        "sam": save_official_sam(folder / "sam_tiny.pth"),
    }


@pytest.fixture(scope="module")
def names_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("names") / "voc21.txt"
    path.write_text("".join(", ".join(n) + "\n" for n in load_names("voc21", "full-rename")))
    return path


def _load_keywords(config: dict[str, Any]) -> dict[str, Any]:
    """ovss.load keywords from a run's config.json: the pipeline, and the options (``gla_rho`` for composed ones)."""
    keywords = {k: tuple(v) if isinstance(v, list) else v for k, v in config["pipeline"].items()}
    options = config["options"]
    if "base" in options:  # a composed method: the base's options as they are, the parts' with their prefix
        keywords.update(options["base"])
        extra = get_method(config["method"]).options.extra
        prefixes = {"gla": "gla_", "extra": None if extra is None else type(extra).keyword_prefix}
        for part, values in options.items():
            if part != "base" and values is not None:
                prefix = prefixes[part]
                keywords.update({f"{prefix}{k}": tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    else:
        keywords.update(options)
    return keywords


def _counts(predictions: list[np.ndarray], labels: list[np.ndarray]) -> dict[str, list[int]]:
    inter, pred_area, label_area = (np.zeros(NUM_CLASSES, dtype=np.int64) for _ in range(3))
    for pred, label in zip(predictions, labels, strict=True):
        keep = label != 255
        p, lab = pred[keep].astype(np.int64), label[keep].astype(np.int64)
        inter += np.bincount(p[p == lab], minlength=NUM_CLASSES)
        pred_area += np.bincount(p, minlength=NUM_CLASSES)
        label_area += np.bincount(lab, minlength=NUM_CLASSES)
    return {"intersection": inter.tolist(), "pred_area": pred_area.tolist(), "label_area": label_area.tolist()}


@pytest.mark.parametrize(("method", "preset", "preset_values", "roles"), CASES, ids=[c[0] for c in CASES])
def test_eval_records_the_run_and_equals_the_api(
    method: str,
    preset: str,
    preset_values: dict[str, Any],
    roles: tuple[str, ...],
    files: dict[str, Path],
    names_file: Path,
    assets_dir: Path,
    bpe_path: Path,
    tmp_path: Path,
) -> None:
    samples = assets_dir / "voc2012-val-samples"
    weights = {"vfm" if role.startswith("vfm") else role: files[role] for role in roles}  # the flag of each file
    out = tmp_path / "run"
    argv = ["eval", "--dataset", "folder", "--images", str(samples / "images"), "--masks", str(samples / "labels"),
            "--names", str(names_file), "--image-suffix", "_image", "--label-suffix", "_label", "--has-background",
            "--method", method, "--preset", preset, "--tokenizer", str(bpe_path), "--templates", "imagenet7",
            "--short-side", "64", "--crop", "48", "--stride", "32", "--limit", str(IMAGES), "--save-predictions",
            "--no-progress", "--out", str(out)]  # fmt: skip
    for role, path in weights.items():
        argv += [f"--{role}", str(path)]
    assert main(argv) == 0

    config = json.loads((out / "config.json").read_text())
    setting = config["setting"]
    assert (setting["method"], setting["preset"], config["limit"]) == (method, preset, IMAGES)
    for key, value in preset_values.items():
        assert setting[key] == value, key
    if method.startswith("cass"):
        assert {k: setting["method_options"][k] for k in CASS_GENERIC} == CASS_GENERIC
    for role, path in weights.items():
        assert config["weights"][role]["path"] == str(path)
        assert config["weights"][role]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    seg = ovss.load(method, **{role: str(path) for role, path in weights.items()}, tokenizer=str(bpe_path),
                    **_load_keywords(config))  # fmt: skip
    classes = [list(n) for n in load_names("voc21", "full-rename")]
    saved, truth = [], []
    for index in range(IMAGES):
        written = np.asarray(Image.open(out / "predictions" / f"{index}.png"))  # (H0, W0) class ids
        api = seg.predict(str(samples / "images" / f"{index}_image.png"), classes).labels.numpy()  # (H0, W0)
        np.testing.assert_array_equal(written, api, err_msg=f"{method}: image {index}")
        saved.append(written)
        truth.append(np.asarray(Image.open(samples / "labels" / f"{index}_label.png")))
    result = json.loads((out / "result.json").read_text())
    assert result["images"] == IMAGES and result["dataset"] == "custom"
    assert {k: result["counts"][k] for k in ("intersection", "pred_area", "label_area")} == _counts(saved, truth)
