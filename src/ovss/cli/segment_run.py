"""The image loop of ``ovss segment``: predict (``Segmenter.predict_many``), save, mark; run-level files; summary.

Each finished image gets a marker (:mod:`ovss.output.resume`) after all its files; ``--resume`` skips the
images whose marker matches this run's configuration. An image that cannot be read is reported and
skipped; a failed write stops the run (it would fail for every later image). ``config.json`` (the resolved
configuration and the finished images in full-run order) is written by :func:`finish_run`; a run in one
process also rewrites it as it goes (after an image, at most every ``CONFIG_EVERY_S`` seconds) and when
Ctrl-C stops it, so an interrupted run leaves an up-to-date one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovss.errors import OvssError

if TYPE_CHECKING:
    from ovss.output.collection import CollectionOptions

MANY_WINDOWS = 100  # above this many windows per image, warn (naming the flags that reduce the count)
# A run in one process rewrites config.json after an image at most this often (seconds): the file lists every
# finished image, so rewriting it after each of 10^5 images would write O(n^2) bytes. Ctrl-C and the end of
# the run always write it; --resume reads the done-markers, not this file.
CONFIG_EVERY_S = 10.0


@dataclass(frozen=True)
class SegmentRun:
    """What every image of a segment run shares."""

    out: Path  # output folder
    per_image: dict[str, list[Path]]  # stem -> every file the image may write
    key: str  # the run key of the done-markers (ovss.output.resume.run_key)
    record: dict[str, Any]  # config.json without "inputs": resolved configuration, classes, background
    classes: list[list[str]]  # classes, each a list of synonyms
    background: int | None  # the background class, or None
    args: argparse.Namespace  # the command line (file options, progress, --read-ahead, --pool-windows)
    collection: CollectionOptions  # coco.json / GeoJSON / score maps (ovss.output.collection)
    save_each: bool  # rewrite config.json as images finish, at most every CONFIG_EVERY_S (a run in one process)
    progress: bool  # show progress bars (stderr is a terminal, not --quiet / --no-progress; rank 0)


@dataclass
class Outcome:
    """What a process did with its images (picklable: gathered across torchrun ranks)."""

    finished: list[str] = field(default_factory=list)  # stems finished, earlier or now, in job order
    failed: dict[str, str] = field(default_factory=dict)  # stem -> why it failed (one line), in job order
    skipped: int = 0  # images finished by an earlier run (--resume), included in ``finished``
    interrupted: bool = False  # Ctrl-C stopped the loop
    stopped: str | None = None  # the one-line error that stopped this process (a torchrun rank), if any


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


class ImageBars:
    """The ``progress`` of ``predict_many``: a :class:`WindowProgress` per image, begun with :meth:`start`."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.current: WindowProgress | None = None

    def start(self, stem: str) -> None:
        self.current = WindowProgress(stem, self.enabled)

    def __call__(self, done: int, total: int) -> None:
        if self.current is not None:
            self.current(done, total)

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


def output_options(args: argparse.Namespace) -> dict[str, Any]:
    """The file options that decide the output bytes (config.json's ``outputs``; part of the run key)."""
    from ovss.output.collection import collection_options

    options: dict[str, Any] = {"logits": args.save_logits, "logits_dtype": args.logits_dtype,
                               "masks": args.save_masks, "json": args.save_json, "alpha": args.alpha}  # fmt: skip
    collection = collection_options(args)
    if collection.any:  # only then: the key of a run without these outputs stays what it was
        options["collection"] = collection.record()
    return options


def run_key(record: dict[str, Any], args: argparse.Namespace) -> str:
    """The key of everything that decides the output bytes: the configuration record and the file options."""
    from ovss.output import resume

    return resume.run_key({**record, "outputs": output_options(args)})


def finished_images(
    out: Path, jobs: list[tuple[str, Any]], per_image: dict[str, list[Path]], key: str, record: dict[str, Any]
) -> set[str]:
    """The stems whose outputs in ``out`` are complete and from this configuration (``--resume``).

    Raises:
        OvssError: an image there was made with another configuration (resuming would mix the two); the
            message names what differs from the earlier run's ``config.json`` when it can tell.
    """
    from ovss.output.resume import image_state, source_digest

    finished: set[str] = set()
    for stem, source in jobs:
        state = image_state(out, stem, key, source_digest(source), per_image[stem])
        if state == "other-config":
            raise OvssError(
                f"--resume: the outputs of '{stem}' in {out} were made with another configuration "
                f"({changed_settings(out, record)}); rerun with the same flags, pass --overwrite to redo every "
                "image, or choose another --out"
            )
        if state == "finished":
            finished.add(stem)
    return finished


def changed_settings(out: Path, record: dict[str, Any]) -> str:
    """What differs between this run's record and the earlier run's ``config.json`` in ``out``, in words."""
    try:
        earlier = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict):
        return "method, weights, labels or output flags differ"
    now = json.loads(json.dumps(record, default=str))  # as config.json holds it: tuples as lists, objects as text
    differ = sorted(k for k in set(now) | set(earlier) if k != "inputs" and now.get(k) != earlier.get(k))
    if "outputs" in differ:  # name the flags; a config.json of ovss < 0.2 does not record them
        if isinstance(earlier.get("outputs"), dict):
            flags = ", ".join(changed_flags(now["outputs"], earlier["outputs"]))
            differ[differ.index("outputs")] = f"output flags {flags}"
        else:
            differ.remove("outputs")
    if differ:
        return f"these settings differ from its config.json: {', '.join(differ)}"
    return "the output flags differ: --save-*, --logits-dtype, --alpha, --coco-polygons"


OUTPUT_FLAGS = {"logits": "--save-logits", "logits_dtype": "--logits-dtype", "masks": "--save-masks",
                "json": "--save-json", "alpha": "--alpha", "coco": "--save-coco", "coco_polygons": "--coco-polygons",
                "geojson": "--save-geojson", "scores": "--save-scores"}  # fmt: skip


def changed_flags(now: dict[str, Any], earlier: dict[str, Any]) -> list[str]:
    """The command-line flags whose values differ between two ``outputs`` entries of config.json."""
    off = {"coco": False, "coco_polygons": False, "geojson": False, "scores": None}  # no "collection": all off
    flat_now = {**now, **off, **now.get("collection", {})}
    flat_earlier = {**earlier, **off, **earlier.get("collection", {})}
    return [flag for key, flag in OUTPUT_FLAGS.items() if flat_now.get(key) != flat_earlier.get(key)]


def segment_images(segmenter: Any, jobs: list[tuple[str, Any]], finished: set[str], run: SegmentRun) -> Outcome:
    """Segment this process's images in order (those in ``finished`` are skipped), saving each.

    Raises:
        OvssError: the outputs cannot be written (it would hold for every later image: the run stops).
    """
    from tqdm import tqdm

    args = run.args
    show = run.progress
    bars = ImageBars(show)
    todo = [source for stem, source in jobs if stem not in finished]
    results = segmenter.predict_many(
        todo, run.classes, background=run.background, progress=bars, read_ahead=args.read_ahead, errors="yield",
        pool_windows=args.pool_windows,
    )  # fmt: skip
    outcome = Outcome()
    saved = 0  # len(outcome.finished) at the last config.json write
    written_at = -CONFIG_EVERY_S  # time.monotonic() of that write (the first image writes at once)
    bar = tqdm(jobs, desc="segment", unit="img", disable=not show or len(jobs) < 2, file=sys.stderr)
    try:
        for stem, source in bar:
            if stem in finished:
                outcome.finished.append(stem)
                outcome.skipped += 1
                continue
            bars.start(stem)
            try:
                result = next(results)  # libpng / OpenCV lines become one ovss warning per image, in order
            finally:
                bars.close()
            if isinstance(result, OvssError):
                label = str(source) if isinstance(source, Path) else stem
                message = str(result) if Path(label).name in str(result) else f"{label}: {result}"
                tqdm.write(f"ovss: error: {message}", file=sys.stderr)
                outcome.failed[stem] = message
                continue
            save_image(result, stem, source, run)
            outcome.finished.append(stem)
            if run.save_each and time.monotonic() - written_at >= CONFIG_EVERY_S:
                save_config(run.out, run.record, outcome.finished)
                saved, written_at = len(outcome.finished), time.monotonic()
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        results.close()  # stops the read-ahead thread
    if run.save_each and outcome.interrupted and saved != len(outcome.finished):
        save_config(run.out, run.record, outcome.finished)  # images skipped after the last write are finished too
    return outcome


def save_image(result: Any, stem: str, source: Any, run: SegmentRun) -> None:
    """Write one image's files, then its done-marker (removed first: until then the image is unfinished).

    Raises:
        OvssError: the outputs cannot be written.
    """
    from ovss.output.collection import save_collection
    from ovss.output.resume import remove_marker, remove_stale_files, source_digest, write_marker

    args, out = run.args, run.out
    digest = source_digest(source)
    try:
        remove_stale_files(out, stem, run.per_image[stem])  # --overwrite: the earlier run's files this one won't write
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
        written += save_collection(  # coco.json's part, GeoJSON, score maps: before the marker, which vouches for them
            out, stem, result, run.collection, file_name=source.name if isinstance(source, Path) else stem,
            overwrite=args.overwrite or args.resume,
        )  # fmt: skip
        write_marker(out, stem, run.key, digest, written)
    except (OSError, OvssError) as err:
        reason = getattr(err, "strerror", None) or err
        raise OvssError(
            f"cannot write the outputs of {stem!r} to {out}: {reason}; stopped (the same command with --resume "
            "continues once that is fixed)"
        ) from err


def save_config(out: Path, record: dict[str, Any], done: list[str]) -> None:
    """``config.json``: the resolved configuration and the finished images."""
    from ovss.storage.files import save_text

    save_text(out / "config.json", json.dumps({**record, "inputs": done}, indent=2, default=str) + "\n")


def finish_run(run: SegmentRun, finished: list[str], stems: list[str]) -> None:
    """The run-level files, once every image of the whole run (all shards / ranks) was tried.

    Called by exactly one process per finished run (or by two finishing shards at once, with the same
    content: every write is atomic). ``finished`` are the finished images of the whole run and ``stems``
    all of its images, both in full-run order: ``config.json`` lists the first, ``coco.json`` (with
    ``--save-coco``) numbers its images by their place in the second.
    """
    from ovss.output.collection import merge_collection

    save_config(run.out, run.record, finished)
    if not run.collection.coco:
        return
    info = {"method": run.record.get("method")}
    merged = merge_collection(run.out, stems, run.classes, run.collection, background=run.background, info=info)
    if merged.missing and not run.args.quiet:
        print(
            f"ovss: note: {merged.path} lists {merged.images} of {len(stems)} image(s); the others are not finished",
            file=sys.stderr,
        )


def combined(parts: list[Outcome], stems: list[str]) -> Outcome:
    """One outcome from the outcomes of several processes, images in full-run order (``stems``).

    Args:
        parts: the processes' outcomes (their images do not overlap).
        stems: every image of the run, in order.
    """
    finished = {stem for part in parts for stem in part.finished}
    failed = {stem: message for part in parts for stem, message in part.failed.items()}
    return Outcome(
        [stem for stem in stems if stem in finished],
        {stem: failed[stem] for stem in stems if stem in failed},
        sum(part.skipped for part in parts),
    )


def summary(out: Path, outcome: Outcome, total: int, scope: str = "") -> str:
    """The closing lines: how many images were segmented, and which failed and why (one line each)."""
    skipped = f" ({outcome.skipped} finished earlier, skipped)" if outcome.skipped else ""
    where = f"{scope}: " if scope else ""
    lines = [f"{where}segmented {len(outcome.finished)} of {total} image(s) into {out}{skipped}"]
    if outcome.failed:
        lines[0] += f"; {len(outcome.failed)} failed:"
        lines += [f"  {message}" for message in outcome.failed.values()]
    return "\n".join(lines)
