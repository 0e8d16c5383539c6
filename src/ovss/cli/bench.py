"""``ovss bench``: seconds per image, peak RSS, windows and FLOP-bound time per method and precision, and text times.

Thin over :mod:`ovss.bench`: every number comes from a fresh process running what users run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from ovss.errors import OvssError

PRECISIONS = ("fp32", "bf16", "fp16")


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
    p.add_argument("--methods", help="comma-separated methods (default: every registered one); see `ovss methods`")
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16 (default fp32,bf16)")
    p.add_argument("--size", default="512x512", metavar="HxW", help="random test image size (default 512x512)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every measurement (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; the median is reported")
    p.add_argument("--quick", action="store_true", help="tiny random models and a small image (a smoke test)")
    p.add_argument("--random", action="store_true", help="full-size random weights even when real ones are cached")
    p.add_argument("--clip", help="CLIP weights to use (name or file) instead of the cached ViT-B/16 / random ones")
    p.add_argument("--vfm", help="VFM weights for DINO-guided methods (name or file)")
    p.add_argument("--tokenizer", help="CLIP BPE vocabulary (.txt.gz) or HF tokenizer folder (default: cached)")
    p.add_argument("--no-text", action="store_true", help="skip the text-encoder timing")
    p.add_argument("--weights-dir", help="write / reuse the random checkpoints here instead of a temporary folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline setting for every method, e.g. --set crop=224 --set short_side=none")  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="also write the full record as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=run_bench)


def _methods(text: str | None) -> list[str]:
    from ovss.methods import available_methods
    from ovss.methods.registry import get_method

    if not text:
        return available_methods()
    names = [m.strip() for m in text.split(",") if m.strip()]
    for name in names:
        get_method(name)  # an unknown name fails here, with the closest names
    return names


def _settings(pairs: list[str]) -> dict[str, Any]:
    from ovss.config import PIPELINE_KEYS, PipelineConfig
    from ovss.fields import field_types, parse_text

    hints = field_types(PipelineConfig)
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in PIPELINE_KEYS:
            raise OvssError(f"--set expects KEY=VALUE with KEY one of {', '.join(PIPELINE_KEYS)}; got {pair!r}")
        out[key] = parse_text(f"--set {key}", raw, hints[key])
    return out


def _check_args(args: argparse.Namespace) -> tuple[list[str], list[str], dict[str, Any], Path | None]:
    """Every argument error, raised before any measurement starts."""
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise OvssError(f"--precision takes a comma-separated list of {', '.join(PRECISIONS)}; got {args.precision!r}")
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
    methods = _methods(args.methods)
    settings = _settings(args.set)
    if not args.clip or args.tokenizer is not None:  # the jobs load the vocabulary: a missing one fails here, once
        from ovss.text.tokenizer import load_tokenizer

        load_tokenizer(args.tokenizer, download=False)  # parsed once here: a corrupt file fails before any job
    return methods, precisions, settings, out


def _weights(args: argparse.Namespace, folder: Path, sam: bool) -> dict[str, Any]:
    """Which weights the jobs load: the given ones, the cached real ones, or random ones written to ``folder``."""
    from ovss import hub
    from ovss.bench import write_random_weights

    cached = all((hub.cache_dir() / hub.REGISTRY[n].filename).is_file() for n in (hub.DEFAULT_CLIP, hub.DEFAULT_VFM))
    if args.clip:
        return {"clip": args.clip, "vfm": args.vfm, "kind": f"given ({args.clip})"}
    if cached and not (args.random or args.quick):
        return {"clip": hub.DEFAULT_CLIP, "vfm": args.vfm, "kind": "real (cached ViT-B/16, dino-vitb8)"}
    paths = write_random_weights(folder, quick=args.quick, sam=sam)
    kind = "random tiny (--quick)" if args.quick else "random full-size ViT-B/16 + DINO ViT-B/8 (not cached)"
    if sam and not args.quick:
        kind = kind.replace(" (not", " + DINO ViT-B/16 + SAM ViT-B (not")
    return {**paths, "vfm": args.vfm or paths["vfm"], "kind": kind}


def run_bench(args: argparse.Namespace) -> int:
    from ovss.bench import SMOKE_ENV, MeasurementError, flop_bound_seconds, measure, measure_many

    methods, precisions, settings, out = _check_args(args)
    if args.quick:
        settings = {"short_side": 112, "crop": 56, "stride": 28, **settings}
    size = "112x112" if args.quick and args.size == "512x512" else args.size
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.weights_dir).expanduser() if args.weights_dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        from ovss.methods.registry import get_method

        weights = _weights(args, folder, sam=any(get_method(m).needs_sam for m in methods))
        roles = ("clip", "vfm", "vfm16", "sam")
        base = {"threads": args.threads, "tokenizer": args.tokenizer, **{k: weights.get(k) for k in roles}}
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
                    own = settings
                    if args.quick and get_method(method).needs_sam:  # Trident's windows: multiples of 16 pixels
                        own = {**settings, "crop": 64, "stride": 32}
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
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "versions": _versions(),
        "peak_gflops": peaks,
        "runs": runs,
        "text": text,
    }
    if out is not None:
        from ovss.io_utils import save_text

        save_text(out, json.dumps(record, indent=2) + "\n")
        print(f"\nwrote {out}")
    return 0


def _progress(line: str) -> None:
    """A progress line on stderr (the table on stdout stays clean Markdown)."""
    print(f"ovss bench: {line}", file=sys.stderr, flush=True)


def _row(r: dict[str, Any]) -> str:
    """One Markdown table row of an image measurement."""
    from ovss.bench import GIB

    gflop = sum(r["flops"].values()) / 1e9
    ratio = f"{r['bound_ratio']:.2f}×" if r["bound_ratio"] else "-"
    return (
        f"| {r['method']} | {r['precision']} | {r['image']} | {r['windows']} | {r['seconds']:.3f} "
        f"| {r['peak_rss_bytes'] / GIB:.2f} | {gflop:.1f} | {r['flop_bound_seconds']:.3f} | {ratio} |"
    )


def _text_times(job: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Cold and warm ``encode_names`` times: one process twice without the disk cache (cold, then the in-memory
    hit), then with it: a process that fills it (or finds it filled) and a fresh one that reads it."""
    from ovss.bench import TEXT_NAMES, measure

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
