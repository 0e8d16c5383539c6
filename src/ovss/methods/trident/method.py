"""Trident (spec §4.12): splice sub-image CLIP+DINO features, aggregate them with SAM, refine with SAM.

Trident runs through the same two stages as every method, with its own windowing, finish and post step:

1. Sub-image stage (§4.12.2): the ``"canvas"`` windowing (:mod:`ovss.pipeline.windows`) resizes the
   CLIP-normalised image to a canvas whose sides are multiples of 16 and cuts full c x c windows; every window
   gets ProxyCLIP's attention from DINO ViT-B/16 with one image-level mean (:func:`run_trident`;
   ``trident+gla`` replaces this step by GLA's cross-window operator).
2. Finish (:func:`finish_trident`): the outputs y^(b) (before the dense head) are averaged into one
   768 x Gr x Gc map (:func:`splice`) and aggregated by SAM (§4.12.3, :mod:`ovss.methods.trident.sam`):
   Z = W X on SAM's valid grid, one whole-image "window" for the dense head, text scores and stitching.
3. Post step (:func:`refine_trident`): SAM refinement of the labels (§4.12.4, :mod:`ovss.methods.trident.refine`).

``set_image`` runs steps 1-2 up to the normalised dense features (and keeps SAM's image embedding);
``predict`` only scores text, stitches (bilinear to H0 x W0), labels (§2.6) and refines.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ovss.errors import OvssError
from ovss.methods.common import Backbones, MethodOutput, WindowBatch, attend
from ovss.methods.options import TridentOptions, base_options
from ovss.methods.proxyclip import clip_values_on_grid, masked_softmax, proxy_attention, vfm_features
from ovss.models.vit import VisionTransformer
from ovss.pipeline.maps import FullResolutionMaps, LabelRule
from ovss.pipeline.postprocess import compact_label_dtype, labels_from_probs
from ovss.pipeline.windows import Layout, Window
from ovss.precision import full_precision

PATCH = 16  # CLIP ViT-B/16, DINO ViT-B/16 and SAM ViT-B patch side


def check_patch(backbones: Backbones, name: str) -> VisionTransformer:
    """Trident's spliced grid needs CLIP and the VFM on the same 16-pixel grid (DINO ViT-B/16); the VFM."""
    if backbones.vfm is None:
        raise OvssError(f"{name} needs a vision foundation model; load it with vfm='dino-vitb16' (or --vfm NAME)")
    if backbones.vfm.cfg.patch != PATCH or backbones.clip.cfg.patch != PATCH:
        raise OvssError(
            f"{name} needs CLIP and the VFM with patch {PATCH} (got {backbones.clip.cfg.patch} and "
            f"{backbones.vfm.cfg.patch}); use vfm='dino-vitb16' and a /16 CLIP"
        )
    return backbones.vfm


def image_level_attention(features: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """ProxyCLIP's attention with one mean over all sub-images of the image (spec §4.12.2 step 5), fp32.

    Args:
        features: (L, N, D_v) VFM features of the L sub-images.

    Returns:
        (L, N, N) masked softmax of gamma * (S^(b) - beta * mean_{b,i,j} S^(b)_ij).
    """
    with full_precision():
        f = F.normalize(features.float(), dim=-1)  # (L, N, D_v)
        s = f @ f.transpose(-2, -1)  # (L, N, N)
        return masked_softmax(gamma * (s - beta * s.mean()))  # (L, N, N)


def run_trident(backbones: Backbones, batch: WindowBatch, opts: TridentOptions) -> MethodOutput:
    """Trident's sub-image outputs y^(b) = OutProj(A^(b) v^(b)) on the 16-pixel grid (before the dense head)."""
    vfm = check_patch(backbones, "trident")
    if not opts.gamma > 0:
        raise OvssError(f"trident gamma must be > 0, got {opts.gamma}")
    clip, block_tokens = backbones.clip, backbones.tuning.block_tokens
    features, grid = vfm_features(vfm, batch.pixels, clip, block_tokens=block_tokens)  # (L, N, D_v)
    v, _ = clip_values_on_grid(clip, batch.pixels, grid, block_tokens=block_tokens)  # (L, H, N, d) on the VFM grid
    if opts.shift_mean == "window":
        attn = proxy_attention(features, opts.beta, opts.gamma)  # (L, N, N)
    else:
        attn = image_level_attention(features, opts.beta, opts.gamma)  # (L, N, N)
    y = attend(clip.blocks[-1], attn[:, None], v)  # (L, N, D)
    return MethodOutput(y, grid, {"trident": {"sub_images": len(batch.windows), "shift_mean": opts.shift_mean}})


def splice(tokens: torch.Tensor, windows: list[Window], grid: tuple[int, int], canvas: tuple[int, int]) -> torch.Tensor:
    """Average the sub-image outputs at their patch offsets into one map (spec §4.12.2 step 6).

    Args:
        tokens: (L, gr * gc, D) per-window outputs, row-major.
        windows: the L windows on the canvas (corners multiples of 16).
        grid: (gr, gc) token grid of every window.
        canvas: (H', W') canvas size in pixels (multiples of 16).

    Returns:
        (D, H' / 16, W' / 16) fp32 map; every position is covered by at least one window.
    """
    L, _, D = tokens.shape
    gr, gc = grid
    total = torch.zeros(D, canvas[0] // PATCH, canvas[1] // PATCH, dtype=torch.float32, device=tokens.device)
    count = torch.zeros(1, *total.shape[1:], dtype=torch.float32, device=tokens.device)  # (1, Gr, Gc)
    maps = tokens.float().transpose(1, 2).reshape(L, D, gr, gc)  # (L, D, gr, gc)
    for b, win in enumerate(windows):
        r, c = win.y1 // PATCH, win.x1 // PATCH
        total[:, r : r + gr, c : c + gc] += maps[b]
        count[:, r : r + gr, c : c + gc] += 1
    return total / count  # (D, Gr, Gc)


def check_trident(backbones: Backbones, pipeline: Any, options: Any, name: str) -> None:
    """Errors that hold for every image, raised when the segmenter is built: SAM, VFM, crop, PAMR, gamma."""
    if backbones.sam is None:
        raise OvssError(f"{name} needs SAM weights; load them with sam='sam-vitb' (or --sam PATH)")
    check_patch(backbones, name)
    if pipeline.crop % PATCH:
        raise OvssError(f"{name} needs a crop that is a multiple of {PATCH} (or 0), got {pipeline.crop}")
    if pipeline.pamr_steps:
        raise OvssError(f"{name} refines its labels with SAM and does not run PAMR; use pamr_steps=0")
    if not base_options(options).gamma > 0:
        raise OvssError(f"{name} gamma must be > 0, got {base_options(options).gamma}")


def finish_trident(backbones: Backbones, batch: WindowBatch, out: MethodOutput, options: Any) -> MethodOutput:
    """Splice the sub-image outputs and aggregate them with SAM: Z (1, n_s, D) on SAM's valid grid.

    Runs outside autocast (SAM's encoder autocasts itself); keeps SAM's view of the image for the post step.
    """
    from ovss.methods.trident.sam import sam_aggregate

    assert batch.rgb is not None  # the predictor hands every method the original image
    canvas = batch.image_size
    spliced = splice(out.tokens, batch.windows, out.grid, canvas)  # (D, Gr, Gc)
    z, grid, sam_image, sam_info = sam_aggregate(backbones, batch.rgb, spliced, base_options(options))  # (n_s, D)
    info = {**out.info, "trident_sam": sam_info}
    return MethodOutput(z[None], grid, info, out.window_info, {"sam_image": sam_image}, Layout.whole(grid))


def refine_trident(
    backbones: Backbones, extras: dict[str, Any], maps: FullResolutionMaps, rule: LabelRule, options: Any
) -> tuple[FullResolutionMaps, dict[str, Any]]:
    """SAM refinement of the coarse labels when ``refine`` is on (the post step); the maps and diagnostics."""
    from ovss.methods.trident.refine import refine_labels

    opts = base_options(options)
    if not opts.refine:
        return maps, {}
    probs = maps.probs()  # (C, H0, W0), kept by the maps
    coarse_labels = labels_from_probs(probs, rule.bg_threshold, rule.bg_label)  # = maps.labels(), one pass less
    labels, counts = refine_labels(extras["sam_image"], coarse_labels, probs, opts, backbones.sam)  # (H0, W0)
    return RefinedMaps(maps, labels), {"trident_refine": counts}


class RefinedMaps(FullResolutionMaps):
    """Full-resolution maps whose labels were changed by SAM refinement (logits and probs stay the coarse ones)."""

    def __init__(self, coarse: FullResolutionMaps, labels: torch.Tensor) -> None:
        super().__init__(coarse._rows, coarse.size, coarse.rule, device=coarse.device, band_rows=coarse.band_rows)
        self._probs = coarse._probs  # built for the refinement: kept, not recomputed
        self._refined = labels  # (H0, W0) int64

    def labels(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(H0, W0) labels after SAM refinement, in ``dtype`` (None: the smallest that holds them)."""
        return self._refined.to(compact_label_dtype(self.rule.num_classes) if dtype is None else dtype)

