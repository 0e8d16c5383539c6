"""From full-resolution logits to class probabilities and labels (spec §2.6, SCLIP area filter §2.8).

Memory: at 2000x2000 with Q = 171 names one (Q, H0, W0) fp32 tensor is 2.7 GB. Every step is per pixel
except the area filter, so :func:`segment_rows` runs the steps on bands of rows (a few MB each) pulled
from a row source, and never holds a whole (Q, H0, W0) map; the area filter's per-class areas are counted
in a first pass over the bands. :func:`logits_to_labels` is the same code on an in-memory logit map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ovss.tuning import DEFAULT_TUNING

# Default band size: rows per band = max(1, BAND_ELEMENTS // (Q * W0)), 16 MB fp32 (a Segmenter's Tuning.band_elements)
BAND_ELEMENTS = DEFAULT_TUNING.band_elements

LogitRows = Callable[[int, int], torch.Tensor]  # (start, stop) -> (Q, stop - start, W0) logits of those rows


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


def first_argmax(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.argmax(values, dim=0)`` (first index on ties, NaN counts as the maximum) and the max, faster on CPU.

    PyTorch's argmax over the leading axis of a (C, H, W) map walks each pixel's C values with a stride of
    H * W (25 ms for 20 x 409 x 512 on one core); here one pass per class compares whole contiguous planes
    (8 ms). Strict ``>`` keeps the first maximal index, as ``torch.argmax``; a map holding NaN falls back to
    ``torch.argmax`` itself. Equal to ``torch.argmax`` in every case (tests/test_postprocess_speed.py).

    Args:
        values: (C, H, W) float map, C >= 1.

    Returns:
        labels (H, W) int64 in [0, C) and the max over C (H, W) in ``values``' dtype.
    """
    best = values[0].clone()  # (H, W) running max
    labels = torch.zeros(values.shape[1:], dtype=torch.int64, device=values.device)  # (H, W)
    above = torch.empty(values.shape[1:], dtype=torch.bool, device=values.device)  # (H, W)
    for c in range(1, values.shape[0]):
        torch.gt(values[c], best, out=above)
        labels.masked_fill_(above, c)
        torch.maximum(best, values[c], out=best)  # propagates NaN, so one check below sees any
    if bool(best.isnan().any()):
        return torch.argmax(values, dim=0), values.amax(dim=0)
    return labels, best


def class_areas(class_probs: torch.Tensor) -> torch.Tensor:
    """Pixels won by each class, ``A_c = |{x : argmax_c P_c(x) = c}|`` (first index on ties).

    Args:
        class_probs: (C, H, W) class probabilities, or any band of rows of them.

    Returns:
        (C,) int64 pixel counts (add the counts of the bands of an image to get the image's).
    """
    winners, _ = first_argmax(class_probs)  # (H, W) int64
    return torch.bincount(winners.reshape(-1), minlength=class_probs.shape[0]).cpu()  # (C,)


def small_classes(areas: torch.Tensor, threshold: float) -> torch.Tensor:
    """SCLIP's area rule: foreground classes ``c >= 1`` with ``A_c <= threshold * sum_{c>=1} A_c``.

    A class is kept iff ``A_c > threshold * A`` as in SCLIP's release; class 0 (background) is never
    dropped; if no pixel is foreground (A = 0) every foreground class is dropped. Compared in float64.

    Args:
        areas: (C,) pixels won by each class over the whole image (:func:`class_areas`).
        threshold: area fraction in [0, 1] (SCLIP VOC21: 0.1).

    Returns:
        (C,) bool, True for the classes whose probability is set to 0 everywhere.
    """
    areas = areas.to(torch.float64)  # (C,)
    total = float(areas[1:].sum())
    drop = areas <= threshold * total  # (C,) bool
    drop[0] = False
    return drop


def area_filter(class_probs: torch.Tensor, threshold: float, *, inplace: bool = False) -> torch.Tensor:
    """SCLIP's small-area filter on a whole map: drop foreground classes that win too few pixels (spec §2.8).

    With ``y = argmax_c P_c`` (first index on ties), ``A_c = |{x : y(x) = c}|`` and ``A = sum_{c>=1} A_c``,
    every class ``c >= 1`` with ``A_c <= threshold * A`` gets probability 0 everywhere
    (:func:`class_areas`, :func:`small_classes`).

    Args:
        class_probs: (C, H, W) class probabilities (>= 0).
        threshold: area fraction in [0, 1] (SCLIP VOC21: 0.1).
        inplace: modify ``class_probs`` instead of returning a copy.

    Returns:
        (C, H, W) filtered probabilities (``class_probs`` itself when ``inplace``).
    """
    if class_probs.dim() != 3:
        raise ValueError(f"class_probs must be (C, H, W), got {tuple(class_probs.shape)}")
    drop = small_classes(class_areas(class_probs), threshold)  # (C,) bool
    out = class_probs if inplace else class_probs.clone()  # (C, H, W)
    out[drop.to(out.device)] = 0.0
    return out


def labels_from_probs(class_probs: torch.Tensor, bg_threshold: float = 0.0, bg_label: int = 0) -> torch.Tensor:
    """Per-pixel labels: argmax over classes, ``bg_label`` (default class 0) where the best probability is too low.

    Ties go to the lowest class index, as ``torch.argmax`` (:func:`first_argmax`; checked on CPU in
    ``tests/test_postprocess.py``).

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
    labels, best = first_argmax(class_probs)  # (H, W) int64, (H, W)
    if bg_threshold > 0.0:
        labels[best < bg_threshold] = bg_label
    return labels


def compact_label_dtype(num_classes: int) -> torch.dtype:
    """The smallest signed integer dtype that holds the labels of ``num_classes`` classes and -1 (UNLABELLED).

    int8 up to 128 classes (1 byte a pixel: 81 MB for a 9000 x 9000 photo, against 648 MB in int64), int16 up
    to 32768, else int32.
    """
    for dtype in (torch.int8, torch.int16):
        if num_classes - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int32


def default_band_rows(channels: int, width: int, elements: int = BAND_ELEMENTS) -> int:
    """Rows per band so that a (channels, rows, width) band holds about ``elements`` values (>= 1; ``elements``
    0: one band for any image)."""
    if elements <= 0:
        return 1 << 31
    return max(1, elements // max(1, channels * width))


def row_bands(height: int, band_rows: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` bands of ``band_rows`` rows (the last may be shorter) covering 0..height."""
    if band_rows < 1:
        raise ValueError(f"band_rows must be >= 1, got {band_rows}")
    return [(start, min(start + band_rows, height)) for start in range(0, height, band_rows)]


def _class_probs_of_band(
    logits: torch.Tensor, mapping: list[int], num_classes: int, logit_scale: float
) -> torch.Tensor:
    """Steps 2-3 of spec §2.6 on a band: (Q, n, W) logits -> (C, n, W) float32 class probabilities."""
    name_probs = name_probabilities(logits, logit_scale)  # (Q, n, W)
    if mapping == list(range(num_classes)):
        return name_probs  # (C, n, W): one name per class, in class order
    return class_probabilities(name_probs, mapping, num_classes)  # (C, n, W)


def band_class_probs(
    logits: torch.Tensor, name_to_class: Sequence[int], num_classes: int, logit_scale: float
) -> torch.Tensor:
    """Spec §2.6 steps 2-3 on a band of rows: (Q, n, W) logits -> (C, n, W) float32 class probabilities."""
    mapping = _class_of_each_name(name_to_class, int(logits.shape[0]), num_classes)
    return _class_probs_of_band(logits, mapping, num_classes, logit_scale)


def dropped_classes(
    logit_rows: LogitRows,
    bands: Sequence[tuple[int, int]],
    name_to_class: Sequence[int],
    num_classes: int,
    logit_scale: float,
    area_threshold: float,
) -> torch.Tensor:
    """The area filter's classes (:func:`small_classes`), their areas counted over ``bands`` (the whole image).

    Returns:
        (C,) bool, True for the classes whose probability is set to 0 everywhere.
    """
    mapping = _class_of_each_name(name_to_class, len(name_to_class), num_classes)  # checked, as band_class_probs
    areas = torch.zeros(num_classes, dtype=torch.int64)  # (C,)
    for start, stop in bands:
        areas += class_areas(_class_probs_of_band(logit_rows(start, stop), mapping, num_classes, logit_scale))
    return small_classes(areas, area_threshold)  # (C,) bool


def segment_rows(
    logit_rows: LogitRows,
    size: tuple[int, int],
    name_to_class: Sequence[int] | torch.Tensor,
    num_classes: int,
    logit_scale: float,
    bg_threshold: float = 0.0,
    area_threshold: float | None = None,
    *,
    band_rows: int | None = None,
    probs_out: torch.Tensor | None = None,
    bg_label: int = 0,
    progress: Callable[[int, int], None] | None = None,
    labels_dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """Spec §2.6 steps 2-5 band by band: joint softmax, synonym max, area filter, argmax + background.

    Every step but the area filter is per pixel, so the labels of a band depend only on its logits; the
    area filter needs the whole image's class areas, counted in a first pass over the bands (so with the
    filter on, ``logit_rows`` is called twice per band). The result equals the whole-map computation.
    PAMR (step 1), if wanted, is applied by the caller to the logits ``logit_rows`` returns.

    Args:
        logit_rows: ``(start, stop) -> (Q, stop - start, W0)`` logits of those rows (any float dtype).
        size: (H0, W0) of the logit map.
        name_to_class: (Q,) class index in [0, C) of every name.
        num_classes: number of classes C.
        logit_scale: temperature tau > 0.
        bg_threshold: theta_bg in [0, 1] (0 = no background thresholding).
        area_threshold: SCLIP area-filter fraction (e.g. 0.1), or None to skip the filter.
        band_rows: rows per band (default: ``max(1, BAND_ELEMENTS // (Q * W0))``); any value gives the
            same result.
        probs_out: optional (C, H0, W0) tensor that receives the class probabilities (after the filter).
        bg_label: label of the pixels below ``bg_threshold`` (see :func:`labels_from_probs`).
        progress: called as ``progress(rows_labelled, H0)`` after each band of the labelling pass.
        labels_dtype: integer dtype of the result (e.g. :func:`compact_label_dtype`); it must hold C - 1
            and ``bg_label``. The values do not depend on it.

    Returns:
        (H0, W0) labels in [0, C), or ``bg_label``, of ``labels_dtype``.
    """
    height, width = size
    num_names = len(name_to_class)
    mapping = _class_of_each_name(name_to_class, num_names, num_classes)
    if probs_out is not None and tuple(probs_out.shape) != (num_classes, height, width):
        raise ValueError(f"probs_out must be {(num_classes, height, width)}, got {tuple(probs_out.shape)}")
    bands = row_bands(height, band_rows if band_rows is not None else default_band_rows(num_names, width))

    drop: torch.Tensor | None = None
    if area_threshold is not None:
        drop = dropped_classes(logit_rows, bands, mapping, num_classes, logit_scale, area_threshold)  # (C,) bool

    labels: torch.Tensor | None = None
    for start, stop in bands:
        probs = _class_probs_of_band(logit_rows(start, stop), mapping, num_classes, logit_scale)  # (C, n, W0)
        if drop is not None:
            probs[drop.to(probs.device)] = 0.0
        band_labels = labels_from_probs(probs, bg_threshold, bg_label)  # (n, W0)
        if labels is None:
            labels = torch.empty(height, width, dtype=labels_dtype, device=band_labels.device)  # (H0, W0)
        labels[start:stop] = band_labels
        if probs_out is not None:
            probs_out[:, start:stop] = probs
        if progress is not None:
            progress(stop, height)
    if labels is None:
        raise ValueError(f"cannot segment an empty {height}x{width} map")
    return labels


def logits_to_labels(
    logits: torch.Tensor,
    name_to_class: Sequence[int] | torch.Tensor,
    num_classes: int,
    logit_scale: float,
    bg_threshold: float = 0.0,
    area_threshold: float | None = None,
    bg_label: int = 0,
    *,
    band_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec §2.6 steps 2-5 on an in-memory logit map (:func:`segment_rows` over its rows).

    PAMR (step 1), if wanted, is applied to ``logits`` by the caller before this function.

    Args:
        logits: (Q, H0, W0) full-resolution logits (cosine similarities), any float dtype; not modified.
        name_to_class: (Q,) class index in [0, C) of every name.
        num_classes: number of classes C.
        logit_scale: temperature tau > 0.
        bg_threshold: theta_bg in [0, 1] (0 = no background thresholding).
        area_threshold: SCLIP area-filter fraction (e.g. 0.1), or None to skip the filter.
        bg_label: label of the pixels below ``bg_threshold`` (see :func:`labels_from_probs`).
        band_rows: rows per band (see :func:`segment_rows`; the result does not depend on it).

    Returns:
        probs: (C, H0, W0) float32 class probabilities (after the area filter, if any).
        labels: (H0, W0) int64 labels in [0, C), or ``bg_label``.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (Q, H, W), got {tuple(logits.shape)}")
    size = (int(logits.shape[1]), int(logits.shape[2]))
    probs = torch.empty(num_classes, *size, dtype=torch.float32, device=logits.device)  # (C, H0, W0)
    labels = segment_rows(
        lambda start, stop: logits[:, start:stop],
        size,
        name_to_class,
        num_classes,
        logit_scale,
        bg_threshold,
        area_threshold,
        band_rows=band_rows,
        probs_out=probs,
        bg_label=bg_label,
    )
    return probs, labels
