"""Class-name files of the eight benchmarks and of custom datasets (spec §6.3).

Name files live in the package under ``ovss/data/names/`` and use the format of the public releases:
one line per class in label order; a class with several names (the "rename trick" synonyms) lists them
separated by ``", "``; they are read by the one labels-file reader (:func:`ovss.labels.parse_labels_text`).
Files:

* ``<dataset>-<name_set>.txt`` for VOC21, VOC20 and COCO-Object, whose names differ per name set
  (``plain``, ``bg-rename``, ``full-rename``);
* ``<dataset>.txt`` for the five datasets whose names are identical in all three name sets;
* ``<dataset>.classes.txt``: the canonical class names in label order (one per line, no synonyms), used
  for reports and overlays, never fed to the text encoder.

Names are exactly the strings fed to the text encoder (``ship``, ``table``, ``trafficlight``, ...).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ovss.errors import OvssError
from ovss.labels import parse_labels_text, read_labels_file

DATASETS: tuple[str, ...] = (
    "voc21",
    "voc20",
    "pc60",
    "pc59",
    "coco_object",
    "coco_stuff",
    "cityscapes",
    "ade20k",
)
NAME_SETS: tuple[str, ...] = ("plain", "bg-rename", "full-rename")
# Datasets whose names depend on the name set; the others share one file for all name sets.
_PER_NAME_SET: frozenset[str] = frozenset({"voc21", "voc20", "coco_object"})


def parse_names(text: str, source: str = "<text>") -> list[list[str]]:
    """Parse the content of a name file into synonym lists (:func:`ovss.labels.parse_labels_text`).

    The reader of ``ovss segment --labels-file``: one class per line; synonyms separated by commas (the
    release files use ``", "``), ``|`` or ``;``; ``#`` starts a comment. A name may serve two classes (the
    reference COCO-Object name sets list ``bed`` as a background synonym and as a class), and a line of many
    comma-separated synonyms does not warn (it is the release format).

    Args:
        text: file content.
        source: what to call the text in error messages (usually the file path).

    Returns:
        One list of names (length >= 1) per class, in label order.

    Raises:
        OvssError: a line has an empty name (e.g. ``"cat, , dog"``) or the text has no class at all.
    """
    return parse_labels_text(text, source, allow_duplicates=True, warn_comma_lists=False)


def read_names_file(path: str | Path) -> list[list[str]]:
    """Read a custom class-name file (``ovss eval --names``), as ``ovss segment --labels-file`` reads it.

    Args:
        path: a UTF-8 text file, one class per line in label order (format: :func:`parse_names`).

    Returns:
        One synonym list per class.

    Raises:
        OvssError: the file does not exist or is malformed.
    """
    return read_labels_file(path, allow_duplicates=True, warn_comma_lists=False)


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise OvssError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def _packaged_text(file_name: str) -> str:
    return (resources.files("ovss") / "data" / "names" / file_name).read_text(encoding="utf-8")


def load_names(dataset: str, name_set: str = "plain") -> list[list[str]]:
    """The names fed to the text encoder for one of the eight benchmarks.

    Args:
        dataset: one of :data:`DATASETS`.
        name_set: one of :data:`NAME_SETS`; only VOC21, VOC20 and COCO-Object differ between sets.

    Returns:
        One synonym list per class in label order (21, 20, 60, 59, 81, 171, 19 or 150 classes).

    Raises:
        OvssError: unknown dataset or name set.
    """
    _check_dataset(dataset)
    if name_set not in NAME_SETS:
        raise OvssError(f"unknown name set {name_set!r}; choose one of {', '.join(NAME_SETS)}")
    file_name = f"{dataset}-{name_set}.txt" if dataset in _PER_NAME_SET else f"{dataset}.txt"
    return parse_names(_packaged_text(file_name), source=f"name file 'ovss/data/names/{file_name}'")


def class_names(dataset: str) -> list[str]:
    """Canonical class names of a benchmark in label order (for reports and overlays).

    Args:
        dataset: one of :data:`DATASETS`.

    Returns:
        One name per class, e.g. ``"boat"`` and ``"diningtable"`` for VOC21 (whose text-encoder names
        are ``ship`` and ``table``).

    Raises:
        OvssError: unknown dataset.
    """
    _check_dataset(dataset)
    text = _packaged_text(f"{dataset}.classes.txt")
    return [line.strip() for line in text.splitlines() if line.strip()]
