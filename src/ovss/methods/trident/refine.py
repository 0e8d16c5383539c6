"""Trident's SAM refinement (spec §4.12.4, release ``sam_refinement``).

The coarse labels are halved; every class's 8-connected regions of at least ``min_area`` pixels prompt
SAM's mask decoder with a box, a point (the region's most probable pixel) and a dense mask prompt (the
class probability above ``coarse_thresh``, scaled by ``mask_coef``); masks whose predicted IoU exceeds
``iou_thresh`` re-label the pixels they cover by R_c = max_m sigmoid(l_m) * P_c (argmax over classes).

The logic (:func:`refine_with_decoder`) takes the decoder as a function, so it can be checked without SAM;
:func:`refine_labels` binds it to SAM's prompt encoder and mask decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ovss.methods.options import TridentOptions
from ovss.methods.trident.sam import SAM_SIZE, SamGeometry, long_side_size
from ovss.precision import full_precision

MASK_SIZE = 256  # SAM's low-resolution mask side

# decode(points (B, 1, 2), point_labels (B, 1), boxes (B, 4), mask prompt) -> (low-res logits (B, 256, 256),
# predicted IoU (B,)); points and boxes in SAM's 1024 frame; mask (1, 256, 256) (release) or (B, 1, 256, 256).
Decoder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Upsampler = Callable[[torch.Tensor], torch.Tensor]  # (B, 256, 256) low-res logits -> (B, H0, W0) logits


@dataclass(frozen=True)
class Regions:
    """The prompted regions of one class on the half-resolution grid."""

    boxes: torch.Tensor  # (B, 4) float (x_min, y_min, x_max, y_max), inclusive pixel indices
    points: torch.Tensor  # (B, 2) float (x, y) of each region's most probable pixel


def connected_regions(mask: np.ndarray, score: np.ndarray, min_area: int) -> Regions:
    """8-connected components of ``mask`` with at least ``min_area`` pixels, with box and best point.

    Args:
            mask: (h, w) bool.
            score: (h, w) float; each region's point is its argmax (first in raster order on ties).
            min_area: smallest kept component, in pixels.

    Returns:
        The regions in OpenCV's label order (raster order of their first pixel).
    """
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    boxes, points = [], []
    flat_labels, flat_score = labels.ravel(), score.ravel()
    for r in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[r])
        if area < min_area:
            continue
        best = int(np.argmax(np.where(flat_labels == r, flat_score, -np.inf)))  # first maximum, raster order
        boxes.append([x, y, x + w - 1, y + h - 1])
        points.append([best % mask.shape[1], best // mask.shape[1]])
    return Regions(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(points, dtype=torch.float32).reshape(-1, 2),
    )


def mask_prompt(
    prob: torch.Tensor, size: tuple[int, int], threshold: float, coef: float, side: int = MASK_SIZE
) -> torch.Tensor:
    """Dense mask prompt: probability resized to the long-side-256 size of H0 x W0, zero-padded to 256 x 256,
    ``coef * p`` where ``p > threshold`` else 0 (spec §4.12.4 step 3).

    Args:
        prob: (h, w) half-resolution class probability.
        size: (H0, W0) of the image.

        side: SAM's low-resolution mask side (256).

    Returns:
        (1, 256, 256) fp32.
    """
    h, w = long_side_size(*size, side)
    p = F.interpolate(prob[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]  # (h, w)
    p = F.pad(p, (0, side - w, 0, side - h))  # (256, 256)
    return torch.where(p > threshold, coef * p, torch.zeros_like(p))[None]  # (1, 256, 256)


def to_sam_frame(xy: torch.Tensor, size: tuple[int, int], side: int = SAM_SIZE) -> torch.Tensor:
    """Scale (..., 2k) x, y coordinates of an h x w image to its long-side-1024 size (SAM apply_coords)."""
    h, w = size
    new_h, new_w = long_side_size(h, w, side)
    scale = torch.tensor([new_w / w, new_h / h], dtype=torch.float32).repeat(xy.shape[-1] // 2)  # (2k,)
    return xy.float() * scale.to(xy.device)  # (..., 2k)


def refine_with_decoder(
    coarse: torch.Tensor,
    probs: torch.Tensor,
    opts: TridentOptions,
    decode: Decoder,
    upsample: Upsampler,
    frame: tuple[int, int] = (SAM_SIZE, MASK_SIZE),
) -> tuple[torch.Tensor, dict[str, Any]]:
    """SAM refinement of coarse labels (spec §4.12.4 steps 1-7) with a given decoder.

    Args:
        coarse: (H0, W0) int64 labels of §2.6 (a pixel outside 0..C-1 is never prompted).
        probs: (C, H0, W0) fp32 class probabilities.
        opts: thresholds, areas, mask prompt layout and the failed-region rule.
        decode: the mask decoder (see :data:`Decoder`); called once per prompted class.
        upsample: low-res logits -> full-resolution logits (SAM post-processing).
        frame: SAM's input side and low-resolution mask side (1024, 256).

    Returns:
        (H0, W0) int64 refined labels, and counts of prompted / kept regions.
    """
    C, H0, W0 = probs.shape
    dh, dw = H0 // 2, W0 // 2
    y_d = F.interpolate(coarse[None, None].float(), size=(dh, dw), mode="nearest")[0, 0].long()  # (dh, dw)
    p_d = F.interpolate(probs[None].float(), size=(dh, dw), mode="bilinear", align_corners=False)[0]  # (C, dh, dw)
    y_d[p_d.amax(dim=0) < opts.coarse_thresh] = C  # unsure pixels are never prompted
    # R_c = [covered] * max_m sigmoid(l_m) * P_c is kept as its running max over classes and the first class
    # reaching it (classes ascend, so ties go to the lowest index, as argmax): no (C, H0, W0) tensor.
    best = torch.zeros(H0, W0, dtype=probs.dtype, device=probs.device)  # (H0, W0) max_c R_c
    best_class = coarse.clone()  # (H0, W0) argmax_c R_c where best > 0, the coarse label elsewhere
    failed = torch.zeros(H0, W0, dtype=torch.bool, device=probs.device)  # (H0, W0) failed-mask cover
    prompted = kept = 0
    for c in range(C):
        if float(p_d[c].max()) < opts.coarse_thresh:
            continue
        regions = connected_regions((y_d == c).cpu().numpy(), p_d[c].cpu().numpy(), opts.min_area)
        B = regions.boxes.shape[0]
        if B == 0:
            continue
        points = to_sam_frame(regions.points, (dh, dw), frame[0])[:, None].to(probs.device)  # (B, 1, 2)
        boxes = to_sam_frame(regions.boxes, (dh, dw), frame[0]).to(probs.device)  # (B, 4)
        mask = mask_prompt(p_d[c], (H0, W0), opts.coarse_thresh, opts.mask_coef, frame[1])  # (1, 256, 256)
        if opts.mask_prompt == "batched":
            mask = mask[None].expand(B, -1, -1, -1)  # (B, 1, 256, 256)
        labels = torch.ones(B, 1, dtype=torch.long, device=probs.device)  # (B, 1) foreground points
        with full_precision():
            low, iou = decode(points, labels, boxes, mask)  # (B, 256, 256), (B,)
        good = iou > opts.iou_thresh  # (B,)
        prompted, kept = prompted + B, kept + int(good.sum())
        if good.any():
            logits = upsample(low[good])  # (k, H0, W0)
            covered = (logits > 0).any(dim=0)  # (H0, W0)
            r = covered * logits.sigmoid().amax(dim=0) * probs[c]  # (H0, W0) R_c
            higher = r > best  # (H0, W0)
            best = torch.where(higher, r, best)
            best_class[higher] = c
        if opts.failed == "coarse" and (~good).any():
            failed |= (upsample(low[~good]) > 0).any(dim=0)  # (H0, W0)
    refined = best_class  # argmax_c R_c where sum_c R_c > 0 (R >= 0), else the coarse label
    if opts.failed == "coarse":
        revert = failed & (probs.amax(dim=0) > best)  # (H0, W0)
        refined = torch.where(revert, coarse, refined)
    return refined, {"regions": prompted, "kept": kept}


@dataclass
class SamImage:
    """SAM's image embedding of the whole image and where the image sits in SAM's input."""

    embedding: torch.Tensor  # (1, 256, 64, 64) neck output
    geometry: SamGeometry  # sizes of the image in SAM's frame


def sam_upsampler(geometry: SamGeometry) -> Upsampler:
    """SAM post-processing: bilinear to 1024 x 1024, crop to h_in x w_in, bilinear to H~ x W~, then to H0 x W0."""

    def upsample(low: torch.Tensor) -> torch.Tensor:
        side = geometry.side
        x = F.interpolate(low[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)
        x = x[..., : geometry.input[0], : geometry.input[1]]  # (k, 1, h_in, w_in)
        x = F.interpolate(x, size=geometry.rounded, mode="bilinear", align_corners=False)  # (k, 1, H~, W~)
        if geometry.rounded != geometry.original:
            x = F.interpolate(x, size=geometry.original, mode="bilinear", align_corners=False)  # (k, 1, H0, W0)
        return x[:, 0]  # (k, H0, W0)

    return upsample


def sam_decoder(sam: Any, image: SamImage) -> Decoder:
    """SAM's prompt encoder and mask decoder on one image embedding, single-mask output (mask token 0)."""

    def decode(
        points: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        low, iou = sam.decode(image.embedding, (points, labels), boxes, mask)  # (B, 1, 256, 256), (B, 1)
        return low[:, 0].float(), iou[:, 0].float()

    return decode


def refine_labels(
    image: SamImage, coarse: torch.Tensor, probs: torch.Tensor, opts: TridentOptions, sam: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """SAM refinement of one image's coarse labels with SAM's decoder (fp32)."""
    with torch.inference_mode():
        g = image.geometry
        decode, upsample = sam_decoder(sam, image), sam_upsampler(g)
        return refine_with_decoder(coarse, probs, opts, decode, upsample, (g.side, g.mask_side))
