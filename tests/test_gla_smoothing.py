"""GLA query smoothing (spec §4.8.3, Eq. 17): index tables vs a brute-force loop over all token pairs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ovss.errors import OvssError
from ovss.gla import resolve_smoothing, smooth_queries, smoothing_index
from ovss.pipeline.windows import Window, sliding_windows

PATCH = 4  # pixels per patch; windows of 16 px give a 4 x 4 token grid
GRID = (4, 4)


def _brute_force_sets(
    windows: list[Window], grid: tuple[int, int], patch: int
) -> tuple[list[set[int]], list[set[int]]]:
    """N(i) and O(i) by comparing every pair of tokens (O(M^2), reference only)."""
    rows, cols = grid
    tokens = [(b, t // cols, t % cols) for b in range(len(windows)) for t in range(rows * cols)]
    pixel = [(windows[b].y1 + r * patch, windows[b].x1 + c * patch) for b, r, c in tokens]
    neighbours: list[set[int]] = [set() for _ in tokens]
    others: list[set[int]] = [set() for _ in tokens]
    for i, (bi, ri, ci) in enumerate(tokens):
        for j, (bj, rj, cj) in enumerate(tokens):
            if bi == bj and max(abs(ri - rj), abs(ci - cj)) == 1:
                neighbours[i].add(j)
            if bi != bj and pixel[i] == pixel[j]:
                others[i].add(j)
    return neighbours, others


def _brute_force_eq17(q: Tensor, neighbours: list[set[int]], others: list[set[int]]) -> Tensor:
    out = []
    for i in range(q.shape[0]):
        members = [i, *sorted(neighbours[i]), *sorted(others[i])]
        out.append(q[members].double().mean(0))
    return torch.stack(out)


def _brute_force_release(q: Tensor, neighbours: list[set[int]], others: list[set[int]]) -> Tensor:
    k = F.normalize(q.double(), dim=-1)
    out = []
    for i in range(q.shape[0]):
        members = sorted(neighbours[i] | others[i])
        out.append(k[members].mean(0) if members else k[i])
    return torch.stack(out)


LAYOUTS = {
    # 16 x 30 image, crop 16, stride 8: x1 = 0, 8 and the border-shifted 14 (not a multiple of 4).
    "row_with_shifted_border_window": sliding_windows(16, 30, 16, 8),
    # 24 x 24 image: 2 x 2 windows at offsets 0 / 8, the patch at pixel (8, 8) is in all four.
    "two_by_two": sliding_windows(24, 24, 16, 8),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_index_and_smoothing_match_brute_force(layout: str) -> None:
    windows = LAYOUTS[layout]
    m = len(windows) * GRID[0] * GRID[1]
    neighbours, others = _brute_force_sets(windows, GRID, PATCH)
    index = smoothing_index(windows, GRID, PATCH)
    table_n = [set(row) - {m} for row in index.neighbours.tolist()]
    table_o = [set(row) - {m} for row in index.others.tolist()]
    assert table_n == neighbours and table_o == others
    assert index.num_neighbours.tolist() == [len(s) for s in neighbours]
    assert index.num_others.tolist() == [len(s) for s in others]
    q = torch.randn(m, 6, generator=torch.Generator().manual_seed(0)) * 3.0  # raw, not unit norm
    torch.testing.assert_close(smooth_queries(q, index), _brute_force_eq17(q, neighbours, others).float())
    torch.testing.assert_close(
        smooth_queries(q, index, mode="release_proxyclip"),
        _brute_force_release(q, neighbours, others).float(),
    )
    boxes = [(w.y1, w.x1, w.y2, w.x2) for w in windows]  # tuples give the same tables
    assert torch.equal(smoothing_index(boxes, GRID, PATCH).others, index.others)


def test_hand_counts_on_the_row_layout() -> None:
    windows = LAYOUTS["row_with_shifted_border_window"]
    assert [(w.x1, w.x2) for w in windows] == [(0, 16), (8, 24), (14, 30)]
    index = smoothing_index(windows, GRID, PATCH)
    n = GRID[0] * GRID[1]
    # Window 0 token (0, 2) at pixel (0, 8) = window 1 token (0, 0); window 0 token (0, 0) has none.
    assert index.num_others[2].item() == 1 and index.others[2, 0].item() == n + 0
    assert index.num_others[0].item() == 0
    # Window 1 columns 0-1 (x = 8, 12) match window 0 columns 2-3; columns 2-3 (x = 16, 20) match nothing.
    assert index.num_others[n : 2 * n].view(GRID).tolist() == [[1, 1, 0, 0]] * 4
    # The border-shifted window (x = 14, 18, 22, 26) is misaligned: it contributes to and receives nothing.
    assert index.num_others[2 * n :].sum().item() == 0
    # Corner / edge / interior neighbour counts.
    assert index.num_neighbours[:n].view(GRID).tolist() == [
        [3, 5, 5, 3],
        [5, 8, 8, 5],
        [5, 8, 8, 5],
        [3, 5, 5, 3],
    ]


def test_hand_value_eq17() -> None:
    # One 1 x 2 window and a second one shifted by one patch: (0, 0) (0, 4) and (0, 4) (0, 8).
    windows = [Window(0, 0, 4, 8), Window(0, 4, 4, 12)]
    index = smoothing_index(windows, (1, 2), PATCH)
    q = torch.tensor([[1.0], [2.0], [4.0], [8.0]])  # raw features of tokens 0, 1 | 2, 3
    # token 0: {0, 1} -> 1.5; token 1: {1, 0} + other {2} -> 7 / 3; token 2: {2, 3} + {1} -> 14 / 3;
    # token 3: {3, 2} -> 6.
    torch.testing.assert_close(smooth_queries(q, index).flatten(), torch.tensor([1.5, 7 / 3, 14 / 3, 6.0]))


def test_release_variant_keeps_isolated_tokens() -> None:
    # 1 x 1 grids at distinct positions: no neighbours and no other-window matches.
    windows = [Window(0, 0, 4, 4), Window(0, 4, 4, 8)]
    index = smoothing_index(windows, (1, 1), PATCH)
    q = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    torch.testing.assert_close(
        smooth_queries(q, index, mode="release_proxyclip"), torch.tensor([[0.6, 0.8], [0.0, -1.0]])
    )
    torch.testing.assert_close(smooth_queries(q, index), q)  # Eq. 17 with empty sets: the token itself


def test_modes_and_errors() -> None:
    assert resolve_smoothing("auto", clip_internal_keys=True) == "eq17"
    assert resolve_smoothing("auto", clip_internal_keys=False) == "off"
    assert resolve_smoothing("release_proxyclip", clip_internal_keys=False) == "release_proxyclip"
    with pytest.raises(OvssError):
        resolve_smoothing("gaussian", clip_internal_keys=True)
    index = smoothing_index([Window(0, 0, 8, 8)], (2, 2), PATCH)
    with pytest.raises(OvssError):
        smooth_queries(torch.zeros(4, 3), index, mode="off")
    with pytest.raises(ValueError):
        smooth_queries(torch.zeros(5, 3), index)
