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
WIDE_IGNORE_INDEX = 65535  # the ignore id of datasets of more than 255 classes (16-bit labels)

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


LABEL_FORMATS = (
    "palette PNGs of class ids (as `ovss segment` writes them), 8- or 16-bit greyscale PNGs of class ids, or the "
    "coco.json of `ovss segment --save-coco`"
)  # what a user's --masks may hold, for error messages


def read_label_ids(path: str | Path) -> np.ndarray:
    """The class ids of a label PNG, as stored: palette indices, or 8- or 16-bit grey values.

    Palette ("P") images give their palette **indices** (never the RGB colours); 16-bit greyscale PNGs (PIL
    modes ``I;16*`` / ``I``) are read with OpenCV's ``IMREAD_UNCHANGED``, which keeps their uint16 values.

    Args:
        path: a palette, greyscale or 16-bit PNG.

    Returns:
        (H0, W0) uint8 or uint16 class ids.

    Raises:
        OvssError: the file is no image, an RGB(A) image, or another kind of image.
    """
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode in ("P", "L"):
                return np.array(image)  # (H0, W0) uint8
    except (OSError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise OvssError(f"label {path} is not an image PNG ({err}); masks must be {LABEL_FORMATS}") from err
    if mode not in ("I", "I;16", "I;16B", "I;16L"):
        raise OvssError(f"label {path} is a {mode} image (colours?); masks must be {LABEL_FORMATS}")
    import cv2

    values = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # (H0, W0) uint16 for a 16-bit PNG
    if values is None or values.ndim != 2 or values.dtype not in (np.uint8, np.uint16):
        kind = "unreadable" if values is None else f"{values.dtype} of shape {values.shape}"
        raise OvssError(f"label {path} is {kind}; masks must be {LABEL_FORMATS}")
    return values


def read_label(path: str | Path) -> np.ndarray:
    """Decode a label PNG of at most 256 ids to uint8 class ids (:func:`read_label_ids`).

    Args:
        path: a palette, greyscale or 16-bit PNG.

    Returns:
        (H0, W0) uint8 class ids.

    Raises:
        OvssError: the file is an RGB(A) image or holds values above 255.
    """
    values = read_label_ids(path)  # (H0, W0)
    if values.dtype != np.uint8:
        if values.min() < 0 or values.max() > 255:
            raise OvssError(f"label {path} has values outside 0..255; store class ids 0..254 and 255 = ignore")
        values = values.astype(np.uint8)
    return values


def narrow_labels(values: np.ndarray) -> np.ndarray:
    """Class ids of a dataset of at most 255 classes: (H0, W0) uint8, 255 = ignore.

    A 16-bit file's 65535 is ignore too; its other values above 255 stay out of range (``int64``, for the
    caller's check) instead of wrapping around.
    """
    if values.dtype == np.uint8:
        return values
    ids = values.astype(np.int64)  # (H0, W0)
    ids[ids == WIDE_IGNORE_INDEX] = IGNORE_INDEX
    return ids.astype(np.uint8) if ids.max(initial=0) <= IGNORE_INDEX else ids


def wide_labels(values: np.ndarray, reduce_zero: bool) -> np.ndarray:
    """Class ids of a dataset of more than 255 classes: (H0, W0) uint16 with ``WIDE_IGNORE_INDEX`` = ignore.

    An 8-bit file's 255 and a 16-bit file's 65535 are ignore (what `ovss segment` writes for unlabelled
    pixels); with ``reduce_zero`` 0 becomes ignore and every other id v becomes v - 1.
    """
    ids = values.astype(np.int64)  # (H0, W0)
    ignore = ids == (IGNORE_INDEX if values.dtype == np.uint8 else WIDE_IGNORE_INDEX)  # (H0, W0) bool
    if reduce_zero:
        ignore |= ids == 0
        ids = ids - 1
    ids[ignore] = WIDE_IGNORE_INDEX
    return ids.astype(np.uint16)


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


class CocoMasks:
    """The label maps of a COCO JSON, by image file stem (``ovss eval --dataset folder --masks coco.json``).

    Categories are matched to the classes by name (a category's ``name`` is one of a class's names, as
    ``ovss segment --save-coco`` writes them); every category must be a class and every class a category.
    An image's label map is painted from its annotations in file order (RLE, uncompressed RLE or polygons,
    decoded by pycocotools); pixels of no annotation are ignored.

    Args:
        path: the COCO JSON file.
        classes: the class list (``read_names_file``: the reader of ``ovss segment --labels-file``).
        names_source: what to call the class list in messages (e.g. ``--names classes.txt``).

    Raises:
        OvssError: unreadable or not COCO; a category that is no class, or a class without a category.
    """

    def __init__(self, path: str | Path, classes: list[list[str]], names_source: str = "the class names") -> None:
        import json

        self.path = Path(path)
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise OvssError(f"cannot read COCO masks file {self.path} ({err}); give a coco.json or a folder") from err
        keys = ("categories", "images", "annotations")
        if not isinstance(document, dict) or any(not isinstance(document.get(key), list) for key in keys):
            raise OvssError(
                f"{self.path} is not a COCO JSON (it needs 'categories', 'images' and 'annotations' lists); "
                f"masks must be {LABEL_FORMATS}"
            )
        fields = {"categories": ("id", "name"), "images": ("id", "file_name", "height", "width"),
                  "annotations": ("image_id", "category_id", "segmentation")}  # fmt: skip
        for key, needed in fields.items():  # a malformed entry: one line now, not a KeyError at some image
            bad = next((e for e in document[key] if not isinstance(e, dict) or any(f not in e for f in needed)), None)
            if bad is not None:
                raise OvssError(
                    f"{self.path} has a malformed entry in '{key}' ({str(bad)[:80]}): each needs "
                    f"{', '.join(needed)}; masks must be {LABEL_FORMATS}"
                )
        self.class_of_category = self._match(document["categories"], classes, names_source)
        self.images: dict[str, tuple[int, int, int]] = {}  # file stem -> (image id, height, width)
        for image in document["images"]:
            try:
                size = (int(image["height"]), int(image["width"]))
            except (TypeError, ValueError) as err:
                raise OvssError(f"{self.path}: image {image['file_name']!r} has a non-integer height or width") from err
            self.images[Path(str(image["file_name"])).stem] = (image["id"], *size)
        self.annotations: dict[int, list[dict]] = {}  # image id -> its annotations, in file order
        for annotation in document["annotations"]:
            self.annotations.setdefault(annotation["image_id"], []).append(annotation)

    def _match(self, categories: list[dict], classes: list[list[str]], names_source: str) -> dict[int, int]:
        class_of_name = {name: c for c, names in reversed(list(enumerate(classes))) for name in names}
        matched: dict[int, int] = {}
        for category in categories:
            name = category.get("name")
            if name not in class_of_name:
                raise OvssError(
                    f"category {name!r} (id {category.get('id')}) of {self.path} is not a class of {names_source}; "
                    "give the class file the masks were made with"
                )
            matched[category["id"]] = class_of_name[name]
        unmatched = [names[0] for c, names in enumerate(classes) if c not in matched.values()]
        if unmatched:
            raise OvssError(
                f"class {unmatched[0]!r} of {names_source} has no category in {self.path}"
                f"{f' (nor {len(unmatched) - 1} more)' if len(unmatched) > 1 else ''}; give the class file the "
                "masks were made with"
            )
        return matched

    def label(self, stem: str, fill: int, dtype: type[np.integer]) -> np.ndarray:
        """(H0, W0) label map of the image with file stem ``stem``; ``fill`` where no annotation is."""
        from ovss.output.coco import decode_annotations

        image_id, height, width = self.images[stem]
        annotations = self.annotations.get(image_id, [])
        return decode_annotations(annotations, height, width, self.class_of_category, fill, dtype)
