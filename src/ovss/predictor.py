"""The :class:`Segmenter`: ``set_image`` runs the image encoder once, ``predict`` scores any label set."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ovss.config import PipelineConfig
from ovss.errors import OvssError
from ovss.labels import UNLABELLED, check_background, flatten_labels, normalize_labels
from ovss.methods.common import Backbones, MethodOutput, WindowBatch
from ovss.methods.proxyclip import window_pad_multiple
from ovss.methods.registry import MethodSpec
from ovss.models.clip import CLIP
from ovss.models.vit import VisionTransformer
from ovss.pipeline.image import clip_normalize, read_image, resize_short_side
from ovss.pipeline.image_state import ImageState, ImageWindows
from ovss.pipeline.maps import FullResolutionMaps, LabelRule
from ovss.pipeline.merge import StitchedLogits
from ovss.pipeline.method_outputs import gathered_outputs
from ovss.pipeline.pamr import pamr
from ovss.pipeline.postprocess import default_band_rows
from ovss.pipeline.windows import WINDOWINGS, Window, pad_windows, symmetric_padding
from ovss.precision import backbone_precision
from ovss.prediction import Prediction
from ovss.text.embeddings import EmbeddingCache
from ovss.text.templates import TEMPLATE_SETS
from ovss.text.tokenizer import Tokenizer, load_tokenizer
from ovss.tuning import DEFAULT_TUNING, Tuning

ImageLike = str | os.PathLike[str] | np.ndarray | Image.Image
LabelsLike = Sequence[str | Sequence[str]]
Progress = Callable[[int, int], None]  # progress(windows_done, windows_total), called from set_image
NO_TOKENIZER = (
    "this segmenter was loaded with tokenizer=False, so it cannot encode label names: pass "
    "text_embeddings=(Q, E) to predict(), or load it with a vocabulary (tokenizer=None, the default, or a path)"
)


class Segmenter:
    """Open-vocabulary segmentation with a frozen CLIP and a training-free method.

    Create it with :func:`ovss.load`. ``set_image`` computes the image's dense features once; ``predict``
    then scores any label list against them (text embeddings are cached per name).
    """

    def __init__(
        self,
        clip: CLIP,
        method: MethodSpec,
        options: Any,
        config: PipelineConfig,
        *,
        vfm: VisionTransformer | None = None,
        sam: Any = None,
        tokenizer: str | os.PathLike[str] | Tokenizer | Literal[False] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        record: dict[str, Any] | None = None,
        tuning: Tuning = DEFAULT_TUNING,
    ) -> None:
        self.clip = clip
        self.method = method
        self.options = options
        self.pipeline = config
        self.vfm = vfm
        # DINO-guided methods pad to a multiple of the VFM's patch (56 for DINO-B/8, 16 for DINOv3; spec §2.3).
        self.pad_multiple = window_pad_multiple(method.pad_multiple, vfm if method.needs("vfm") else None)
        self.sam = sam  # SAM model of methods whose weights include the "sam" role (Trident)
        self.device = torch.device(device)
        self.dtype = dtype
        self.tuning = tuning  # speed / memory switches (ovss.tuning), passed explicitly to the code that uses them
        self._tokenizer_source = tokenizer
        self._tokenizer: Tokenizer | None = tokenizer if isinstance(tokenizer, Tokenizer) else None
        self._cache = EmbeddingCache()
        self._record = dict(record or {})
        self._state: ImageState | None = None
        self._read_ahead: tuple[ImageLike, Any] | None = None  # (image, its ovss.bulk read-ahead), one call
        if config.templates not in TEMPLATE_SETS:
            raise OvssError(f"unknown template set {config.templates!r}; choose one of {', '.join(TEMPLATE_SETS)}")
        if method.check is not None:  # errors that hold for every image, before any is read
            method.check(self.backbones(), config, options, method.name)

    def __repr__(self) -> str:
        cfg = self.pipeline
        weights = self._record.get("clip", "<in-memory model>")
        vfm = f", vfm={self._record.get('vfm', '<in-memory model>')!r}" if self.vfm is not None else ""
        options = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items())
        state = self._state
        image = "none" if state is None else f"{state.rgb.shape[0]}x{state.rgb.shape[1]}, {len(state.windows)} windows"
        return (
            f"Segmenter(method={self.method.name!r}, clip={weights!r}{vfm}, device={self.device}, "
            f"dtype={str(self.dtype).replace('torch.', '')},\n"
            f"          options=({options}),\n"
            f"          short_side={cfg.short_side}, crop={cfg.crop}, stride={cfg.stride}, "
            f"logit_scale={cfg.logit_scale}, bg_threshold={cfg.bg_threshold}, templates={cfg.templates!r},\n"
            f"          image: {image})"
        )

    def backbones(self) -> Backbones:
        """The frozen models the method runs on, with the device and backbone precision."""
        return Backbones(self.clip.visual, self.vfm, self.sam, self.device, self.dtype, self.tuning)

    def _precision(self) -> Any:
        """The backbones' precision context (autocast for bf16 / fp16), with the tuning's weight copies."""
        return backbone_precision(self.device, self.dtype, keep_reduced_copies=self.tuning.keep_reduced_copies)

    # ------------------------------------------------------------------ configuration
    @property
    def config(self) -> dict[str, Any]:
        """The fully resolved configuration (method, options, pipeline, weights, device, dtype, tuning)."""
        return {
            "method": self.method.name,
            "options": dataclasses.asdict(self.options),
            "pipeline": self.pipeline.to_dict(),
            "pad_multiple": self.pad_multiple,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "tuning": self.tuning.to_dict(),
            "clip_fingerprint": self.clip.fingerprint,
            **self._record,
        }

    # ------------------------------------------------------------------ text
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            source = self._tokenizer_source
            if source is False:
                raise OvssError(NO_TOKENIZER)
            self._tokenizer = load_tokenizer(None if source is None else str(source))
        return self._tokenizer

    def encode_names(self, names: Sequence[str]) -> torch.Tensor:
        """Text embeddings of names with the configured templates (spec §3): (Q, E) fp32, unit rows."""
        self.clip.require_text()  # a vision-only checkpoint fails here, before a tokenizer is looked for
        if self._tokenizer_source is False:  # even for names already in the text cache: the same run every time
            raise OvssError(NO_TOKENIZER)
        templates = TEMPLATE_SETS[self.pipeline.templates]
        key = f"{self.clip.fingerprint}:{self.pipeline.templates}"
        encode = functools.partial(self.clip.encode_text, block_tokens=self.tuning.block_tokens)
        return self._cache.get(key, encode, lambda: self.tokenizer, list(names), templates)

    # ------------------------------------------------------------------ image
    def set_image(self, image: ImageLike, *, progress: Progress | None = None) -> None:
        """Read, resize and window an image and compute its dense features with the method.

        Args:
            image: a path, an (H, W, 3) uint8 RGB array (greyscale/RGBA/16-bit accepted), or a PIL image.
            progress: called as ``progress(done, total)`` with the number of windows encoded so far, once
                with ``done = 0`` before the first window and after every batch of windows.
        """
        held, self._read_ahead = self._read_ahead, None  # predict_many's read of this very image, if any
        cut = self._image_windows(image, held)
        out, features = self._dense_features(cut, progress)
        self._state = cut.state(out, features)

    def _image_windows(self, image: ImageLike, held: tuple[ImageLike, Any] | None = None) -> ImageWindows:
        """The image stage's first step: read (or take ``held``, the read-ahead's read of this very image),
        resize, normalise, window, crop and pad (``set_image`` and the pooled ``predict_many``)."""
        if held is not None and held[0] is image:
            rgb, processed = held[1].get()  # its decoder warnings are issued, a bad image's OvssError raised, here
        else:
            rgb, processed = self._read_and_resize(image)  # (H0, W0, 3) uint8, (H, W, 3)
        cfg = self.pipeline
        mean, std, _ = self.clip.input_norm.pixel_statistics()  # 0-255 scale (OpenAI: mmseg's rounded values)
        pixels = clip_normalize(processed, device=self.device, mean=mean, std=std)  # (3, H, W) fp32
        pixels, windows = WINDOWINGS[self.method.windowing](pixels, cfg.crop, cfg.stride)  # Trident: the canvas
        H, W = pixels.shape[-2:]
        h, w = windows[0].height, windows[0].width  # every window has the same size (spec §2.3)
        padding = symmetric_padding(h, w, self.pad_multiple)
        padded = (h + padding.top + padding.bottom, w + padding.left + padding.right)
        patch = self.clip.visual.cfg.patch
        if padded[0] < patch or padded[1] < patch:
            raise OvssError(
                f"the processed image is {H}x{W} pixels, smaller than one {patch}x{patch} CLIP patch; "
                "use a larger image or a larger short_side"
            )
        crops = torch.stack([pixels[:, win.y1 : win.y2, win.x1 : win.x2] for win in windows])  # (L, 3, h, w)
        return ImageWindows(rgb, pixels, windows, padding, padded, pad_windows(crops, padding))  # (L, 3, h', w')

    def _read_and_resize(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray]:
        """The image as (H0, W0, 3) uint8 RGB and resized for processing, (H, W, 3) (thread-safe: no state)."""
        rgb = read_image(image)  # (H0, W0, 3) uint8
        cfg = self.pipeline
        return rgb, resize_short_side(rgb, cfg.short_side, cfg.max_long_side)  # (H, W, 3)

    def _current(self, hint: str = "") -> ImageState:
        """The state of the last ``set_image``; OvssError when there is none."""
        if self._state is None:
            raise OvssError(f"no image: call set_image(image) first{hint}")
        return self._state

    def image_state(self) -> ImageState:
        """The dense features of the last ``set_image``, to keep and bring back with :meth:`restore_image`."""
        return self._current()

    def restore_image(self, state: ImageState) -> None:
        """Make ``state`` (an :meth:`image_state` of this segmenter) the current image, without re-encoding it."""
        self._state = state

    def current_image(self) -> np.ndarray:
        """The (H0, W0, 3) uint8 RGB image of the last ``set_image``."""
        return self._current().rgb

    def current_windows(self) -> tuple[list[Window], tuple[int, int]]:
        """The windows of the last ``set_image`` and the processing size (H, W) they live in."""
        st = self._current()
        return st.windows, (int(st.pixels.shape[-2]), int(st.pixels.shape[-1]))

    def _windows_per_forward(self, size: tuple[int, int] | torch.Size) -> int:
        """Windows per backbone forward: ``window_batch`` at most, and at most ``tuning.window_tokens`` tokens in all.

        Batching windows gives the matrix products no more speed once a window has hundreds of tokens,
        while the element-wise work on the larger batch spills the caches and faults in fresh pages.
        """
        tokens = max(
            (size[0] // vit.cfg.patch) * (size[1] // vit.cfg.patch) + vit.num_prefix_tokens
            for vit in (self.clip.visual, self.vfm)
            if vit is not None
        )  # tokens per window of the largest backbone grid
        budget = self.tuning.window_tokens
        if budget <= 0:
            return self.pipeline.window_batch
        return max(1, min(self.pipeline.window_batch, budget // tokens))

    @torch.inference_mode()
    def _dense_features(self, cut: ImageWindows, progress: Progress | None = None) -> tuple[MethodOutput, torch.Tensor]:
        """The image stage: ``run`` over batches of windows (all at once for joint methods), then ``finish``.

        Returns:
            The stage's output (grid, diagnostics, extras, layout; per-window diagnostics and tensor extras
            gathered over the batches) and its dense features (L', N, E) fp32, unit rows.
        """
        backbones = self.backbones()
        L = len(cut.windows)
        step = L if self.method.joint_windows else self._windows_per_forward(cut.crops.shape[-2:])
        chunks: list[torch.Tensor] = []
        outputs: list[MethodOutput] = []
        if progress is not None:
            progress(0, L)
        for start in range(0, L, step):
            out, f = self._forward(backbones, cut.batch(start, start + step))
            chunks.append(f)
            outputs.append(out)
            if progress is not None:
                progress(min(start + step, L), L)
        return gathered_outputs(outputs), torch.cat(chunks)  # (L', N, E)

    def _forward(self, backbones: Backbones, batch: WindowBatch) -> tuple[MethodOutput, torch.Tensor]:
        """One backbone forward: ``run`` (and ``finish``) on a batch of windows, then the dense head.

        Returns:
            The method's output and the batch's dense features (l', N, E) fp32, unit rows.
        """
        method = self.method
        with self._precision():
            out = method.run(backbones, batch, self.options)
        if method.finish is not None:  # over all windows (joint methods): outside autocast
            out = method.finish(backbones, batch, out, self.options)
        with self._precision():
            f = self.clip.visual.head(out.tokens).float()  # (l', N, E)
        return out, F.normalize(f, dim=-1)

    # ------------------------------------------------------------------ prediction
    @torch.inference_mode()
    def predict(
        self,
        image: ImageLike | None = None,
        labels: LabelsLike | None = None,
        *,
        text_embeddings: torch.Tensor | np.ndarray | None = None,
        background: int | None = 0,
        progress: Progress | None = None,
        rows_progress: Progress | None = None,
    ) -> Prediction:
        """Label every pixel with one of the given classes.

        Args:
            image: an image (see :meth:`set_image`); None reuses the image of the last ``set_image``.
            labels: one entry per class: a name or a list of synonyms, e.g.
                ``['sky', 'road', ['person', 'pedestrian']]``.
            text_embeddings: optional (Q, E) embeddings of the Q names in label order (synonyms flattened),
                used instead of encoding the names (e.g. your own prompt ensemble); rows are L2-normalised.
            background: the class that receives pixels whose best probability is below ``bg_threshold``:
                0 (default, the papers' rule: class 0 is background), another class index, or None to
                leave them unlabelled (``labels`` holds ``ovss.labels.UNLABELLED`` = -1 there).
            progress: see :meth:`set_image` (used when ``image`` is given).
            rows_progress: called as ``rows_progress(rows_done, H0)`` while the full-resolution labels are
                computed, after each band of rows (the step after the windows; seconds on large photos;
                Trident's SAM refinement does not report).

        Returns:
            A :class:`Prediction` at the input resolution. Its labels are computed band by band; its
            ``logits`` / ``probs`` (Q or C x H0 x W0 fp32) are built on first access.
        """
        if labels is None:
            raise OvssError("predict() needs labels, e.g. ['sky', 'road', ['person', 'pedestrian']]")
        classes = normalize_labels(labels)
        names, name_to_class = flatten_labels(classes)
        check_background(background, len(classes))
        if image is not None:
            self.set_image(image, progress=progress)
        st = self._current(" or pass an image to predict()")
        text = self._text_embeddings(names, text_embeddings)  # (Q, E)
        cfg = self.pipeline
        rule = LabelRule(
            tuple(name_to_class),
            len(classes),
            cfg.logit_scale,
            cfg.bg_threshold,
            cfg.area_threshold,
            UNLABELLED if background is None else background,
        )
        maps = self._full_resolution_maps(st, text, rule, rows_progress)
        if self.method.post is not None:  # Trident's SAM refinement
            maps, info = self.method.post(self.backbones(), st.extras, maps, rule, self.options)
            st.info = {**st.info, **info}  # a new dict: earlier predictions keep their record
        record = {**self.config, "method_info": st.info, "window_info": st.window_info}
        return Prediction(maps.labels(), classes, record, maps, st.rgb)

    def predict_many(
        self, images: Iterable[ImageLike], labels: LabelsLike, **kwargs: Any
    ) -> Iterator[Prediction | OvssError]:
        """Label many images in order: :meth:`predict` on each (bit for bit), the next ones read meanwhile.

        Keywords: ``predict``'s, plus ``read_ahead`` (default 2 on CUDA, 0 on CPU), ``errors`` and
        ``pool_windows`` (several images' windows in one backbone forward: the same labels, logits within the
        backend's rounding of another batch size); see :func:`ovss.bulk.predict_many`, which this is.
        """
        from ovss.bulk import predict_many

        return predict_many(self, images, labels, **kwargs)

    def _full_resolution_maps(
        self, st: ImageState, text: torch.Tensor, rule: LabelRule, rows_progress: Progress | None = None
    ) -> FullResolutionMaps:
        """Spec §2.5-2.7 without materialising (Q, H0, W0): per-window logits, stitched band by band on demand.

        With PAMR on, the refinement needs the whole logit map: it is built once (Q x H0 x W0 fp32) and
        the labels are computed from it.
        """
        L = st.features.shape[0]
        score = self.method.score  # CASS: image- and text-dependent scoring
        scores = st.features @ text.T if score is None else score(st.extras, st.features, text, self.options)
        window_logits = scores.transpose(1, 2).reshape(L, -1, *st.grid)  # (L, N, Q) -> (L, Q, gr, gc)
        H0, W0 = st.rgb.shape[:2]
        lay = st.layout
        stitched = StitchedLogits(window_logits, lay.windows, lay.padding, lay.padded_size, lay.image_size, (H0, W0))
        band_rows = default_band_rows(window_logits.shape[1], W0, self.tuning.band_elements)
        maps = FullResolutionMaps(
            stitched.rows, (H0, W0), rule, device=stitched.device, band_rows=band_rows, progress=rows_progress
        )
        cfg = self.pipeline
        if cfg.pamr_steps == 0:
            return maps
        guide = F.interpolate(st.pixels[None].float(), size=(H0, W0), mode="bilinear", align_corners=False)[0]
        logits = maps.logits()  # (Q, H0, W0), built band by band; refined in place
        pamr(guide, logits, steps=cfg.pamr_steps, dilations=cfg.pamr_dilations, inplace=True)
        return FullResolutionMaps.from_logits(logits, rule, band_rows=band_rows, progress=rows_progress)

    def _text_embeddings(self, names: list[str], given: torch.Tensor | np.ndarray | None) -> torch.Tensor:
        if given is None:
            return self.encode_names(names).to(self.device)
        text = torch.as_tensor(given, dtype=torch.float32, device=self.device)
        E = self.clip.visual.cfg.output_dim
        if text.ndim != 2 or text.shape != (len(names), E):
            raise OvssError(
                f"text_embeddings must have shape ({len(names)}, {E}) — one row per name in label order "
                f"(synonyms flattened) — got {tuple(text.shape)}"
            )
        if not torch.isfinite(text).all() or (text.norm(dim=-1) == 0).any():
            raise OvssError("text_embeddings contain NaN/inf or all-zero rows")
        return F.normalize(text, dim=-1)
