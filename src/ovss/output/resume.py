"""Which images of an output folder are finished, and by which configuration (``ovss segment --resume``).

An image is *finished* when its marker ``<out>/.ovss/done/<stem>.json`` exists. The marker is written
(atomically) only after every output file of the image was written, and removed before an image's files
are (re)written, so a marker never vouches for a half-written image. It records:

- ``config``: the run key, a SHA-256 of the run's configuration (:func:`run_key`: what ``config.json``
  records, less the list of inputs, plus the output options) — the same key means byte-identical outputs;
- ``source``: a SHA-256 of the input file's bytes (or of an example photo's pixels), so a changed input is
  redone;
- ``files``: every output file, relative to the folder, with its size in bytes.

:func:`image_state` compares a marker with what a run would write. One file per image (no shared index)
lets several processes fill one folder at once (bulk labelling, sharded runs): each writes only its own
images' markers. See docs/decisions.md ("Resume of ovss segment").
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ovss.storage.files import file_sha256, save_text

MARKER_FOLDER = Path(".ovss") / "done"  # inside the output folder
FORMAT = "ovss-segment-done"  # the marker's "format" field
VERSION = 1  # the marker's "version" field; a marker of another version is not trusted (the image is redone)

State = Literal["finished", "unfinished", "other-config"]


def run_key(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a configuration record, independent of key order.

    Args:
        record: everything that decides the bytes of the outputs (a JSON-serialisable mapping; other
            values are written with ``str``).
    """
    text = json.dumps(record, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def source_digest(source: str | os.PathLike[str] | np.ndarray) -> str:
    """SHA-256 (hex) of an input: the bytes of a file, or the shape and pixels of an in-memory image."""
    digest = hashlib.sha256()
    if isinstance(source, np.ndarray):
        digest.update(repr((source.shape, str(source.dtype))).encode("utf-8"))
        digest.update(np.ascontiguousarray(source).data)  # the buffer itself: no bytes copy of the image
        return digest.hexdigest()
    return file_sha256(source)


def marker_path(folder: str | os.PathLike[str], stem: str) -> Path:
    """``<folder>/.ovss/done/<stem>.json``."""
    return Path(folder) / MARKER_FOLDER / f"{stem}.json"


def write_marker(folder: str | os.PathLike[str], stem: str, key: str, source: str, files: Sequence[Path]) -> Path:
    """Record that ``stem`` is finished: call only after every one of ``files`` was written."""
    out = Path(folder)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "image": stem,
        "config": key,
        "source": source,
        "files": {path.relative_to(out).as_posix(): path.stat().st_size for path in files},
    }
    return save_text(marker_path(out, stem), json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def remove_marker(folder: str | os.PathLike[str], stem: str) -> None:
    """Forget that ``stem`` was finished (before its files are written again)."""
    marker_path(folder, stem).unlink(missing_ok=True)


def image_state(folder: str | os.PathLike[str], stem: str, key: str, source: str, files: Sequence[Path]) -> State:
    """Whether an image's outputs in ``folder`` are complete and were made by run ``key`` from ``source``.

    Returns:
        ``"finished"``: the marker matches the key, the source and the planned files, and each file exists
        with its recorded size. ``"other-config"``: a valid marker of another configuration. ``"unfinished"``:
        anything else (no marker, an unreadable one, a changed input, a missing or cut file): redo it.
    """
    out = Path(folder)
    try:
        record = json.loads(marker_path(out, stem).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unfinished"
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
        return "unfinished"
    if record.get("config") != key:
        return "other-config"
    recorded = record.get("files")
    planned = [path.relative_to(out).as_posix() for path in files]
    if record.get("source") != source or not isinstance(recorded, dict) or sorted(recorded) != sorted(planned):
        return "unfinished"
    for name, size in recorded.items():
        path = out / name
        if not path.is_file() or path.stat().st_size != size:
            return "unfinished"
    return "finished"


def remove_stale_files(folder: str | os.PathLike[str], stem: str, keep: Sequence[Path]) -> list[Path]:
    """Remove the files an earlier run's marker lists for ``stem`` that this run will not write (``--overwrite``).

    A rerun with other labels or output flags would otherwise leave the earlier run's masks, score maps or
    GeoJSON beside its own files. Only files named in ovss's own marker are touched (never a user's), and
    only inside ``folder``; a folder those removals leave empty (``<stem>_masks``) goes too.

    Returns:
        The removed paths.
    """
    out = Path(folder)
    try:
        record = json.loads(marker_path(out, stem).read_text(encoding="utf-8"))
        listed = list(record["files"]) if isinstance(record.get("files"), dict) else []
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return []
    kept = {path.resolve() for path in keep}
    removed: list[Path] = []
    root = out.resolve()
    for name in listed:
        path = (out / str(name)).resolve()
        if path in kept or not path.is_relative_to(root) or not path.is_file():
            continue
        path.unlink()
        removed.append(path)
        if path.parent != root and not any(path.parent.iterdir()):
            path.parent.rmdir()
    return removed
