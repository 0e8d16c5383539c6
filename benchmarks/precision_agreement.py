"""Agreement of reduced-precision (bf16 / fp16 autocast) predictions with fp32, per image and overall.

    python benchmarks/precision_agreement.py IMAGES_DIR --method proxyclip+gla --dtype bf16 \
        --labels-file classes.txt [--clip ViT-B/16] [--vfm dino-vitb8]

Target (GLA issue): >= 99.5 % of pixels agree on the test images with the real weights. Extra keyword
arguments of ``ovss.load`` can be given as ``--opt key=value``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ovss
from ovss.cli.options import parse_method_options
from ovss.cli.segment import collect_inputs
from ovss.labels import read_labels_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--labels-file", required=True)
    parser.add_argument("--method", default="proxyclip+gla")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--clip", default="ViT-B/16")
    parser.add_argument("--vfm", default=None)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--opt", action="append", default=[])
    args = parser.parse_args()
    classes = read_labels_file(args.labels_file, allow_duplicates=True)
    kw = dict(
        clip=args.clip,
        vfm=args.vfm,
        tokenizer=args.tokenizer,
        device=args.device,
        **parse_method_options(args.opt, args.method),
    )
    full = ovss.load(args.method, **kw)
    reduced = ovss.load(args.method, dtype=args.dtype, **kw)
    agree = total = 0
    per_image = {}
    for path in collect_inputs(args.images):
        a = full.predict(path, classes).labels
        b = reduced.predict(path, classes).labels
        same = int((a == b).sum())
        per_image[Path(path).name] = round(100.0 * same / a.numel(), 3)
        agree, total = agree + same, total + a.numel()
    print(
        json.dumps(
            {
                "method": args.method,
                "dtype": args.dtype,
                "agreement_pct": round(100.0 * agree / total, 3),
                "per_image_pct": per_image,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
