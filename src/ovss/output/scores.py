"""Per-class score maps of a prediction (``ovss segment --save-scores png|npy``).

The scores are ``Prediction.probs``: the class probabilities the labels are the argmax of (spec §2.6: the
softmax over all names with the method's temperature, the max over each class's synonyms, after SCLIP's area
filter when it is on; before the background threshold, which only relabels pixels). Nothing is recomputed.

- ``png``: ``<stem>_scores/<id>_<name>.png``, one 8-bit greyscale PNG per class (file names as
  ``--save-masks``), value ``round(p * 255)`` with NumPy's round-half-to-even, so ``value / 255`` is within
  ``0.5 / 255`` of ``p``;
- ``npy``: ``<stem>_scores.npy``, one (C, H0, W0) float16 array (``torch`` round-to-nearest-even of the fp32
  probabilities).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ovss.errors import OvssError
from ovss.output.files import mask_file_name
from ovss.storage.files import save_npy, save_png

if TYPE_CHECKING:
    from ovss.prediction import Prediction

SCORE_FORMATS = ("png", "npy")


def score_paths(folder: str | os.PathLike[str], stem: str, classes: list[list[str]], fmt: str) -> list[Path]:
    """The files :func:`save_scores` writes for ``fmt`` ("png": one per class, "npy": one)."""
    out = Path(folder)
    if fmt == "npy":
        return [out / f"{stem}_scores.npy"]
    if fmt == "png":
        return [out / f"{stem}_scores" / mask_file_name(c, names[0], len(classes)) for c, names in enumerate(classes)]
    raise OvssError(f"unknown score format {fmt!r}; choose one of {', '.join(SCORE_FORMATS)}")


def scores_to_uint8(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] (any shape) -> uint8 ``round(p * 255)`` (half to even), clipped to 0..255."""
    return np.clip(np.rint(probs * 255.0), 0, 255).astype(np.uint8)  # same shape


def save_scores(prediction: Prediction, folder: str | os.PathLike[str], stem: str, fmt: str) -> list[Path]:
    """Write the score maps of one prediction (see the module docstring); a failure removes this call's files.

    Returns:
        The written paths, in :func:`score_paths` order.
    """
    import torch

    paths = score_paths(folder, stem, prediction.classes, fmt)
    probs = prediction.probs  # (C, H0, W0) fp32, built once and kept by the prediction
    written: list[Path] = []
    try:
        if fmt == "npy":
            written.append(save_npy(paths[0], probs.to(torch.float16).cpu().numpy()))  # (C, H0, W0) fp16
        else:
            for c, path in enumerate(paths):  # one class at a time: no (C, H0, W0) fp32 temporaries
                written.append(save_png(path, scores_to_uint8(probs[c].cpu().numpy())))  # (H0, W0) uint8
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
