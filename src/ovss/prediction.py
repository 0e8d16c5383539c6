"""The :class:`Prediction` that :meth:`ovss.Segmenter.predict` returns: labels, lazy full-resolution maps, files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovss.pipeline.maps import FullResolutionMaps


@dataclass
class Prediction:
    """The result of :meth:`Segmenter.predict`, everything at the input image's resolution H0 x W0.

    The labels are held in the smallest integer dtype that fits them (``compact_labels``: int8 up to 128
    classes, 1 byte a pixel); ``labels`` is their int64 copy, built on first access and kept (8 bytes a
    pixel: 648 MB for a 9000 x 9000 photo, which the file writers never build). ``logits`` and ``probs`` are
    built on first access (Q x H0 x W0 x 4 bytes: 2.7 GB for a 2000 x 2000 photo and 171 names) and kept;
    the labels never needed them. ``maps.logits(torch.float16)`` builds a half-size copy of the logits
    without the fp32 one.
    """

    compact_labels: torch.Tensor  # (H0, W0) class index per pixel in 0..C-1, or UNLABELLED (-1); int8/16/32
    classes: list[list[str]]  # the names of each class, as used
    config: dict[str, Any]  # the fully resolved configuration that produced this result
    maps: FullResolutionMaps = field(repr=False, compare=False)  # full-resolution maps, built on demand
    image: np.ndarray | None = None  # (H0, W0, 3) uint8 RGB input image (for overlays), shared, not copied
    _labels: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def labels(self) -> torch.Tensor:
        """(H0, W0) int64 class index per pixel, in 0..C-1, or ``ovss.labels.UNLABELLED`` (-1), see predict.

        The int64 copy of ``compact_labels``, built on first access and kept.
        """
        if self._labels is None:
            self._labels = self.compact_labels.to(torch.int64)  # (H0, W0)
        return self._labels

    @property
    def logits(self) -> torch.Tensor:
        """(Q, H0, W0) fp32 cosine similarities per name, before the softmax (after PAMR)."""
        return self.maps.logits()

    @property
    def probs(self) -> torch.Tensor:
        """(C, H0, W0) fp32 class probabilities (max over each class's names), in [0, 1]."""
        return self.maps.probs()

    def overlay(self, alpha: float = 0.5) -> np.ndarray:
        """The image with class colours blended in and a legend: (H0', W0 + legend, 3) uint8 RGB.

        Every class has a bright colour (``ovss.output.overlay.class_palette``); unlabelled pixels keep the
        image's colour.
        """
        from ovss.output.files import prediction_overlay

        return prediction_overlay(self, alpha)

    def save(
        self,
        folder: str | os.PathLike[str],
        stem: str = "prediction",
        *,
        logits: bool = False,
        masks: bool = False,
        json: bool = False,
        alpha: float = 0.5,
        overwrite: bool = False,
        logits_dtype: str = "fp32",
    ) -> list[Path]:
        """Write the prediction's files into ``folder`` (see :func:`ovss.output.files.save_prediction`).

        ``<stem>.png`` (label map: class ids, 255 = unlabelled; 16-bit with 65535 beyond 255 classes),
        ``<stem>_overlay.png``, and on request ``<stem>_logits.npy``, ``<stem>_masks/<id>_<name>.png``
        (one binary mask per class) and ``<stem>.json`` (class areas); ``logits_dtype`` fp32 or fp16.
        Existing files are replaced only with ``overwrite``; a failure leaves none of this call's files behind.

        Returns:
            The written paths.
        """
        from ovss.output.files import save_prediction

        return save_prediction(
            self,
            folder,
            stem,
            logits=logits,
            masks=masks,
            json=json,
            alpha=alpha,
            overwrite=overwrite,
            logits_dtype=logits_dtype,
        )
