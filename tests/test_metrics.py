"""Dataset-level mIoU accumulator (spec §7.1): hand-computed cases and a torchmetrics cross-check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from ovss.eval.metrics import ConfusionAccumulator


def test_hand_computed_three_classes_with_ignore() -> None:
    # label row 0: 0 0 1, row 1: 1 255 2 ; pred row 0: 0 1 1, row 1: 2 2 2
    label = np.array([[0, 0, 1], [1, 255, 2]], dtype=np.uint8)
    pred = np.array([[0, 1, 1], [2, 2, 2]], dtype=np.int64)
    acc = ConfusionAccumulator(3)
    acc.update(pred, label)
    # kept pixels: 5 (the 255 one is dropped, its prediction 2 too)
    assert acc.intersection.tolist() == [1, 1, 1]
    assert acc.pred_area.tolist() == [1, 2, 2]
    assert acc.label_area.tolist() == [2, 2, 1]
    result = acc.compute()
    # unions: 0 -> 1+2-1 = 2, 1 -> 2+2-1 = 3, 2 -> 2+1-1 = 2
    assert result["IoU"] == pytest.approx([50.0, 100 / 3, 50.0])
    assert result["mIoU"] == pytest.approx((50 + 100 / 3 + 50) / 3)
    assert result["Acc"] == pytest.approx([50.0, 50.0, 100.0])
    assert result["mAcc"] == pytest.approx(200 / 3)
    assert result["aAcc"] == pytest.approx(3 / 5 * 100)


def test_absent_but_predicted_counts_zero_and_never_seen_is_skipped() -> None:
    # class 2 is predicted but absent from the labels -> IoU 0 (counts); class 3 never appears -> NaN
    label = np.array([[0, 0, 1, 1]], dtype=np.uint8)
    pred = np.array([[0, 2, 1, 1]], dtype=np.uint8)
    acc = ConfusionAccumulator(4)
    acc.update(pred, label)
    result = acc.compute()
    iou = result["IoU"]
    assert isinstance(iou, list)
    assert iou[:3] == pytest.approx([50.0, 100.0, 0.0])
    assert math.isnan(iou[3])
    assert result["mIoU"] == pytest.approx(50.0)  # (50 + 100 + 0) / 3, class 3 skipped
    acc_per_class = result["Acc"]
    assert isinstance(acc_per_class, list)
    assert math.isnan(acc_per_class[2]) and math.isnan(acc_per_class[3])  # no label pixels
    assert result["mAcc"] == pytest.approx(75.0)


def test_ignored_pixels_leave_prediction_area_untouched() -> None:
    label = np.full((2, 2), 255, dtype=np.uint8)
    label[0, 0] = 1
    pred = np.ones((2, 2), dtype=np.int64)
    acc = ConfusionAccumulator(2)
    acc.update(pred, label)
    assert acc.pred_area.tolist() == [0, 1]
    assert acc.compute()["IoU"] == [pytest.approx(math.nan, nan_ok=True), 100.0]


def test_custom_ignore_index_and_out_of_range_values() -> None:
    # ignore_index 0; label value 7 >= C is counted in no histogram (mmseg's histc over 0..C-1)
    label = np.array([[0, 1, 7, 2]])
    pred = np.array([[2, 1, 2, 9]])
    acc = ConfusionAccumulator(3, ignore_index=0)
    acc.update(pred, label)
    assert acc.intersection.tolist() == [0, 1, 0]
    assert acc.pred_area.tolist() == [0, 1, 1]  # pred 9 dropped, pred 2 at label 7 kept
    assert acc.label_area.tolist() == [0, 1, 1]


def test_dataset_level_sums_not_per_image_means() -> None:
    acc = ConfusionAccumulator(2)
    acc.update(np.zeros((1, 4), dtype=np.int64), np.array([[0, 0, 0, 1]]))  # class 0: I=3 U=4
    acc.update(np.array([[0, 1]]), np.array([[0, 0]]))  # class 0: I=1 U=2; class 1: I=0 U=1
    result = acc.compute()
    # dataset level: class 0 I=4 U=6, class 1 I=0 U=2 (per-image means would give 0.625 for class 0)
    assert result["IoU"] == pytest.approx([400 / 6, 0.0])
    assert result["aAcc"] == pytest.approx(4 / 6 * 100)


def test_empty_accumulator_is_nan_everywhere() -> None:
    result = ConfusionAccumulator(2).compute()
    for key in ("mIoU", "mAcc", "aAcc"):
        value = result[key]
        assert isinstance(value, float) and math.isnan(value)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        ConfusionAccumulator(2).update(np.zeros((2, 2)), np.zeros((2, 3)))


def _random_images(seed: int, count: int, classes: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        height, width = rng.integers(5, 40, size=2)
        label = rng.integers(0, classes, size=(height, width)).astype(np.uint8)
        label[rng.random((height, width)) < 0.15] = 255
        # predictions agree with the label ~half of the time
        pred = np.where(rng.random((height, width)) < 0.5, label, rng.integers(0, classes, (height, width)))
        pred[pred == 255] = 0
        images.append((pred.astype(np.int64), label))
    return images


def test_matches_torchmetrics_dataset_level_iou() -> None:
    classes = 7
    acc = ConfusionAccumulator(classes)
    reference = MulticlassJaccardIndex(num_classes=classes, average="none", ignore_index=255)
    for pred, label in _random_images(seed=0, count=6, classes=classes - 1):  # class 6 never appears
        acc.update(pred, label)
        reference.update(torch.from_numpy(pred), torch.from_numpy(label.astype(np.int64)))
    ours = np.array(acc.compute()["IoU"])
    theirs = reference.compute().numpy() * 100
    defined = ~np.isnan(ours)
    assert defined.sum() == classes - 1
    np.testing.assert_allclose(ours[defined], theirs[defined], rtol=1e-5)
    # torchmetrics reports 0 (zero_division) where mmseg/ovss report NaN and skip the class in the mean
    assert theirs[~defined].tolist() == [0.0]
    assert acc.compute()["mIoU"] == pytest.approx(theirs[defined].mean(), rel=1e-5)
    assert acc.compute()["mIoU"] > theirs.mean()


def test_merge_and_state_dict_equal_single_pass() -> None:
    images = _random_images(seed=1, count=5, classes=4)
    whole = ConfusionAccumulator(4)
    first, second = ConfusionAccumulator(4), ConfusionAccumulator(4)
    for index, (pred, label) in enumerate(images):
        whole.update(pred, label)
        (first if index < 2 else second).update(torch.from_numpy(pred), torch.from_numpy(label))
    merged = ConfusionAccumulator(4)
    merged.merge(first)
    merged.merge(second)
    assert merged.compute() == whole.compute()
    # an all-reduce sums the count tensors of every worker's state_dict
    state_a, state_b = first.state_dict(), second.state_dict()
    reduced = {key: state_a[key] + state_b[key] for key in ("intersection", "pred_area", "label_area")}
    restored = ConfusionAccumulator(4)
    restored.load_state_dict({**state_a, **reduced})
    assert restored.compute() == whole.compute()
    assert restored.intersection.dtype == torch.int64
    state_a["intersection"] += 1  # state_dict returns copies
    assert first.intersection.tolist() != state_a["intersection"].tolist()


def test_mismatched_accumulators_are_rejected() -> None:
    with pytest.raises(ValueError, match="merge"):
        ConfusionAccumulator(3).merge(ConfusionAccumulator(4))
    with pytest.raises(ValueError, match="num_classes=4"):
        ConfusionAccumulator(3).load_state_dict(ConfusionAccumulator(4).state_dict())


def test_counts_are_int64_beyond_int32() -> None:
    acc = ConfusionAccumulator(2)
    big = 2**31 + 5
    state = acc.state_dict()
    state["intersection"] = torch.tensor([big, 0])
    state["pred_area"] = torch.tensor([big, 0])
    state["label_area"] = torch.tensor([big, 0])
    acc.load_state_dict(state)
    acc.update(np.zeros((1, 3), dtype=np.uint8), np.zeros((1, 3), dtype=np.uint8))
    assert acc.intersection.tolist() == [big + 3, 0]
