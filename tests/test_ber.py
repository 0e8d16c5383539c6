"""Boundary Error Rate (spec §7.2): boundary lines, hand-built pair counts and a brute-force cross-check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ovss.eval.ber import BoundaryErrorAccumulator, boundary_error_counts, boundary_lines, format_ber
from ovss.pipeline.windows import sliding_windows


def _quadrants(size: int, line: int) -> np.ndarray:
    """(size, size) prediction that changes exactly at column ``line`` and at row ``line``."""
    rows, cols = np.indices((size, size))
    return (rows >= line).astype(np.int64) * 2 + (cols >= line)


def test_lines_of_two_by_two_windows_at_equal_and_different_resolution() -> None:
    windows = sliding_windows(8, 8, crop=4, stride=4)
    assert len(windows) == 4
    xs, ys = boundary_lines(windows, 8, 8, 8, 8)
    assert xs.tolist() == [4] and ys.tolist() == [4]
    xs, ys = boundary_lines(windows, 8, 8, 12, 5)  # rows 4*12/8 = 6; cols floor(4*5/8 + 0.5) = 3
    assert xs.tolist() == [3] and ys.tolist() == [6]
    assert xs.dtype == np.int64


def test_overlapping_windows_give_both_edges() -> None:
    windows = sliding_windows(10, 10, crop=6, stride=4)  # [0, 6) and [4, 10) on each axis
    xs, ys = boundary_lines(windows, 10, 10, 10, 10)
    assert xs.tolist() == [4, 6] and ys.tolist() == [4, 6]
    xs, _ = boundary_lines(windows, 10, 10, 10, 5)  # 4 -> 2, 6 -> 3
    assert xs.tolist() == [2, 3]
    xs, _ = boundary_lines(windows, 10, 10, 10, 2)  # both map to 1 (floor(0.8+0.5), floor(1.2+0.5))
    assert xs.tolist() == [1]
    xs, _ = boundary_lines(windows, 10, 10, 10, 1)  # nothing inside 1..W0-1
    assert xs.tolist() == []


def test_whole_image_window_has_no_lines() -> None:
    xs, ys = boundary_lines(sliding_windows(336, 448, crop=0, stride=1), 336, 448, 375, 500)
    assert xs.size == 0 and ys.size == 0
    acc = BoundaryErrorAccumulator()
    assert acc.update(np.zeros((375, 500)), np.zeros((375, 500)), xs, ys) == (0, 0)
    assert math.isnan(acc.compute())
    assert format_ber(acc.compute()) == "n/a"


def test_cityscapes_lines() -> None:
    # 560x1120 with 224/112: 4 x 9 windows; x1 = 0, 112, ..., 896; x2 = 224, ..., 1120
    windows = sliding_windows(560, 1120, crop=224, stride=112)
    assert len(windows) == 36
    xs, ys = boundary_lines(windows, 560, 1120, 1024, 2048)
    # processing columns 112..1008 step 112 (x1 > 0 and x2 < W), times 2048/1120
    expected_x = [int(np.floor(b * 2048 / 1120 + 0.5)) for b in range(112, 1009, 112)]
    assert xs.tolist() == expected_x
    # rows: y1 in {112, 224, 336}, y2 in {224, 336, 448}
    assert ys.tolist() == [int(np.floor(b * 1024 / 560 + 0.5)) for b in (112, 224, 336, 448)]


def test_constant_prediction_is_zero_and_flip_at_lines_is_hundred() -> None:
    label = np.ones((4, 4), dtype=np.uint8)
    xs, ys = np.array([2]), np.array([2])
    assert boundary_error_counts(np.zeros((4, 4)), label, xs, ys) == (0, 8)  # 4 rows + 4 columns
    assert boundary_error_counts(_quadrants(4, 2), label, xs, ys) == (8, 8)
    # a prediction changing one column away from the line is not a seam error
    assert boundary_error_counts(_quadrants(4, 3), label, xs, ys) == (0, 8)


def test_ignore_and_disagreeing_labels_drop_pairs() -> None:
    label = np.ones((4, 4), dtype=np.uint8)
    label[0, 1:3] = 255  # row-0 pair of the vertical line (columns 1|2): both ignored -> dropped
    label[1, 3] = 255  # column-3 pair of the horizontal line (rows 1|2): 255 | 1 -> dropped
    label[2, 2] = 5  # row 2: 1 | 5 differs -> dropped; column 2: 1 | 5 differs -> dropped
    xs, ys = np.array([2]), np.array([2])
    # kept: vertical rows 1, 3; horizontal columns 0, 1
    assert boundary_error_counts(_quadrants(4, 2), label, xs, ys) == (4, 4)
    # with ignore index 5 the 255 | 255 pair of row 0 is an ordinary agreeing pair
    assert boundary_error_counts(_quadrants(4, 2), label, xs, ys, ignore_index=5) == (5, 5)


def test_different_label_resolution_lines() -> None:
    windows = sliding_windows(8, 8, crop=4, stride=4)
    xs, ys = boundary_lines(windows, 8, 8, 12, 12)  # line 4 -> 6
    cols = np.indices((12, 12))[1]
    label = np.zeros((12, 12), dtype=np.uint8)
    pred = (cols >= 6).astype(np.int64)  # flips at the vertical line only
    acc = BoundaryErrorAccumulator()
    assert acc.update(pred, label, xs, ys) == (12, 24)
    assert acc.compute() == pytest.approx(50.0)
    assert format_ber(acc.compute()) == "50.00"


def test_band_pairs() -> None:
    label = np.zeros((6, 6), dtype=np.uint8)
    cols = np.indices((6, 6))[1]
    pred = (cols <= 1).astype(np.int64)  # pairs (1, 4) and (0, 5) differ, (2, 3) agrees
    xs, ys = np.array([3]), np.array([], dtype=np.int64)
    assert boundary_error_counts(pred, label, xs, ys, band=1) == (0, 6)  # pair (2, 3)
    assert boundary_error_counts(pred, label, xs, ys, band=2) == (6, 12)  # + (1, 4)
    assert boundary_error_counts(pred, label, xs, ys, band=3) == (12, 18)  # + (0, 5)
    assert boundary_error_counts(pred, label, xs, ys, band=4) == (12, 18)  # (-1, 6) leaves the image
    with pytest.raises(ValueError, match="band"):
        BoundaryErrorAccumulator(band=0)


def test_coco_object_like_background_counts() -> None:
    # no 255 anywhere: background (0) pairs count like any other class
    label = np.zeros((4, 4), dtype=np.uint8)
    label[:, 2:] = 3  # vertical-line pairs disagree in the label -> dropped; horizontal ones kept
    pred = _quadrants(4, 2)
    assert boundary_error_counts(pred, label, np.array([2]), np.array([2])) == (4, 4)


def _brute_force(
    pred: np.ndarray, label: np.ndarray, xs: np.ndarray, ys: np.ndarray, band: int
) -> tuple[int, int]:
    errors = pairs = 0
    height, width = label.shape
    for line in xs:
        for k in range(band):
            a, b = line - 1 - k, line + k
            if a < 0 or b >= width:
                continue
            for r in range(height):
                if label[r, a] == label[r, b] != 255:
                    pairs += 1
                    errors += int(pred[r, a] != pred[r, b])
    for line in ys:
        for k in range(band):
            a, b = line - 1 - k, line + k
            if a < 0 or b >= height:
                continue
            for c in range(width):
                if label[a, c] == label[b, c] != 255:
                    pairs += 1
                    errors += int(pred[a, c] != pred[b, c])
    return errors, pairs


@pytest.mark.parametrize("band", [1, 2, 3])
def test_matches_brute_force_on_random_images(band: int) -> None:
    rng = np.random.default_rng(band)
    for _ in range(4):
        height, width = rng.integers(6, 30, size=2)
        label = rng.integers(0, 3, size=(height, width)).astype(np.uint8)
        label[rng.random((height, width)) < 0.2] = 255
        pred = rng.integers(0, 3, size=(height, width))
        xs = np.unique(rng.integers(1, width, size=3))
        ys = np.unique(rng.integers(1, height, size=2))
        expected = _brute_force(pred, label, xs, ys, band)
        assert boundary_error_counts(pred, label, xs, ys, band=band) == expected
        assert (
            boundary_error_counts(torch.from_numpy(pred), torch.from_numpy(label), xs, ys, band=band)
            == expected
        )


def test_accumulator_sums_merges_and_restores() -> None:
    xs, ys = np.array([2]), np.array([2])
    label = np.ones((4, 4), dtype=np.uint8)
    first, second = BoundaryErrorAccumulator(), BoundaryErrorAccumulator()
    assert first.update(_quadrants(4, 2), label, xs, ys) == (8, 8)
    assert second.update(np.zeros((4, 4)), label, xs, ys) == (0, 8)
    second.update(np.zeros((4, 4)), label, xs, ys)
    first.merge(second)
    assert (first.errors, first.pairs) == (8, 24)
    assert first.compute() == pytest.approx(100 / 3)
    restored = BoundaryErrorAccumulator()
    restored.load_state_dict(first.state_dict())
    assert restored.compute() == first.compute()
    with pytest.raises(ValueError, match="band"):
        BoundaryErrorAccumulator(band=2).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="merge"):
        first.merge(BoundaryErrorAccumulator(band=2))
