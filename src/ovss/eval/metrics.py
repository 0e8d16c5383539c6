"""Dataset-level mIoU, exactly as mmsegmentation's ``IoUMetric`` (spec §7.1).

Per image, pixels whose label is the ignore index are dropped; per-class histograms of intersection,
prediction area and label area are accumulated over the whole dataset in int64, and the ratios are only
taken at the end (``compute``). Accumulators of different workers or chunks combine with ``merge`` (or by
summing the tensors of ``state_dict``, e.g. with an all-reduce).

As in mmsegmentation (``torch.histc`` over ``0..C-1``), values outside ``0..C-1`` that are not the
ignore index are counted in no histogram. Ratios are computed in float64 (mmsegmentation divides in
float32; the difference is far below the reported 2 decimals).
"""

from __future__ import annotations

import math

import numpy as np
import torch

_COUNT_KEYS = ("intersection", "pred_area", "label_area")


def _as_long(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Integer class ids as an int64 tensor (on the input's device)."""
    return torch.as_tensor(values).long()


def _nanmean(values: torch.Tensor) -> float:
    """Mean of the non-NaN entries; NaN (without a warning) when every entry is NaN."""
    defined = values[~torch.isnan(values)]
    return float(defined.mean()) if defined.numel() else math.nan


class ConfusionAccumulator:
    """Accumulates per-class intersection / prediction area / label area over a dataset.

    Args:
        num_classes: C; predictions and labels hold class ids 0..C-1.
        ignore_index: label value whose pixels are excluded from all three histograms.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.intersection = torch.zeros(num_classes, dtype=torch.int64)  # (C,) pixels with pred == label == c
        self.pred_area = torch.zeros(num_classes, dtype=torch.int64)  # (C,) kept pixels with pred == c
        self.label_area = torch.zeros(num_classes, dtype=torch.int64)  # (C,) kept pixels with label == c

    def _histogram(self, values: torch.Tensor) -> torch.Tensor:
        """(C,) int64 counts of the values in 0..C-1 (others are dropped, like ``torch.histc``)."""
        in_range = values[(values >= 0) & (values < self.num_classes)]  # (K,)
        return torch.bincount(in_range, minlength=self.num_classes).cpu()  # (C,)

    def update(self, pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor) -> None:
        """Add one image.

        Args:
            pred: (H0, W0) integer predicted class ids (numpy or torch, any integer dtype, any device).
            label: (H0, W0) integer ground-truth class ids; ``ignore_index`` marks ignored pixels.

        Raises:
            ValueError: shapes differ.
        """
        pred_ids = _as_long(pred)  # (H0, W0)
        label_ids = _as_long(label).to(pred_ids.device)  # (H0, W0)
        if pred_ids.shape != label_ids.shape:
            raise ValueError(
                f"pred {tuple(pred_ids.shape)} and label {tuple(label_ids.shape)} differ in shape"
            )
        kept = label_ids != self.ignore_index  # (H0, W0)
        pred_kept = pred_ids[kept]  # (K,)
        label_kept = label_ids[kept]  # (K,)
        self.intersection += self._histogram(pred_kept[pred_kept == label_kept])
        self.pred_area += self._histogram(pred_kept)
        self.label_area += self._histogram(label_kept)

    def merge(self, other: ConfusionAccumulator) -> None:
        """Add the counts of another accumulator (same C and ignore index) into this one."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge accumulators with (num_classes, ignore_index) "
                f"{(other.num_classes, other.ignore_index)} into {(self.num_classes, self.ignore_index)}"
            )
        self.intersection += other.intersection
        self.pred_area += other.pred_area
        self.label_area += other.label_area

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Counts for checkpointing or all-reduce: three (C,) int64 tensors (copies) and two 0-d tensors.

        Keys: ``intersection``, ``pred_area``, ``label_area`` (summable across workers), ``num_classes``,
        ``ignore_index`` (identical across workers).
        """
        return {
            "intersection": self.intersection.clone(),
            "pred_area": self.pred_area.clone(),
            "label_area": self.label_area.clone(),
            "num_classes": torch.tensor(self.num_classes),
            "ignore_index": torch.tensor(self.ignore_index),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the counts with those of ``state_dict()`` output (C and ignore index must match)."""
        if (int(state["num_classes"]), int(state["ignore_index"])) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"state is for num_classes={int(state['num_classes'])}, "
                f"ignore_index={int(state['ignore_index'])}; this accumulator has "
                f"num_classes={self.num_classes}, ignore_index={self.ignore_index}"
            )
        for key in _COUNT_KEYS:
            counts = state[key].to(device="cpu", dtype=torch.int64)
            if counts.shape != (self.num_classes,):
                raise ValueError(
                    f"state[{key!r}] has shape {tuple(counts.shape)}, expected ({self.num_classes},)"
                )
            setattr(self, key, counts.clone())

    def compute(self) -> dict[str, float | list[float]]:
        """The metrics of everything accumulated so far, all in percent (x100, unrounded floats).

        Returns:
            ``IoU``: per-class IoU list (length C), NaN where prediction and label area are both 0;
            ``mIoU``: NaN-mean of ``IoU``; ``Acc``: per-class accuracy I/label area, NaN where the
            class is absent from the labels; ``mAcc``: NaN-mean of ``Acc``; ``aAcc``: sum I / sum label
            area. Means are NaN when nothing is defined.
        """
        intersection = self.intersection.double()  # (C,)
        union = (self.pred_area + self.label_area - self.intersection).double()  # (C,)
        label_area = self.label_area.double()  # (C,)
        nan = torch.full_like(intersection, math.nan)  # (C,)
        iou = torch.where(union > 0, intersection / union.clamp(min=1), nan) * 100  # (C,)
        acc = torch.where(label_area > 0, intersection / label_area.clamp(min=1), nan) * 100  # (C,)
        total = float(label_area.sum())
        return {
            "IoU": iou.tolist(),
            "mIoU": _nanmean(iou),
            "Acc": acc.tolist(),
            "mAcc": _nanmean(acc),
            "aAcc": float(intersection.sum()) / total * 100 if total > 0 else math.nan,
        }
