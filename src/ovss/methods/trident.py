"""Trident (spec §4.12): splice sub-image CLIP+DINO features, aggregate them with SAM, refine with SAM.

Trident owns its image path instead of the window-logit pipeline (its logits live on SAM's grid):

1. Sub-image stage (§4.12.2): the CLIP-normalised image is resized to a canvas whose sides are multiples
   of 16 (:func:`canvas_size`), cut into full c x c windows, and every window gets ProxyCLIP's attention
   from DINO ViT-B/16 with one image-level mean (:func:`run_trident`; ``trident+gla`` replaces this step by
   GLA's cross-window operator). The outputs y^(b) (before the dense head) are averaged into one
   768 x Gr x Gc map (:func:`splice`).
2. SAM aggregation (§4.12.3, :mod:`ovss.methods.trident_sam`): Z = W X on SAM's valid grid, dense head,
   text scores, bilinear to H0 x W0, labels of §2.6.
3. SAM refinement (§4.12.4, :mod:`ovss.methods.trident_refine`).

``set_image`` runs steps 1-2 up to the normalised dense features (and keeps SAM's image embedding);
``predict`` only scores text and refines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ovss.errors import OvssError
from ovss.methods.common import Backbones, MethodOutput, WindowBatch, attend
from ovss.methods.options import TridentOptions
from ovss.methods.proxyclip import clip_values_on_grid, masked_softmax, proxy_attention, vfm_features
from ovss.models.vit import VisionTransformer
from ovss.pipeline.maps import FullResolutionMaps, LabelRule
from ovss.pipeline.postprocess import LogitRows, labels_from_probs
from ovss.pipeline.windows import Padding, Window, sliding_windows
from ovss.precision import full_precision

if TYPE_CHECKING:
    from ovss.predictor import ImageState, Progress, Segmenter

PATCH = 16  # CLIP ViT-B/16, DINO ViT-B/16 and SAM ViT-B patch side


def canvas_size(height: int, width: int, crop: int) -> tuple[int, int]:
    """The canvas H' x W' of the sub-image stage (spec §4.12.2 step 2, release ``preprocess_image``).

    Sides that are both multiples of 16 are kept; otherwise the long side is rounded up to a multiple of 16
    and each side is scaled by the same ratio (floored) and rounded up to a multiple of 16. Each side is at
    least ``crop`` so that every window is a full c x c.

    Example: 448 x 597 (VOC 375 x 500 at S = 448) -> 464 x 608; 688 x 1376 (Cityscapes) is kept.
    """
    if height % PATCH or width % PATCH:
        long = max(height, width)
        target = PATCH * math.ceil(long / PATCH)
        height = PATCH * math.ceil((height * target // long) / PATCH)
        width = PATCH * math.ceil((width * target // long) / PATCH)
    return max(height, crop), max(width, crop)


def resize_canvas(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (half-pixel, no antialias) resize of the normalised (3, H, W) image to the canvas."""
    if tuple(pixels.shape[-2:]) == size:
        return pixels
    return F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False)[0]  # (3, H', W')


def trident_options(options: Any) -> TridentOptions:
    """The Trident part of ``trident`` or ``trident+gla`` options."""
    return options if isinstance(options, TridentOptions) else options.base


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


@dataclass
class TridentImage:
    """What Trident keeps per image beyond :class:`~ovss.predictor.ImageState`: SAM's view for refinement."""

    sam_image: Any  # ovss.methods.trident_refine.SamImage: embedding and geometry of the whole image


class TridentPath:
    """Trident's image path: ``encode`` in ``set_image``, ``maps`` in ``predict`` (``MethodSpec.image_path``)."""

    def check(self, seg: Segmenter) -> None:
        """Errors that hold for every image, raised when the segmenter is built: SAM, VFM, crop, PAMR, gamma."""
        name = seg.method.name
        if seg.sam is None:
            raise OvssError(f"{name} needs SAM weights; load them with sam='sam-vitb' (or --sam PATH)")
        check_patch(Backbones(seg.clip.visual, seg.vfm), name)
        if seg.pipeline.crop % PATCH:
            raise OvssError(f"{name} needs a crop that is a multiple of {PATCH} (or 0), got {seg.pipeline.crop}")
        if seg.pipeline.pamr_steps:
            raise OvssError(f"{name} refines its labels with SAM and does not run PAMR; use pamr_steps=0")
        if not trident_options(seg.options).gamma > 0:
            raise OvssError(f"{name} gamma must be > 0, got {trident_options(seg.options).gamma}")

    def encode(self, seg: Segmenter, rgb: np.ndarray, progress: Progress | None) -> ImageState:
        """Sub-image stage, splice and SAM aggregation: unit dense features on SAM's valid grid."""
        from ovss.methods.trident_sam import sam_aggregate
        from ovss.pipeline.image import clip_normalize, resize_short_side
        from ovss.precision import backbone_precision
        from ovss.predictor import ImageState

        cfg, opts = seg.pipeline, trident_options(seg.options)
        self.check(seg)
        processed = resize_short_side(rgb, cfg.short_side, cfg.max_long_side)  # (H, W, 3)
        mean, std, _ = seg.clip.input_norm.pixel_statistics()
        pixels = clip_normalize(processed, device=seg.device, mean=mean, std=std)  # (3, H, W)
        canvas = canvas_size(int(pixels.shape[-2]), int(pixels.shape[-1]), cfg.crop)
        pixels = resize_canvas(pixels, canvas)  # (3, H', W')
        windows = sliding_windows(*canvas, cfg.crop, cfg.stride)
        crops = torch.stack([pixels[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])  # (L, 3, c, c)
        no_pad = Padding(0, 0, 0, 0)
        if progress is not None:
            progress(0, len(windows))
        with torch.inference_mode():
            backbones = Backbones(seg.clip.visual, seg.vfm, seg.tuning)
            with backbone_precision(seg.device, seg.dtype, keep_reduced_copies=seg.tuning.keep_reduced_copies):
                out = seg.method.run(backbones, WindowBatch(crops, windows, no_pad, canvas), seg.options)
            spliced = splice(out.tokens, windows, out.grid, canvas)  # (D, Gr, Gc)
            z, grid, sam_image, sam_info = sam_aggregate(seg, seg.sam, rgb, spliced, opts)  # (n_s, D)
            with backbone_precision(seg.device, seg.dtype, keep_reduced_copies=seg.tuning.keep_reduced_copies):
                f = seg.clip.visual.head(z[None]).float()  # (1, n_s, E)
        if progress is not None:
            progress(len(windows), len(windows))
        info = {**out.info, "trident_sam": sam_info}
        features = F.normalize(f, dim=-1)  # (1, n_s, E)
        window_size = (cfg.crop, cfg.crop) if cfg.crop else canvas
        return ImageState(
            rgb, pixels, windows, no_pad, window_size, features, grid, info, out.window_info,
            owned=TridentImage(sam_image),
        )

    def maps(self, seg: Segmenter, st: ImageState, text: torch.Tensor, rule: LabelRule) -> FullResolutionMaps:
        """Text scores on SAM's grid, bilinear to H0 x W0, §2.6 labels, then SAM refinement when on."""
        from ovss.methods.trident_refine import refine_labels

        opts = trident_options(seg.options)
        H0, W0 = st.rgb.shape[:2]
        h, w = st.grid
        coarse = (st.features[0] @ text.T).T.reshape(-1, h, w)  # (Q, h_s, w_s)
        maps = FullResolutionMaps(resized_rows(coarse, (H0, W0)), (H0, W0), rule, device=coarse.device)
        if not opts.refine:
            return maps
        probs = maps.probs()  # (C, H0, W0), kept by the maps
        coarse_labels = labels_from_probs(probs, rule.bg_threshold, rule.bg_label)  # = maps.labels(), one pass less
        labels, counts = refine_labels(st.owned.sam_image, coarse_labels, probs, opts, seg.sam)  # (H0, W0)
        st.info = {**st.info, "trident_refine": counts}  # a new dict: earlier predictions keep their record
        return RefinedMaps(maps, labels)


def resized_rows(small: torch.Tensor, size: tuple[int, int]) -> LogitRows:
    """Rows of the bilinear (half-pixel) resize of (Q, h, w) logits to (Q, H0, W0), computed band by band.

    Columns are resized once ((Q, h, W0), small); each band then blends two source rows per output row with
    PyTorch's weights (source y = (y + 0.5) h / H0 - 0.5, clamped at 0), so the full map is never held.
    """
    h = small.shape[1]
    H0, W0 = size
    cols = F.interpolate(small[None].float(), size=(h, W0), mode="bilinear", align_corners=False)[0]  # (Q, h, W0)

    def rows(start: int, stop: int) -> torch.Tensor:
        y = torch.arange(start, stop, dtype=torch.float32, device=cols.device)  # (n,)
        src = ((y + 0.5) * (h / H0) - 0.5).clamp(min=0)  # (n,)
        y0 = src.long().clamp(max=h - 1)  # (n,)
        y1 = (y0 + 1).clamp(max=h - 1)  # (n,)
        lam = (src - y0)[None, :, None]  # (1, n, 1)
        return cols[:, y0] * (1 - lam) + cols[:, y1] * lam  # (Q, n, W0)

    return rows


class RefinedMaps(FullResolutionMaps):
    """Full-resolution maps whose labels were changed by SAM refinement (logits and probs stay the coarse ones)."""

    def __init__(self, coarse: FullResolutionMaps, labels: torch.Tensor) -> None:
        super().__init__(coarse._rows, coarse.size, coarse.rule, device=coarse.device, band_rows=coarse.band_rows)
        self._probs = coarse._probs  # built for the refinement: kept, not recomputed
        self._refined = labels  # (H0, W0) int64

    def labels(self) -> torch.Tensor:
        """(H0, W0) int64 labels after SAM refinement."""
        return self._refined


TRIDENT_PATH = TridentPath()
