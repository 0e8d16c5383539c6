"""Label decoding and remapping of the benchmarks (spec §6.2), and the one-off label preparation.

Labels are class-id PNGs at the original resolution H0 x W0; 255 = ignore. ``read_label`` decodes
palette indices (never RGB colours); the remapping functions are 256-entry lookup tables;
``prepare_coco_object`` and ``prepare_cityscapes`` write the converted label files next to their
sources (what ``ovss data prepare`` runs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ovss.errors import OvssError
from ovss.eval.layouts import LAYOUTS, find_base, layout_tree

IGNORE_INDEX = 255

# Cityscapes labelIds -> trainIds (official mapping); every other id -> 255.
CITYSCAPES_LABELID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def _lookup(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Apply a 256-entry uint8 lookup table; values outside 0..255 map to 255."""
    values = np.asarray(values)
    inside = (values >= 0) & (values <= 255)
    out = np.full(values.shape, IGNORE_INDEX, dtype=np.uint8)
    out[inside] = table[values[inside].astype(np.int64)]
    return out


def read_label(path: str | Path) -> np.ndarray:
    """Decode a label PNG to class ids.

    Palette ("P") images give their palette **indices** (never the RGB colours); greyscale ("L") and
    16-bit images give their values.

    Args:
        path: a palette, greyscale or 16-bit PNG.

    Returns:
        (H0, W0) uint8 class ids.

    Raises:
        OvssError: the file is an RGB(A) image or holds values above 255.
    """
    with Image.open(path) as image:
        mode = image.mode
        if mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
            raise OvssError(f"label {path} is a {mode} image; labels must be palette or greyscale PNGs of class ids")
        values = np.array(image)  # (H0, W0)
    if values.dtype != np.uint8:
        if values.min() < 0 or values.max() > 255:
            raise OvssError(f"label {path} has values outside 0..255; store class ids 0..254 and 255 = ignore")
        values = values.astype(np.uint8)
    return values


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmsegmentation's ``reduce_zero_label``: 0 -> 255, v -> v - 1 for 1..254, 255 stays 255.

    Args:
        label: (H0, W0) uint8 class ids.

    Returns:
        (H0, W0) uint8, a new array.
    """
    table = np.arange(-1, 255, dtype=np.int64)  # v -> v - 1
    table[0] = IGNORE_INDEX
    table[255] = IGNORE_INDEX
    return _lookup(label, table.astype(np.uint8))


def labelids_to_trainids(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes ``labelIds`` (34 ids) to the 19 ``labelTrainIds`` (official mapping, §6.2).

    Args:
        label_ids: (H0, W0) integer array of Cityscapes label ids.

    Returns:
        (H0, W0) uint8 train ids 0..18; every unmapped id -> 255.
    """
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_LABELID_TO_TRAINID.items():
        table[label_id] = train_id
    return _lookup(label_ids, table)


def trainids_to_coco_object(train_ids: np.ndarray) -> np.ndarray:
    """COCO-Stuff ``labelTrainIds`` to COCO-Object ids (GroupViT/TCL conversion, §6.2).

    Args:
        train_ids: (H0, W0) integer array of COCO-Stuff train ids (0..170, 255).

    Returns:
        (H0, W0) uint8: things 0..79 -> 1..80; stuff 80..170, 255 and anything else -> 0 (background).
    """
    table = np.zeros(256, dtype=np.uint8)
    table[:80] = np.arange(1, 81, dtype=np.uint8)
    out = _lookup(train_ids, table)
    out[out == IGNORE_INDEX] = 0  # values outside 0..255 are background too
    return out


def _prepare(name: str, root: str | Path, convert: Callable[[np.ndarray], np.ndarray], overwrite: bool) -> int:
    layout = LAYOUTS[name]
    base = find_base(Path(root), layout)
    label_dir = base / layout.label_dir if base is not None else None
    sources = sorted(label_dir.rglob(f"*{layout.source_suffix}")) if label_dir is not None else []
    if not sources:
        raise OvssError(
            f"no *{layout.source_suffix} files found for {name} under {root}; "
            f"point root at the folder holding the layout below\n" + layout_tree(name)
        )
    written = 0
    for source in sources:
        target = source.with_name(source.name[: -len(layout.source_suffix)] + layout.label_suffix)
        if target.exists() and not overwrite:
            continue
        Image.fromarray(convert(read_label(source))).save(target)
        written += 1
    return written


def prepare_coco_object(root: str | Path, overwrite: bool = False) -> int:
    """Write ``X_instanceTrainIds.png`` (COCO-Object, 81 classes) next to every ``X_labelTrainIds.png``.

    Uses ``trainids_to_coco_object``: 0..79 -> 1..80, 80..170 -> 0, 255 -> 0.

    Args:
        root: the ``coco_stuff164k`` layout root, its base directory, or any folder in between.
        overwrite: rewrite files that already exist.

    Returns:
        Number of files written.

    Raises:
        OvssError: no ``_labelTrainIds.png`` file found under ``annotations/val2017``.
    """
    return _prepare("coco_object", root, trainids_to_coco_object, overwrite)


def prepare_cityscapes(root: str | Path, overwrite: bool = False) -> int:
    """Write ``A_gtFine_labelTrainIds.png`` next to every ``A_gtFine_labelIds.png`` of Cityscapes val.

    Args:
        root: the ``cityscapes`` layout root, its base directory, or any folder in between.
        overwrite: rewrite files that already exist.

    Returns:
        Number of files written.

    Raises:
        OvssError: no ``_gtFine_labelIds.png`` file found under ``gtFine/val``.
    """
    return _prepare("cityscapes", root, labelids_to_trainids, overwrite)
