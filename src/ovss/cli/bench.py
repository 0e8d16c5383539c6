"""``ovss bench``: seconds per image, peak RSS, windows and FLOP-bound time per method and precision, and text times.

Thin over :mod:`ovss.cli.bench_harness`: every number comes from a fresh process running what users run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ovss.cli.options import (
    add_device_flags,
    add_methods_flag,
    add_setting_flags,
    add_weight_flags,
    dtypes_of,
    methods_of,
    options_of,
    pipeline_of,
)
from ovss.errors import OvssError


class _DefaultPrecisions(str):
    """``--dtype``'s default in bench (a value the user gives is a plain ``str``): on a GPU it means fp32,fp16,bf16."""


DEFAULT_PRECISIONS = _DefaultPrecisions("fp32,bf16")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="time every method (seconds per image, peak RSS, FLOP-bound ratio) and the text encoder",
        description=(
            "Measure what users run, each (method, precision) in a fresh process: seconds per image "
            "(set_image + predict, median after a warm-up), peak RSS, windows, matrix-product FLOPs and the "
            "FLOP-bound time at this machine's measured matmul peaks; and the text encoder's cold and warm "
            "times for 20 names. Uses ViT-B/16 and dino-vitb8 when cached, else full-size random weights "
            "of the same shapes (said in the output; time and memory do not depend on the values). Before each "
            "measurement it waits for a quiet machine; a timed run during which other processes used the CPU is "
            "redone, and a result that stayed disturbed is marked ~. --device cuda: synchronised GPU timing, "
            "fp32,fp16,bf16 by default, GPU memory, and a comparison with the GLA-CLIP paper's Table 11."
        ),
    )
    g = p.add_argument_group("methods and weights")
    add_methods_flag(g, None)
    add_weight_flags(g, clip_default=None, act=False, offline=False)  # the jobs never download
    add_device_flags(g, device=True, dtype_default="fp32,bf16", several=True)
    p.set_defaults(dtype=DEFAULT_PRECISIONS)  # fp32,bf16; on a GPU fp32,fp16,bf16
    p.add_argument("--size", default="512x512", metavar="HxW", help="random test image size (default 512x512)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every measurement (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; the median is reported")
    p.add_argument("--quick", action="store_true", help="tiny random models and a small image (a smoke test)")
    p.add_argument("--random", action="store_true", help="full-size random weights even when real ones are cached")
    p.add_argument("--no-text", action="store_true", help="skip the text-encoder timing")
    p.add_argument("--weights-dir", help="write / reuse the random checkpoints here instead of a temporary folder")
    q = p.add_argument_group("quiet machine (other processes' CPU, from /proc/stat; unavailable without /proc)")
    q.add_argument("--max-other-load", type=float, default=0.10, metavar="CORES",
                   help="a timed run during which other processes used more cores than this on average is "
                   "disturbed and redone (default 0.10: 10%% of one core)")  # fmt: skip
    q.add_argument("--max-redos", type=int, default=3, help="disturbed runs redone per result at most (default 3)")
    q.add_argument("--quiet-wait", type=float, default=60.0, metavar="SECONDS",
                   help="longest wait for a quiet machine before each measurement (default 60; 0: none)")  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="also write the full record as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    add_setting_flags(p)  # every method gets the pipeline settings and the --opt options it declares
    p.set_defaults(func=run_bench)


def _check_args(
    args: argparse.Namespace,
) -> tuple[list[str], list[str], dict[str, Any], dict[str, dict[str, Any]], Path | None]:
    """Every argument error, raised before any measurement starts."""
    from ovss.api import check_device

    device = check_device(args.device)  # --device cuda without CUDA: one line, before anything runs
    args.device = str(device)
    if isinstance(args.dtype, _DefaultPrecisions) and device.type == "cuda":  # --dtype not given, on a GPU
        args.dtype = "fp32,fp16,bf16"
    precisions = dtypes_of(args)
    parts = args.size.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise OvssError(f"--size must be HEIGHTxWIDTH in pixels, e.g. 512x683; got {args.size!r}")
    if args.threads < 1 or args.repeats < 1:
        raise OvssError("--threads and --repeats must be >= 1")
    if args.max_other_load < 0 or args.max_redos < 0 or args.quiet_wait < 0:
        raise OvssError("--max-other-load, --max-redos and --quiet-wait must be >= 0")
    out = Path(args.json).expanduser() if args.json else None
    if out is not None:
        if out.exists() and not args.overwrite:
            raise OvssError(f"{out} exists; pass --overwrite to replace it or choose another --json path")
        if out.is_dir():
            raise OvssError(f"--json {out} is a folder; give a file path")
        if not out.parent.is_dir():
            raise OvssError(f"--json {out}: the folder {out.parent} does not exist")
    methods = methods_of(args)
    settings = pipeline_of(args)
    options = {method: options_of(args, method, methods) for method in methods}  # each method: the ones it has
    if not args.clip or args.tokenizer is not None:  # the jobs load the vocabulary: a missing one fails here, once
        from ovss.text.tokenizer import load_tokenizer

        load_tokenizer(args.tokenizer, download=False)  # parsed once here: a corrupt file fails before any job
    return methods, precisions, settings, options, out


def _weights(args: argparse.Namespace, folder: Path, methods: list[str]) -> dict[str, Any]:
    """Which weights the jobs load: the given ones, the cached registry files the methods ask for, or random
    stand-ins for them written to ``folder`` (each method asks for its own roles: ``MethodSpec.weights``)."""
    from ovss.cli.bench_weights import write_random_weights
    from ovss.methods.registry import needed_weights
    from ovss.storage import hub

    given = {"clip": args.clip, "vfm": args.vfm, "sam": args.sam}
    names = needed_weights(methods, given)
    cached = all((hub.cache_dir() / hub.REGISTRY[n].filename).is_file() for n in names if n in hub.REGISTRY)
    if not (args.random or args.quick) and (args.clip or cached):  # real weights: given, else the cached ones
        kind = f"given ({args.clip})" if args.clip else f"real (cached {', '.join(names)})"
        return {**given, "files": {}, "kind": kind}
    files = write_random_weights(folder, quick=args.quick, names=names)
    if args.quick:
        return {**given, "files": files, "kind": "random tiny (--quick)"}
    return {**given, "files": files, "kind": f"random full-size {' + '.join(files)} (not cached)"}


def run_bench(args: argparse.Namespace) -> int:
    from ovss.cli.bench_harness import SMOKE_ENV, MeasurementError, measure, measure_many, quick_settings
    from ovss.cli.bench_machine import (
        QuietPolicy,
        machine_info,
        machine_line,
        proc_load_source,
        quiet_check_line,
        wait_for_quiet,
    )
    from ovss.cli.bench_report import (
        paper_comparison,
        peaks_line,
        row,
        settle_peaks,
        summary_line,
        table_head,
        with_bound,
    )

    methods, precisions, settings, options, out = _check_args(args)
    device = str(args.device)
    gpu = device.startswith("cuda")
    user_settings = settings  # what the user set (--quick's defaults yield to it)
    if args.quick:
        settings = {"short_side": 112, "crop": 56, "stride": 28, **settings}
    size = "112x112" if args.quick and args.size == "512x512" else args.size
    wait = 0.0 if args.quick else args.quiet_wait  # --quick: a smoke test, no wait (its runs are still checked)
    policy = QuietPolicy(max_other=args.max_other_load, max_redos=args.max_redos, wait_seconds=wait)
    load = proc_load_source([os.getpid()])  # in this process: every other process (no measurement runs yet)
    waits: list[dict[str, Any]] = []

    def quiet() -> None:
        if policy.wait_seconds > 0:
            waits.append(wait_for_quiet(load, policy, _progress))

    machine = machine_info(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.weights_dir).expanduser() if args.weights_dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)

        weights = _weights(args, folder, methods)
        roles = ("clip", "vfm", "sam", "files")
        base = {"threads": args.threads, "tokenizer": args.tokenizer, "device": device, "policy": asdict(policy)}
        base.update({k: weights[k] for k in roles})
        print(f"weights: {weights['kind']}; {args.threads} threads; image {size} (random pixels); {device}")
        if args.quick:
            print("--quick: a smoke test; the image runs share one process (peak RSS is not per method)")
        print(quiet_check_line(load, policy), flush=True)
        try:
            _progress("measuring the matrix-product peaks ...")
            quiet()
            env = SMOKE_ENV if args.quick else None  # --quick: a smoke test, also on a loaded machine
            dtypes = ["float32", "bfloat16"] + (["float16"] if gpu or "fp16" in precisions else [])
            peak_job = {**base, "kind": "peaks", "dtypes": dtypes, "quick": args.quick}
            peaks = measure(peak_job, env)
            machine.update(peaks["gpu_info"] or {})  # read in the measurement process: this one never starts CUDA
            rates: dict[str, float] = dict(peaks["gflops"])
            print(f"{machine_line(machine)}\n{peaks_line(peaks)}\n\n{table_head(gpu)}", flush=True)
            jobs = []
            for method in methods:
                for precision in precisions:
                    job = {**base, "kind": "image", "method": method, "dtype": precision, "image": size}
                    own = {**settings, **options[method]}
                    if args.quick:
                        own = quick_settings(method, own, {**user_settings, **options[method]})
                    jobs.append({**job, "repeats": args.repeats, "settings": own})

            def started(i: int, job: dict[str, Any]) -> None:
                quiet()
                _progress(f"[{i + 1}/{len(jobs)}] {job['method']} {job['dtype']} ...")

            def remeasure() -> dict[str, float]:
                _progress("a run beat its FLOP bound: measuring the peaks again ...")
                quiet()
                return dict(measure({**peak_job, "repeats": 5}, env)["gflops"])

            runs, notes = [], []
            for r in measure_many(jobs, one_process=args.quick, started=started, env=env):  # --quick: one process
                rates, note = settle_peaks(r, rates, None if args.quick else remeasure)
                notes += [note] if note else []
                runs.append(with_bound(r, rates))
                print(row(runs[-1]), flush=True)
            runs = [with_bound(r, rates) for r in runs]  # every ratio at the final peaks
            if notes:
                print("\n" + "\n".join(notes) + "; the table at the final peaks:\n\n" + table_head(gpu))
                print("\n".join(row(r) for r in runs))
            print("\n" + summary_line(runs, load is not None and peaks["quiet_check"]), flush=True)
            if gpu:
                print("\n" + "\n".join(paper_comparison(runs)), flush=True)
            if not args.no_text:
                _progress("text encoder: 20 names, cold then warm ...")
                quiet()
            text = None if args.no_text else _text_times({**base, "kind": "text", "settings": settings}, policy, env)
        except MeasurementError as err:
            raise OvssError(str(err).replace("\n", " | ")) from err
    record = {
        "weights": weights["kind"],
        "threads": args.threads,
        "device": device,
        "image": size,
        "settings": settings,
        "options": {method: own for method, own in options.items() if own},  # --opt options, per method
        "machine": machine,
        "versions": _versions(),
        "quiet": {**asdict(policy), "available": load is not None, "waits": waits},
        "peaks": {**peaks, "notes": notes},
        "peak_gflops": rates,  # the peaks every FLOP bound uses (measured; raised where a run beat them)
        "runs": runs,
        "text": text,
    }
    if out is not None:
        from ovss.storage.files import save_text

        save_text(out, json.dumps(record, indent=2) + "\n")
        print(f"\nwrote {out}")
    return 0


def _progress(line: str) -> None:
    """A progress line on stderr (the table on stdout stays clean Markdown)."""
    print(f"ovss bench: {line}", file=sys.stderr, flush=True)


def _text_times(job: dict[str, Any], policy: Any, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Cold and warm ``encode_names`` times: one process twice without the disk cache (cold, then the in-memory
    hit), then with it: a process that fills it (or finds it filled) and a fresh one that reads it. A cold
    process whose first call other processes disturbed is run again (``policy.max_redos`` times at most)."""
    from ovss.cli.bench_harness import TEXT_NAMES, measure

    redone = 0
    while True:
        first = measure(job, env={**(env or {}), "OVSS_TEXT_CACHE": "0"})  # cold even when an earlier run cached
        if not first["disturbed"][0] or redone >= policy.max_redos:
            break
        redone += 1
    measure(job, env)  # fills the disk cache
    second = measure(job, env)
    calls = {"cold": (first, 0), "warm_same_process": (first, 1), "warm_new_process": (second, 0)}
    text = {
        "names": len(TEXT_NAMES),
        "templates": first["templates"],
        "cold_seconds": first["first_seconds"],
        "warm_same_process_seconds": first["second_seconds"],
        "warm_new_process_seconds": second["first_seconds"],
        "background_cores": {name: r["background_cores"][i] for name, (r, i) in calls.items()},
        "disturbed": {name: r["disturbed"][i] for name, (r, i) in calls.items()},
        "redone": redone,
    }
    mark = {name: "~" if bad else "" for name, bad in text["disturbed"].items()}
    print(
        f"\ntext, {text['names']} names x {text['templates']} templates: cold {mark['cold']}"
        f"{text['cold_seconds']:.2f} s, warm (same process) {mark['warm_same_process']}"
        f"{text['warm_same_process_seconds']:.4f} s, warm (new process) {mark['warm_new_process']}"
        f"{text['warm_new_process_seconds']:.2f} s; cold run redone {redone}x"
        + ("; ~: disturbed by other processes" if any(text["disturbed"].values()) else ""),
        flush=True,
    )
    return text


def _versions() -> dict[str, str]:
    import torch

    from ovss import __version__

    return {"ovss": __version__, "torch": torch.__version__}
