"""GLA cost benchmarks, measured end to end through what users run: ``ovss.load(...).set_image(...)``/``predict``.

    python benchmarks/gla_bench.py memory     # 560x1120, 36 windows: peak RSS of GLA-ProxyCLIP vs ProxyCLIP
    python benchmarks/gla_bench.py latency    # 336x448, 6 windows: GLA-ProxyCLIP latency vs ProxyCLIP
    python benchmarks/gla_bench.py precision  # every registered method: bf16 vs fp32 latency and label agreement
    python benchmarks/gla_bench.py all        # the three, sharing one set of weight files
    python benchmarks/gla_bench.py latency --quick   # tiny models and a small image: a smoke test in seconds

Weights: a full-size CLIP ViT-B/16 (OpenAI state dict, as ``torch.jit.load("ViT-B-16.pt").state_dict()``)
and DINO ViT-B/8 (the facebookresearch ``dino_vitbase8_pretrain.pth`` layout) with random values are written
to a temporary folder (or ``--weights-dir``) and loaded by path, as a user would. Time and memory do not
depend on the values.
Text embeddings are random unit vectors passed to ``predict``; ``ovss.load`` still reads the BPE vocabulary
(``OVSS_BPE_PATH``, the ``shared/`` assets beside the checkout, or the ovss cache).

Every measurement is an ``ovss.cli.bench_harness`` image job (the machinery of ``ovss bench``): a fresh process with
``torch.set_num_threads(--threads)``; its peak resident set is read from the OS (``VmHWM`` of
``/proc/self/status``, or ``ru_maxrss``) and includes the loaded models. Latency is the median of
``--repeats`` runs of ``set_image`` + ``predict`` after one warm-up, all inside that one process. Before each
measurement it waits for a quiet machine (not with ``--quick``); a timed run during which other processes used
the CPU is redone there, and a time that stayed disturbed is printed with ``~`` (``ovss.cli.bench_machine``).
Each mode prints Markdown rows for the README.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from common import vocab_path

from ovss.cli.bench_harness import GIB, MeasurementError, quick_settings
from ovss.cli.bench_harness import measure as measure_job
from ovss.cli.bench_machine import QuietPolicy, proc_load_source, wait_for_quiet
from ovss.cli.bench_report import seconds_cell
from ovss.cli.bench_weights import write_weights_for
from ovss.cli.options import add_methods_flag

LABELS = 7  # classes of every measurement (random unit text embeddings)
COMPARED = ("proxyclip", "proxyclip+gla", "cass", "cass+gla")  # the memory and latency modes' methods


def measure(job: dict, quick: bool) -> dict:
    """One ``ovss.cli.bench_harness`` image job in a fresh process (see :mod:`ovss.cli.bench_harness`), after
    waiting for a quiet machine (not with ``quick``); its disturbed timed runs are redone there."""
    if not quick:
        wait_for_quiet(proc_load_source([os.getpid()]), QuietPolicy(), lambda line: print(line, file=sys.stderr))
    try:
        return measure_job(job)
    except MeasurementError as err:
        raise SystemExit(str(err)) from err


# ----------------------------------------------------------------------------------------------- modes
def _job(args: argparse.Namespace, method: str, **kw: object) -> dict:
    job = {
        "method": method,
        "files": args.paths,  # registry name -> random stand-in; each method loads the weights it asks for
        "kind": "image",
        "dtype": "fp32",
        "threads": args.threads,
        "classes": LABELS,
        "warmup": 1,
        "repeats": args.repeats,
        "image": "336x448",  # HxW of a random image, or "astronaut"
        "tokenizer": vocab_path(),
    }
    job.update(kw)
    return job


def bench_memory(args: argparse.Namespace) -> list[str]:
    h, w = (112, 224) if args.quick else (560, 1120)
    crop, stride = (56, 28) if args.quick else (224, 112)
    geometry = {"short_side": None, "crop": crop, "stride": stride}
    res = {
        m: measure(_job(args, m, image=f"{h}x{w}", settings=geometry, warmup=0, repeats=1), args.quick)
        for m in COMPARED
    }
    base, gla = res["proxyclip"], res["proxyclip+gla"]
    extra = (gla["peak_rss_bytes"] - base["peak_rss_bytes"]) / GIB
    rows = [
        "| method | image | windows | peak RSS (GiB) | set_image + predict (s) |",
        "|---|---|---|---|---|",
    ]
    for r in res.values():
        rows.append(
            f"| {r['method']} | {r['image']} | {r['windows']} | {r['peak_rss_bytes'] / GIB:.2f} "
            f"| {seconds_cell(r, 2)} |"
        )
    rows.append(f"| GLA - ProxyCLIP | | | {extra:+.2f} (target <= +2) | {gla['seconds'] - base['seconds']:+.2f} |")
    return rows


def bench_latency(args: argparse.Namespace) -> list[str]:
    h, w = (112, 168) if args.quick else (336, 448)
    crop, stride = (56, 28) if args.quick else (224, 112)
    geometry = {"short_side": None, "crop": crop, "stride": stride}
    res = {m: measure(_job(args, m, image=f"{h}x{w}", settings=geometry), args.quick) for m in COMPARED}
    base = res["proxyclip"]
    rows = [
        f"| method | image | windows | latency (s, median of {args.repeats}) | vs ProxyCLIP |",
        "|---|---|---|---|---|",
    ]
    for r in res.values():
        ratio = r["seconds"] / base["seconds"]
        mark = "~" if r["disturbed_runs"] or base["disturbed_runs"] else ""
        rows.append(f"| {r['method']} | {r['image']} | {r['windows']} | {seconds_cell(r, 2)} | {mark}{ratio:.2f}x |")
    rows.append("| target | | | | GLA <= 1.20x |")
    return rows


def bench_precision(args: argparse.Namespace) -> list[str]:
    import ovss

    methods = args.methods or ovss.available_methods()
    geometry = {"short_side": 112, "crop": 56, "stride": 28} if args.quick else {}
    rows = [
        "| method | fp32 (s) | bf16 (s) | bf16 / fp32 | identical labels |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            res = {}
            geo = quick_settings(method, geometry, {}) if args.quick else geometry
            for dtype in ("fp32", "bf16"):
                out = str(Path(tmp) / f"{method}-{dtype}.npy")
                job = _job(args, method, dtype=dtype, image="astronaut", settings=geo, labels_out=out)
                res[dtype] = measure(job, args.quick)
                res[dtype]["labels"] = np.load(out)
            same = float((res["fp32"]["labels"] == res["bf16"]["labels"]).mean())
            t32, t16 = res["fp32"]["seconds"], res["bf16"]["seconds"]
            mark = "~" if res["fp32"]["disturbed_runs"] or res["bf16"]["disturbed_runs"] else ""
            cells = f"{seconds_cell(res['fp32'], 2)} | {seconds_cell(res['bf16'], 2)} | {mark}{t16 / t32:.2f}x"
            rows.append(f"| {method} | {cells} | {100 * same:.2f} % |")
    return rows


@contextmanager
def weights(args: argparse.Namespace) -> Iterator[None]:
    if args.weights_dir:
        folder = Path(args.weights_dir)
        folder.mkdir(parents=True, exist_ok=True)
        args.paths = write_weights_for(folder, args.quick, _measured(args))
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.paths = write_weights_for(Path(tmp), args.quick, _measured(args))
        yield


def _measured(args: argparse.Namespace) -> list[str]:
    """The methods a run measures (memory and latency: COMPARED); their weights are written."""
    import ovss

    methods = (args.methods or ovss.available_methods()) if args.mode in ("precision", "all") else []
    return [*COMPARED, *methods]


MODES = {"memory": bench_memory, "latency": bench_latency, "precision": bench_precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=[*MODES, "all"])
    parser.add_argument("--quick", action="store_true", help="tiny models and a small image (smoke test)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every measurement (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (median)")
    add_methods_flag(parser, None)  # the precision mode's methods (default: every registered one)
    parser.add_argument("--weights-dir", help="write / reuse the random checkpoints here instead of a temp folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with weights(args):
        for mode in MODES if args.mode == "all" else [args.mode]:
            print(f"\n### {mode}{' (quick)' if args.quick else ''}, {args.threads} threads\n", flush=True)
            print("\n".join(MODES[mode](args)), flush=True)


if __name__ == "__main__":
    main()
