"""The files of one prediction (``Prediction.save``, ``ovss segment``): label map, overlay, logits, masks, areas.

Per image ``<stem>``, in the output folder:

- ``<stem>.png``: the label map, pixel value = class id. 8-bit palette PNG for up to 255 classes, with
  255 = unlabelled; 16-bit greyscale PNG beyond, with 65535 = unlabelled. Class colours come from
  ``ovss.output.overlay.class_palette`` (every class visible), unlabelled pixels are black.
- ``<stem>_overlay.png``: the image with class colours and a legend; unlabelled pixels are not tinted.
- ``<stem>_logits.npy`` (optional): (Q, H0, W0) float32 (or float16) cosine logits per name.
- ``<stem>_masks/<id>_<name>.png`` (optional): one 8-bit mask per class, 255 inside, 0 outside.
- ``<stem>.json`` (optional): image size and each class's pixel count and share of the image.

Each file's content is computed just before it is written and dropped after (a 9000 x 9000 photo's overlay
alone is 243 MB); a failure part-way removes the files this call wrote, and each file appears whole or not
at all (``ovss.storage.files``). The writers read the labels in their compact dtype
(``Prediction.compact_labels``) and never build the int64 ``Prediction.labels``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ovss.errors import OvssError
from ovss.labels import UNLABELLED
from ovss.output.overlay import class_palette, overlay, rows_per_band, save_label_png
from ovss.storage.files import save_npy, save_png, save_rgb_png, save_text

if TYPE_CHECKING:
    from ovss.prediction import Prediction

MAX_8BIT_CLASSES = 255  # ids 0..254 are classes, 255 is unlabelled
MAX_16BIT_CLASSES = 65535  # ids 0..65534 are classes, 65535 is unlabelled
_UNSAFE_FILE_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]+")


def label_map_format(num_classes: int) -> tuple[int, int]:
    """``(bit_depth, unlabelled_value)`` of the label PNG for ``num_classes`` classes: (8, 255) or (16, 65535)."""
    if num_classes <= MAX_8BIT_CLASSES:
        return 8, 2**8 - 1
    if num_classes <= MAX_16BIT_CLASSES:
        return 16, 2**16 - 1
    raise OvssError(f"{num_classes} classes do not fit a 16-bit label PNG (at most {MAX_16BIT_CLASSES})")


def mask_file_name(class_index: int, name: str, num_classes: int) -> str:
    """``07_traffic_light.png``: the zero-padded class id and the name reduced to letters, digits, _ and -."""
    safe = _UNSAFE_FILE_CHARACTERS.sub("_", name).strip("_")[:40] or "class"
    return f"{class_index:0{len(str(num_classes - 1))}d}_{safe}.png"


def output_paths(
    folder: str | os.PathLike[str],
    stem: str,
    classes: list[list[str]],
    *,
    logits: bool = False,
    masks: bool = False,
    json: bool = False,
) -> list[Path]:
    """Every file :func:`save_prediction` writes for these arguments, label map first (for up-front checks)."""
    out = Path(folder)
    paths = [out / f"{stem}.png", out / f"{stem}_overlay.png"]
    if logits:
        paths.append(out / f"{stem}_logits.npy")
    if masks:
        paths += [out / f"{stem}_masks" / mask_file_name(c, names[0], len(classes)) for c, names in enumerate(classes)]
    if json:
        paths.append(out / f"{stem}.json")
    return paths


def _label_map(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, int, int]:
    """Class ids with UNLABELLED replaced by the file's unlabelled value, and the (bit depth, that value)."""
    bit_depth, unlabelled = label_map_format(num_classes)
    ids = labels.astype(np.uint8 if bit_depth == 8 else np.uint16)  # (H0, W0) the file's dtype
    ids[labels == UNLABELLED] = unlabelled
    return ids, bit_depth, unlabelled


def prediction_overlay(prediction: Prediction, alpha: float = 0.5) -> np.ndarray:
    """``Prediction.overlay``: (H0', W0 + legend, 3) uint8 RGB with every class in a bright colour."""
    if prediction.image is None:
        raise OvssError("this prediction holds no image; create it with Segmenter.predict to draw an overlay")
    names = [synonyms[0] for synonyms in prediction.classes]
    labels = prediction.compact_labels.cpu().numpy()  # (H0, W0) int8/16/32, UNLABELLED left untinted
    return overlay(prediction.image, labels, names, alpha=alpha, palette=class_palette(len(names)))


def class_pixel_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) int64 pixel count of each class id 0..C-1 in a (H, W) label map (negative values: unlabelled).

    Counted one band of rows at a time: ``np.bincount`` makes an int64 copy of what it counts.
    """
    height, width = labels.shape
    counts = np.zeros(num_classes, dtype=np.int64)  # (C,)
    rows = rows_per_band(width)
    for start in range(0, height, rows):
        band = labels[start : start + rows]  # (n, W)
        counts += np.bincount(band[band >= 0], minlength=num_classes)[:num_classes]
    return counts


def class_areas(labels: np.ndarray, classes: list[list[str]]) -> dict[str, Any]:
    """Image size, per-class pixel counts and shares, and the unlabelled pixels of a label map."""
    height, width = labels.shape
    total = max(height * width, 1)
    counts = class_pixel_counts(labels, len(classes))  # (C,)
    unlabelled = int((labels == UNLABELLED).sum())
    return {
        "height": height,
        "width": width,
        "classes": [
            {"id": c, "name": names[0], "synonyms": names, "pixels": int(counts[c]), "area": int(counts[c]) / total}
            for c, names in enumerate(classes)
        ],
        "unlabelled": {"pixels": unlabelled, "area": unlabelled / total},
    }


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Before anything is written: refuse to replace an existing output unless ``overwrite``.

    Raises:
        OvssError: one of ``paths`` exists and ``overwrite`` is off.
    """
    existing = next((path for path in paths if path.exists()), None)
    if existing is not None and not overwrite:
        raise OvssError(f"'{existing}' already exists; pass overwrite=True (--overwrite) or choose another folder")


def save_prediction(
    prediction: Prediction,
    folder: str | os.PathLike[str],
    stem: str = "prediction",
    *,
    logits: bool = False,
    masks: bool = False,
    json: bool = False,
    alpha: float = 0.5,
    overwrite: bool = False,
    logits_dtype: str = "fp32",
) -> list[Path]:
    """Write a prediction's files (see the module docstring); the one writer of ``ovss segment``.

    Args:
        prediction: the result of ``Segmenter.predict``.
        folder: output folder, created if missing.
        stem: file-name stem, e.g. the input image's.
        logits: also write ``<stem>_logits.npy``.
        masks: also write one binary mask per class into ``<stem>_masks/``.
        json: also write ``<stem>.json`` with the class areas.
        alpha: overlay opacity of the class colours, in [0, 1].
        overwrite: replace existing files; otherwise an existing file raises before anything is written.
        logits_dtype: "fp32" or "fp16" (half the file, built without the fp32 map: ``maps.logits(float16)``).

    Returns:
        The written paths, in :func:`output_paths` order.

    Raises:
        OvssError: an output exists (without ``overwrite``), ``folder`` is a file, or a bad ``alpha``.
    """
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise OvssError(f"output folder '{out}' is a file; give a folder (it is created if missing)")
    classes = prediction.classes
    paths = output_paths(out, stem, classes, logits=logits, masks=masks, json=json)
    refuse_existing(paths, overwrite)
    if logits and logits_dtype not in ("fp32", "fp16"):
        raise OvssError(f"logits_dtype must be 'fp32' or 'fp16', got {logits_dtype!r}")
    labels = prediction.compact_labels.cpu().numpy()  # (H0, W0) int8/16/32, never the int64 copy

    def label_png(path: Path) -> Path:
        ids, bit_depth, _ = _label_map(labels, len(classes))  # (H0, W0)
        palette = np.zeros((256, 3), dtype=np.uint8)  # (256, 3) unlabelled (255) black
        palette[: min(len(classes), MAX_8BIT_CLASSES)] = class_palette(min(len(classes), MAX_8BIT_CLASSES))
        return save_label_png(ids, path, palette=palette, bit_depth=bit_depth)

    def overlay_png(path: Path) -> Path:
        return save_rgb_png(path, prediction_overlay(prediction, alpha), consume=True)  # a fresh canvas

    def logits_npy(path: Path) -> Path:
        import torch

        dtype = torch.float16 if logits_dtype == "fp16" else torch.float32
        return save_npy(path, prediction.maps.logits(dtype).cpu().numpy())  # (Q, H0, W0)

    def mask_png(class_id: int) -> Callable[[Path], Path]:
        return lambda path: save_png(path, np.multiply(labels == class_id, 255, dtype=np.uint8))  # (H0, W0)

    def areas_json(path: Path) -> Path:
        record = {"image": stem, **class_areas(labels, classes), "method": prediction.config.get("method")}
        return save_text(path, _json_text(record))

    writers: list[Callable[[Path], Path]] = [label_png, overlay_png]  # in output_paths order
    writers += [logits_npy] if logits else []
    writers += [mask_png(c) for c in range(len(classes))] if masks else []
    writers += [areas_json] if json else []
    written: list[Path] = []
    try:
        for path, write in zip(paths, writers, strict=True):
            written.append(write(path))  # each content is made here and dropped after its file
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if masks and (out / f"{stem}_masks").is_dir() and not any((out / f"{stem}_masks").iterdir()):
            (out / f"{stem}_masks").rmdir()
        raise
    return written


def _json_text(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2) + "\n"
