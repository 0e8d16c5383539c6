"""``ovss segment``: label every pixel of an image, a folder of images, or a bundled example photo.

Order of work, so that a mistake costs one line and no file: parse the labels, collect the inputs, plan
every output path (refusing to replace an input image, or an earlier run's file without ``--resume`` or
``--overwrite``), check that the output folder can be written, build the segmenter (which checks that the
models fit together) and encode the labels once; only then read and segment the images one by one. An
image that cannot be read is reported and skipped; a failed write stops the run (it would fail for every
later image). The output folder and ``config.json`` appear only once an image was segmented.

Each finished image gets a marker (:mod:`ovss.output.resume`) after all its files; ``--resume`` skips the
images whose marker matches this run's configuration and redoes the others.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ovss.cli.main import one_shot_process
from ovss.cli.options import add_model_flags, load_kwargs
from ovss.errors import OvssError

if TYPE_CHECKING:
    import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
# --example NAME -> scikit-image loader; only photos shipped inside scikit-image (no download).
EXAMPLES = {"astronaut": "astronaut", "cat": "cat", "chelsea": "chelsea", "coffee": "coffee", "rocket": "rocket"}
MANY_WINDOWS = 100  # above this many windows per image, warn (naming the flags that reduce the count)


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
    out: Path, jobs: list[tuple[str, Any]], classes: list[list[str]], args: Any
) -> dict[str, list[Path]]:
    """Every file the run may write, per input stem; refuses (OvssError) to replace an input, an earlier
    output without ``--resume`` or ``--overwrite``, and two inputs writing the same file."""
    from ovss.output.collection import collection_options, collection_paths
    from ovss.output.files import output_paths
    from ovss.output.resume import marker_path

    if out.exists() and not out.is_dir():
        raise OvssError(f"--out '{out}' is a file; give a folder (it is created if missing)")
    per_image = {
        stem: output_paths(out, stem, classes, logits=args.save_logits, masks=args.save_masks, json=args.save_json)
        + collection_paths(out, stem, classes, collection_options(args))
        for stem, _ in jobs
    }
    planned = [out / "config.json", *(path for paths in per_image.values() for path in paths)]
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
    existing = [path for path in [*planned, *(marker_path(out, stem) for stem in per_image)] if path.exists()]
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
        raise OvssError(
            f"cannot {what} '{existing}': {err.strerror or err}; choose a writable --out folder"
        ) from err


class WindowProgress:
    """``progress(done, total)`` for ``Segmenter.predict``: a window bar, and a warning for many windows."""

    def __init__(self, name: str, enabled: bool) -> None:
        self.name = name
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if total > MANY_WINDOWS:
                warnings.warn(
                    f"{self.name}: {total} windows to encode (slow); a smaller --short-side (e.g. 448) or a "
                    "larger --crop/--stride gives fewer",
                    UserWarning,
                    stacklevel=2,
                )
            from tqdm import tqdm

            disable = not self.enabled or total < 2
            self.bar = tqdm(total=total, desc=self.name, unit="win", leave=False, disable=disable, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    import ovss
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
    stems = [stem for stem, _ in jobs]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise OvssError(f"several inputs share the file name stem(s) {', '.join(dup)}; outputs would collide")
    out = Path(args.out)
    per_image = plan_outputs(out, jobs, classes, args)
    check_writable(out)
    own_process = one_shot_process()
    if own_process:  # importing torch and building the model leave no cycles: skip 0.14 s of full GC passes
        gc.disable()
    try:
        segmenter = ovss.load(args.method, **load_kwargs(args))  # models that do not fit together end here
    finally:
        if own_process:
            gc.freeze()  # what is loaded lives to the end of the process: later collections need not walk it
            gc.enable()
    names = [name for synonyms in classes for name in synonyms]
    segmenter.encode_names(names)  # once, before any image: vocabulary and label errors end the run here
    record = {**segmenter.config, "classes": classes, "background": background}
    key = run_key(record, args)
    finished = finished_images(out, jobs, per_image, key) if args.resume else set()
    show_progress = args.progress and not args.quiet and sys.stderr.isatty()
    from tqdm import tqdm

    bar = tqdm(jobs, desc="segment", unit="img", disable=not show_progress or len(jobs) < 2, file=sys.stderr)
    done: list[str] = []
    saved = 0  # len(done) at the last config.json write
    try:
        for stem, source in bar:
            if stem in finished:
                done.append(stem)
                continue
            if _segment_one(segmenter, stem, source, out, per_image[stem], key, classes, background, args):
                done.append(stem)
                save_config(out, record, done)
                saved = len(done)
    except KeyboardInterrupt:
        if saved != len(done):  # images skipped after the last write (--resume) are finished too
            save_config(out, record, done)
        redone = len(done) - len(finished)
        print(
            f"ovss: interrupted after {redone} new image(s), {len(done)} of {len(jobs)} finished in {out}; the "
            "same command with --resume continues",
            file=sys.stderr,
        )
        return 130
    if saved != len(done):  # images skipped after the last write (--resume) are finished too
        save_config(out, record, done)
    if done:  # no image segmented: the output folder is left as it was
        _merge_collection(out, stems, classes, background, record, args)
    if not args.quiet:
        skipped = f" ({len(finished)} finished earlier, skipped)" if finished else ""
        print(f"segmented {len(done)} of {len(jobs)} image(s) into {out}{skipped}", file=sys.stderr)
    return 0 if len(done) == len(jobs) else 1


def run_key(record: dict[str, Any], args: argparse.Namespace) -> str:
    """The key of everything that decides the output bytes: the configuration record and the file options."""
    from ovss.output import resume
    from ovss.output.collection import collection_options

    options = {"logits": args.save_logits, "logits_dtype": args.logits_dtype, "masks": args.save_masks,
               "json": args.save_json, "alpha": args.alpha}  # fmt: skip
    collection = collection_options(args)
    if collection.any:  # only then: the key of a run without these outputs stays what it was
        options["collection"] = collection.record()
    return resume.run_key({**record, "outputs": options})


def finished_images(out: Path, jobs: list[tuple[str, Any]], per_image: dict[str, list[Path]], key: str) -> set[str]:
    """The stems whose outputs in ``out`` are complete and from this configuration (``--resume``).

    Raises:
        OvssError: an image there was made with another configuration (resuming would mix the two).
    """
    from ovss.output.resume import image_state, source_digest

    finished: set[str] = set()
    for stem, source in jobs:
        state = image_state(out, stem, key, source_digest(source), per_image[stem])
        if state == "other-config":
            raise OvssError(
                f"--resume: the outputs of '{stem}' in {out} were made with another configuration (method, "
                "weights, labels or output flags differ); rerun with the same flags, pass --overwrite to redo "
                "every image, or choose another --out"
            )
        if state == "finished":
            finished.add(stem)
    return finished


def _segment_one(
    segmenter: Any, stem: str, source: Any, out: Path, paths: list[Path], key: str, classes: list[list[str]],
    background: int | None, args: argparse.Namespace,
) -> bool:  # fmt: skip
    """Segment and save one image, then mark it finished; False (reported) when the image cannot be read.

    Raises:
        OvssError: the outputs cannot be written (it would hold for every later image: the run stops).
    """
    from tqdm import tqdm

    from ovss.output.resume import remove_marker, source_digest, write_marker

    label = str(source) if isinstance(source, Path) else stem
    progress = WindowProgress(stem, args.progress and not args.quiet and sys.stderr.isatty())
    try:
        try:  # libpng / OpenCV lines become one ovss warning where the image is read (pipeline/image.py)
            result = segmenter.predict(source, classes, background=background, progress=progress)
        finally:
            progress.close()
    except OvssError as err:
        message = str(err) if Path(label).name in str(err) else f"{label}: {err}"
        tqdm.write(f"ovss: error: {message}", file=sys.stderr)
        return False
    digest = source_digest(source)
    try:
        remove_marker(out, stem)  # from here until the new marker, the image counts as unfinished
        written = result.save(
            out,
            stem,
            logits=args.save_logits,
            masks=args.save_masks,
            json=args.save_json,
            alpha=args.alpha,
            overwrite=args.overwrite or args.resume,
            logits_dtype=args.logits_dtype,
        )
        written += _save_collection(out, stem, source, result, args)
        write_marker(out, stem, key, digest, written)
    except (OSError, OvssError) as err:
        reason = getattr(err, "strerror", None) or err
        raise OvssError(
            f"cannot write the outputs of {stem!r} to {out}: {reason}; stopped (the same command with --resume "
            "continues once that is fixed)"
        ) from err
    return True


def save_config(out: Path, record: dict[str, Any], done: list[str]) -> None:
    """``config.json``: the resolved configuration and the finished images (rewritten after each image)."""
    from ovss.storage.files import save_text

    save_text(out / "config.json", json.dumps({**record, "inputs": done}, indent=2, default=str) + "\n")


# ---------------------------------------------------------------- issue 22: outputs other tools read


def _save_collection(out: Path, stem: str, source: Any, result: Any, args: argparse.Namespace) -> list[Path]:
    """One image's coco.json part, GeoJSON and score maps (:func:`ovss.output.collection.save_collection`)."""
    from ovss.output.collection import collection_options, save_collection

    file_name = source.name if isinstance(source, Path) else stem
    options = collection_options(args)
    return save_collection(out, stem, result, options, file_name=file_name, overwrite=args.overwrite or args.resume)


def _merge_collection(
    out: Path, stems: list[str], classes: list[list[str]], background: int | None, record: dict[str, Any],
    args: argparse.Namespace,
) -> None:  # fmt: skip
    """coco.json of the whole job list, in input order (:func:`ovss.output.collection.merge_collection`)."""
    from ovss.output.collection import collection_options, merge_collection

    options = collection_options(args)
    if not options.coco:
        return
    info = {"method": record.get("method")}
    merged = merge_collection(out, stems, classes, options, background=background, info=info)
    if merged.missing and not args.quiet:
        print(
            f"ovss: note: {merged.path} lists {merged.images} of {len(stems)} image(s); the others are not finished",
            file=sys.stderr,
        )
