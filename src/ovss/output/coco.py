"""COCO-style annotations of label maps: one RLE (or polygon list) per image and present class, and back.

The run-level ``coco.json`` of ``ovss segment --save-coco`` is built from per-image parts
(:mod:`ovss.output.collection`); this module holds the pieces that do not depend on files:

- :func:`coco_categories`: one category per class, ``id = class index + 1`` (COCO ids start at 1; the
  label map value of a category is ``id - 1``), ``name`` the class's first name, ``synonyms`` all its
  names, ``background: true`` on the class that receives uncertain pixels (it is annotated like any other
  class, so the file decodes back to the exact label map; drop it by that flag for things-only tools);
- :func:`image_annotations`: per present class (ascending ids) ``category_id``, ``segmentation`` (compressed
  RLE from ``pycocotools.mask.encode``, counts stored as ``str``; or COCO polygons, see
  :mod:`ovss.output.polygons`), ``area`` and ``bbox`` (from pycocotools, of the RLE: exact pixel counts)
  and ``iscrowd: 0`` (semantic "stuff" annotations, as COCO-Stuff writes them). Unlabelled pixels (255 in
  the label map) belong to no annotation;
- :func:`decode_annotations`: annotations (RLE, uncompressed RLE or polygons) back to a label map, what
  ``ovss eval --masks coco.json`` reads.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ovss.errors import OvssError
from ovss.output.files import class_pixel_counts


def _mask_api() -> Any:
    try:
        from pycocotools import mask
    except ImportError as err:  # a dependency; only a broken install lacks it
        raise OvssError("COCO output needs pycocotools: pip install pycocotools") from err
    return mask


def category_id(class_index: int) -> int:
    """The COCO category id of a class: ``class index + 1``."""
    return class_index + 1


def coco_categories(classes: Sequence[Sequence[str]], background: int | None = None) -> list[dict[str, Any]]:
    """One category per class in class order (see the module docstring)."""
    categories: list[dict[str, Any]] = []
    for index, names in enumerate(classes):
        entry: dict[str, Any] = {"id": category_id(index), "name": names[0], "supercategory": ""}
        entry["synonyms"] = list(names)
        if index == background:
            entry["background"] = True
        categories.append(entry)
    return categories


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Compressed RLE of a (H, W) boolean mask: ``{"size": [H, W], "counts": str}`` (pycocotools)."""
    rle = _mask_api().encode(np.asfortranarray(mask, dtype=np.uint8))  # (H, W) Fortran order, as pycocotools needs
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _as_pycocotools_rle(rle: Mapping[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def present_classes(labels: np.ndarray, num_classes: int) -> list[int]:
    """Ascending class ids that label at least one pixel of ``labels`` (negative values are unlabelled)."""
    return [int(c) for c in np.flatnonzero(class_pixel_counts(labels, num_classes))]


def image_annotations(labels: np.ndarray, num_classes: int, polygons: bool = False) -> list[dict[str, Any]]:
    """The annotations of one label map, without ``id`` and ``image_id`` (given when the run is merged).

    Args:
        labels: (H, W) integer class ids in [0, C), negative = unlabelled.
        num_classes: C.
        polygons: COCO polygon lists instead of RLE where a class's mask has no hole and no component
            thinner than a polygon (:func:`ovss.output.polygons.coco_polygons`); RLE elsewhere.

    Returns:
        One annotation per present class, in ascending class order.
    """
    api = _mask_api()
    annotations: list[dict[str, Any]] = []
    for c in present_classes(labels, num_classes):
        mask = labels == c  # (H, W) bool
        rle = encode_mask(mask)
        segmentation: Any = rle
        if polygons:
            from ovss.output.polygons import coco_polygons

            polygon_list = coco_polygons(mask)
            if polygon_list is not None:
                segmentation = polygon_list
        exact = _as_pycocotools_rle(rle)
        x, y, w, h = (float(v) for v in api.toBbox(exact))
        annotations.append(
            {
                "category_id": category_id(c),
                "segmentation": segmentation,
                "area": int(api.area(exact)),
                "bbox": [x, y, w, h],
                "iscrowd": 0,
            }
        )
    return annotations


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a COCO ``segmentation``: compressed or uncompressed RLE, or a polygon list."""
    api = _mask_api()
    if isinstance(segmentation, list):  # polygons: rasterised by pycocotools and united
        if not segmentation:
            return np.zeros((height, width), dtype=bool)
        rle = api.merge(api.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = api.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = _as_pycocotools_rle(segmentation)
    else:
        raise OvssError(f"unknown COCO segmentation {str(segmentation)[:60]!r}; expected RLE or polygons")
    with warnings.catch_warnings():  # pycocotools <= 2.0.11 under NumPy 2: "__array__ ... copy keyword"
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        mask = api.decode(rle)  # (H, W) uint8
    if mask.shape != (height, width):
        raise OvssError(f"a COCO segmentation of size {mask.shape} belongs to an image of size {(height, width)}")
    return mask.astype(bool)


def decode_annotations(
    annotations: Iterable[Mapping[str, Any]],
    height: int,
    width: int,
    class_of_category: Mapping[int, int],
    fill: int,
    dtype: type[np.integer[Any]] = np.int64,
) -> np.ndarray:
    """A label map painted from annotations, in their order (a later annotation wins where two overlap).

    Args:
        annotations: COCO annotations of one image (``category_id`` and ``segmentation``).
        height, width: the image's size.
        class_of_category: label value of each category id.
        fill: value of the pixels that no annotation covers (the ignore / unlabelled value).
        dtype: dtype of the result.

    Returns:
        (H, W) label map.

    Raises:
        OvssError: an annotation names a category outside ``class_of_category``.
    """
    labels = np.full((height, width), fill, dtype=dtype)  # (H, W)
    for annotation in annotations:
        category = annotation.get("category_id")
        if not isinstance(category, int) or category not in class_of_category:
            raise OvssError(f"a COCO annotation has category_id {category!r}, which no category lists; fix the file")
        labels[decode_segmentation(annotation["segmentation"], height, width)] = class_of_category[category]
    return labels
