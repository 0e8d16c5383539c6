"""``ovss segment``: label every pixel of an image, a folder of images, or a bundled example photo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ovss.cli.options import add_model_flags, load_kwargs
from ovss.errors import OvssError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
EXAMPLES = ("astronaut", "chelsea", "coffee", "motorcycle_left", "rocket", "cat")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "segment",
        help="segment images with free-form labels",
        description="Segment an image, a folder of images, or a scikit-image example photo. Writes per image "
        "<stem>.png (palette PNG of class ids), <stem>_overlay.png (colours + legend) and, with --save-logits, "
        "<stem>_logits.npy (Q x H x W cosine logits); plus config.json with the resolved configuration.",
    )
    p.add_argument("inputs", nargs="*", help="image files and/or folders of images")
    p.add_argument("--example", choices=EXAMPLES, help="segment a photo bundled with scikit-image instead")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='classes separated by commas, synonyms by "|": "sky, road, person|pedestrian"')
    labels.add_argument(
        "--labels-file",
        "--labels_file",
        dest="labels_file",
        help="one class per line, synonyms separated by commas",
    )
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument(
        "--save-logits",
        "--save_logits",
        dest="save_logits",
        action="store_true",
        help="also write the full-resolution name logits as .npy",
    )
    p.add_argument(
        "--logits-dtype",
        "--logits_dtype",
        dest="logits_dtype",
        choices=["fp32", "fp16"],
        default="fp32",
        help="dtype of the --save-logits file (fp16: half the size and memory; default fp32)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours (default 0.5)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    add_model_flags(p)
    p.set_defaults(func=run)


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Expand folders into their image files (sorted); missing paths raise OvssError."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise OvssError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise OvssError(f"input {item!r} does not exist")
    return files


def example_image(name: str) -> np.ndarray:
    """A photo bundled with scikit-image, (H, W, 3) uint8 RGB."""
    try:
        from skimage import data
    except ImportError as err:
        raise OvssError("--example needs scikit-image: pip install 'ovss[examples]'") from err
    image = np.asarray(getattr(data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def write_outputs(out: Path, stem: str, result: Any, rgb: np.ndarray, names: list[str], args: Any) -> None:
    """Write one image's files; every array is computed first, and a failed write removes the image's files."""
    from ovss.io_utils import save_npy, save_png
    from ovss.viz import overlay, save_label_png

    labels = result.labels.numpy()  # (H0, W0) int64
    blended = overlay(rgb, labels, names, alpha=args.alpha)  # (H0, W0 + legend, 3) uint8
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.logits_dtype]
    logits = result.maps.logits(dtype).cpu().numpy() if args.save_logits else None  # (Q, H0, W0)
    written: list[Path] = []
    try:
        written.append(save_label_png(labels, out / f"{stem}.png"))
        written.append(save_png(out / f"{stem}_overlay.png", blended))
        if logits is not None:
            written.append(save_npy(out / f"{stem}_logits.npy", logits))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    import ovss
    from ovss.labels import parse_labels, read_labels_file

    if not args.inputs and not args.example:
        raise OvssError("nothing to segment: give image files/folders or --example NAME")
    classes = parse_labels(args.labels) if args.labels is not None else read_labels_file(args.labels_file)
    jobs: list[tuple[str, Any]] = [(p.stem, p) for p in collect_inputs(args.inputs)]
    if args.example:
        jobs.append((args.example, example_image(args.example)))
    stems = [stem for stem, _ in jobs]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise OvssError(f"several inputs share the file name stem(s) {', '.join(dup)}; outputs would collide")
    segmenter = ovss.load(args.method, **load_kwargs(args))
    segmenter.encode_names([n for c in classes for n in c])  # once, before any image: a vision-only CLIP fails here
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [c[0] for c in classes]
    failures = 0
    from tqdm import tqdm

    bar = tqdm(jobs, desc="segment", unit="img", disable=not args.progress or len(jobs) < 2, file=sys.stderr)
    for stem, source in bar:
        try:
            result = segmenter.predict(source, classes)
        except OvssError as err:
            failures += 1
            tqdm.write(f"ovss: error: {err}", file=sys.stderr)
            continue
        try:
            write_outputs(out, stem, result, segmenter.current_image(), names, args)
        except OSError as err:
            failures += 1
            tqdm.write(f"ovss: error: cannot write outputs for {stem!r} to {out}: {err}", file=sys.stderr)
    record = {**segmenter.config, "classes": classes, "inputs": stems}
    (out / "config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    done = len(jobs) - failures
    print(f"segmented {done} of {len(jobs)} image(s) into {out}", file=sys.stderr)
    return 0 if failures == 0 else 1
