"""Logits -> probabilities -> labels (spec §2.6) and SCLIP's area filter (spec §2.8)."""

from __future__ import annotations

import math

import pytest
import torch

from ovss.pipeline.postprocess import (
    area_filter,
    class_areas,
    class_probabilities,
    labels_from_probs,
    logits_to_labels,
    name_probabilities,
    segment_rows,
    small_classes,
)


def test_name_probabilities_equal_softmax_of_scaled_logits() -> None:
    torch.manual_seed(0)
    logits = torch.rand(7, 5, 6, dtype=torch.float64) * 2 - 1  # (Q, H, W) cosine similarities
    original = logits.clone()
    probs = name_probabilities(logits, 50.0)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(50.0 * logits.float(), dim=0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probs.sum(0), torch.ones(5, 6))
    assert torch.equal(logits, original)


def test_synonyms_take_max_after_joint_softmax() -> None:
    # Classes: 0 background (name 0), 1 cat (name 1), 2 dog (names 2 and 3).
    # tau = 1 and logits ln[1, 3, 2, 2] -> joint softmax [1/8, 3/8, 2/8, 2/8].
    #   max after softmax (spec): P = [1/8, 3/8, 1/4]   -> label 1; with theta_bg = 0.4 -> 0.
    #   sum after softmax:        P = [1/8, 3/8, 1/2]   -> label 2.
    #   max of logits, softmax:   P = [1/6, 1/2, 1/3]   -> label 1 even with theta_bg = 0.4.
    logits = torch.tensor([math.log(1), math.log(3), math.log(2), math.log(2)])[:, None, None]  # (4, 1, 1)
    name_to_class = [0, 1, 2, 2]
    probs = class_probabilities(name_probabilities(logits, 1.0), name_to_class, 3)
    torch.testing.assert_close(probs[:, 0, 0], torch.tensor([1 / 8, 3 / 8, 1 / 4]))
    probs_all, labels = logits_to_labels(logits, name_to_class, 3, logit_scale=1.0)
    torch.testing.assert_close(probs_all, probs)
    assert labels.item() == 1
    _, labels_bg = logits_to_labels(logits, name_to_class, 3, logit_scale=1.0, bg_threshold=0.4)
    assert labels_bg.item() == 0


def test_class_probabilities_matches_masked_max_with_tensor_mapping() -> None:
    torch.manual_seed(1)
    name_probs = torch.softmax(torch.randn(6, 4, 5), dim=0)  # (Q, H, W)
    name_to_class = torch.tensor([2, 0, 2, 1, 2, 0])
    probs = class_probabilities(name_probs, name_to_class, 3)
    for cls in range(3):
        expected = name_probs[name_to_class == cls].amax(0)
        torch.testing.assert_close(probs[cls], expected, rtol=0, atol=0)


def test_class_probabilities_rejects_bad_mappings() -> None:
    name_probs = torch.full((3, 2, 2), 1 / 3)
    with pytest.raises(ValueError, match="no name"):
        class_probabilities(name_probs, [0, 0, 2], 3)
    with pytest.raises(ValueError, match="entries"):
        class_probabilities(name_probs, [0, 1], 2)
    with pytest.raises(ValueError, match="lie in"):
        class_probabilities(name_probs, [0, 1, 3], 3)


def test_background_threshold_is_strict() -> None:
    # Three pixels with best probability 0.5 (exactly the threshold), 0.49 and 0.8.
    probs = torch.tensor(
        [
            [[0.25, 0.30, 0.10]],
            [[0.50, 0.21, 0.80]],
            [[0.25, 0.49, 0.10]],
        ]
    )  # (C, 1, 3)
    assert labels_from_probs(probs, 0.5).tolist() == [[1, 0, 1]]
    assert labels_from_probs(probs, 0.0).tolist() == [[1, 2, 1]]


def test_argmax_ties_go_to_lowest_index() -> None:
    # Large enough to use the vectorised CPU reduction over a non-innermost dimension.
    probs = torch.zeros(6, 64, 80)  # (C, H, W)
    probs[2] = 0.4
    probs[4] = 0.4
    probs[5, :, :40] = 0.4
    assert torch.all(labels_from_probs(probs) == 2)
    probs[1, 10, 10] = 0.4
    labels = labels_from_probs(probs)
    assert labels[10, 10].item() == 1
    assert int((labels == 2).sum()) == 64 * 80 - 1


def test_area_filter_drops_classes_at_the_threshold_boundary() -> None:
    # 10 pixels (2 x 5). Winners: class 0 on 2 px, class 1 on 3 px, class 2 on 2 px, class 3 on 3 px.
    # A = 3 + 2 + 3 = 8 and threshold 0.25 -> 0.25 * A = 2: class 2 (A_2 = 2) is dropped, 1 and 3 kept.
    winners = torch.tensor([[0, 1, 1, 2, 3], [0, 1, 2, 3, 3]])
    probs = torch.full((4, 2, 5), 0.1)  # (C, H, W)
    probs.scatter_(0, winners[None], 0.6)
    probs[1, 0, 3] = 0.2  # runner-up of the first class-2 pixel is class 1
    probs[0, 1, 2] = 0.3  # runner-up of the second class-2 pixel is background
    original = probs.clone()
    filtered = area_filter(probs, 0.25)
    assert torch.equal(probs, original)
    assert torch.all(filtered[2] == 0)
    torch.testing.assert_close(filtered[[0, 1, 3]], original[[0, 1, 3]], rtol=0, atol=0)
    assert labels_from_probs(filtered).tolist() == [[0, 1, 1, 1, 3], [0, 1, 0, 3, 3]]
    # Just below the boundary every class survives.
    assert torch.equal(area_filter(probs, 0.2499), original)
    # In place on request.
    assert area_filter(probs, 0.25, inplace=True) is probs
    assert torch.all(probs[2] == 0)


def test_area_filter_never_touches_background() -> None:
    probs = torch.tensor([[[0.9, 0.9]], [[0.1, 0.1]]])  # (2, 1, 2): all background, A = 0
    filtered = area_filter(probs, 0.1)
    torch.testing.assert_close(filtered[0], probs[0], rtol=0, atol=0)
    assert torch.all(filtered[1] == 0)


def test_logits_to_labels_matches_step_by_step_composition() -> None:
    torch.manual_seed(2)
    logits = torch.rand(8, 12, 10) * 0.4  # (Q, H, W)
    name_to_class = [0, 1, 1, 2, 3, 3, 3, 4]
    probs, labels = logits_to_labels(logits, name_to_class, 5, 40.0, bg_threshold=0.3, area_threshold=0.1)
    expected = area_filter(class_probabilities(name_probabilities(logits, 40.0), name_to_class, 5), 0.1)
    torch.testing.assert_close(probs, expected, rtol=0, atol=0)
    torch.testing.assert_close(labels, labels_from_probs(expected, 0.3), rtol=0, atol=0)
    assert labels.dtype == torch.int64
    # Identity mapping (one name per class) takes the short path and equals the name probabilities.
    probs_id, labels_id = logits_to_labels(logits, list(range(8)), 8, 40.0)
    torch.testing.assert_close(probs_id, name_probabilities(logits, 40.0), rtol=0, atol=0)
    torch.testing.assert_close(labels_id, torch.argmax(logits, dim=0), rtol=0, atol=0)


def _biased_logits() -> torch.Tensor:
    """(9, 37, 53) random logits where class 4's only name rarely wins (so the area filter drops it)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.rand(9, 37, 53, generator=gen) * 0.4  # (Q, H0, W0), odd sizes
    logits[8] -= 0.1
    return logits


NAME_TO_CLASS = [0, 1, 1, 2, 3, 3, 3, 2, 4]


@pytest.mark.parametrize("area_threshold, bg_threshold", [(None, 0.0), (0.1, 0.0), (0.1, 0.35), (None, 0.35)])
def test_row_bands_give_the_whole_map_result(area_threshold, bg_threshold) -> None:
    logits = _biased_logits()
    whole_probs, whole_labels = logits_to_labels(
        logits, NAME_TO_CLASS, 5, 40.0, bg_threshold, area_threshold, band_rows=37
    )
    if area_threshold is not None:
        assert bool(whole_probs[4].eq(0).all())  # the filter is active on this input ...
        assert bool(
            small_classes(
                class_areas(class_probabilities(name_probabilities(logits, 40.0), NAME_TO_CLASS, 5)), area_threshold
            )[4]
        )  # ... on class 4
    if bg_threshold > 0:
        assert bool((whole_labels == 0).any()) and bool((whole_labels != 0).any())
    for band_rows in (1, 4, 10, 36):
        probs, labels = logits_to_labels(
            logits, NAME_TO_CLASS, 5, 40.0, bg_threshold, area_threshold, band_rows=band_rows
        )
        assert torch.equal(labels, whole_labels), band_rows
        torch.testing.assert_close(probs, whole_probs, rtol=1e-6, atol=1e-7)  # exp: vector vs scalar ulp


def test_segment_rows_reads_bands_only_and_two_passes_with_the_area_filter() -> None:
    logits = _biased_logits()
    requested: list[tuple[int, int]] = []

    def rows(start: int, stop: int) -> torch.Tensor:
        requested.append((start, stop))
        return logits[:, start:stop].clone()

    labels = segment_rows(rows, (37, 53), NAME_TO_CLASS, 5, 40.0, area_threshold=0.1, band_rows=8)
    bands = [(0, 8), (8, 16), (16, 24), (24, 32), (32, 37)]
    assert requested == bands + bands  # one pass for the class areas, one for the labels
    assert torch.equal(labels, logits_to_labels(logits, NAME_TO_CLASS, 5, 40.0, area_threshold=0.1)[1])
    requested.clear()
    segment_rows(rows, (37, 53), NAME_TO_CLASS, 5, 40.0, band_rows=8)
    assert requested == bands
    # the default band holds about BAND_ELEMENTS logits, at least one row
    requested.clear()
    segment_rows(rows, (37, 53), NAME_TO_CLASS, 5, 40.0)
    assert requested == [(0, 37)]
