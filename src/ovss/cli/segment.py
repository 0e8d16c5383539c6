"""``ovss segment``: label every pixel of an image, a folder of images, or a bundled example photo.

Order of work, so that a mistake costs one line and no file: parse the labels, collect the inputs, plan
every output path (refusing to replace an input image, or an earlier run's file without ``--resume`` or
``--overwrite``), check that the output folder can be written, build the segmenter (which checks that the
models fit together) and encode the labels once; only then read and segment the images
(:mod:`ovss.cli.segment_run`). The output folder and ``config.json`` appear only once an image was segmented.

A run splits over processes with ``--shard I/N`` and/or ``torchrun`` (:mod:`ovss.cli.segment_shard`); every
process takes its own images of the full ordered list and one writes the run-level files at the end.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ovss.cli.main import one_shot_process
from ovss.cli.options import add_model_flags, load_kwargs
from ovss.cli.segment_run import Outcome, SegmentRun, finished_images, output_options, run_key, segment_images
from ovss.cli.segment_shard import Shard, finish_shard, forget_shard, parse_shard
from ovss.errors import OvssError

if TYPE_CHECKING:
    import numpy as np

    from ovss.distributed import DistContext

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
# --example NAME -> scikit-image loader; only photos shipped inside scikit-image (no download).
EXAMPLES = {"astronaut": "astronaut", "cat": "cat", "chelsea": "chelsea", "coffee": "coffee", "rocket": "rocket"}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "segment",
        help="segment images with free-form labels",
        description="Segment an image, a folder of images, or a scikit-image example photo. Writes per image "
        "<stem>.png (label map: class ids, 255 = unlabelled; 16-bit beyond 255 classes), <stem>_overlay.png "
        "(colours + legend) and on request <stem>_logits.npy, <stem>_masks/ and <stem>.json; plus config.json "
        "with the resolved configuration. Never replaces an input image; replaces earlier outputs only with "
        "--overwrite.",
    )
    p.add_argument("inputs", nargs="*", help="image files and/or folders of images")
    p.add_argument("--example", help=f"segment a photo bundled with scikit-image: {', '.join(EXAMPLES)}")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='classes separated by commas, synonyms by "|": "sky, road, person|pedestrian"')
    labels.add_argument(
        "--labels-file",
        "--labels_file",
        dest="labels_file",
        help="one class per line; synonyms separated by '|', ';' or ',' (as in the release name files); "
        "the same reader as `ovss eval --names`",
    )
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run in --out")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out: skip the images finished with the same configuration, "
        "redo the others",
    )
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
    p.add_argument(
        "--save-masks", dest="save_masks", action="store_true", help="also write one binary PNG mask per class"
    )
    p.add_argument(
        "--save-json", dest="save_json", action="store_true", help="also write <stem>.json with each class's area"
    )
    p.add_argument(
        "--background",
        metavar="NAME",
        help="the class that gets pixels below --bg-threshold (default: a class named 'background' if any, "
        "else they stay unlabelled: 255 in the label map, untinted in the overlay)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours (default 0.5)")
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="segment only shard I of N (0-based, 0 <= I < N: image k of the sorted inputs when k %% N == I), for "
        "independent processes or a SLURM array (--shard $SLURM_ARRAY_TASK_ID/N); the last shard to finish "
        "writes config.json; under torchrun each shard's images are split further over the ranks",
    )
    p.add_argument(
        "--read-ahead",
        "--read_ahead",
        dest="read_ahead",
        type=int,
        metavar="N",
        help="images decoded and resized on a worker thread while the model runs (default: 2 on a CUDA "
        "device, 0 on the CPU, where the model's threads already use every core; 0: read each image when "
        "its turn comes)",
    )
    p.add_argument(
        "--pool-windows",
        "--pool_windows",
        dest="pool_windows",
        action="store_true",
        help="put the windows of consecutive images into the same backbone forwards (up to --window-batch): "
        "for large window batches on a GPU; same labels (--save-logits / --save-scores values may differ in the "
        "last bits, as with another --window-batch); X+gla, Trident and CASS run image by image",
    )
    from ovss.output.collection import add_collection_flags  # issue 22: coco.json, GeoJSON, score maps

    add_collection_flags(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary line")
    add_model_flags(p)
    p.set_defaults(func=run)


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Expand folders into their image files (sorted); missing paths raise OvssError."""
    files: list[Path] = []
    for item in inputs:
        if not item.strip():  # Path("") is the current folder: an empty argument (an unset shell variable) is a mistake
            raise OvssError("an input path is empty (an unset shell variable?); give image files or folders")
        path = Path(item)
        if path.is_dir():
            try:
                found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            except OSError as err:
                raise OvssError(f"cannot list folder {path}: {err.strerror}") from err
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
    import numpy as np

    if name not in EXAMPLES:
        raise OvssError(f"unknown example {name!r}; choose one of {', '.join(EXAMPLES)}")
    try:
        from skimage import data
    except ImportError as err:
        raise OvssError("--example needs scikit-image: pip install 'ovss[examples]'") from err
    try:
        image = np.asarray(getattr(data, EXAMPLES[name])())
    except Exception as err:  # a missing loader or data file in this scikit-image version
        raise OvssError(f"scikit-image cannot load example {name!r} ({err}); try another --example") from err
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def plan_outputs(
    out: Path,
    jobs: list[tuple[str, Any]],
    classes: list[list[str]],
    args: Any,
    mine: list[tuple[str, Any]] | None = None,
) -> dict[str, list[Path]]:
    """Every file the run may write, per input stem; refuses (OvssError) to replace an input, an earlier
    output without ``--resume`` or ``--overwrite``, and two inputs writing the same file.

    Clashes are checked over the whole run's ``jobs`` (every shard refuses alike); earlier outputs only for
    this process's images ``mine`` (default: all), so a shard never trips over another shard's files.
    """
    from ovss.output.collection import COCO_FILE, collection_options, collection_paths
    from ovss.output.files import output_paths
    from ovss.output.resume import marker_path

    if out.exists() and not out.is_dir():
        raise OvssError(f"--out '{out}' is a file; give a folder (it is created if missing)")
    collection = collection_options(args)
    per_image = {
        stem: output_paths(out, stem, classes, logits=args.save_logits, masks=args.save_masks, json=args.save_json)
        + collection_paths(out, stem, classes, collection)
        for stem, _ in jobs
    }
    run_files = [out / "config.json", *([out / COCO_FILE] if collection.coco else [])]
    planned = [*run_files, *(path for paths in per_image.values() for path in paths)]
    resolved = [path.resolve() for path in planned]
    if len(set(resolved)) != len(resolved):
        clash = next(path for path in planned if resolved.count(path.resolve()) > 1)
        raise OvssError(f"two inputs would both write '{clash}'; rename one of them or segment them separately")
    inputs = {source.resolve(): source for _, source in jobs if isinstance(source, Path)}
    for path, full in zip(planned, resolved, strict=True):
        if full in inputs:
            raise OvssError(
                f"writing '{path}' would replace the input image '{inputs[full]}'; choose another --out folder"
            )
    own = [stem for stem, _ in (jobs if mine is None else mine)]
    checked = [*run_files, *(path for stem in own for path in [*per_image[stem], marker_path(out, stem)])]
    existing = [path for path in checked if path.exists()]
    if existing and not (args.overwrite or args.resume):
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OvssError(
            f"'{existing[0]}'{more} exists from an earlier run; pass --resume to continue that run (finished "
            "images are kept), --overwrite to replace it, or choose another --out"
        )
    return per_image


def check_writable(out: Path) -> None:
    """Raise OvssError unless ``out`` is (or can be created as) a folder this process can write into.

    Probes the folder (or its nearest existing parent) with a temporary file that is removed at once:
    nothing is left behind, and an unwritable ``--out`` is one line before any model is loaded.
    """
    existing = out.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OvssError(f"--out '{out}' cannot be created: '{existing}' is a file; choose another --out")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # created and removed at once
    except OSError as err:
        what = "write into" if existing == out.absolute() else f"create --out '{out}' in"
        raise OvssError(f"cannot {what} '{existing}': {err.strerror or err}; choose a writable --out folder") from err


def sweep_outputs(out: Path, per_image: dict[str, list[Path]]) -> None:
    """Remove what killed runs left half-written: hidden temporary files in the output folders."""
    from ovss.storage.files import sweep_temp_files

    for folder in sorted({path.parent for paths in per_image.values() for path in paths} | {out}):
        sweep_temp_files(folder)
    sweep_temp_files(out / ".ovss", recursive=True)


@contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show warnings as ``ovss: warning: ...`` lines on stderr (each distinct warning once)."""

    def show(message: Warning | str, category: Any, filename: str, lineno: int, file: TextIO | None = None,
             line: str | None = None) -> None:  # fmt: skip
        print(f"ovss: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


def run(args: argparse.Namespace) -> int:
    with one_line_warnings():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ovss.distributed import distributed_session
    from ovss.labels import background_class, parse_labels, read_labels_file

    if not args.inputs and not args.example:
        raise OvssError("nothing to segment: give image files/folders or --example NAME")
    if not 0.0 <= args.alpha <= 1.0:
        raise OvssError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.resume and args.overwrite:
        raise OvssError("--resume keeps the finished images, --overwrite redoes them all; pass only one of them")
    classes = parse_labels(args.labels) if args.labels is not None else read_labels_file(args.labels_file)
    background = background_class(classes, args.background)
    jobs: list[tuple[str, Any]] = [(p.stem, p) for p in collect_inputs(args.inputs)]
    if args.example:
        jobs.append((args.example, example_image(args.example)))
    _refuse_shared_stems(jobs)
    if args.read_ahead is not None and args.read_ahead < 0:
        raise OvssError(f"--read-ahead must be >= 0 images, got {args.read_ahead}")
    index, count = parse_shard(args.shard)
    with distributed_session(args.device) as context:
        shard = Shard(index, count, context.rank, context.world_size)
        mine = [jobs[k] for k in shard.positions(len(jobs))]
        return _run_shard(args, jobs, mine, classes, background, shard, context)


def _refuse_shared_stems(jobs: list[tuple[str, Any]]) -> None:
    """One line naming the first stem several inputs share (with their paths) and the fix.

    Raises:
        OvssError: two inputs would write the same ``<stem>.png``.
    """
    sources: dict[str, list[str]] = {}
    for stem, source in jobs:
        sources.setdefault(stem, []).append(str(source) if isinstance(source, Path) else f"--example {stem}")
    shared = [stem for stem, paths in sources.items() if len(paths) > 1]
    if shared:
        more = f" (and {len(shared) - 1} more stem(s))" if len(shared) > 1 else ""
        raise OvssError(
            f"inputs {', '.join(sources[shared[0]])} share the file name stem {shared[0]!r}{more}, so their outputs "
            "would collide; give each image once, rename one, or segment them into separate --out folders"
        )


def _run_shard(
    args: argparse.Namespace, jobs: list[tuple[str, Any]], mine: list[tuple[str, Any]], classes: list[list[str]],
    background: int | None, shard: Shard, context: DistContext,
) -> int:  # fmt: skip
    """Segment this process's images ``mine`` of the run's ``jobs``; the run-level files when the run is done."""
    import torch

    import ovss
    from ovss.distributed import rank_device
    from ovss.output.collection import collection_options, remove_earlier_coco

    out = Path(args.out)
    shard_jobs = [jobs[k] for k in range(shard.index, len(jobs), shard.count)]  # all ranks refuse alike
    per_image = plan_outputs(out, jobs, classes, args, shard_jobs)
    check_writable(out)
    sweep_outputs(out, per_image)
    own_process = one_shot_process()
    if own_process:  # importing torch and building the model leave no cycles: skip 0.14 s of full GC passes
        gc.disable()
    try:
        kwargs = {**load_kwargs(args), "device": rank_device(args.device, context)}
        segmenter = ovss.load(args.method, **kwargs)  # models that do not fit together end here
    finally:
        if own_process:
            gc.freeze()  # what is loaded lives to the end of the process: later collections need not walk it
            gc.enable()
    names = [name for synonyms in classes for name in synonyms]
    segmenter.encode_names(names)  # once, before any image: vocabulary and label errors end the run here
    record = {**segmenter.config, "classes": classes, "background": background}
    record["device"] = str(torch.device(args.device))  # the same config.json on every rank (cuda, not cuda:1)
    record["outputs"] = output_options(args)  # the file options (run_key hashes the same dict: keys unchanged)
    key = run_key(record, args)
    finished = finished_images(out, mine, per_image, key, record) if args.resume else set()
    if shard.count > 1 and shard.rank == 0:
        forget_shard(out, shard)  # running again: not finished until this attempt's record
    collection = collection_options(args)
    if args.overwrite and not collection.coco:  # once the model and names loaded: the run starts
        remove_earlier_coco(out)  # it would describe the earlier run; a coco.json ovss did not write stays
    show = args.progress and not args.quiet and sys.stderr.isatty() and shard.rank == 0  # one rank's bars
    run = SegmentRun(out, per_image, key, record, classes, background, args, collection, not shard.split, show)
    try:
        outcome = segment_images(segmenter, mine, finished, run)
    except OvssError as err:
        if context.world_size == 1:
            raise
        outcome = Outcome(stopped=str(err))  # the other ranks wait for this one at the gather: meet them there
    if outcome.interrupted:
        redone = len(outcome.finished) - outcome.skipped
        where = f"{shard.name()}: " if shard.split else ""
        print(
            f"ovss: {where}interrupted after {redone} new image(s), {len(outcome.finished)} of {len(mine)} "
            f"finished in {out}; the same command with --resume continues",
            file=sys.stderr,
        )
        return 130
    return finish_shard(args, jobs, shard, context, outcome, run)
