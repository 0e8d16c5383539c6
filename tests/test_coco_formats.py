"""Outputs other tools read (issue 22, item 3): RLE, polygons and GeoJSON decode back to the label map;
score maps round-trip; coco.json does not depend on the processing order or the split into shards."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from ovss.errors import OvssError
from ovss.labels import UNLABELLED
from ovss.output.coco import coco_categories, decode_annotations, image_annotations
from ovss.output.collection import (
    COCO_FILE,
    CollectionOptions,
    collection_paths,
    merge_collection,
    part_path,
    save_collection,
)
from ovss.output.polygons import coco_polygons, geojson_document
from ovss.pipeline.maps import FullResolutionMaps, LabelRule
from ovss.prediction import Prediction

# pycocotools <= 2.0.11 under NumPy 2 warns in its own decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
CLASSES = [["sky"], ["road", "street"], ["car"], ["person", "pedestrian"]]


def _blobs(height: int, width: int, seed: int, absent: int | None = None, unlabelled: float = 0.01) -> np.ndarray:
    """(H, W) int64 labels: smooth random blobs of 4 classes, a share of unlabelled pixels, a speck."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(4, height // 4 + 2, width // 4 + 2)).astype(np.float32)  # (4, h, w)
    smooth = np.stack([cv2.resize(n, (width, height), interpolation=cv2.INTER_CUBIC) for n in noise])  # (4, H, W)
    if absent is not None:
        smooth[absent] = -np.inf
    labels = smooth.argmax(axis=0).astype(np.int64)  # (H, W)
    labels[rng.random((height, width)) < unlabelled] = UNLABELLED  # isolated unlabelled pixels
    labels[height // 2, width // 3] = 2 if absent != 2 else 0  # a one-pixel speck
    return labels


def _prediction(labels: np.ndarray, seed: int = 0) -> Prediction:
    """A Prediction whose probabilities come from random logits (the labels are given separately)."""
    generator = torch.Generator().manual_seed(seed)
    names = [name for names in CLASSES for name in names]
    logits = torch.randn(len(names), *labels.shape, generator=generator)  # (Q, H, W)
    rule = LabelRule(tuple(c for c, names in enumerate(CLASSES) for _ in names), len(CLASSES), 40.0)
    maps = FullResolutionMaps.from_logits(logits, rule)
    return Prediction(torch.from_numpy(labels), CLASSES, {"method": "test"}, maps, None)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels on either side of the mask's edge (8-neighbourhood)."""
    kernel = np.ones((3, 3), np.uint8)
    grown = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
    shrunk = cv2.erode(mask.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
    return grown & ~shrunk


@pytest.mark.parametrize(("height", "width", "absent"), [(37, 53, None), (1, 9, None), (64, 31, 2), (16, 16, 0)])
def test_every_rle_decodes_to_its_class_mask_exactly(height: int, width: int, absent: int | None) -> None:
    labels = _blobs(height, width, seed=height * width, absent=absent)
    annotations = image_annotations(labels, len(CLASSES))
    present = sorted(set(labels[labels >= 0].tolist()))
    assert [a["category_id"] - 1 for a in annotations] == present
    if absent is not None:
        assert absent + 1 not in [a["category_id"] for a in annotations]
    for annotation in annotations:
        rle = annotation["segmentation"]
        assert isinstance(rle["counts"], str) and rle["size"] == [height, width]
        decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})  # pycocotools itself
        expected = labels == annotation["category_id"] - 1
        assert np.array_equal(decoded.astype(bool), expected)
        assert annotation["area"] == int(expected.sum())
        rows, cols = np.nonzero(expected)
        assert annotation["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
    back = decode_annotations(annotations, height, width, {c + 1: c for c in range(len(CLASSES))}, UNLABELLED)
    assert np.array_equal(back, labels)


def test_coco_polygons_rasterise_back_within_one_boundary_pixel() -> None:
    labels = _blobs(48, 60, seed=3, unlabelled=0.0)
    annotations = image_annotations(labels, len(CLASSES), polygons=True)
    kinds = {type(a["segmentation"]) for a in annotations}
    assert list in kinds  # some class became polygons
    for annotation in annotations:
        expected = labels == annotation["category_id"] - 1
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, dict):  # a hole: the exact RLE was kept
            assert coco_polygons(expected) is None
            continue
        assert all(len(polygon) >= 6 for polygon in segmentation)
        decoded = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(segmentation, 48, 60))).astype(bool)
        wrong = decoded != expected
        assert wrong.sum() < expected.sum() // 2  # it is the mask, not something else
        assert not (wrong & ~_boundary(expected)).any()


def test_a_mask_with_a_hole_keeps_its_rle_as_a_coco_polygon_cannot_hold_it() -> None:
    labels = np.zeros((12, 12), dtype=np.int64)
    labels[3:9, 3:9] = 1
    labels[5:7, 5:7] = 2  # a hole in class 1
    annotations = {a["category_id"]: a["segmentation"] for a in image_annotations(labels, 3, polygons=True)}
    assert isinstance(annotations[2], dict)  # class 1 with its hole: RLE
    assert isinstance(annotations[3], list)  # class 2: a polygon
    assert isinstance(annotations[1], dict)  # class 0 surrounds a hole too


def test_geojson_rings_fill_back_to_the_mask_with_holes_within_one_boundary_pixel() -> None:
    labels = _blobs(40, 50, seed=7)
    labels[10:30, 10:30] = 1
    labels[15:20, 15:20] = 3  # a hole in class 1
    document = json.loads(json.dumps(geojson_document(labels, CLASSES, "x.jpg")))
    assert document["type"] == "FeatureCollection" and document["image"] == {"file_name": "x.jpg", "height": 40,
                                                                              "width": 50}  # fmt: skip
    holes = 0
    for feature in document["features"]:
        geometry = feature["geometry"]
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        filled = np.zeros(labels.shape, np.uint8)
        for rings in polygons:
            assert all(ring[0] == ring[-1] and len(ring) >= 4 for ring in rings)
            holes += len(rings) - 1
            # even-odd fill of the outer ring and its holes: a hole's inside is left out
            # OpenCV's pixel (c, r) is centred at (c, r), GeoJSON's at (c + 0.5, r + 0.5); quarter pixels
            quarters = [np.rint((np.array(ring[:-1]) - 0.5) * 4).astype(np.int32) for ring in rings]
            cv2.fillPoly(filled, quarters, 1, shift=2)
        expected = labels == feature["properties"]["class_id"]
        assert feature["properties"]["name"] == CLASSES[feature["properties"]["class_id"]][0]
        wrong = filled.astype(bool) != expected
        assert not (wrong & ~_boundary(expected)).any()
    assert holes >= 1


def _run(
    folder: Path, order: list[int], stems: list[str], labels: list[np.ndarray], options: CollectionOptions
) -> None:
    """Write the parts of the images ``order`` (positions in ``stems``), in that order: one "process"."""
    for i in order:
        save_collection(folder, stems[i], _prediction(labels[i], i), options, file_name=f"{stems[i]}.jpg")


def test_merged_coco_json_is_the_same_for_any_order_or_split_into_shards(tmp_path: Path) -> None:
    stems = ["b", "a", "c", "d", "e"]  # the job list's order is not alphabetical
    labels = [_blobs(20 + i, 30 - i, seed=i, absent=i % 4 if i else None) for i in range(len(stems))]
    labels[3][:] = UNLABELLED  # an image without any annotation
    options = CollectionOptions(coco=True)
    one, shards = tmp_path / "one", tmp_path / "shards"
    _run(one, [0, 1, 2, 3, 4], stems, labels, options)
    merge_collection(one, stems, CLASSES, options, background=0)
    _run(shards, [4, 2, 0], stems, labels, options)  # "shard 0", processing in reverse
    first = merge_collection(shards, stems, CLASSES, options, background=0)  # a shard done early: partial
    assert first.missing == ["a", "d"] and first.images == 3
    _run(shards, [3, 1], stems, labels, options)  # "shard 1"
    last = merge_collection(shards, stems, CLASSES, options, background=0)
    assert last.missing == [] and last.images == 5
    assert (one / COCO_FILE).read_bytes() == (shards / COCO_FILE).read_bytes()

    coco = COCO(str(shards / COCO_FILE))  # pycocotools loads it
    assert [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)] == [f"{s}.jpg" for s in stems]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["sky", "road", "car", "person"]
    assert coco.loadCats(1)[0]["background"] is True and coco.loadCats(2)[0]["synonyms"] == ["road", "street"]
    assert sorted(coco.anns) == list(range(1, len(coco.anns) + 1))
    for position, expected in enumerate(labels):
        image = coco.imgs[position + 1]
        assert (image["height"], image["width"]) == expected.shape
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[position + 1]))
        back = np.full(expected.shape, UNLABELLED, dtype=np.int64)
        for annotation in annotations:
            back[coco.annToMask(annotation).astype(bool)] = annotation["category_id"] - 1
        assert np.array_equal(back, expected)


def test_merge_leaves_out_parts_of_another_class_list_or_format(tmp_path: Path) -> None:
    labels = _blobs(10, 12, seed=1)
    options = CollectionOptions(coco=True)
    save_collection(tmp_path, "a", _prediction(labels), options, file_name="a.png")
    other = CollectionOptions(coco=True, coco_polygons=True)
    assert merge_collection(tmp_path, ["a"], CLASSES, other).missing == ["a"]
    assert merge_collection(tmp_path, ["a"], [*CLASSES, ["tree"]], options).missing == ["a"]
    part_path(tmp_path, "a").write_text('{"format": "ovss-coco-part", "vers')  # a cut file
    assert merge_collection(tmp_path, ["a"], CLASSES, options).missing == ["a"]


def test_score_maps_round_trip(tmp_path: Path) -> None:
    labels = _blobs(17, 23, seed=5)
    prediction = _prediction(labels, seed=5)
    probs = prediction.probs.numpy()  # (C, H, W) what the labels of the method are the argmax of
    written = save_collection(tmp_path, "x", prediction, CollectionOptions(scores="npy"), file_name="x.png")
    assert written == [tmp_path / "x_scores.npy"]
    stored = np.load(written[0])
    assert stored.dtype == np.float16 and stored.shape == probs.shape
    assert np.array_equal(stored, probs.astype(np.float16))
    written = save_collection(tmp_path, "x", prediction, CollectionOptions(scores="png"), file_name="x.png")
    assert [p.name for p in written] == ["0_sky.png", "1_road.png", "2_car.png", "3_person.png"]
    from PIL import Image

    pngs = np.stack([np.asarray(Image.open(p)) for p in written])  # (C, H, W)
    assert pngs.dtype == np.uint8
    assert np.abs(pngs / 255.0 - probs).max() <= 0.5 / 255 + 1e-7


def test_collection_paths_are_what_save_collection_writes(tmp_path: Path) -> None:
    options = CollectionOptions(coco=True, coco_polygons=True, geojson=True, scores="png")
    written = save_collection(tmp_path, "x", _prediction(_blobs(9, 9, seed=2)), options, file_name="x.png")
    assert written == collection_paths(tmp_path, "x", CLASSES, options)
    assert all(path.is_file() for path in written)
    with pytest.raises(OvssError, match="already exists"):
        save_collection(tmp_path, "x", _prediction(_blobs(9, 9, seed=2)), options, file_name="x.png")


def test_categories_mark_the_background_class() -> None:
    categories = coco_categories(CLASSES, background=2)
    assert [c["id"] for c in categories] == [1, 2, 3, 4]
    assert [c.get("background", False) for c in categories] == [False, False, True, False]


def test_specks_and_one_pixel_lines_become_polygons_with_an_area() -> None:
    labels = np.zeros((9, 11), dtype=np.int64)
    labels[0, 10] = 1  # a speck in the corner
    labels[4, 2:9] = 2  # a horizontal line one pixel wide
    for i in range(5):
        labels[2 + i, i] = 3  # a diagonal line (8-connected)
    for annotation in image_annotations(labels, 4, polygons=True)[1:]:  # class 0 surrounds everything: RLE
        polygons = annotation["segmentation"]
        assert isinstance(polygons, list) and all(len(polygon) >= 8 for polygon in polygons)
        decoded = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polygons, 9, 11))).astype(bool)
        assert np.array_equal(decoded, labels == annotation["category_id"] - 1)


def test_the_collection_writers_read_the_compact_labels_and_never_build_the_int64_copy(tmp_path: Path) -> None:
    labels = _blobs(23, 31, seed=5)
    compact = _prediction(labels.astype(np.int8))  # what predict returns for a few classes
    wide = _prediction(labels)  # int64, the labels of earlier versions
    options = CollectionOptions(coco=True, geojson=True)
    written = save_collection(tmp_path / "compact", "x", compact, options, file_name="x.png")
    assert compact._labels is None  # the 8-bytes-a-pixel copy was never made
    again = save_collection(tmp_path / "wide", "x", wide, options, file_name="x.png")
    assert [p.name for p in written] == [p.name for p in again] and len(written) == 2
    for one, other in zip(written, again, strict=True):
        assert one.read_bytes() == other.read_bytes(), one.name
