"""Boundary Error Rate: label changes across sliding-window seams (spec §7.2, ovss's operationalisation).

BER = 100 * (pairs across a window boundary whose ground truth agrees but whose prediction differs) /
(pairs across a window boundary whose ground truth agrees and is not ignored). Boundaries are the window
edges at processing resolution H x W (§2.2), mapped to the label resolution H0 x W0 where the pairs are
formed; both counts are summed over the dataset before dividing.

Whole-image settings have no boundary, so the denominator is 0 and BER is NaN, reported as "n/a".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ovss.pipeline.windows import Window


def _to_label_resolution(coords: Iterable[int], size: int, label_size: int) -> np.ndarray:
    """Map line coordinates b to b' = floor(b * label_size / size + 0.5), keep 1..label_size-1, dedupe.

    Integer arithmetic: floor(b * S0 / S + 1/2) = (2 * b * S0 + S) // (2 * S).
    """
    mapped = {(2 * b * label_size + size) // (2 * size) for b in coords}
    return np.array(sorted(b for b in mapped if 1 <= b <= label_size - 1), dtype=np.int64)


def boundary_lines(
    windows: Sequence[Window], height: int, width: int, label_height: int, label_width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Window-boundary lines at label resolution (§7.2 steps 1–2).

    A line coordinate b denotes the line between pixel columns (rows) b-1 and b.

    Args:
        windows: the windows of the evaluated setting on the processing image (``sliding_windows``).
        height: processing-image rows H.
        width: processing-image columns W.
        label_height: label rows H0.
        label_width: label columns W0.

    Returns:
        ``(xs, ys)``: sorted unique int64 arrays of vertical line columns in 1..W0-1 and horizontal
        line rows in 1..H0-1. Both are empty for a single whole-image window.
    """
    xs = {w.x1 for w in windows if w.x1 > 0} | {w.x2 for w in windows if w.x2 < width}
    ys = {w.y1 for w in windows if w.y1 > 0} | {w.y2 for w in windows if w.y2 < height}
    return _to_label_resolution(xs, width, label_width), _to_label_resolution(ys, height, label_height)


def _pair_indices(lines: np.ndarray, band: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (b'-1-k, b'+k), k = 0..band-1, of the pixel pairs straddling each line; pairs that
    would leave the 0..size-1 range are dropped."""
    offsets = np.arange(band, dtype=np.int64)  # (band,)
    first = (np.asarray(lines, dtype=np.int64)[:, None] - 1 - offsets).reshape(-1)  # (n * band,)
    second = (np.asarray(lines, dtype=np.int64)[:, None] + offsets).reshape(-1)  # (n * band,)
    inside = (first >= 0) & (second < size)
    return torch.from_numpy(first[inside]), torch.from_numpy(second[inside])


def boundary_error_counts(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    xs: np.ndarray,
    ys: np.ndarray,
    band: int = 1,
    ignore_index: int = 255,
) -> tuple[int, int]:
    """Counts of one image (§7.2 steps 3–5, with band width δ of step 7).

    For every vertical line x' and row r the pairs ((r, x'-1-k), (r, x'+k)); for every horizontal line
    y' and column c the pairs ((y'-1-k, c), (y'+k, c)); k = 0..band-1. A pair is kept when both labels
    are equal and not ``ignore_index``; it is an error when additionally the predictions differ.

    Args:
        pred: (H0, W0) integer predicted class ids (numpy or torch, any device).
        label: (H0, W0) integer ground-truth class ids.
        xs: vertical line columns at label resolution (from ``boundary_lines``).
        ys: horizontal line rows at label resolution.
        band: δ >= 1, pairs per line and pixel row/column.
        ignore_index: label value that never forms a kept pair.

    Returns:
        ``(errors, pairs)``: kept pairs with differing predictions, kept pairs.
    """
    if band < 1:
        raise ValueError(f"band must be >= 1, got {band}")
    pred_ids = torch.as_tensor(pred).long()  # (H0, W0)
    label_ids = torch.as_tensor(label).long().to(pred_ids.device)  # (H0, W0)
    if pred_ids.shape != label_ids.shape or pred_ids.dim() != 2:
        raise ValueError(f"pred {tuple(pred_ids.shape)} and label {tuple(label_ids.shape)} must be equal 2-D")
    errors, pairs = 0, 0
    for dim, lines in ((1, xs), (0, ys)):  # vertical lines pair columns, horizontal lines pair rows
        first, second = _pair_indices(lines, band, pred_ids.shape[dim])
        first, second = first.to(pred_ids.device), second.to(pred_ids.device)
        label_a = label_ids.index_select(dim, first)  # (H0, P) or (P, W0)
        label_b = label_ids.index_select(dim, second)  # same shape
        kept = (label_a == label_b) & (label_a != ignore_index)  # same shape
        differs = pred_ids.index_select(dim, first) != pred_ids.index_select(dim, second)  # same shape
        pairs += int(kept.sum())
        errors += int((kept & differs).sum())
    return errors, pairs


def format_ber(value: float) -> str:
    """BER for tables: two decimals, or ``"n/a"`` when it is NaN (no boundary pair)."""
    return "n/a" if math.isnan(value) else f"{value:.2f}"


class BoundaryErrorAccumulator:
    """Sums BER numerator and denominator over a dataset.

    Args:
        band: δ >= 1, pixel pairs per line on each pixel row/column (§7.2 step 7).
        ignore_index: label value that never forms a kept pair.
    """

    def __init__(self, band: int = 1, ignore_index: int = 255) -> None:
        if band < 1:
            raise ValueError(f"band must be >= 1, got {band}")
        self.band = band
        self.ignore_index = ignore_index
        self.errors = 0  # kept pairs whose predictions differ
        self.pairs = 0  # kept pairs (equal, non-ignored labels)

    def update(
        self,
        pred: np.ndarray | torch.Tensor,
        label: np.ndarray | torch.Tensor,
        xs: np.ndarray,
        ys: np.ndarray,
    ) -> tuple[int, int]:
        """Add one image; see ``boundary_error_counts`` for the arguments.

        Returns:
            The image's own ``(errors, pairs)`` (for per-image BER; skip images with 0 pairs).
        """
        errors, pairs = boundary_error_counts(pred, label, xs, ys, self.band, self.ignore_index)
        self.errors += errors
        self.pairs += pairs
        return errors, pairs

    def merge(self, other: BoundaryErrorAccumulator) -> None:
        """Add the counts of another accumulator (same band and ignore index) into this one."""
        if (other.band, other.ignore_index) != (self.band, self.ignore_index):
            raise ValueError(
                f"cannot merge accumulators with (band, ignore_index) {(other.band, other.ignore_index)} "
                f"into {(self.band, self.ignore_index)}"
            )
        self.errors += other.errors
        self.pairs += other.pairs

    def state_dict(self) -> dict[str, torch.Tensor]:
        """0-d int64 tensors: ``errors``, ``pairs`` (summable across workers), ``band``, ``ignore_index``."""
        return {
            "errors": torch.tensor(self.errors, dtype=torch.int64),
            "pairs": torch.tensor(self.pairs, dtype=torch.int64),
            "band": torch.tensor(self.band, dtype=torch.int64),
            "ignore_index": torch.tensor(self.ignore_index, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the counts with those of ``state_dict()`` output (band and ignore index must match)."""
        if (int(state["band"]), int(state["ignore_index"])) != (self.band, self.ignore_index):
            raise ValueError(
                f"state is for band={int(state['band'])}, ignore_index={int(state['ignore_index'])}; "
                f"this accumulator has band={self.band}, ignore_index={self.ignore_index}"
            )
        self.errors = int(state["errors"])
        self.pairs = int(state["pairs"])

    def compute(self) -> float:
        """BER in percent (0..100); NaN when no pair was kept (report it with ``format_ber``)."""
        return 100.0 * self.errors / self.pairs if self.pairs > 0 else math.nan
