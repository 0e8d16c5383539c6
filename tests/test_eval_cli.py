"""``ovss eval`` / ``data`` / ``report`` end to end with a tiny CLIP file; a 2-process torchrun run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ovss.cli.main import main
from ovss.eval.datasets import labelids_to_trainids, read_label
from ovss.eval.names import load_names


@pytest.fixture(scope="module")
def model_file(tiny_state_dict: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import save_openai_jit

    return save_openai_jit(tiny_state_dict, tmp_path_factory.mktemp("model") / "tiny-ViT.pt")


@pytest.fixture(scope="module")
def folder_args(
    assets_dir: Path, bpe_path: Path, model_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[str]:
    names = tmp_path_factory.mktemp("names") / "voc21.txt"
    names.write_text("".join(", ".join(n) + "\n" for n in load_names("voc21", "plain")))
    samples = assets_dir / "voc2012-val-samples"
    return [
        "eval",
        "--dataset", "folder",
        "--images", str(samples / "images"),
        "--masks", str(samples / "labels"),
        "--names", str(names),
        "--image-suffix", "_image",
        "--label-suffix", "_label",
        "--has-background",
        "--method", "clearclip",
        "--preset", "clearclip",
        "--clip", str(model_file),
        "--tokenizer", str(bpe_path),
        "--templates", "imagenet7",
        "--short-side", "64",
        "--crop", "32",
        "--stride", "24",
        "--bg-threshold", "0.1",
        "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cli_run(folder_args: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like every torchrun worker, so both runs reduce in the same order
    try:
        assert main([*folder_args, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_torchrun_processes_give_the_single_process_counts(
    cli_run: Path, folder_args: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "dist"
    command = [  # torchrun's own module, so no `torchrun` script needs to be on PATH
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "ovss", *folder_args, "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("mIoU") == 1  # only rank 0 reports
    single = json.loads((cli_run / "result.json").read_text())
    double = json.loads((out / "result.json").read_text())
    assert double["counts"] == single["counts"] and double["mIoU"] == single["mIoU"]
    assert double["timing"]["world_size"] == 2 and double["images"] == 14
    # the saved accumulator states: rank 0 took the even indices, rank 1 the odd ones, and they sum exactly
    ranks = [torch.load(out / "checkpoint" / f"rank{r}-of-2.pt", weights_only=True) for r in (0, 1)]
    alone = torch.load(cli_run / "checkpoint" / "rank0-of-1.pt", weights_only=True)
    assert ranks[0]["done"] == list(range(0, 14, 2)) and ranks[1]["done"] == list(range(1, 14, 2))
    for key in ("intersection", "pred_area", "label_area"):
        assert torch.equal(ranks[0]["confusion"][key] + ranks[1]["confusion"][key], alone["confusion"][key])
    for key in ("errors", "pairs"):
        assert int(ranks[0]["boundary"][key] + ranks[1]["boundary"][key]) == int(alone["boundary"][key])


def test_eval_user_errors_exit_2(folder_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--dataset", "voc21", "--out", str(tmp_path), "--method", "clearclip"]) == 2
    assert "ovss: error: --dataset voc21 needs --root DIR" in capsys.readouterr().err
    assert main(["eval", "--dataset", "folder", "--out", str(tmp_path)]) == 2
    assert "needs --images, --masks, --names" in capsys.readouterr().err
    assert main([*folder_args, "--out", str(tmp_path), "--preset", "gla", "--opt", "nonsense=1"]) == 2
    assert "has no option nonsense" in capsys.readouterr().err


def test_eval_old_labels_flag_names_its_new_spelling(
    folder_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``eval --labels`` (a folder of PNG masks, unlike ``segment --labels``) is now ``--masks``: one line, no run."""
    masks = folder_args[folder_args.index("--masks") + 1]
    old = list(folder_args)
    old[old.index("--masks")] = "--labels"
    out = tmp_path / "run"
    assert main([*old, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"ovss: error: eval --labels is now --masks (the folder of label PNGs): --masks {masks}\n"
    assert not out.exists()


def test_eval_names_file_is_read_as_segment_reads_a_labels_file(
    folder_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A '|' synonym in ``eval --names`` is a synonym (as in ``segment --labels-file``), not part of one name."""
    from ovss.cli.evaluate import _open
    from ovss.cli.main import build_parser
    from ovss.labels import read_labels_file

    names = tmp_path / "voc21.txt"
    lines = [", ".join(n) for n in load_names("voc21", "plain")]
    lines[15] = "person|pedestrian ; human"
    names.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    argv = [*folder_args, "--out", str(tmp_path / "run")]
    argv[argv.index("--names") + 1] = str(names)
    dataset = _open(build_parser().parse_args(argv))  # what `ovss eval` evaluates on
    assert dataset.names == read_labels_file(names)
    assert dataset.names[15] == ["person", "pedestrian", "human"] and dataset.names[0] == ["background"]


def _voc_tree(root: Path, samples: Path, ids: list[str]) -> Path:
    """A VOCdevkit/VOC2012 layout holding the given sample ids (images re-encoded as JPEG)."""
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
    return base


def test_data_check_reports_missing_files(assets_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _voc_tree(tmp_path, assets_dir / "voc2012-val-samples", ["0", "1", "8"])
    (base / "SegmentationClass" / "1.png").unlink()
    assert main(["data", "check", "voc21", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "voc21: 2/1449 image-label pairs" in out and "SegmentationClass/1.png" in out
    split = tmp_path / "two.txt"
    split.write_text("0\n8\n")
    assert main(["data", "check", "voc21", "--root", str(base), "--split-file", str(split)]) == 0
    assert "voc21: 2/2 image-label pairs" in capsys.readouterr().out
    assert main(["data", "check", "ade20k", "--root", str(tmp_path)]) == 1
    assert "ADEChallengeData2016/" in capsys.readouterr().out


def test_data_prepare_cityscapes(assets_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = assets_dir / "cityscapes-val-sample" / "frankfurt_000000_000294_gtFine_labelIds.png"
    folder = tmp_path / "cityscapes" / "gtFine" / "val" / "frankfurt"
    folder.mkdir(parents=True)
    shutil.copy(source, folder / source.name)
    assert main(["data", "prepare", "cityscapes", "--root", str(tmp_path)]) == 0
    assert "wrote 1 label file(s)" in capsys.readouterr().out
    written = np.asarray(Image.open(folder / "frankfurt_000000_000294_gtFine_labelTrainIds.png"))
    assert np.array_equal(written, labelids_to_trainids(read_label(source)))
    assert main(["data", "prepare", "coco_object", "--root", str(tmp_path)]) == 2


def test_report_renders_table_one_from_run_folders(
    assets_dir: Path, bpe_path: Path, model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _voc_tree(tmp_path / "data", assets_dir / "voc2012-val-samples", ["0", "23"])
    common = ["--root", str(tmp_path / "data"), "--method", "clearclip", "--preset", "clearclip", "--clip"]
    common += [str(model_file), "--tokenizer", str(bpe_path), "--templates", "imagenet7", "--no-progress"]
    runs: dict[str, Any] = {}
    for dataset in ("voc21", "voc20"):
        out = tmp_path / "runs" / dataset
        assert main(["eval", "--dataset", dataset, *common, "--out", str(out)]) == 0
        runs[dataset] = json.loads((out / "result.json").read_text())
    (tmp_path / "runs" / "unfinished").mkdir()
    capsys.readouterr()
    folders = [str(tmp_path / "runs" / name) for name in ("voc21", "voc20", "unfinished")]
    assert main(["report", *folders]) == 0
    captured = capsys.readouterr()
    header, rule, row = captured.out.splitlines()[:3]
    assert header == "| method / preset | V21 | PC60 | C-Obj | V20 | PC59 | C-Stf | City | ADE | Avg |"
    assert rule == "|" + "---|" * 10
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[0] == "clearclip / clearclip"
    # two images of VOC's 1449: marked, and never printed beside the paper's full-split number
    assert cells[1] == f"{runs['voc21']['mIoU']:.2f}*" and cells[4] == f"{runs['voc20']['mIoU']:.2f}*"
    assert cells[2] == "– (32.6)" and cells[9] == "– (38.1)"
    assert "runs/voc21: 2 of 1449 images" in captured.out and "partial split" in captured.out
    assert "GLA-CLIP Table 1" in captured.out
    assert "unfinished holds no finished run" in captured.err
    assert main(["report", str(tmp_path / "runs" / "unfinished")]) == 2


def _fake_run(folder: Path, dataset: str, images: int, miou: float, method: str = "clearclip") -> Path:
    folder.mkdir(parents=True)
    result = {"method": method, "preset": method, "dataset": dataset, "images": images, "complete": True,
              "mIoU": miou, "mAcc": 1.0, "aAcc": 2.0, "BER": 3.0}  # fmt: skip
    (folder / "result.json").write_text(json.dumps(result))
    (folder / "config.json").write_text(json.dumps({"setting": {"overrides": []}}))
    return folder


def test_report_prints_full_splits_beside_the_papers_and_lists_folder_runs(
    cli_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = _fake_run(tmp_path / "full", "voc21", 1449, 50.0)
    partial = _fake_run(tmp_path / "partial", "pc60", 100, 30.0)
    assert main(["report", str(full), str(partial), str(cli_run)]) == 0
    out = capsys.readouterr().out
    cells = [cell.strip() for cell in out.splitlines()[2].strip("|").split("|")]
    assert cells[1] == "50.00 (51.8)" and cells[2] == "30.00*" and cells[9] == "– (38.1)"
    own = out[out.index("Own datasets") :].splitlines()
    folder_row = [cell.strip() for cell in own[4].strip("|").split("|")]
    result = json.loads((cli_run / "result.json").read_text())
    assert folder_row[0] == str(cli_run) and folder_row[2] == "14"
    assert folder_row[1] == "clearclip / clearclip (bg_threshold=0.1, crop=32, short_side=64, stride=24)"
    assert folder_row[3] == f"{result['mIoU']:.2f}"
    assert main(["report", str(cli_run)]) == 0  # folder runs alone make a report too
    assert "Own datasets" in capsys.readouterr().out


def test_eval_refuses_to_replace_another_run_without_overwrite(
    cli_run: Path, folder_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(cli_run, out)
    before = (out / "result.json").read_bytes()
    other = list(folder_args)
    other[other.index("--bg-threshold") + 1] = "0.2"  # another configuration
    assert main([*other, "--limit", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (clearclip on custom, preset clearclip)" in err and "--overwrite" in err
    assert (out / "result.json").read_bytes() == before
    assert main([*other, "--limit", "1", "--out", str(out), "--resume"]) == 2  # resume checks the configuration
    assert "another configuration" in capsys.readouterr().err and (out / "result.json").read_bytes() == before
    assert main([*folder_args, "--out", str(out), "--resume"]) == 0  # same configuration: allowed
    assert json.loads((out / "result.json").read_text())["counts"] == json.loads(before)["counts"]
    assert main([*other, "--limit", "1", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "result.json").read_text())["images"] == 1


def test_module_entry_point_lists_the_new_commands() -> None:
    done = subprocess.run([sys.executable, "-m", "ovss", "--help"], capture_output=True, text=True, check=True)
    assert all(command in done.stdout for command in ("eval", "data", "report"))


def test_eval_uses_the_given_vfm_and_gla_flag(folder_args: list[str], tmp_path: Path) -> None:
    from test_dino import dino_state_dict

    dino = tmp_path / "tiny_dino_pretrain.pth"
    torch.save(dino_state_dict(seed=2, grid=28), dino)
    args = list(folder_args)
    args[args.index("--method") + 1] = "proxyclip"
    args[args.index("--preset") + 1] = "proxyclip"
    args[args.index("--crop") + 1], args[args.index("--stride") + 1] = "56", "56"
    out = tmp_path / "run"
    assert main([*args, "--vfm", str(dino), "--gla", "--limit", "1", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["setting"]["method"] == "proxyclip+gla"
    assert config["weights"]["vfm"]["path"] == str(dino)
    assert config["weights"]["vfm"]["sha256"] == hashlib.sha256(dino.read_bytes()).hexdigest()


def _vfm_run(folder: Path, method: str, vfm: str | None, miou: float, fmt: str = "dino") -> Path:
    folder.mkdir(parents=True)
    result = {"method": method, "preset": "gla", "dataset": "voc21", "images": 1449, "complete": True,
              "mIoU": miou, "mAcc": 1.0, "aAcc": 2.0, "BER": 3.0}  # fmt: skip
    weights = {"clip": {"name": "ViT-B/16"}, **({"vfm": {"name": vfm, "format": fmt}} if vfm else {})}
    (folder / "result.json").write_text(json.dumps(result))
    (folder / "config.json").write_text(json.dumps({"setting": {"overrides": []}, "weights": weights}))
    return folder


def test_report_keeps_runs_with_another_vfm_apart_and_prints_table_four(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [
        _vfm_run(tmp_path / "b8", "proxyclip+gla", "dino-vitb8", 66.0),  # the default VFM: the Table 1 row
        _vfm_run(tmp_path / "v3", "proxyclip+gla", "dinov3_vitb16", 63.0, "dinov3"),
        _vfm_run(tmp_path / "local", "proxyclip", "/weights/my_dinov3.pth", 61.0, "dinov3"),  # the one DINOv3
        _vfm_run(tmp_path / "v2", "proxyclip", "/weights/dinov2.pth", 58.0, "dinov2"),  # B/14 or L/14: no row
        _vfm_run(tmp_path / "b8copy", "proxyclip", "/weights/dino_b8.pth", 60.0),  # a copy of the default
    ]
    assert main(["report", *map(str, runs)]) == 0
    rows = {
        cells[0]: cells
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| proxyclip")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert rows["proxyclip+gla / gla"][1] == "66.00 (66.3)"  # GLA-CLIP Table 1
    assert rows["proxyclip+gla / gla / vfm dinov3_vitb16"][1] == "63.00 (63.6)"  # GLA-CLIP Table 4
    assert rows["proxyclip+gla / gla / vfm dinov3_vitb16"][5] == "– (38.9)"
    assert rows["proxyclip / gla / vfm dinov3_vitb16"][1] == "61.00 (62.8)"
    assert rows["proxyclip / gla / vfm dinov2.pth"][1] == "58.00"
    assert rows["proxyclip / gla"][1] == "60.00"  # ProxyCLIP has no published row in preset gla
