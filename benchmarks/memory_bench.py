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
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from common import vocab_path

from ovss.cli.bench_harness import MeasurementError, measure, random_clip_state_dict
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
    args = parser.parse_args()
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
        f"| {load_peak:.0f} | {run_peak:.0f} | {r['peak_rss_bytes'] / mb:.0f} | {r['seconds']:.1f} |"
    )


if __name__ == "__main__":
    main()
