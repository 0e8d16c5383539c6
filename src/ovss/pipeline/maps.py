"""The full-resolution maps of one prediction, computed band by band from a row source when asked for.

A (Q, H0, W0) fp32 logit map of a 2000x2000 photo with 171 names is 2.7 GB, and the labels do not need
it (:func:`~ovss.pipeline.postprocess.segment_rows`). :class:`FullResolutionMaps` keeps only the row
source (for the predictor: the small per-window logits, :class:`~ovss.pipeline.merge.StitchedLogits`) and
builds the whole logit or probability map the first time someone asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ovss.pipeline.postprocess import (
    LogitRows,
    band_class_probs,
    compact_label_dtype,
    default_band_rows,
    dropped_classes,
    row_bands,
    segment_rows,
)


@dataclass(frozen=True)
class LabelRule:
    """How logits become labels (spec §2.6 steps 2-5)."""

    name_to_class: tuple[int, ...]  # class index in [0, C) of every name, Q entries
    num_classes: int  # number of classes C
    logit_scale: float  # temperature tau of the softmax over all names
    bg_threshold: float = 0.0  # pixels whose best class probability is below this get bg_label (0: off)
    area_threshold: float | None = None  # SCLIP area filter fraction (None: off)
    bg_label: int = 0  # label of pixels below bg_threshold: 0 (the papers' rule), a class, or UNLABELLED (-1)


class FullResolutionMaps:
    """Logits, class probabilities and labels at H0 x W0, computed from row bands on demand.

    ``labels()`` never holds more than one band of logits; ``logits()`` and ``probs()`` build their
    whole map on first use (and keep the fp32 results, so later calls return the same tensor).
    """

    def __init__(
        self,
        logit_rows: LogitRows,
        size: tuple[int, int],
        rule: LabelRule,
        *,
        device: torch.device | str = "cpu",
        band_rows: int | None = None,
        logits: torch.Tensor | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Keep the row source; nothing is computed yet.

        Args:
            logit_rows: ``(start, stop) -> (Q, stop - start, W0)`` fp32 logits of those rows.
            size: (H0, W0) of the maps.
            rule: the softmax / synonym / area / background rule.
            device: device of the maps.
            band_rows: rows per band (default: about ``BAND_ELEMENTS`` logits per band); no effect on results.
            logits: the whole (Q, H0, W0) fp32 map when it already exists (e.g. after PAMR), kept as is.
            progress: called as ``progress(rows_done, H0)`` after each band while ``labels()`` runs.
        """
        self._rows = logit_rows
        self.size = (int(size[0]), int(size[1]))
        self.rule = rule
        self.device = torch.device(device)
        self.num_names = len(rule.name_to_class)
        self.band_rows = band_rows if band_rows is not None else default_band_rows(self.num_names, self.size[1])
        self._logits = logits
        self._probs: torch.Tensor | None = None
        self._dropped: torch.Tensor | None = None  # (C,) the area filter's classes, once counted
        self.progress = progress

    @classmethod
    def from_logits(
        cls,
        logits: torch.Tensor,
        rule: LabelRule,
        band_rows: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> FullResolutionMaps:
        """Maps over an in-memory (Q, H0, W0) logit map (bands are slices of it)."""
        return cls(
            lambda start, stop: logits[:, start:stop],
            (int(logits.shape[1]), int(logits.shape[2])),
            rule,
            device=logits.device,
            band_rows=band_rows,
            logits=logits,
            progress=progress,
        )

    def _segment(
        self,
        probs_out: torch.Tensor | None = None,
        progress: Callable[[int, int], None] | None = None,
        labels_dtype: torch.dtype = torch.int64,
    ) -> torch.Tensor:
        rule = self.rule
        return segment_rows(
            self._rows,
            self.size,
            list(rule.name_to_class),
            rule.num_classes,
            rule.logit_scale,
            rule.bg_threshold,
            rule.area_threshold,
            band_rows=self.band_rows,
            probs_out=probs_out,
            bg_label=rule.bg_label,
            progress=progress,
            labels_dtype=labels_dtype,
        )

    @torch.inference_mode()
    def labels(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(H0, W0) class index per pixel, in [0, C) or the rule's ``bg_label``; computed band by band (not kept).

        Args:
            dtype: the labels' integer dtype; None: the smallest that holds them (:func:`compact_label_dtype`).
        """
        wanted = compact_label_dtype(self.rule.num_classes) if dtype is None else dtype
        return self._segment(progress=self.progress, labels_dtype=wanted)

    @torch.inference_mode()
    def logits(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(Q, H0, W0) logits (cosine similarities, after PAMR when on), built band by band.

        Args:
            dtype: ``torch.float32`` (kept after the first call) or e.g. ``torch.float16`` to build a half-size
                copy without ever holding the fp32 map (not kept).
        """
        if self._logits is not None:
            return self._logits if self._logits.dtype == dtype else self._logits.to(dtype)
        out = torch.empty(self.num_names, *self.size, dtype=dtype, device=self.device)  # (Q, H0, W0)
        for start, stop in row_bands(self.size[0], self.band_rows):
            out[:, start:stop] = self._rows(start, stop)  # (Q, n, W0), cast to dtype
        if dtype == torch.float32:
            self._logits = out
        return out

    @torch.inference_mode()
    def probs(self) -> torch.Tensor:
        """(C, H0, W0) fp32 class probabilities in [0, 1] (max over each class's names, after the area
        filter), built band by band on first use and kept."""
        if self._probs is None:
            probs = torch.empty(self.rule.num_classes, *self.size, dtype=torch.float32, device=self.device)
            self._segment(probs_out=probs)
            self._probs = probs
        return self._probs

    @torch.inference_mode()
    def probs_of_rows(self, start: int, stop: int) -> torch.Tensor:
        """(C, stop - start, W0) fp32 class probabilities of rows ``start:stop``: ``probs()[:, start:stop]``
        without building the whole map (a click on a pixel of a 9000 x 9000 result needs one row)."""
        if self._probs is not None:
            return self._probs[:, start:stop]
        rule = self.rule
        probs = band_class_probs(self._rows(start, stop), rule.name_to_class, rule.num_classes, rule.logit_scale)
        if rule.area_threshold is not None:
            if self._dropped is None:  # the filter needs the whole image's class areas: one pass, kept
                bands = row_bands(self.size[0], self.band_rows)
                self._dropped = dropped_classes(
                    self._rows, bands, rule.name_to_class, rule.num_classes, rule.logit_scale, rule.area_threshold
                )
            probs[self._dropped.to(probs.device)] = 0.0
        return probs  # (C, n, W0)
