"""Trident's SAM refinement rules (spec §4.12.4) with a scripted mask decoder."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ovss.methods.options import TridentOptions
from ovss.methods.trident.refine import connected_regions, mask_prompt, refine_with_decoder, to_sam_frame

H0, W0 = 64, 96  # half resolution 32 x 48


def _image() -> tuple[Tensor, Tensor]:
    """Coarse labels: class 1 on the left, class 2 on the right, class 0 in a small top-left corner."""
    coarse = torch.ones(H0, W0, dtype=torch.long)
    coarse[:, 48:] = 2
    coarse[:6, :6] = 0
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, H0, W0, generator=g) * 0.2
    for c in range(3):
        probs[c][coarse == c] += 0.6  # the coarse label is the most probable class
    return coarse, probs


class ScriptedDecoder:
    """Returns, for the c-th call, a full-resolution mask logit per region and an IoU per region."""

    def __init__(self, masks: dict[int, Tensor], ious: dict[int, float]) -> None:
        self.masks, self.ious = masks, ious  # class -> (H0, W0) logits; class -> IoU of its regions
        self.calls: list[dict[str, Tensor]] = []

    def __call__(self, points: Tensor, labels: Tensor, boxes: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        c = len(self.calls)
        self.calls.append({"points": points, "labels": labels, "boxes": boxes, "mask": mask})
        cls = sorted(self.masks)[c]
        B = points.shape[0]
        return self.masks[cls].expand(B, -1, -1).clone(), torch.full((B,), self.ious[cls])


def _identity(low: Tensor) -> Tensor:
    return low


def _rect(y1: int, y2: int, x1: int, x2: int, inside: float = 4.0) -> Tensor:
    m = torch.full((H0, W0), -4.0)
    m[y1:y2, x1:x2] = inside
    return m


def test_connected_components_are_8_connected_with_inclusive_boxes():
    mask = np.zeros((10, 12), bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True  # a diagonal chain: one region under 8-connectivity
    mask[6:9, 5:11] = True  # 18 pixels
    mask[0, 11] = True  # a single pixel
    score = np.zeros((10, 12))
    score[7, 6] = score[8, 9] = 5.0  # tie: the first in raster order wins
    regions = connected_regions(mask, score, min_area=3)
    assert regions.boxes.tolist() == [[1, 1, 3, 3], [5, 6, 10, 8]]
    assert regions.points.tolist()[1] == [6, 7]  # (x, y)
    assert connected_regions(mask, score, min_area=4).boxes.shape == (1, 4)


def test_mask_prompt_and_coordinate_frame():
    prob = torch.rand(32, 48, generator=torch.Generator().manual_seed(1))
    got = mask_prompt(prob, (H0, W0), 0.5, 0.005)
    assert got.shape == (1, 256, 256)
    p = F.interpolate(prob[None, None], size=(171, 256), mode="bilinear", align_corners=False)[0, 0]  # 64*256/96
    torch.testing.assert_close(got[0, :171], torch.where(p > 0.5, 0.005 * p, torch.zeros_like(p)))
    assert got[0, 171:].abs().sum() == 0  # zero-padded at the bottom
    xy = torch.tensor([[10.0, 20.0, 47.0, 31.0]])
    frame = to_sam_frame(xy, (187, 250))  # VOC half resolution -> 766 x 1024
    torch.testing.assert_close(frame, xy * torch.tensor([1024 / 250, 766 / 187] * 2))


def test_failed_regions_change_nothing_and_unsure_pixels_are_not_prompted():
    coarse, probs = _image()
    decoder = ScriptedDecoder({1: _rect(0, 64, 0, 96), 2: _rect(0, 64, 0, 96)}, {1: 0.5, 2: 0.79})
    opts = TridentOptions(min_area=20)
    for failed in ("release", "coarse"):
        decoder.calls.clear()
        got, counts = refine_with_decoder(coarse, probs, dataclasses.replace(opts, failed=failed), decoder, _identity)
        assert torch.equal(got, coarse)  # no mask passed the IoU test
        assert counts == {"regions": 2, "kept": 0}  # class 0's 9-pixel corner is below min_area
    low = probs.clone()
    low[2] = 0.1  # class 2 never reaches theta_c: not prompted, and its pixels are unsure
    decoder.calls.clear()
    decoder.masks.pop(2)
    refine_with_decoder(coarse, low, opts, decoder, _identity)
    assert len(decoder.calls) == 1


def _merge_by_hand(coarse: Tensor, probs: Tensor, kept: dict[int, Tensor]) -> Tensor:
    R = torch.zeros_like(probs)
    for c, logit in kept.items():
        R[c] = (logit > 0) * logit.sigmoid() * probs[c]
    return torch.where(R.sum(0) > 0, R.argmax(0), coarse)


def test_kept_masks_relabel_by_sigmoid_times_probability():
    coarse, probs = _image()
    m1 = _rect(0, 64, 0, 60, inside=3.0)  # class 1's mask spills 12 columns into class 2's area
    m2 = _rect(10, 50, 40, 96, inside=1.0)  # class 2's mask overlaps it
    decoder = ScriptedDecoder({1: m1, 2: m2}, {1: 0.9, 2: 0.95})
    got, counts = refine_with_decoder(coarse, probs, TridentOptions(min_area=20), decoder, _identity)
    assert counts["kept"] == 2
    want = _merge_by_hand(coarse, probs, {1: m1, 2: m2})
    assert torch.equal(got, want)
    assert (got[:10, 48:60] == 1).all() and not torch.equal(got, coarse)  # the spill re-labels class-2 pixels


def test_failed_coarse_switch_restores_coarse_labels_in_failed_masks():
    coarse, probs = _image()
    m1 = _rect(0, 64, 0, 60)  # kept: spills into class 2's area
    m2 = _rect(0, 64, 48, 96)  # fails the IoU test
    decoder = ScriptedDecoder({1: m1, 2: m2}, {1: 0.9, 2: 0.5})
    release, _ = refine_with_decoder(coarse, probs, TridentOptions(min_area=20), decoder, _identity)
    decoder.calls.clear()
    fixed, _ = refine_with_decoder(coarse, probs, TridentOptions(min_area=20, failed="coarse"), decoder, _identity)
    assert (release[:, 48:60] == 1).all()  # release: the failed region cannot protect its labels
    assert torch.equal(fixed[:, 48:60], coarse[:, 48:60])  # coarse: P_max > R_max there, the coarse label stays
    assert torch.equal(fixed[:, :48], release[:, :48])


def test_prompts_per_class_and_mask_layouts():
    coarse, probs = _image()
    decoder = ScriptedDecoder({1: _rect(0, 1, 0, 1), 2: _rect(0, 1, 0, 1)}, {1: 0.1, 2: 0.1})
    refine_with_decoder(coarse, probs, TridentOptions(min_area=20), decoder, _identity)
    first = decoder.calls[0]
    assert first["mask"].shape == (1, 256, 256)  # release: one unbatched mask for the batch
    assert first["points"].shape == (1, 1, 2) and first["labels"].tolist() == [[1]]
    # Class 1 on the half-resolution grid: columns 0..23, rows 0..31 minus the 3 x 3 class-0 corner.
    half = F.interpolate(probs[None], size=(32, 48), mode="bilinear", align_corners=False)[0, 1]
    region = torch.zeros(32, 48, dtype=torch.bool)
    region[:, :24] = True
    region[:3, :3] = False
    best = int(torch.where(region, half, torch.tensor(-1.0)).flatten().argmax())
    point = torch.tensor([[best % 48, best // 48]], dtype=torch.float32)
    torch.testing.assert_close(first["points"][:, 0], to_sam_frame(point, (32, 48)))
    torch.testing.assert_close(first["boxes"], to_sam_frame(torch.tensor([[0.0, 0.0, 23.0, 31.0]]), (32, 48)))
    decoder.calls.clear()
    refine_with_decoder(coarse, probs, TridentOptions(min_area=20, mask_prompt="batched"), decoder, _identity)
    assert decoder.calls[0]["mask"].shape == (1, 1, 256, 256)  # batched: one mask per region
