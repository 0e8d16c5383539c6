"""`ovss segment` split over processes (issue 22, item 1): two `--shard` processes and a 2-rank torchrun run
leave the bytes of a one-process run, with one summary and the whole run's exit code; an interrupted shard
resumes without touching the other shard's images."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ovss.output.files
from ovss.cli.main import main
from ovss.cli.segment_shard import Shard, all_shards, inputs_digest, parse_shard, record_shard
from ovss.errors import OvssError
from ovss.predictor import Segmenter

GOOD = ["a", "b", "c", "e", "f"]
BAD = "d"  # position 3 of the sorted folder: shard 1 of 2, torchrun rank 1
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for seed, stem in enumerate(GOOD):
        pixels = np.random.default_rng(seed).integers(0, 256, size=(40 + 4 * seed, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{stem}.png")
    (folder / f"{BAD}.png").write_text("not an image\n")
    return folder


def _args(clip_file: Path, bpe_path: Path, photos: Path, out: Path, *extra: str) -> list[str]:
    args = ["segment", str(photos), "--labels", "cat, sofa", "--clip", str(clip_file), "--tokenizer", str(bpe_path)]
    args += ["--out", str(out), "--templates", "imagenet7", "--short-side", "32", "--crop", "32", "--stride", "16"]
    args += ["--save-coco", "--save-geojson"]  # run-level coco.json: merged from the shards' parts, same bytes
    return [*args, "--save-json", "--save-logits", "--no-progress", *extra]


def _env() -> dict[str, str]:
    path = os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # one thread, as every torchrun worker


def _ovss(args: list[str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "ovss", *args]
    return subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but the shard records (which only sharded runs keep)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".ovss/shards" not in p.as_posix())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def alone(clip_file: Path, bpe_path: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-process run of the folder (in a fresh process with one thread, like the sharded runs)."""
    out = tmp_path_factory.mktemp("alone") / "out"
    process = _ovss(_args(clip_file, bpe_path, photos, out))
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err  # the bad image fails the run
    assert f"segmented {len(GOOD)} of {len(GOOD) + 1} image(s)" in err and "1 failed:" in err
    assert json.loads((out / "config.json").read_text())["inputs"] == GOOD
    return out


# ------------------------------------------------------------------------------ the split itself


@pytest.mark.parametrize("total", [0, 1, 5, 17])
@pytest.mark.parametrize(("count", "world"), [(1, 1), (3, 1), (1, 2), (2, 3)])
def test_shards_and_ranks_partition_the_job_list(total: int, count: int, world: int) -> None:
    parts = [Shard(i, count, r, world).positions(total) for i in range(count) for r in range(world)]
    together = sorted(p for part in parts for p in part)
    assert together == list(range(total))  # every image once, none twice
    assert max(map(len, parts)) - min(map(len, parts)) <= 2  # balanced (round-robin, twice nested)


def test_shard_flag_values(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert parse_shard(None) == (0, 1) and parse_shard("0/2") == (0, 2) and parse_shard(" 3 / 4 ") == (3, 4)
    for bad in ["2/2", "1/0", "-1/2", "1", "a/b", "1/2/3", ""]:
        with pytest.raises(OvssError, match="0-based"):
            parse_shard(bad)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    code = main(["segment", str(image), "--labels", "cat", "--out", str(tmp_path / "o"), "--shard", "2/2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "ovss: error: --shard must be I/N with 0 <= I < N" in err
    assert not (tmp_path / "o").exists()
    code = main(["segment", str(image), "--labels", "cat", "--out", str(tmp_path / "o"), "--read-ahead", "-1"])
    assert code == 2 and "ovss: error: --read-ahead must be >= 0 images, got -1" in capsys.readouterr().err


# ------------------------------------------------------------------------------ sharded runs, byte for byte


def test_two_shard_processes_give_the_bytes_of_one(
    alone: Path, clip_file: Path, bpe_path: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sharded"
    shards = [_ovss(_args(clip_file, bpe_path, photos, out, "--shard", f"{i}/2")) for i in (0, 1)]
    errs = [shard.communicate(timeout=300)[1] for shard in shards]
    assert _snapshot(out) == _snapshot(alone)  # per-image files, markers and config.json ("inputs" in full order)
    from pycocotools.coco import COCO

    coco = COCO(str(out / "coco.json"))  # merged by the last shard from both shards' parts
    assert [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)] == [f"{stem}.png" for stem in GOOD]
    assert sorted(p.name for p in (out / ".ovss" / "shards").iterdir()) == ["0-of-2.json", "1-of-2.json"]
    assert shards[1].returncode == 1 and f"{BAD}.png" in errs[1]  # shard 1 holds the bad image
    finishers = [err for err in errs if f"segmented {len(GOOD)} of {len(GOOD) + 1} image(s)" in err]
    assert len(finishers) == 1 and "1 failed:" in finishers[0] and f"{BAD}.png" in finishers[0]  # whole-run summary
    assert all(f"shard {i}/2: segmented " in err for i, err in enumerate(errs))  # each shard's own line, then
    assert f"all shards: segmented {len(GOOD)} of {len(GOOD) + 1} image(s)" in finishers[0]  # the whole run's
    assert [s.returncode for s, e in zip(shards, errs, strict=True) if e in finishers] == [1]  # the whole run's code


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_torchrun_ranks_give_the_bytes_of_one(
    alone: Path, clip_file: Path, bpe_path: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ranks"
    command = [  # torchrun's own module, so no `torchrun` script needs to be on PATH
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "ovss", *_args(clip_file, bpe_path, photos, out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert _snapshot(out) == _snapshot(alone), done.stderr[-3000:]
    assert not (out / ".ovss" / "shards").exists()
    assert done.returncode == 1, done.stderr[-3000:]  # both ranks return the run's code (1: an image failed)
    assert done.stderr.count("segmented ") == 1  # one summary, from rank 0, listing rank 1's failure
    assert f"segmented {len(GOOD)} of {len(GOOD) + 1} image(s)" in done.stderr and f"{BAD}.png" in done.stderr


def test_a_rank_that_cannot_write_stops_every_rank_with_one_line(
    clip_file: Path, bpe_path: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "blocked"
    (out / "e.png").mkdir(parents=True)  # rank 0 holds e (position 4): its label map cannot replace a folder
    (out / "e.png" / "keep").write_text("a user's file\n")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "ovss", *_args(clip_file, bpe_path, photos, out, "--overwrite"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300, check=False)
    stops = [line for line in done.stderr.splitlines() if line.startswith("ovss: error: cannot write")]
    assert len(stops) == 1 and "cannot write the outputs of 'e'" in stops[0], done.stderr[-3000:]  # said once
    assert done.returncode != 0 and "Timed out" not in done.stderr  # no rank waited for the other until a timeout
    assert "ovss: error: cannot read image" in done.stderr  # rank 1's bad image d, reported as it went
    assert (out / "e.png" / "keep").read_text() == "a user's file\n"


# ------------------------------------------------------------------------------ interrupt and resume


def test_an_interrupted_shard_resumes_and_never_touches_the_other_shard(
    alone: Path, clip_file: Path, bpe_path: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "resumed"
    calls: list[str] = []
    predict, save_overlay = Segmenter.predict, ovss.output.files.save_rgb_png
    interrupt = {"at": 2}  # Ctrl-C while shard 0 saves its second image

    def counting(self: Segmenter, image: object, *args: object, **kwargs: object) -> object:
        calls.append(Path(str(image)).stem)
        return predict(self, image, *args, **kwargs)

    def saving(path: Path, image: object, **kwargs: object) -> Path:
        if len(calls) == interrupt["at"] and path.name.endswith("_overlay.png"):
            raise KeyboardInterrupt
        return save_overlay(path, image, **kwargs)

    monkeypatch.setattr(Segmenter, "predict", counting)
    monkeypatch.setattr(ovss.output.files, "save_rgb_png", saving)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one-process run
    try:
        assert main(_args(clip_file, bpe_path, photos, out, "--shard", "0/2")) == 130
        assert calls == ["a", "c"] and not (out / "config.json").exists()
        interrupt["at"] = -1
        calls.clear()
        assert main(_args(clip_file, bpe_path, photos, out, "--shard", "0/2", "--resume")) == 0
        assert calls == ["c", "e"]  # a was finished: skipped; c was cut: redone
        assert not (out / "config.json").exists()  # shard 1 has not run yet
        calls.clear()
        assert main(_args(clip_file, bpe_path, photos, out, "--shard", "1/2", "--overwrite")) == 1
        assert calls == ["b", BAD, "f"]  # --overwrite redoes only this shard's images
        summary = capsys.readouterr().err  # shard 1 finishes the run: the whole run's summary
        assert f"segmented {len(GOOD)} of {len(GOOD) + 1} image(s)" in summary
        assert "(1 finished earlier, skipped)" in summary  # shard 0's resumed run skipped a
    finally:
        torch.set_num_threads(threads)
    assert _snapshot(out) == _snapshot(alone)


def test_a_shard_record_of_another_run_or_image_list_is_not_this_runs(tmp_path: Path) -> None:
    old, new = ["a", "b", "c"], ["a", "b", "c", "d"]  # a file added to the folder since
    for index in (0, 1):
        record_shard(tmp_path, Shard(index, 2, 0, 1), "key", inputs_digest(old), old[index::2], {}, 1)
    records = all_shards(tmp_path, 2, "key", inputs_digest(old))
    assert records is not None and [r["finished"] for r in records] == [["a", "c"], ["b"]]
    assert all_shards(tmp_path, 2, "key", inputs_digest(new)) is None  # shard 1 must run again on the new list
    assert all_shards(tmp_path, 2, "other key", inputs_digest(old)) is None


def test_inputs_sharing_a_stem_are_refused_in_one_line_and_counted_in_one_pass(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / folder / "a.png")
    code = main(["segment", str(tmp_path / "x"), str(tmp_path / "y"), "--labels", "cat", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "share the file name stem 'a'" in err
    from ovss.cli.segment import _refuse_shared_stems

    many = [(f"img{k:07d}", tmp_path / f"img{k:07d}.png") for k in range(300_000)]  # a big folder, two clashes
    many += [("img0000007", tmp_path / "x" / "img0000007.png"), ("img0000003", tmp_path / "x" / "img0000003.png")]
    with pytest.raises(OvssError, match=r"share the file name stem 'img0000003' \(and 1 more stem\(s\)\)"):
        _refuse_shared_stems(many)  # one pass: list.count per stem would take hours here

def test_shards_run_with_different_configurations_say_what_the_run_waits_for(
    clip_file: Path, bpe_path: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mixed"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(clip_file, bpe_path, photos, out, "--shard", "0/2")) == 0
        capsys.readouterr()
        other = [arg if arg != "cat, sofa" else "dog, lawn" for arg in _args(clip_file, bpe_path, photos, out)]
        assert main([*other, "--shard", "1/2"]) == 1  # its own outcome: the bad image is shard 1's
        err = capsys.readouterr().err
        assert "ovss: shard 1/2 done, but shard(s) 0/2 in" in err and "another configuration" in err
        assert "the last shard to finish writes" not in err  # not while shard 0's record is another run's
        assert not (out / "config.json").exists() and not (out / "coco.json").exists()
        assert main([*other, "--shard", "0/2", "--overwrite"]) == 1  # shard 0 again, with shard 1's flags
        assert json.loads((out / "config.json").read_text())["classes"] == [["dog"], ["lawn"]]
        assert "all shards: segmented" in capsys.readouterr().err and (out / "coco.json").exists()
    finally:
        torch.set_num_threads(threads)
