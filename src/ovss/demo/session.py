"""The demo's work, without Gradio: segmenters per method, image features kept per image, one call per click.

A click on *Segment* runs :meth:`DemoSession.run`. Every method's segmenter is built once (all share one CLIP,
one VFM and one tokenizer) and keeps ``set_image`` features per image, keyed by a hash of the pixels: a second
click on the same image with other labels or thresholds runs only ``predict`` (the fast path). The logit scale
and background threshold act after the features, so they are applied by replacing just those two fields of
the segmenter's :class:`~ovss.config.PipelineConfig` (``dataclasses.replace``); the geometry never changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovss.errors import OvssError
from ovss.labels import background_class, parse_labels
from ovss.methods.registry import get_method
from ovss.prediction import Prediction
from ovss.predictor import ImageState, Segmenter
from ovss.storage.files import save_rgb_png

MAX_METHODS = 4  # methods shown side by side on one page
MAX_IMAGES = 4  # images whose features are kept per method (least recently used dropped first)
Progress = Callable[[float, str], None]  # progress(fraction in [0, 1], what is running)
Loader = Callable[..., Segmenter]  # ovss.load, or a stand-in with its signature


def parse_label_box(text: str | None) -> list[list[str]]:
    """The labels box with the CLI's parser (``"sky, road, person|pedestrian"``); errors name the box."""
    if text is None or not text.strip():
        raise OvssError("the labels box is empty; type class names separated by commas, e.g. 'sky, road, person'")
    try:
        return parse_labels(text)
    except OvssError as err:
        raise OvssError(str(err).replace("--labels", "the labels box")) from err


def check_methods(methods: Sequence[str] | None) -> list[str]:
    """Registry names of the chosen methods (1 to MAX_METHODS, each once, order kept); OvssError otherwise."""
    chosen = list(dict.fromkeys(methods or []))
    if not chosen:
        raise OvssError("no method chosen; tick one or more, e.g. clearclip and clearclip+gla")
    if len(chosen) > MAX_METHODS:
        raise OvssError(f"{len(chosen)} methods chosen; the page shows at most {MAX_METHODS} side by side")
    return [get_method(name).name for name in chosen]


def read_rgb(image: Any) -> np.ndarray:
    """An uploaded image as (H, W, 3) uint8 RGB (greyscale, RGBA and 16-bit accepted); OvssError when unusable."""
    if image is None:
        raise OvssError("no image: upload a photo, paste one, or pick one of the examples")
    from ovss.pipeline.image import read_image

    rgb = read_image(image)  # a read-only upload as it is, anything else copied into a new array
    rgb.flags.writeable = False  # shared by every method's image state (read_image keeps it uncopied)
    return rgb


def image_key(rgb: np.ndarray) -> str:
    """A hash of the pixels and the shape: equal images share their cached features."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(rgb.shape).encode())
    digest.update(np.ascontiguousarray(rgb).data)  # hashed in place: no bytes copy of the image
    return digest.hexdigest()


class ModelPool:
    """One segmenter per method, built on first use; models are shared where methods name the same weights.

    Each method asks for its own models (``MethodSpec.weights``: roles such as "vfm" and "sam" with their
    defaults). A model is built once per (role, weights) and handed to every later method that names the same
    weights: ``proxyclip`` and ``cass`` share DINO ViT-B/8, while ``trident`` gets its own DINO ViT-B/16 and SAM.
    A model given here for a role (``vfm=``, ``sam=``) is used by every method that needs that role.

    Args:
        clip: CLIP weights as ``ovss.load`` takes them (registry name, local file, or built model).
        vfm: the VFM of every DINO-guided method (name, file, or built ViT; None: each method's default).
        sam: the SAM of every SAM-based method (name, file, or built model; None: each method's default).
        loader: builds a segmenter (default ``ovss.load``).
        **load_kwargs: further keywords of ``ovss.load`` for every method (tokenizer, device, dtype, download,
            pipeline settings such as short_side).
    """

    def __init__(
        self, clip: Any, *, vfm: Any = None, sam: Any = None, loader: Loader | None = None, **load_kwargs: Any
    ) -> None:
        if loader is None:
            from ovss.api import load

            loader = load
        self._loader: Loader = loader
        self._clip = clip
        self._given: dict[str, Any] = {"vfm": vfm, "sam": sam}  # role -> the user's choice (None: method default)
        self._kwargs = load_kwargs
        self._segmenters: dict[str, Segmenter] = {}
        self._postprocess: dict[str, Any] = {}  # method -> its own PipelineConfig, as loaded
        self._clip_record: dict[str, Any] = {}  # where CLIP came from (the first load's record)
        self._models: dict[tuple[str, str], Any] = {}  # (role, weights) -> the model built for them
        self._records: dict[tuple[str, str], dict[str, Any]] = {}  # (role, weights) -> where it came from
        self._text_owner: dict[tuple[str, str], Segmenter] = {}  # (CLIP fingerprint, templates) -> whose cache

    def _weights_key(self, role: str, default: str) -> tuple[str, str]:
        """(role, weights) of the model a method gets in ``role``: the given one, else the method's default."""
        given = self._given.get(role)
        if given is None:
            return role, default
        if isinstance(given, torch.nn.Module):
            return role, f"<in-memory model {id(given)}>"
        return role, str(given)

    def get(self, method: str) -> Segmenter:
        """The segmenter of ``method``, built on first use (OvssError: unknown method, missing weights...)."""
        spec = get_method(method)
        name = spec.name
        if name in self._segmenters:
            return self._segmenters[name]
        keys = {role: self._weights_key(role, default) for role, default in spec.weights}
        models = {}  # role -> a model built for an earlier method, else what to load (the given weights or default)
        for role, key in keys.items():
            given = self._given.get(role)
            models[role] = self._models.get(key, given if given is not None else key[1])
        seg = self._loader(name, clip=self._clip, **models, **self._kwargs)
        record = seg.config
        if not self._segmenters:  # the first load read the files: share its models and remember their record
            self._clip = seg.clip
            self._kwargs = {**self._kwargs, "tokenizer": seg.tokenizer if seg.clip.text is not None else None}
            self._clip_record = {k: v for k, v in record.items() if k.startswith("clip") and k != "clip_fingerprint"}
        for role, key in keys.items():
            if key not in self._models:
                self._models[key] = getattr(seg, role)
                self._records[key] = {k: v for k, v in record.items() if k.startswith(role)}
        self._segmenters[name] = seg
        self._postprocess[name] = seg.pipeline
        return seg

    def loaded(self) -> list[str]:
        """The methods built so far."""
        return list(self._segmenters)

    def set_postprocess(self, method: str, logit_scale: float | None, bg_threshold: float) -> None:
        """Set the segmenter's logit scale (None: the method's own) and background threshold for ``predict``.

        Only these two fields of the pipeline change (``dataclasses.replace``, checked by PipelineConfig):
        they act after the dense features, so kept ``set_image`` features stay valid.
        """
        seg = self.get(method)
        base = self._postprocess[seg.method.name]
        scale = base.logit_scale if logit_scale is None else float(logit_scale)
        seg.pipeline = dataclasses.replace(base, logit_scale=scale, bg_threshold=float(bg_threshold))

    def text_embeddings(self, method: str, names: list[str]) -> torch.Tensor:
        """(Q, E) unit text embeddings of ``names`` for ``method``, from one cache per CLIP and template set.

        Methods that share the CLIP and the templates share the embeddings: a label set is encoded once per
        click, not once per method (the text tower is the slow part of a click once the image is cached).
        """
        seg = self.get(method)
        owner = self._text_owner.setdefault((seg.clip.fingerprint, seg.pipeline.templates), seg)
        return owner.encode_names(names)  # (Q, E)

    def config(self, method: str) -> dict[str, Any]:
        """The resolved configuration of ``method``'s segmenter, naming the weight files actually read."""
        seg = self.get(method)
        record = {**seg.config, **self._clip_record}
        for role, default in seg.method.weights:
            record.update(self._records[self._weights_key(role, default)])
        return record


@dataclass
class MethodResult:
    """One method's answer to one click."""

    method: str  # registry name, e.g. "clearclip+gla"
    prediction: Prediction  # labels, classes, full-resolution maps; .save writes the downloads
    overlay: np.ndarray  # (H0', W0 + legend, 3) uint8 RGB: Prediction.overlay, window grid drawn on request
    encode_seconds: float  # set_image time; 0.0 when the features came from the cache
    predict_seconds: float  # predict time: text embeddings (once per label set), stitching, softmax, labels
    cached: bool  # True: the image's features were reused (the fast path)
    windows: int  # number of sliding windows of this image
    config: dict[str, Any] = field(repr=False)  # the resolved configuration
    overlay_seconds: float = 0.0  # drawing the overlay with its legend (and the window grid), writing its PNG
    read_seconds: float = 0.0  # decoding the upload and hashing its pixels, once per click (same for every method)
    overlay_file: Path | None = None  # the overlay as a lossless PNG: what the page shows (Gradio copies the file)


class DemoSession:
    """What the page calls: segment one image with several methods, reusing each method's image features.

    Args:
        pool: the segmenters.
        max_images: images whose features are kept (per method), least recently used dropped first.
    """

    def __init__(self, pool: ModelPool, *, max_images: int = MAX_IMAGES) -> None:
        self.pool = pool
        self.max_images = max_images
        self.set_image_calls = 0  # image encodings so far (the fast path leaves it unchanged)
        self.load_error: str | None = None  # the one-line error of the last warm_up, if any
        self._features: OrderedDict[str, dict[str, ImageState]] = OrderedDict()  # image key -> method -> state
        self._files = tempfile.TemporaryDirectory(prefix="ovss-demo-")  # the overlay PNGs of the last two clicks
        self._clicks = 0  # clicks that got as far as drawing overlays

    def warm_up(self, methods: Sequence[str]) -> str | None:
        """Build the segmenters of ``methods`` now; the one-line error (e.g. weights missing) or None."""
        self.load_error = None
        try:
            for method in check_methods(methods):
                self.pool.get(method)
        except OvssError as err:
            self.load_error = str(err)
        return self.load_error

    def run(
        self,
        image: Any,
        labels: str | None,
        methods: Sequence[str] | None,
        *,
        logit_scale: float | None = None,
        bg_threshold: float = 0.0,
        show_windows: bool = False,
        alpha: float = 0.5,
        progress: Progress | None = None,
        decode_seconds: float = 0.0,
    ) -> list[MethodResult]:
        """Segment ``image`` with every chosen method.

        Every input is checked, every segmenter built and the labels encoded before the first image encoding.

        Args:
            image: (H, W, 3) uint8 RGB array (greyscale/RGBA/16-bit accepted), a path or a PIL image.
            labels: the labels box: classes separated by ``,``, synonyms by ``|``.
            methods: registry names, 1 to MAX_METHODS.
            logit_scale: softmax temperature for all methods; None keeps each method's own.
            bg_threshold: pixels whose best probability is below it go to a class named "background", or
                stay unlabelled when there is none (as in ``ovss segment``); in [0, 1].
            show_windows: draw the sliding windows over each overlay (the seams GLA works on).
            alpha: overlay opacity of the class colours, in [0, 1].
            progress: called as ``progress(fraction, text)`` before the labels and while windows are encoded.
            decode_seconds: time the caller spent decoding ``image`` (the page's upload), counted as reading it.

        Returns:
            One :class:`MethodResult` per method, in the given order.

        Raises:
            OvssError: no or unreadable image, empty or malformed labels, no/unknown/too many methods, a
                setting out of range, weights that cannot be loaded, an image too small for the model.
        """
        from ovss.demo.render import draw_windows

        chosen = check_methods(methods)
        classes = parse_label_box(labels)
        started = time.perf_counter()
        rgb = read_rgb(image)
        read_seconds = decode_seconds + time.perf_counter() - started
        if not 0.0 <= alpha <= 1.0:
            raise OvssError(f"overlay opacity must be in [0, 1], got {alpha}")
        background = background_class(classes)
        names = [name for synonyms in classes for name in synonyms]
        if progress is not None:
            progress(0.0, "encoding the labels")
        texts: dict[str, tuple[torch.Tensor, float]] = {}  # method -> (Q, E) embeddings, seconds to get them
        for method in chosen:
            self.pool.set_postprocess(method, logit_scale, bg_threshold)
            start = time.perf_counter()
            text = self.pool.text_embeddings(method, names)  # (Q, E), encoded once for all methods, then cached
            texts[method] = text, time.perf_counter() - start
        started = time.perf_counter()
        key = image_key(rgb)
        read_seconds += time.perf_counter() - started  # decoding and hashing: once per click
        kept = self._features.pop(key, {})
        self._features[key] = kept  # most recently used last
        while len(self._features) > self.max_images:
            self._features.popitem(last=False)
        results = []
        self._clicks += 1
        for old in Path(self._files.name).glob(f"{self._clicks - 2}-*.png"):  # shown two clicks ago: in Gradio's cache
            old.unlink(missing_ok=True)
        for index, method in enumerate(chosen):
            seg = self.pool.get(method)
            start = time.perf_counter()
            cached = method in kept
            if cached:
                seg.restore_image(kept[method])
            else:
                seg.set_image(rgb, progress=_window_progress(progress, method, index, len(chosen)))
                self.set_image_calls += 1
                kept[method] = seg.image_state()
            encoded = time.perf_counter()
            text, text_seconds = texts[method]
            prediction = seg.predict(
                labels=classes,
                text_embeddings=text,
                background=background,
                rows_progress=_rows_progress(progress, method, index, len(chosen)),
            )
            finished = time.perf_counter()
            if progress is not None:
                progress((index + 1) / len(chosen), f"{method}: drawing the overlay")
            picture = prediction.overlay(alpha)  # (H0', W0 + legend, 3)
            windows, size = seg.current_windows()
            if show_windows:
                picture = draw_windows(picture, windows, size, rgb.shape[:2])
            overlay_file = save_rgb_png(Path(self._files.name) / f"{self._clicks}-{index}.png", picture)
            drawn = time.perf_counter()
            results.append(
                MethodResult(
                    method,
                    prediction,
                    picture,
                    0.0 if cached else encoded - start,
                    text_seconds + finished - encoded,
                    cached,
                    len(windows),
                    self.pool.config(method),
                    drawn - finished,
                    read_seconds,
                    overlay_file,
                )
            )
        return results


def _window_progress(progress: Progress | None, method: str, index: int, count: int) -> Any:
    """``set_image``'s ``progress(done, total)`` as a fraction of the whole click: the first half of the method's
    share (the second is its full-resolution labels, :func:`_rows_progress`)."""
    if progress is None:
        return None

    def report(done: int, total: int) -> None:
        progress((index + 0.5 * done / max(total, 1)) / count, f"{method}: encoding window {done} of {total}")

    return report


def _rows_progress(progress: Progress | None, method: str, index: int, count: int) -> Any:
    """``predict``'s ``rows_progress(done, H0)`` as the second half of the method's share of the click."""
    if progress is None:
        return None

    def report(done: int, total: int) -> None:
        progress((index + 0.5 + 0.5 * done / max(total, 1)) / count, f"{method}: labelling row {done} of {total}")

    return report


def pixel_report(result: MethodResult, x: int, y: int) -> str:
    """One line about the pixel (x, y) of a result's overlay: its class and probability, and the runner-up.

    Args:
        result: a method's result.
        x: column in the overlay image, 0 at the left.
        y: row in the overlay image, 0 at the top.
    """
    prediction = result.prediction
    height, width = prediction.compact_labels.shape
    if not (0 <= x < width and 0 <= y < height):
        return f"{result.method}: ({x}, {y}) is outside the photo (the legend); click on the photo"
    probs = prediction.maps.probs_of_rows(y, y + 1)[:, 0, x]  # (C,) in [0, 1], without the whole (C, H0, W0) map
    order = probs.argsort(descending=True).tolist()
    names = [synonyms[0] for synonyms in prediction.classes]
    label = int(prediction.compact_labels[y, x])
    if label < 0:
        best = order[0]
        head = f"unlabelled (best: {names[best]} {float(probs[best]):.2f}, below the background threshold)"
    else:
        head = f"{names[label]} (p = {float(probs[label]):.2f})"
        runner_up = next((c for c in order if c != label), None)
        if runner_up is not None:
            head += f"; runner-up {names[runner_up]} ({float(probs[runner_up]):.2f})"
    return f"{result.method} at ({x}, {y}): {head}"


def save_downloads(results: Sequence[MethodResult], folder: str | Path) -> list[Path]:
    """Write each result's label map PNG, overlay and logits (``Prediction.save``) into a new ``folder``.

    File stems are the method names with ``+`` as ``_`` (``clearclip_gla.png``, ``clearclip_gla_logits.npy``).
    """
    if not results:
        raise OvssError("nothing to download yet: press Segment first")
    paths: list[Path] = []
    for result in results:
        stem = result.method.replace("+", "_")
        paths += result.prediction.save(folder, stem, logits=True)
    return paths
