"""first_argmax (the labels' argmax over classes) equals torch.argmax, ties and NaN included."""

from __future__ import annotations

import pytest
import torch

from ovss.pipeline.postprocess import class_areas, first_argmax, labels_from_probs


@pytest.mark.parametrize("classes", [1, 2, 7, 20])
def test_first_argmax_equals_torch_argmax(classes):
    gen = torch.Generator().manual_seed(classes)
    probs = torch.rand(classes, 33, 41, generator=gen).softmax(0)  # (C, H, W)
    if classes > 2:
        probs[2] = probs[1]  # exact ties between two whole planes: the first index wins
        probs[-1, :5] = probs[:, :5].amax(0)  # the last class ties the best on some rows
    labels, best = first_argmax(probs)
    assert labels.dtype == torch.int64
    assert torch.equal(labels, torch.argmax(probs, dim=0))
    assert torch.equal(best, probs.amax(dim=0))


def test_first_argmax_ties_go_to_the_lowest_index():
    probs = torch.full((4, 3, 3), 0.25)  # every class ties everywhere
    labels, _ = first_argmax(probs)
    assert torch.equal(labels, torch.zeros(3, 3, dtype=torch.int64))


def test_first_argmax_with_nan_behaves_as_torch_argmax():
    probs = torch.rand(5, 4, 6, generator=torch.Generator().manual_seed(0))
    probs[3, 1, 2] = float("nan")
    probs[1, 1, 2] = float("nan")
    probs[4, 0, 0] = float("nan")
    labels, best = first_argmax(probs)
    assert torch.equal(labels, torch.argmax(probs, dim=0))
    assert torch.equal(best.isnan(), probs.amax(dim=0).isnan())


def test_labels_and_areas_use_the_same_winner():
    probs = torch.rand(6, 20, 30, generator=torch.Generator().manual_seed(3)).softmax(0)
    probs[4] = probs[2]
    labels = labels_from_probs(probs, bg_threshold=0.2, bg_label=-1)
    reference = torch.argmax(probs, dim=0)
    reference[probs.amax(dim=0) < 0.2] = -1
    assert torch.equal(labels, reference)
    assert torch.equal(class_areas(probs), torch.bincount(torch.argmax(probs, 0).flatten(), minlength=6))
