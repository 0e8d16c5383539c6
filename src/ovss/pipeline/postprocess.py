"""From full-resolution logits to class probabilities and labels (spec §2.6, SCLIP area filter §2.8).

Memory: at 2048x1024 with Q = 171 names one (Q, H, W) fp32 tensor is ~1.4 GB, so every function here
allocates at most one such tensor (its output) and works in place on buffers it owns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def name_probabilities(logits: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Joint softmax over all names of all classes: ``softmax_Q(logit_scale * logits)``.

    Computed in place on a single fp32 copy (max-subtracted, exponentiated, normalised).

    Args:
        logits: (Q, H, W) cosine similarities in [-1, 1], any float dtype; not modified.
        logit_scale: temperature tau > 0 multiplying the logits (e.g. 40, 50 or 100).

    Returns:
        (Q, H, W) float32 probabilities in [0, 1], summing to 1 over Q at every pixel.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (Q, H, W), got {tuple(logits.shape)}")
    probs = logits.to(torch.float32, copy=True)  # (Q, H, W)
    probs.mul_(logit_scale)
    probs.sub_(probs.amax(dim=0, keepdim=True))  # (Q, H, W), max 0 per pixel
    probs.exp_()
    probs.div_(probs.sum(dim=0, keepdim=True))  # (Q, H, W)
    return probs


def _class_of_each_name(
    name_to_class: Sequence[int] | torch.Tensor, num_names: int, num_classes: int
) -> list[int]:
    """Validate the name -> class map: one entry per name, in [0, C), every class owning a name."""
    if isinstance(name_to_class, torch.Tensor):
        mapping = [int(v) for v in name_to_class.reshape(-1).tolist()]
    else:
        mapping = [int(v) for v in name_to_class]
    if len(mapping) != num_names:
        raise ValueError(f"name_to_class has {len(mapping)} entries but there are {num_names} names")
    if any(c < 0 or c >= num_classes for c in mapping):
        raise ValueError(f"name_to_class entries must lie in [0, {num_classes}), got {sorted(set(mapping))}")
    missing = sorted(set(range(num_classes)) - set(mapping))
    if missing:
        raise ValueError(f"classes {missing} have no name")
    return mapping


def class_probabilities(
    name_probs: torch.Tensor, name_to_class: Sequence[int] | torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Synonym reduction ("rename trick"): a class's probability is the max over its names' probabilities.

    The max is taken after the joint softmax over all names (spec §2.6 step 3) — not a sum of
    probabilities and not a max of logits.

    Args:
        name_probs: (Q, H, W) name probabilities from :func:`name_probabilities`; not modified.
        name_to_class: (Q,) class index in [0, C) of every name; every class must own >= 1 name.
        num_classes: number of classes C.

    Returns:
        (C, H, W) class probabilities in [0, 1], same dtype and device as ``name_probs``.
    """
    if name_probs.dim() != 3:
        raise ValueError(f"name_probs must be (Q, H, W), got {tuple(name_probs.shape)}")
    mapping = _class_of_each_name(name_to_class, name_probs.shape[0], num_classes)
    out = torch.empty(num_classes, *name_probs.shape[1:], dtype=name_probs.dtype, device=name_probs.device)
    filled = [False] * num_classes
    for name, cls in enumerate(mapping):
        if filled[cls]:
            torch.maximum(out[cls], name_probs[name], out=out[cls])  # (H, W)
        else:
            out[cls].copy_(name_probs[name])  # (H, W)
            filled[cls] = True
    return out


def area_filter(class_probs: torch.Tensor, threshold: float, *, inplace: bool = False) -> torch.Tensor:
    """SCLIP's small-area filter: drop foreground classes that win too few pixels (spec §2.8).

    With ``y = argmax_c P_c`` (first index on ties), ``A_c = |{x : y(x) = c}|`` and ``A = sum_{c>=1} A_c``,
    every class ``c >= 1`` with ``A_c <= threshold * A`` gets probability 0 everywhere, i.e. a class is
    kept iff ``A_c > threshold * A`` as in SCLIP's release. Class 0 (background) is never changed. If
    no pixel is foreground (A = 0) every foreground class is dropped. The comparison is done in float64.

    Args:
        class_probs: (C, H, W) class probabilities (>= 0).
        threshold: area fraction in [0, 1] (SCLIP VOC21: 0.1).
        inplace: modify ``class_probs`` instead of returning a copy.

    Returns:
        (C, H, W) filtered probabilities (``class_probs`` itself when ``inplace``).
    """
    if class_probs.dim() != 3:
        raise ValueError(f"class_probs must be (C, H, W), got {tuple(class_probs.shape)}")
    num_classes = class_probs.shape[0]
    winners = torch.argmax(class_probs, dim=0)  # (H, W) int64
    areas = torch.bincount(winners.reshape(-1), minlength=num_classes).to(torch.float64)  # (C,)
    total = float(areas[1:].sum())
    drop = areas <= threshold * total  # (C,) bool
    drop[0] = False
    out = class_probs if inplace else class_probs.clone()  # (C, H, W)
    out[drop.to(out.device)] = 0.0
    return out


def labels_from_probs(class_probs: torch.Tensor, bg_threshold: float = 0.0, bg_label: int = 0) -> torch.Tensor:
    """Per-pixel labels: argmax over classes, ``bg_label`` (default class 0) where the best probability is too low.

    Ties go to the lowest class index: ``torch.argmax`` returns the first maximal index (documented by
    PyTorch and checked on CPU in ``tests/test_postprocess.py``).

    Args:
        class_probs: (C, H, W) class probabilities in [0, 1].
        bg_threshold: theta_bg in [0, 1]; pixels with ``max_c P_c < bg_threshold`` get ``bg_label``
            (0 disables it; a pixel exactly at the threshold keeps its argmax).
        bg_label: the label of those pixels: 0 (the papers' rule: class 0 is background), another class
            index, or a value outside [0, C) such as ``ovss.predictor.UNLABELLED`` (-1).

    Returns:
        (H, W) int64 labels in [0, C), or ``bg_label``.
    """
    if class_probs.dim() != 3:
        raise ValueError(f"class_probs must be (C, H, W), got {tuple(class_probs.shape)}")
    labels = torch.argmax(class_probs, dim=0)  # (H, W) int64
    if bg_threshold > 0.0:
        best = class_probs.amax(dim=0)  # (H, W)
        labels[best < bg_threshold] = bg_label
    return labels


def logits_to_labels(
    logits: torch.Tensor,
    name_to_class: Sequence[int] | torch.Tensor,
    num_classes: int,
    logit_scale: float,
    bg_threshold: float = 0.0,
    area_threshold: float | None = None,
    bg_label: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec §2.6 steps 2-5: joint softmax, synonym max, optional area filter, argmax + background.

    PAMR (step 1), if wanted, is applied to ``logits`` by the caller before this function.

    Args:
        logits: (Q, H0, W0) full-resolution logits (cosine similarities), any float dtype; not modified.
        name_to_class: (Q,) class index in [0, C) of every name.
        num_classes: number of classes C.
        logit_scale: temperature tau > 0.
        bg_threshold: theta_bg in [0, 1] (0 = no background thresholding).
        area_threshold: SCLIP area-filter fraction (e.g. 0.1), or None to skip the filter.
        bg_label: label of the pixels below ``bg_threshold`` (see :func:`labels_from_probs`).

    Returns:
        probs: (C, H0, W0) float32 class probabilities (after the area filter, if any).
        labels: (H0, W0) int64 labels in [0, C), or ``bg_label``.
    """
    name_probs = name_probabilities(logits, logit_scale)  # (Q, H0, W0)
    mapping = _class_of_each_name(name_to_class, name_probs.shape[0], num_classes)
    if mapping == list(range(num_classes)):
        probs = name_probs  # (C, H0, W0): one name per class, in class order
    else:
        probs = class_probabilities(name_probs, mapping, num_classes)  # (C, H0, W0)
        del name_probs
    if area_threshold is not None:
        probs = area_filter(probs, area_threshold, inplace=True)  # (C, H0, W0)
    labels = labels_from_probs(probs, bg_threshold, bg_label)  # (H0, W0)
    return probs, labels
