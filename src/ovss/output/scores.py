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
    """(C, H, W) probabilities in [0, 1] -> uint8 ``round(p * 255)`` (half to even), clipped to 0..255."""
    return np.clip(np.rint(probs * 255.0), 0, 255).astype(np.uint8)  # (C, H, W)


def save_scores(prediction: Prediction, folder: str | os.PathLike[str], stem: str, fmt: str) -> list[Path]:
    """Write the score maps of one prediction (see the module docstring); a failure removes this call's files.

    Returns:
        The written paths, in :func:`score_paths` order.
    """
    import torch

    paths = score_paths(folder, stem, prediction.classes, fmt)
    probs = prediction.probs  # (C, H0, W0) fp32, built once and kept by the prediction
    if fmt == "npy":
        contents = [probs.to(torch.float16).cpu().numpy()]  # [(C, H0, W0) fp16]
    else:
        contents = list(scores_to_uint8(probs.cpu().numpy()))  # C x (H0, W0) uint8
    written: list[Path] = []
    try:
        for path, content in zip(paths, contents, strict=True):
            written.append(save_npy(path, content) if fmt == "npy" else save_png(path, content))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
