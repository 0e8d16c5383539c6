"""Every script in benchmarks/ and tools/ runs as a user runs it, in quick mode with tiny weights (smoke tests).

A script that imports a removed function or calls the library the old way fails here instead of rotting until
someone measures. Each test asserts what the script prints or writes: rows of measured numbers, not placeholders.
(``tools/golden_logits.py`` records every method's logits for the refactoring's before/after check; it is run by
the integrator, not here.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, cwd: Path, bpe_path: Path, env: dict[str, str] | None = None) -> str:
    """``python SCRIPT ARGS`` in ``cwd`` with this checkout's ovss; returns stdout (fails with the stderr's end)."""
    path = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    full_env = {**os.environ, "PYTHONPATH": path, "OVSS_BPE_PATH": str(bpe_path), **(env or {})}
    out = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def _number(cell: str) -> float:
    """A measured time or ratio cell: ``0.30``, ``1.2x``, or ``~0.30 (disturbed 1/3)`` when other processes kept
    disturbing it (``ovss.cli.bench_report.seconds_cell``)."""
    match = re.match(r"~?(\d+(?:\.\d+)?)", cell)
    assert match is not None, cell
    return float(match.group(1))


def _rows(text: str, first: str) -> list[list[str]]:
    """The Markdown rows whose first cell is ``first``."""
    return [_cells(line) for line in text.splitlines() if line.startswith("|") and _cells(line)[0] == first]


# ----------------------------------------------------------------------------------------------- benchmarks/
def test_gla_bench_memory_reports_numbers(tmp_path: Path, bpe_path: Path) -> None:
    out = run_script("benchmarks/gla_bench.py", "memory", "--quick", "--threads", "1", "--weights-dir",
                     str(tmp_path / "w"), cwd=tmp_path, bpe_path=bpe_path)  # fmt: skip
    for method in ("proxyclip", "proxyclip+gla"):
        (row,) = _rows(out, method)
        assert row[1] == "112x224" and int(row[2]) > 1  # the quick image, several windows
        peak_gib, seconds = float(row[3]), _number(row[4])
        assert 0.05 < peak_gib < 8 and 0 < seconds < 60  # measured, not placeholders
    assert re.search(r"\| GLA - ProxyCLIP \| \| \| [+-]\d+\.\d\d \(target <= \+2\)", out)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["clip-vitb16-tiny.pt", "dino-vitb8-tiny.pth"]


def test_gla_bench_precision_compares_fp32_and_bf16(tmp_path: Path, bpe_path: Path) -> None:
    out = run_script("benchmarks/gla_bench.py", "precision", "--quick", "--methods", "clearclip", "--repeats", "1",
                     "--threads", "1", cwd=tmp_path, bpe_path=bpe_path)  # fmt: skip
    (row,) = _rows(out, "clearclip")
    t32, t16, agree = _number(row[1]), _number(row[2]), float(row[4].rstrip(" %"))
    assert t32 > 0 and t16 > 0 and _number(row[3]) > 0  # the ratio of the unrounded times
    assert 50.0 < agree <= 100.0  # bf16 moves few labels of a tiny random model


def test_cli_bench_times_the_segment_command(tmp_path: Path, bpe_path: Path, assets_dir: Path) -> None:
    image = assets_dir / "voc2012-val-samples" / "images" / "1_image.png"
    out = run_script("benchmarks/cli_bench.py", "--quick", "--runs", "1", "--dtype", "fp32", "--image", str(image),
                     cwd=tmp_path, bpe_path=bpe_path)  # fmt: skip
    (row,) = _rows(out, "fp32")
    first, warm, peak = float(row[1].split()[0]), float(row[2].split()[0]), float(row[3].split()[0])
    assert warm > 0 and first > 0 and 50 < peak < 16_000  # seconds, seconds, MiB
    assert "(tiny)" in out


def test_memory_bench_reports_load_and_predict_peaks(tmp_path: Path, bpe_path: Path) -> None:
    out = run_script("benchmarks/memory_bench.py", "--quick", cwd=tmp_path, bpe_path=bpe_path)
    (row,) = _rows(out, "clearclip")
    assert row[1:5] == ["160x160", "5", row[3], "none"] and int(row[3]) >= 1
    load, run, process = float(row[5]), float(row[6]), float(row[7])
    assert 50 < load <= process and run <= process < 16_000 and _number(row[8]) > 0


def test_memory_bench_cli_measures_the_segment_command_in_a_fresh_process(tmp_path: Path, bpe_path: Path) -> None:
    out = run_script(
        "benchmarks/memory_bench.py",
        "--cli",
        "--quick",
        "--size",
        "96",
        "--height",
        "64",
        cwd=tmp_path,
        bpe_path=bpe_path,
    )
    (row,) = _rows(out, "ovss segment")
    assert row[1:3] == ["ViT-B/16 tiny", "96x64"]
    assert 50 < float(row[4]) < 16_000 and float(row[5]) > 0  # the child's peak, not this process's


def test_text_bench_cold_warm_and_the_77_position_path(tmp_path: Path, bpe_path: Path) -> None:
    out = run_script("benchmarks/text_bench.py", "--quick", "--datasets", "voc21", "--full", "voc21", "--threads",
                     "1", cwd=tmp_path, bpe_path=bpe_path)  # fmt: skip
    (row,) = _rows(out, "VOC21")
    q, prompts, cold, warm = int(row[1]), int(row[2]), float(row[3]), float(row[4])
    assert q == 21 and prompts == 21 * 80 and cold > 0 and warm >= 0
    full, cut, speedup, diff = float(row[5]), float(row[6]), float(row[7].rstrip("x")), float(row[8])
    assert full > 0 and cut > 0 and speedup > 0 and diff < 1e-4  # cutting the prompts changes nothing


def test_trident_gpu_runs_on_the_cpu_with_tiny_models(tmp_path: Path, bpe_path: Path) -> None:
    out = run_script("benchmarks/trident_gpu.py", "--quick", cwd=tmp_path, bpe_path=bpe_path,
                     env={"OUT": str(tmp_path), "DEV": "cpu"})  # fmt: skip
    assert out.startswith("trident voc fp32 {")
    record = json.loads((tmp_path / "trident_gpu.json").read_text())
    run = record["trident/voc/fp32"]
    assert record["device"] == "cpu" and run["set_image_s"] > 0 and run["predict_s"] > 0
    assert run["windows"] > 1 and run["sam"]["sam_passes"] == 1
    assert run["refine"]["regions"] >= 1 and run["refine"]["kept"] == run["refine"]["regions"]  # iou_thresh=-1e9


# ----------------------------------------------------------------------------------------------- tools/
def test_attention_bench_times_both_routes_with_small_errors(tmp_path: Path, bpe_path: Path) -> None:
    out = run_script("tools/attention_bench.py", "--quick", "--threads", "1", cwd=tmp_path, bpe_path=bpe_path)
    sam = [line for line in out.splitlines() if line.startswith("sam ")]
    vit = [line for line in out.splitlines() if line.startswith("vit ")]
    assert len(sam) == 8 and len(vit) == 12
    assert all(float(line.split()[-2]) > 0 for line in sam)  # "... 12.3 ms"
    errors = {line.split("  ")[0]: float(line.split()[-1]) for line in vit}
    assert all(e < 1e-5 for name, e in errors.items() if " fp32 " in name)
    assert all(e < 0.1 for name, e in errors.items() if " bf16 " in name)


def test_precision_agreement_on_tiny_weight_files(tmp_path: Path, bpe_path: Path, assets_dir: Path) -> None:
    from ovss.cli.bench_weights import random_dino_state_dict
    from tiny import save_openai_plain, tiny_clip_state_dict

    clip = save_openai_plain(tiny_clip_state_dict(seed=0), tmp_path / "tiny-clip.pt")
    dino = tmp_path / "dino_tiny_pretrain.pth"
    import torch

    torch.save(random_dino_state_dict(128, 2, patch=8, grid=28, seed=1), dino)
    rgb = np.asarray(Image.open(assets_dir / "voc2012-val-samples" / "images" / "1_image.png").convert("RGB"))
    Image.fromarray(rgb[:96, :128]).save(tmp_path / "photo.png")
    (tmp_path / "classes.txt").write_text("sky\nperson\nroad\n")
    out = run_script("tools/precision_agreement.py", str(tmp_path / "photo.png"), "--labels-file",
                     str(tmp_path / "classes.txt"), "--clip", str(clip), "--vfm", str(dino), "--tokenizer",
                     str(bpe_path), "--method", "proxyclip+gla", "--short-side", "64", "--crop", "32", "--stride",
                     "16", cwd=tmp_path, bpe_path=bpe_path)  # fmt: skip
    report = json.loads(out[out.index("\n{") + 1 :])  # the last, indented JSON object
    budget = report["proxyclip+gla"]
    assert report["dtype"] == "bf16" and not report["tamed"]
    assert 50.0 <= budget["agree_pct_mean"] <= 100.0
    assert set(budget["per_image"]) == {"photo.png"}


def test_precision_agreement_on_tamed_narrow_towers(tmp_path: Path, bpe_path: Path, assets_dir: Path) -> None:
    rgb = np.asarray(Image.open(assets_dir / "voc2012-val-samples" / "images" / "1_image.png").convert("RGB"))
    Image.fromarray(rgb[:240, :240]).save(tmp_path / "photo.png")
    args = [str(tmp_path / "photo.png"), "--tamed", "--quick", "--cache", str(tmp_path / "tamed.pt"), "--classes",
            "3", "--method", "clearclip", "--short-side", "112", "--crop", "56", "--stride", "28"]  # fmt: skip
    out = run_script("tools/precision_agreement.py", *args, cwd=tmp_path, bpe_path=bpe_path)
    report = json.loads(out[out.index("\n{") + 1 :])
    assert report["tamed"] and (tmp_path / "tamed.pt").is_file()
    clip, dino = report["clip_taming"], report["dino_taming"]
    assert len(clip["entropy_per_block"]) == 3 and clip["query_scale"] in (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
    assert abs(clip["entropy_after"] - 0.7) <= abs(clip["entropy_before"] - 0.7)  # the taming moved towards 0.70
    assert 0 < dino["proxy_share_after"] < dino["proxy_share_before"]  # the DINO tokens were decorrelated
    assert 50.0 <= report["clearclip"]["agree_pct_mean"] <= 100.0
