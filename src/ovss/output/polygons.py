"""Class masks as polygons: COCO polygon lists and GeoJSON features (``--coco-polygons``, ``--save-geojson``).

Outlines come from ``cv2.findContours`` (``RETR_CCOMP``: outer boundaries of the components and the
boundaries of their holes; ``CHAIN_APPROX_SIMPLE``: straight runs reduced to their end points) on the mask
upsampled twice (each pixel a 2 x 2 block), so that every component has an area (a one-pixel speck, a line
one pixel wide) and outlines follow the pixels' edges to a quarter pixel (staircases are then simplified by
``cv2.approxPolyDP`` with a quarter-pixel tolerance). Vertices are continuous pixel
coordinates ``[x, y]`` (x to the right, y down; pixel (column c, row r) covers ``[c, c+1] x [r, r+1]``, its
centre at ``(c + 0.5, r + 0.5)``, as in COCO): an outer ring passes a quarter pixel inside the component's
edge pixels and a hole's ring a quarter pixel inside the pixels around the hole, so a rasteriser that takes
the pixels whose centres lie inside (pycocotools) gives the mask back, to within one boundary pixel.

COCO polygons cannot hold holes (pycocotools unites all polygons of an annotation), so with
``--coco-polygons`` a class mask with a hole keeps its exact RLE (docs/decisions.md, "Outputs other tools
read"); GeoJSON polygons carry holes as interior rings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

UPSAMPLE = 2  # outlines are traced on the mask upsampled by this factor
MIN_VERTICES = 3  # fewer vertices enclose no area (and 2 read as a bbox in pycocotools' frPyObjects)
SIMPLIFY = 0.5  # cv2.approxPolyDP tolerance in upsampled pixels (a quarter pixel): fewer vertices on diagonals


def _contours(mask: np.ndarray) -> tuple[list[list[list[float]]], np.ndarray]:
    """Two-level outlines of a boolean mask: per contour its [x, y] vertices (pixel coordinates, see the
    module docstring), and OpenCV's (K, 4) hierarchy (next, previous, first child, parent)."""
    import cv2

    big = np.repeat(np.repeat(np.asarray(mask, dtype=np.uint8), UPSAMPLE, axis=0), UPSAMPLE, axis=1)  # (2H, 2W)
    found, hierarchy = cv2.findContours(big, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    simplified = [cv2.approxPolyDP(contour, SIMPLIFY, True) for contour in found]  # each (N_i, 1, 2)
    # a component of the upsampled mask is at least 2 x 2: >= 4 vertices, kept where simplifying leaves < 3
    found = [short if len(short) >= MIN_VERTICES else whole for short, whole in zip(simplified, found, strict=True)]
    contours = [
        [[(float(x) + 0.5) / UPSAMPLE, (float(y) + 0.5) / UPSAMPLE] for x, y in contour.reshape(-1, 2)]
        for contour in found
    ]  # each N_i vertices, subpixel centres in the image's pixel coordinates
    links = hierarchy.reshape(-1, 4) if hierarchy is not None else np.zeros((0, 4), dtype=np.int32)  # (K, 4)
    return contours, links


def coco_polygons(mask: np.ndarray) -> list[list[float]] | None:
    """COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` of a boolean mask, or None when it has a hole.

    None: the caller keeps the RLE, which is exact (see the module docstring).
    """
    contours, links = _contours(mask)
    if (links[:, 3] >= 0).any():  # a hole
        return None
    return [[value for vertex in contour for value in vertex] for contour in contours]


def _ring(vertices: list[list[float]]) -> list[list[float]]:
    """A closed GeoJSON ring (first position repeated at the end)."""
    return [*vertices, vertices[0]]


def mask_polygons(mask: np.ndarray) -> list[list[list[list[float]]]]:
    """The polygons of a boolean mask as GeoJSON coordinates: per component, its outer ring then its holes."""
    contours, links = _contours(mask)
    polygons: list[list[list[list[float]]]] = []
    for contour, link in zip(contours, links, strict=True):
        if link[3] >= 0:  # a hole: added to its component below
            continue
        rings = [_ring(contour)]
        child = int(link[2])  # first hole of this component, then its siblings
        while child >= 0:
            rings.append(_ring(contours[child]))
            child = int(links[child][0])
        polygons.append(rings)
    return polygons


def geojson_features(labels: np.ndarray, classes: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """One GeoJSON Feature per class present in ``labels`` (ascending ids).

    The geometry is a Polygon (one component) or a MultiPolygon, in pixel coordinates; properties:
    ``class_id`` (the label map value), ``category_id`` (its id in coco.json), ``name`` and ``synonyms``.
    """
    from ovss.output.coco import category_id, present_classes

    features: list[dict[str, Any]] = []
    for c in present_classes(labels, len(classes)):
        polygons = mask_polygons(labels == c)
        geometry: dict[str, Any] = (
            {"type": "Polygon", "coordinates": polygons[0]}
            if len(polygons) == 1
            else {"type": "MultiPolygon", "coordinates": polygons}
        )
        properties = {"class_id": c, "category_id": category_id(c), "name": classes[c][0], "synonyms": list(classes[c])}
        features.append({"type": "Feature", "geometry": geometry, "properties": properties})
    return features


def geojson_document(
    labels: np.ndarray, classes: Sequence[Sequence[str]], file_name: str
) -> dict[str, Any]:
    """A FeatureCollection of one image's classes (:func:`geojson_features`), with the image's name and size."""
    height, width = labels.shape
    return {
        "type": "FeatureCollection",
        "image": {"file_name": file_name, "height": int(height), "width": int(width)},
        "features": geojson_features(labels, classes),
    }
