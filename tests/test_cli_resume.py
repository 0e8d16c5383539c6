"""`ovss segment` errors that hold for every image end the run before any image (issue 21, item 6), and an
interrupted run continues with `--resume` to the same bytes as an uninterrupted one (item 7)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ovss
import ovss.output.files
from ovss.cli.main import main
from ovss.output.resume import marker_path
from ovss.predictor import Segmenter
from test_dino import dino_state_dict

STEMS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for seed, stem in enumerate(STEMS):
        pixels = np.random.default_rng(seed).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{stem}.png")
    return folder


def _segment(clip_file: Path, bpe_path: Path, photos: Path, out: Path, *extra: str) -> int:
    args = ["segment", str(photos), "--labels", "cat, sofa", "--clip", str(clip_file), "--tokenizer", str(bpe_path)]
    args += ["--out", str(out), "--templates", "imagenet7", "--short-side", "32", "--crop", "32", "--stride", "16"]
    return main([*args, "--save-json", "--no-progress", *extra])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _count_predictions(monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> list[str]:
    """Record the image of every Segmenter.predict call; with ``fail_at``, Ctrl-C in that call's save."""
    calls: list[str] = []
    predict, save_overlay = Segmenter.predict, ovss.output.files.save_rgb_png

    def counting(self: Segmenter, image: object, *args: object, **kwargs: object) -> object:
        calls.append(Path(str(image)).stem)
        return predict(self, image, *args, **kwargs)

    def interrupted(path: Path, image: object, **kwargs: object) -> Path:
        if fail_at is not None and len(calls) == fail_at and path.name.endswith("_overlay.png"):
            raise KeyboardInterrupt  # mid-way through the image: its label map is already written
        return save_overlay(path, image, **kwargs)

    monkeypatch.setattr(Segmenter, "predict", counting)
    monkeypatch.setattr(ovss.output.files, "save_rgb_png", interrupted)
    return calls


def _one_error_line(err: str, *texts: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("ovss: error:")]
    assert len(errors) == 1 and all(text in errors[0] for text in texts), err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------ item 7: resume


def test_an_interrupted_run_resumes_to_the_bytes_of_an_uninterrupted_one(
    clip_file, bpe_path, photos, tmp_path, capsys, monkeypatch
):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert _segment(clip_file, bpe_path, photos, whole) == 0
    expected = _snapshot(whole)
    assert {f"{stem}.png" for stem in STEMS} <= set(expected)

    with monkeypatch.context() as patch:  # Ctrl-C while the second image's files are written
        calls = _count_predictions(patch, fail_at=2)
        assert _segment(clip_file, bpe_path, photos, resumed) == 130
    assert calls == ["a", "b"]
    assert "--resume" in capsys.readouterr().err
    assert not (resumed / "b.png").exists()  # the half-written image left no file that looks finished
    assert (resumed / "a.png").read_bytes() == expected["a.png"] and marker_path(resumed, "a").is_file()
    (resumed / "c.png").write_bytes(b"half a file")  # what a killed process could leave: no marker, so redone
    first = (resumed / "a_overlay.png").stat().st_mtime_ns

    before = _snapshot(resumed)
    assert _segment(clip_file, bpe_path, photos, resumed) == 2  # neither flag: refused, nothing touched
    _one_error_line(capsys.readouterr().err, "--resume", "--overwrite")
    assert _snapshot(resumed) == before

    with monkeypatch.context() as patch:
        calls = _count_predictions(patch)
        assert _segment(clip_file, bpe_path, photos, resumed, "--resume") == 0
    assert calls == ["b", "c"]  # only the unfinished images are recomputed
    assert "1 finished earlier, skipped" in capsys.readouterr().err
    assert _snapshot(resumed) == expected  # outputs, config.json and markers alike
    assert (resumed / "a_overlay.png").stat().st_mtime_ns == first  # the finished image was not rewritten


# Runs `ovss segment` in its own process and sends it SIGNAL while the second image's overlay is being saved
# (its label map already written): SIGINT is Ctrl-C, SIGKILL a killed process that cleans nothing up.
_SIGNALLED_RUN = """
import os, signal, sys
import ovss.output.files as files
from ovss.cli.main import main
from ovss.storage.files import _create_temp_file
save_overlay = files.save_rgb_png
def signalled(path, image, **kwargs):
    if path.name == "b_overlay.png":
        if int(os.environ["SIGNAL"]) == signal.SIGKILL:  # a writer killed mid-way leaves its temporary file
            _create_temp_file(path.parent, path.name, ".png")
        os.kill(os.getpid(), int(os.environ["SIGNAL"]))
    return save_overlay(path, image, **kwargs)
files.save_rgb_png = signalled
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_a_signalled_process_resumes_to_the_same_bytes(
    clip_file, bpe_path, photos, tmp_path, monkeypatch, signal_number
):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert _segment(clip_file, bpe_path, photos, whole) == 0
    args = ["segment", str(photos), "--labels", "cat, sofa", "--clip", str(clip_file), "--tokenizer", str(bpe_path)]
    args += ["--out", str(resumed), "--templates", "imagenet7", "--short-side", "32", "--crop", "32", "--stride", "16"]
    source = str(Path(ovss.__file__).resolve().parents[1])  # the package under test
    env = {**os.environ, "SIGNAL": str(int(signal_number)), "PYTHONPATH": source}
    done = subprocess.run(
        [sys.executable, "-c", _SIGNALLED_RUN, *args, "--save-json", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == (130 if signal_number == signal.SIGINT else -signal.SIGKILL), done.stderr
    assert "Traceback" not in done.stderr
    assert (resumed / "a_overlay.png").read_bytes() == (whole / "a_overlay.png").read_bytes()
    assert not marker_path(resumed, "b").exists() and not (resumed / "c.png").exists()
    # Ctrl-C removes the half-written image's files; a killed process leaves its label map, without a marker,
    # and the hidden temporary file it was writing (the resumed run sweeps it: the snapshots below are equal)
    assert (resumed / "b.png").exists() == (signal_number == signal.SIGKILL)
    assert bool(list(resumed.glob(".b_overlay.png.*.tmp.png"))) == (signal_number == signal.SIGKILL)
    calls = _count_predictions(monkeypatch)
    assert _segment(clip_file, bpe_path, photos, resumed, "--resume") == 0
    assert calls == ["b", "c"]
    assert _snapshot(resumed) == _snapshot(whole)


def test_resume_refuses_outputs_of_another_configuration(clip_file, bpe_path, photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert _segment(clip_file, bpe_path, photos, out) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert _segment(clip_file, bpe_path, photos, out, "--resume", "--alpha", "0.3") == 2
    err = capsys.readouterr().err
    _one_error_line(err, "another configuration", "config.json: output flags --alpha)", "--overwrite")
    assert _segment(clip_file, bpe_path, photos, out, "--resume", "--save-coco", "--save-masks") == 2
    _one_error_line(capsys.readouterr().err, "config.json: output flags --save-masks, --save-coco)")
    config = json.loads((out / "config.json").read_text())
    assert config["outputs"] == {"logits": False, "logits_dtype": "fp32", "masks": False, "json": True, "alpha": 0.5}
    del config["outputs"]  # a config.json of an earlier version: the flags are named as a group
    (out / "config.json").write_text(json.dumps(config))
    before = _snapshot(out)
    assert _segment(clip_file, bpe_path, photos, out, "--resume", "--alpha", "0.3") == 2
    _one_error_line(capsys.readouterr().err, "another configuration", "the output flags differ", "--overwrite")
    args = ["segment", str(photos), "--labels", "dog, sofa", "--clip", str(clip_file), "--tokenizer", str(bpe_path)]
    args += ["--out", str(out), "--templates", "imagenet7", "--short-side", "32", "--crop", "32", "--stride", "16"]
    assert main([*args, "--save-json", "--no-progress", "--resume"]) == 2
    _one_error_line(capsys.readouterr().err, "these settings differ from its config.json: classes)")  # named
    assert _snapshot(out) == before


def test_resume_redoes_an_image_whose_input_changed(clip_file, bpe_path, photos, tmp_path, monkeypatch):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    for stem in STEMS[:2]:
        (inputs / f"{stem}.png").write_bytes((photos / f"{stem}.png").read_bytes())
    assert _segment(clip_file, bpe_path, inputs, out) == 0
    config = (out / "config.json").read_bytes()
    (inputs / "b.png").write_bytes((photos / "c.png").read_bytes())
    calls = _count_predictions(monkeypatch)
    assert _segment(clip_file, bpe_path, inputs, out, "--resume") == 0
    assert calls == ["b"]
    (inputs / "a.png").write_bytes((photos / "c.png").read_bytes())  # the first image now: later ones skipped
    assert _segment(clip_file, bpe_path, inputs, out, "--resume") == 0
    assert calls == ["b", "a"]
    assert (out / "config.json").read_bytes() == config  # every image listed, as after an uninterrupted run


def test_resume_and_overwrite_exclude_each_other(clip_file, bpe_path, photos, tmp_path, capsys):
    assert _segment(clip_file, bpe_path, photos, tmp_path / "out", "--resume", "--overwrite") == 2
    _one_error_line(capsys.readouterr().err, "--resume", "--overwrite")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- item 6: global errors, up front


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_an_unwritable_out_is_one_line_before_any_image(
    clip_file, bpe_path, photos, tmp_path, capsys, monkeypatch, where
):
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "out" if where == "under a file" else Path("/proc/ovss-out")
    calls = _count_predictions(monkeypatch)
    assert _segment(clip_file, bpe_path, photos, out) == 2
    _one_error_line(capsys.readouterr().err, "--out")
    assert calls == [] and not out.exists()


def test_a_write_failure_stops_the_run_at_the_first_image(clip_file, bpe_path, photos, tmp_path, capsys, monkeypatch):
    def full_disk(path: Path, image: object, **kwargs: object) -> Path:
        raise OSError(28, "No space left on device")

    calls = _count_predictions(monkeypatch)
    monkeypatch.setattr(ovss.output.files, "save_rgb_png", full_disk)
    assert _segment(clip_file, bpe_path, photos, tmp_path / "out") == 2
    _one_error_line(capsys.readouterr().err, "No space left on device", "--resume")
    assert calls == ["a"]


def test_a_vfm_whose_heads_do_not_match_is_one_line_before_any_image(
    clip_file, bpe_path, photos, tmp_path, capsys, monkeypatch
):
    vfm = tmp_path / "dino-3-heads.pth"
    torch.save(dino_state_dict(seed=2, grid=28, width=192), vfm)  # 3 heads of 64; the tiny CLIP has 2
    calls = _count_predictions(monkeypatch)
    out = tmp_path / "out"
    assert _segment(clip_file, bpe_path, photos, out, "--method", "cass", "--vfm", str(vfm)) == 2
    _one_error_line(capsys.readouterr().err, "CLIP has 2 heads of 64, the VFM 3 of 64")
    assert calls == [] and not out.exists()


@pytest.mark.parametrize(("every", "writes"), [(0.0, 3 + 1), (1e9, 1 + 1)])
def test_config_json_is_rewritten_at_most_every_few_seconds(
    clip_file, bpe_path, photos, tmp_path, monkeypatch, every, writes
):
    """A one-process run lists every finished image in config.json: rewriting it after each of 10^5 images
    would write O(n^2) bytes, so it is rewritten at most every CONFIG_EVERY_S seconds (the first image at
    once), and always at the end; the file is the same either way."""
    from ovss.cli import segment_run

    monkeypatch.setattr(segment_run, "CONFIG_EVERY_S", every)
    calls: list[int] = []
    save_config = segment_run.save_config

    def counted(out, record, done):
        calls.append(len(done))
        return save_config(out, record, done)

    monkeypatch.setattr(segment_run, "save_config", counted)
    out = tmp_path / str(every)
    assert _segment(clip_file, bpe_path, photos, out) == 0
    assert len(calls) == writes and calls[0] == 1 and calls[-1] == 3  # the first image, then the end
    assert json.loads((out / "config.json").read_text())["inputs"] == ["a", "b", "c"]


def test_overwrite_removes_the_earlier_runs_files_it_does_not_write_again(clip_file, bpe_path, photos, tmp_path):
    out = tmp_path / "out"
    assert _segment(clip_file, bpe_path, photos, out, "--save-masks", "--save-scores", "png") == 0
    assert (out / "a_masks" / "0_cat.png").is_file() and (out / "a_scores" / "1_sofa.png").is_file()
    (out / "a_masks" / "notes.txt").write_text("a user's file\n")  # not in any marker: never touched
    args = ["segment", str(photos), "--labels", "dog, lawn", "--clip", str(clip_file), "--tokenizer", str(bpe_path)]
    args += ["--out", str(out), "--templates", "imagenet7", "--short-side", "32", "--crop", "32", "--stride", "16"]
    assert main([*args, "--save-masks", "--no-progress", "--overwrite"]) == 0
    for stem in STEMS:
        masks = sorted(p.name for p in (out / f"{stem}_masks").iterdir() if p.suffix == ".png")
        assert masks == ["0_dog.png", "1_lawn.png"]  # not the earlier run's 0_cat.png, 1_sofa.png
        assert not (out / f"{stem}_scores").exists() and not (out / f"{stem}.json").exists()  # not asked for now
    assert (out / "a_masks" / "notes.txt").read_text() == "a user's file\n"
