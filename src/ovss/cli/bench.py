"""``ovss bench``: seconds per image, peak RSS, windows and FLOP-bound time per method and precision, and text times.

Thin over :mod:`ovss.cli.bench_harness`: every number comes from a fresh process running what users run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
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


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="time every method (seconds per image, peak RSS, FLOP-bound ratio) and the text encoder",
        description=(
            "Measure what users run, each (method, precision) in a fresh process: seconds per image "
            "(set_image + predict, median after a warm-up), peak RSS, windows, matrix-product FLOPs and the "
            "FLOP-bound time at this machine's measured matmul peaks; and the text encoder's cold and warm "
            "times for 20 names. Uses ViT-B/16 and dino-vitb8 when cached, else full-size random weights "
            "of the same shapes (said in the output; time and memory do not depend on the values)."
        ),
    )
    g = p.add_argument_group("methods and weights")
    add_methods_flag(g, None)
    add_weight_flags(g, clip_default=None, act=False, offline=False)  # the jobs never download
    add_device_flags(g, device=False, dtype_default="fp32,bf16", several=True)  # CPU measurements
    p.add_argument("--size", default="512x512", metavar="HxW", help="random test image size (default 512x512)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every measurement (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; the median is reported")
    p.add_argument("--quick", action="store_true", help="tiny random models and a small image (a smoke test)")
    p.add_argument("--random", action="store_true", help="full-size random weights even when real ones are cached")
    p.add_argument("--no-text", action="store_true", help="skip the text-encoder timing")
    p.add_argument("--weights-dir", help="write / reuse the random checkpoints here instead of a temporary folder")
    p.add_argument("--json", metavar="PATH", help="also write the full record as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    add_setting_flags(p)  # every method gets the pipeline settings and the --opt options it declares
    p.set_defaults(func=run_bench)


def _check_args(
    args: argparse.Namespace,
) -> tuple[list[str], list[str], dict[str, Any], dict[str, dict[str, Any]], Path | None]:
    """Every argument error, raised before any measurement starts."""
    precisions = dtypes_of(args)
    parts = args.size.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise OvssError(f"--size must be HEIGHTxWIDTH in pixels, e.g. 512x683; got {args.size!r}")
    if args.threads < 1 or args.repeats < 1:
        raise OvssError("--threads and --repeats must be >= 1")
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
    from ovss.cli.bench_harness import (
        SMOKE_ENV,
        MeasurementError,
        flop_bound_seconds,
        measure,
        measure_many,
        quick_settings,
    )

    methods, precisions, settings, options, out = _check_args(args)
    user_settings = settings  # what the user set (--quick's defaults yield to it)
    if args.quick:
        settings = {"short_side": 112, "crop": 56, "stride": 28, **settings}
    size = "112x112" if args.quick and args.size == "512x512" else args.size
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.weights_dir).expanduser() if args.weights_dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)

        weights = _weights(args, folder, methods)
        roles = ("clip", "vfm", "sam", "files")
        base = {"threads": args.threads, "tokenizer": args.tokenizer, **{k: weights[k] for k in roles}}
        print(f"weights: {weights['kind']}; {args.threads} threads; image {size} (random pixels)", flush=True)
        if args.quick:
            print("--quick: a smoke test; the image runs share one process (peak RSS is not per method)", flush=True)
        try:
            _progress("measuring the matrix-product peaks ...")
            env = SMOKE_ENV if args.quick else None  # --quick: a smoke test, also on a loaded machine
            peaks = measure({**base, "kind": "peaks", "size": 512 if args.quick else 2048}, env)
            print(f"matmul peak: fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s\n")
            print("| method | precision | image | windows | s / image | peak RSS (GiB) | GFLOP | FLOP-bound (s) "
                  "| × bound |\n|---|---|---|---|---|---|---|---|---|", flush=True)  # fmt: skip
            jobs = []
            for method in methods:
                for precision in precisions:
                    job = {**base, "kind": "image", "method": method, "dtype": precision, "image": size}
                    own = {**settings, **options[method]}
                    if args.quick:
                        own = quick_settings(method, own, {**user_settings, **options[method]})
                    jobs.append({**job, "repeats": args.repeats, "settings": own})

            def started(i: int, job: dict[str, Any]) -> None:
                _progress(f"[{i + 1}/{len(jobs)}] {job['method']} {job['dtype']} ...")

            runs = []
            for r in measure_many(jobs, one_process=args.quick, started=started, env=env):  # --quick: one process
                r["flop_bound_seconds"] = bound = flop_bound_seconds(r["flops"], peaks)
                r["bound_ratio"] = r["seconds"] / bound if bound > 0 else None
                runs.append(r)
                print(_row(r), flush=True)
            if not args.no_text:
                _progress("text encoder: 20 names, cold then warm ...")
            text = None if args.no_text else _text_times({**base, "kind": "text", "settings": settings}, env)
        except MeasurementError as err:
            raise OvssError(str(err).replace("\n", " | ")) from err
    record = {
        "weights": weights["kind"],
        "threads": args.threads,
        "image": size,
        "settings": settings,
        "options": {method: own for method, own in options.items() if own},  # --opt options, per method
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "versions": _versions(),
        "peak_gflops": peaks,
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


def _row(r: dict[str, Any]) -> str:
    """One Markdown table row of an image measurement."""
    from ovss.cli.bench_harness import GIB

    gflop = sum(r["flops"].values()) / 1e9
    ratio = f"{r['bound_ratio']:.2f}×" if r["bound_ratio"] else "-"
    return (
        f"| {r['method']} | {r['precision']} | {r['image']} | {r['windows']} | {r['seconds']:.3f} "
        f"| {r['peak_rss_bytes'] / GIB:.2f} | {gflop:.1f} | {r['flop_bound_seconds']:.3f} | {ratio} |"
    )


def _text_times(job: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Cold and warm ``encode_names`` times: one process twice without the disk cache (cold, then the in-memory
    hit), then with it: a process that fills it (or finds it filled) and a fresh one that reads it."""
    from ovss.cli.bench_harness import TEXT_NAMES, measure

    first = measure(job, env={**(env or {}), "OVSS_TEXT_CACHE": "0"})  # cold even when an earlier run cached them
    measure(job, env)  # fills the disk cache
    second = measure(job, env)
    text = {
        "names": len(TEXT_NAMES),
        "templates": first["templates"],
        "cold_seconds": first["first_seconds"],
        "warm_same_process_seconds": first["second_seconds"],
        "warm_new_process_seconds": second["first_seconds"],
    }
    print(
        f"\ntext, {text['names']} names x {text['templates']} templates: cold {text['cold_seconds']:.2f} s, "
        f"warm (same process) {text['warm_same_process_seconds']:.4f} s, "
        f"warm (new process) {text['warm_new_process_seconds']:.2f} s",
        flush=True,
    )
    return text


def _versions() -> dict[str, str]:
    import torch

    from ovss import __version__

    return {"ovss": __version__, "torch": torch.__version__}
