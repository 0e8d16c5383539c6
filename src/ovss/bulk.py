"""Many images through one :class:`~ovss.predictor.Segmenter`: ``Segmenter.predict_many``.

The loop is ``predict`` on each image in turn, so the predictions are those of a ``predict`` loop, bit for
bit; a worker thread (:mod:`ovss.pipeline.read_ahead`) reads and resizes the next images meanwhile and
hands each read to ``set_image`` through the segmenter's one-shot ``_read_ahead`` slot, which is used only
for the very image object it was read from. ``ovss segment`` runs its images through this loop. With
``pool_windows=True`` consecutive images' windows share backbone forwards (:mod:`ovss.pipeline.pooled`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from ovss.errors import OvssError
from ovss.labels import check_background, flatten_labels, normalize_labels
from ovss.pipeline.read_ahead import Prepared, prepare_ahead

# None is refused: predict(None) would label the last image again
NONE_IMAGE = "predict_many got None for an image; give a path, an array or a PIL image"

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ovss.prediction import Prediction
    from ovss.predictor import ImageLike, LabelsLike, Progress, Segmenter


def predict_many(
    segmenter: Segmenter,
    images: Iterable[ImageLike],
    labels: LabelsLike,
    *,
    text_embeddings: torch.Tensor | np.ndarray | None = None,
    background: int | None = 0,
    progress: Progress | None = None,
    rows_progress: Progress | None = None,
    read_ahead: int | None = None,
    errors: Literal["raise", "yield"] = "raise",
    pool_windows: bool = False,
) -> Iterator[Prediction | OvssError]:
    """Label many images, one prediction per image in input order (``Segmenter.predict_many``).

    Args:
        segmenter: the segmenter whose ``predict`` runs on each image.
        images: paths, arrays or PIL images (see ``Segmenter.set_image``), consumed lazily: at most
            ``read_ahead + 1`` decoded images are held, so a generator over millions of files is fine.
        labels: as for ``predict``, for every image.
        read_ahead: images read and resized ahead on a worker thread; 0 reads each image in the caller's
            thread when its turn comes (a plain ``predict`` loop). Default (None): 2 on a CUDA device (decoding
            overlaps the GPU), 0 on the CPU (the backbone's threads already use every core: measured, a reader
            thread there slowed the loop down; docs/decisions.md).
        errors: an image that cannot be read or segmented: ``"raise"`` (default) raises its OvssError from the
            iterator, which then ends; ``"yield"`` yields the OvssError in its place and goes on with the next
            image (bulk labelling: one bad file does not stop the run).
        pool_windows: put the windows of consecutive images into the same backbone forwards, filled up to the
            per-forward cap (``window_batch`` windows, at most ``tuning.window_tokens`` tokens), then finish
            each image as ``predict`` does. It pays where one image's windows leave the device idle (large
            ``window_batch`` on a GPU, ``Tuning(window_tokens=0)``); off by default (not measured on a GPU; on
            the CPU the token cap keeps forwards small). Methods that take all windows of an image at once
            (``X+gla``, Trident) or read the whole image (CASS) run image by image as without it; a window of
            another shape (a small image, whole-image mode) first encodes the windows waiting. Memory: the
            images whose windows are in the current forward, plus the one being read (and ``read_ahead``).
            An OvssError raised by a forward fails every image with windows in it.
        text_embeddings, background, progress, rows_progress: as for ``predict``, for every image
            (``progress`` starts again at ``done = 0`` for each image).

    Returns:
        An iterator of one ``Prediction`` per image (or, with ``errors="yield"``, an OvssError for an image
        that failed), equal bit for bit to ``predict(image, labels, **kwargs)`` (pooled: labels and record
        equal, logits up to the backend's rounding of a window in a batch of another size, ~1e-7 on the CPU).

    Raises:
        OvssError: bad labels, background, text embeddings, ``errors``, ``read_ahead`` or ``pool_windows``: at
            the call, before any image is read.
    """
    if errors not in ("raise", "yield"):
        raise OvssError(f"errors must be 'raise' or 'yield', got {errors!r}")
    _check_many(images)
    if read_ahead is None:
        read_ahead = 2 if segmenter.device.type == "cuda" else 0
    if read_ahead < 0:
        raise OvssError(f"read_ahead must be >= 0 images, got {read_ahead}")
    if not isinstance(pool_windows, bool):
        raise OvssError(f"pool_windows must be True or False, got {pool_windows!r}")
    classes = normalize_labels(labels)  # what holds for every image is checked now, not at the first image
    check_background(background, len(classes))
    segmenter._text_embeddings(flatten_labels(classes)[0], text_embeddings)
    kwargs = {"text_embeddings": text_embeddings, "background": background, "progress": progress,
              "rows_progress": rows_progress}  # fmt: skip
    queue: Iterator[tuple[ImageLike, Prepared[Any] | None]]
    if read_ahead:
        queue = prepare_ahead(images, segmenter._read_and_resize, read_ahead)
    else:
        queue = ((image, None) for image in images)
    if pool_windows and segmenter.method.pools_images:
        from ovss.pipeline.pooled import predict_pooled

        return predict_pooled(segmenter, queue, labels, kwargs, errors == "yield")
    return _predict_each(segmenter, queue, labels, kwargs, errors == "yield")


def _check_many(images: object) -> None:
    """Refuse one image given where a collection is expected (a path would be read letter by letter).

    Raises:
        OvssError: ``images`` is a single path, array, tensor or PIL image.
    """
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(images, (str, bytes, os.PathLike)):
        raise OvssError(
            f"predict_many takes a collection of images, got the single path {os.fsdecode(images)!r}; pass [path] "
            "(a folder: sorted(Path(folder).glob('*.jpg'))), or use predict for one image"
        )
    if isinstance(images, (np.ndarray, torch.Tensor, Image.Image)):
        raise OvssError(
            f"predict_many takes a collection of images, got a single {type(images).__name__}; pass [image], "
            "or use predict for one image"
        )


def _predict_each(
    segmenter: Segmenter, queue: Iterator[tuple[ImageLike, Prepared[Any] | None]], labels: LabelsLike,
    kwargs: dict[str, Any], yield_errors: bool,
) -> Iterator[Prediction | OvssError]:  # fmt: skip
    """``predict`` on each image of ``queue``, handing ``set_image`` what the reader prepared for it."""
    try:
        for image, prepared in queue:
            segmenter._read_ahead = None if prepared is None else (image, prepared)
            try:
                if image is None:  # predict(None) would label the previous image again
                    raise OvssError(NONE_IMAGE)
                result: Prediction | OvssError = segmenter.predict(image, labels, **kwargs)
            except OvssError as error:
                if not yield_errors:
                    raise
                result = error
            finally:
                segmenter._read_ahead = None
            yield result
    finally:
        queue.close()  # type: ignore[attr-defined]  # a generator: stops the reader thread on an early exit
