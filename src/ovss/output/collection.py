"""Run-level outputs of ``ovss segment`` that labelling tools read: coco.json, GeoJSON, score maps.

Two calls make the interface with the segment loop (and with sharded runs):

- :func:`save_collection`, per image, after its own files and before its done-marker: writes the image's
  part of ``coco.json`` (``<out>/.ovss/coco/<stem>.json``), ``<stem>.geojson`` and the score maps, each
  atomically, and returns the paths (the marker lists them, so ``--resume`` redoes a half-written image);
- :func:`merge_collection`, at the end of a run: streams the parts, one at a time, in the order of the
  full job list into ``<out>/coco.json`` (atomically). Memory stays constant in the number of images.

Image ids are ``position in the full, ordered job list + 1`` and annotation ids count up in that order,
both given at the merge: the parts do not depend on which process wrote them or in which order, so any
split into shards, any processing order and any resume give the same ``coco.json``. Parts of another
class list or annotation format (a key in each part) count as missing. Every process of a sharded run
may call the merge at its end with the full list: it writes the images whose parts exist, and the last
process to finish (which sees every part) writes the complete file; concurrent merges of the same parts
write the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovss.errors import OvssError
from ovss.output.coco import coco_categories, image_annotations
from ovss.output.files import refuse_existing
from ovss.output.scores import SCORE_FORMATS, save_scores, score_paths
from ovss.storage.files import atomic_write, save_text

if TYPE_CHECKING:
    from ovss.prediction import Prediction

PART_FOLDER = Path(".ovss") / "coco"  # inside the output folder
PART_FORMAT = "ovss-coco-part"  # a part's "format" field
PART_VERSION = 1  # a part of another version counts as missing
COCO_FILE = "coco.json"
COCO_DESCRIPTION = "ovss segment"  # coco.json's info.description: how an earlier run's file is recognised


@dataclass(frozen=True)
class CollectionOptions:
    """Which run-level outputs to write (--save-coco, --coco-polygons, --save-geojson, --save-scores)."""

    coco: bool = False  # coco.json (RLE per image and class)
    coco_polygons: bool = False  # polygons instead of RLE in coco.json where a mask allows it (implies coco)
    geojson: bool = False  # <stem>.geojson per image
    scores: str | None = None  # "png" or "npy" per-class score maps, None: none

    def __post_init__(self) -> None:
        if self.scores is not None and self.scores not in SCORE_FORMATS:
            raise OvssError(f"--save-scores must be one of {', '.join(SCORE_FORMATS)}, got {self.scores!r}")
        if self.coco_polygons and not self.coco:
            raise OvssError("coco_polygons changes coco.json; set coco=True too")

    @property
    def any(self) -> bool:
        """Whether anything is written at all."""
        return self.coco or self.geojson or self.scores is not None

    def record(self) -> dict[str, Any]:
        """The options as a JSON-serialisable dict (for the run key of ``--resume``)."""
        return asdict(self)


def add_collection_flags(parser: argparse.ArgumentParser) -> None:
    """The ``ovss segment`` flags of these outputs."""
    parser.add_argument(
        "--save-coco",
        "--save_coco",
        dest="save_coco",
        action="store_true",
        help=f"also write {COCO_FILE}: COCO categories from the labels, one RLE annotation per image and class "
        "(pycocotools), merged in input order at the end of the run (and across --shard runs)",
    )
    parser.add_argument(
        "--coco-polygons",
        "--coco_polygons",
        dest="coco_polygons",
        action="store_true",
        help=f"polygons instead of RLE in {COCO_FILE} (implies --save-coco); masks with holes keep their RLE",
    )
    parser.add_argument(
        "--save-geojson",
        "--save_geojson",
        dest="save_geojson",
        action="store_true",
        help="also write <stem>.geojson: a FeatureCollection of each class's polygons (with holes), pixel coordinates",
    )
    parser.add_argument(
        "--save-scores",
        "--save_scores",
        dest="save_scores",
        choices=SCORE_FORMATS,
        help="also write the class probabilities: png (<stem>_scores/<id>_<name>.png, round(p*255)) or npy "
        "(<stem>_scores.npy, (C, H, W) float16)",
    )


def collection_options(args: argparse.Namespace) -> CollectionOptions:
    """The options of parsed ``ovss segment`` arguments (absent flags: off)."""
    polygons = bool(getattr(args, "coco_polygons", False))
    return CollectionOptions(
        coco=bool(getattr(args, "save_coco", False)) or polygons,
        coco_polygons=polygons,
        geojson=bool(getattr(args, "save_geojson", False)),
        scores=getattr(args, "save_scores", None),
    )


def remove_earlier_coco(folder: str | os.PathLike[str]) -> Path | None:
    """Remove the ``coco.json`` an earlier ``ovss segment --save-coco`` left in ``folder`` (``--overwrite``
    without ``--save-coco``: it would describe the earlier run). A coco.json that ovss did not write is kept.

    Returns:
        The removed path, or None.
    """
    path = Path(folder) / COCO_FILE
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            head = file.read(256)  # ovss writes '{' then its info line first (merge_collection)
    except OSError:
        return None
    if not head.startswith('{\n"info": {"description": ' + _dump(COCO_DESCRIPTION)):
        return None
    path.unlink(missing_ok=True)
    return path


def part_path(folder: str | os.PathLike[str], stem: str) -> Path:
    """``<folder>/.ovss/coco/<stem>.json``: one image's part of coco.json."""
    return Path(folder) / PART_FOLDER / f"{stem}.json"


def collection_paths(
    folder: str | os.PathLike[str], stem: str, classes: list[list[str]], options: CollectionOptions
) -> list[Path]:
    """Every file :func:`save_collection` writes for one image, in its order."""
    paths: list[Path] = []
    if options.coco:
        paths.append(part_path(folder, stem))
    if options.geojson:
        paths.append(Path(folder) / f"{stem}.geojson")
    if options.scores is not None:
        paths += score_paths(folder, stem, classes, options.scores)
    return paths


def part_key(classes: Sequence[Sequence[str]], options: CollectionOptions) -> str:
    """SHA-256 (hex) of what a part's content depends on besides the labels: the classes and the format."""
    text = json.dumps({"classes": [list(c) for c in classes], "polygons": options.coco_polygons}, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def save_collection(
    folder: str | os.PathLike[str],
    stem: str,
    prediction: Prediction,
    options: CollectionOptions,
    *,
    file_name: str,
    overwrite: bool = False,
) -> list[Path]:
    """Write one image's run-level outputs (the module docstring); nothing when ``options.any`` is off.

    Args:
        folder: the output folder.
        stem: the image's stem (its other outputs' names).
        prediction: the image's prediction (labels; ``probs`` for the score maps).
        options: what to write.
        file_name: the image's ``file_name`` in coco.json and the GeoJSON (e.g. the input's file name).
        overwrite: replace existing files; otherwise an existing file raises before anything is written.

    Returns:
        The written paths, in :func:`collection_paths` order. A failure removes this call's files.
    """
    from ovss.output.polygons import geojson_document

    classes = prediction.classes
    paths = collection_paths(folder, stem, classes, options)
    refuse_existing(paths, overwrite)
    if not paths:
        return []
    labels = prediction.compact_labels.cpu().numpy()  # (H0, W0) int8/16/32, UNLABELLED < 0: never the int64 copy
    height, width = labels.shape
    texts: list[str] = []
    if options.coco:
        part = {
            "format": PART_FORMAT,
            "version": PART_VERSION,
            "key": part_key(classes, options),
            "image": {"file_name": file_name, "height": int(height), "width": int(width)},
            "annotations": image_annotations(labels, len(classes), polygons=options.coco_polygons),
        }
        texts.append(_dump(part) + "\n")
    if options.geojson:
        texts.append(json.dumps(geojson_document(labels, classes, file_name), ensure_ascii=False, indent=1) + "\n")
    written: list[Path] = []
    try:
        for path, text in zip(paths[: len(texts)], texts, strict=True):  # the part, the GeoJSON
            written.append(save_text(path, text))
        if options.scores is not None:
            written += save_scores(prediction, folder, stem, options.scores)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_collection` wrote."""

    path: Path | None  # the coco.json written, None when coco.json is off
    images: int  # images listed in it
    missing: list[str] = field(default_factory=list)  # stems without a valid part (not finished, failed)


def read_part(folder: str | os.PathLike[str], stem: str, key: str) -> dict[str, Any] | None:
    """One image's part, or None when it is missing, unreadable, of another version or of another ``key``."""
    try:
        part = json.loads(part_path(folder, stem).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    valid = isinstance(part, dict) and part.get("format") == PART_FORMAT and part.get("version") == PART_VERSION
    return part if valid and part.get("key") == key else None


def merge_collection(
    folder: str | os.PathLike[str],
    stems_in_order: Sequence[str],
    classes: list[list[str]],
    options: CollectionOptions,
    *,
    background: int | None = None,
    info: Mapping[str, Any] | None = None,
) -> MergeResult:
    """Write ``<folder>/coco.json`` from the parts of ``stems_in_order`` (the full, ordered job list).

    Image ``i`` of the list (with a part) gets id ``i + 1``; annotations are numbered from 1 in list
    order. The file is written atomically with one category / image / annotation per line; a stem
    without a valid part is left out and listed in the result.

    Args:
        folder: the output folder.
        stems_in_order: every image's stem in the run's input order (not the processing order).
        classes: the run's classes (categories; must be those the parts were written with).
        options: the run's options (nothing is written unless ``options.coco``).
        background: the class that receives uncertain pixels (marked ``"background": true``), or None.
        info: extra fields of the ``info`` entry (e.g. the method).

    Returns:
        The path, the number of images listed and the stems left out.
    """
    out = Path(folder)
    if not options.coco:
        return MergeResult(None, 0, [])
    key = part_key(classes, options)
    import ovss

    head = {"description": COCO_DESCRIPTION, "version": ovss.__version__, **(info or {})}
    lines_before = [
        "{", f'"info": {_dump(head)},', '"licenses": [],', '"categories": [',
        ",\n".join(_dump(category) for category in coco_categories(classes, background)), "],", '"images": [',
    ]  # fmt: skip
    missing: list[str] = []
    listed = 0

    def write(temp_path: Path) -> None:
        nonlocal listed
        annotation_id = 0
        with open(temp_path, "w", encoding="utf-8", newline="\n") as file, tempfile.TemporaryFile(
            "w+", encoding="utf-8", dir=temp_path.parent
        ) as spool:  # annotations wait here while the images are written: each part is read once
            file.write("\n".join(lines_before) + "\n")
            for position, stem in enumerate(stems_in_order):
                part = read_part(out, stem, key)
                if part is None:
                    missing.append(stem)
                    continue
                image = {"id": position + 1, **part["image"]}
                file.write(("" if listed == 0 else ",\n") + _dump(image))
                listed += 1
                for annotation in part["annotations"]:
                    annotation_id += 1
                    entry = {"id": annotation_id, "image_id": position + 1, **annotation}
                    spool.write(("" if annotation_id == 1 else ",\n") + _dump(entry))
            file.write("\n],\n" + '"annotations": [' + "\n")
            spool.seek(0)
            while chunk := spool.read(1 << 20):
                file.write(chunk)
            file.write("\n]\n}\n")

    path = atomic_write(out / COCO_FILE, write)
    return MergeResult(path, listed, missing)
