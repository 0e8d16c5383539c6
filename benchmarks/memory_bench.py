"""Peak memory of one ``predict`` on a large photo with many classes (issue 9, "Memory").

    python benchmarks/memory_bench.py [--size 2000] [--classes 171] [--method clearclip] [--logits none]
    python benchmarks/memory_bench.py --quick    # tiny weights, 160 x 160, 5 classes: a smoke test in seconds

Builds a random full-size CLIP ViT-B/16 (OpenAI layout, 12 + 12 blocks, 768 / 512 wide), saves it as a
plain OpenAI ``.pt`` file in a temporary folder, writes a random ``size x size`` PNG, and measures with an
``ovss.cli.bench_harness`` image job in a fresh Python process (2 threads):
``ovss.load(method, clip=FILE)``, then ``set_image(PNG)`` + ``predict(labels, text_embeddings=T)``.
The text embeddings are random unit rows, so the 171 x 80 prompt encodings (minutes on a CPU, and not the
pixel pipeline this measures) are skipped; the text tower is still loaded. Peak RSS is read from the OS
(``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs`` after loading), so the row
reports the load peak, the predict peak and the whole-process peak separately, as a Markdown table row.
Target: 2000 x 2000, 171 classes, ClearCLIP, whole-process peak under 1.5 GB.

    python benchmarks/memory_bench.py --cli [--size 9000] [--height 3000] [--max-mb 2000] [--quick]

``--cli`` (issue 21, "Memory on big photos") measures the whole ``ovss segment`` command instead: random
full-size ViT-B/16 weights (``ovss.cli.bench_weights.write_random_weights``; ``--quick``: the tiny ones), a
smooth random ``size x height`` photo (a PNG of a few MB per 10 megapixels, like a photo's), 3 classes with
the imagenet7 templates, run as ``python -m ovss segment`` in a fresh process (2 threads); the peak RSS is
the child's ``ru_maxrss`` from the OS (``os.wait4``), load, decode, windows, labels and both PNGs included.
``--max-mb``: exit 1 when the peak is above it. Target: 9000 x 9000, ViT-B/16, under 2000 MB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import child_env, vocab_path

from ovss.cli.bench_harness import MeasurementError, measure
from ovss.cli.bench_report import seconds_cell
from ovss.cli.bench_weights import random_clip_state_dict
from ovss.cli.options import add_method_flag, method_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2000, help="image side in pixels (square image)")
    parser.add_argument("--classes", type=int, default=171, help="number of classes (one name each)")
    add_method_flag(parser)
    parser.add_argument(
        "--logits",
        default="none",
        choices=["none", "fp16", "fp32"],
        help="also build the full-resolution logits in this dtype (as --save-logits does)",
    )
    parser.add_argument("--width", type=int, default=768, help="vision width (768 = ViT-B; smaller for a dry run)")
    parser.add_argument("--quick", action="store_true", help="tiny weights and image unless given (smoke test)")
    parser.add_argument("--cli", action="store_true", help="measure the whole `ovss segment` command (see above)")
    parser.add_argument("--height", type=int, default=None, help="--cli: image rows (default: --size, square)")
    parser.add_argument("--max-mb", type=float, default=None, help="--cli: exit 1 when the peak RSS is above this")
    args = parser.parse_args()
    if args.cli:
        cli_main(args)
        return
    if args.quick:  # the defaults become tiny; explicit values stay
        args.size = 160 if args.size == 2000 else args.size
        args.classes = 5 if args.classes == 171 else args.classes
        args.width = 128 if args.width == 768 else args.width
    sizes = (args.width, 12, 128, 1, 64) if args.quick else (args.width, 12, 512, 12, 512)  # vision, text, E

    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip_path = folder / "ViT-B-16-random.pt"
        torch.save(random_clip_state_dict(*sizes), clip_path)
        rng = np.random.default_rng(0)
        image_path = folder / "photo.png"
        Image.fromarray(rng.integers(0, 256, size=(args.size, args.size, 3), dtype=np.uint8)).save(image_path)
        job = {
            "kind": "image",
            "threads": 2,
            "method": method_of(args),
            "clip": str(clip_path),
            "tokenizer": vocab_path(),
            "image": str(image_path),
            "classes": args.classes,
            "logits": None if args.logits == "none" else args.logits,
            "warmup": 0,
            "repeats": 1,
            "count_flops": False,
        }
        try:
            r = measure(job)
        except MeasurementError as err:
            sys.exit(str(err))
    mb = 2.0**20
    load_peak, run_peak = r["load_peak_rss_bytes"] / mb, (r["run_peak_rss_bytes"] or r["peak_rss_bytes"]) / mb
    print(
        "| method | image | classes | windows | logits | load peak MB | predict peak MB | process peak MB | predict s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {method_of(args)} | {args.size}x{args.size} | {args.classes} | {r['windows']} | {args.logits} "
        f"| {load_peak:.0f} | {run_peak:.0f} | {r['peak_rss_bytes'] / mb:.0f} | {seconds_cell(r, 1)} |"
    )


def smooth_photo(height: int, width: int, seed: int = 0) -> object:
    """A random photo-like PIL image: random colours every 50 pixels, bilinearly interpolated (compresses well)."""
    import numpy as np
    from PIL import Image

    coarse = np.random.default_rng(seed).integers(0, 256, size=(max(height // 50, 2), max(width // 50, 2), 3))
    return Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR)


def segment_peak(command: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    """Run ``command`` as a fresh process; (its peak RSS in bytes from the OS, seconds, its stderr's end)."""
    start = time.perf_counter()
    with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as child:
        assert child.stderr is not None
        stderr = child.stderr.read().decode("utf-8", "replace")
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        sys.exit(f"ovss segment failed ({child.returncode}):\n{stderr[-3000:]}")
    return int(usage.ru_maxrss) * 1024, seconds, stderr  # ru_maxrss: KiB on Linux


def cli_main(args: argparse.Namespace) -> None:
    """``--cli``: the peak RSS of ``ovss segment`` on one large photo, as a Markdown table row."""
    from ovss.cli.bench_weights import write_random_weights

    width = 160 if args.quick and args.size == 2000 else args.size
    height = args.height or width
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip = write_random_weights(folder, quick=args.quick)["ViT-B/16"]
        image_path = folder / f"photo{width}x{height}.png"
        smooth_photo(height, width).save(image_path)  # type: ignore[attr-defined]
        env = child_env(folder / "cache")
        command = [sys.executable, "-m", "ovss", "segment", str(image_path), "--clip", clip]
        command += ["--labels", "sky,road,person", "--templates", "imagenet7", "--out", str(folder / "out")]
        command += ["--no-progress", "--method", method_of(args)]
        tokenizer = vocab_path()
        if tokenizer is not None:
            command += ["--tokenizer", tokenizer]
        peak, seconds, _ = segment_peak(command, env)
    weights = "ViT-B/16 tiny" if args.quick else "ViT-B/16"
    peak_mb = peak / 2.0**20
    print("| command | weights | image | megapixels | peak RSS MB | seconds |")
    print("|---|---|---|---|---|---|")
    print(
        f"| ovss segment | {weights} | {width}x{height} | {width * height / 1e6:.1f} | {peak_mb:.0f} | {seconds:.1f} |"
    )
    if args.max_mb is not None and peak_mb > args.max_mb:
        sys.exit(f"peak RSS {peak_mb:.0f} MB is above --max-mb {args.max_mb:.0f}")


if __name__ == "__main__":
    main()
