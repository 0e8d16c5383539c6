"""Windows of consecutive images through the backbone together: ``predict_many(..., pool_windows=True)``.

Each image is cut into windows by the first step of ``set_image`` (:meth:`Segmenter._image_windows`); the
windows of consecutive images wait in a pool until there are enough for one backbone forward of the
segmenter's per-forward cap (:meth:`Segmenter._windows_per_forward`: ``window_batch`` windows, at most
``tuning.window_tokens`` tokens), which runs through the same :meth:`Segmenter._forward` as ``set_image``.
The forward's output is split back at image boundaries; once all windows of an image are encoded, its
:class:`~ovss.pipeline.image_state.ImageState` is built as ``set_image`` builds it and ``predict`` finishes it
(merge, text scores, full-resolution maps, post step, record).

Only methods whose ``run`` reads nothing but its windows pool (``MethodSpec.pools_images``); windows of
another crop shape (a small image, whole-image mode) flush the pool first, as one forward takes windows of one
shape. A forward's outputs are per window, so pooled predictions equal a ``predict`` loop's up to how the
backend rounds a window's products in a batch of another size (on the CPU: within 1e-7, labels identical;
bit for bit where the batch sizes round alike; tests/test_pool_windows.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ovss.bulk import NONE_IMAGE
from ovss.errors import OvssError
from ovss.methods.common import MethodOutput, WindowBatch
from ovss.pipeline.method_outputs import gathered_outputs

if TYPE_CHECKING:
    from ovss.pipeline.image_state import ImageWindows
    from ovss.pipeline.read_ahead import Prepared
    from ovss.prediction import Prediction
    from ovss.predictor import ImageLike, LabelsLike, Progress, Segmenter


@dataclass
class _Pooled:
    """One image in the pool: its windows, the outputs of those already encoded, or why it failed."""

    cut: ImageWindows | None  # None: the image failed (``error``)
    error: OvssError | None = None
    done: int = 0  # windows encoded so far
    reported: int = -1  # windows last reported to ``progress`` (-1: not started)
    outputs: list[MethodOutput] = field(default_factory=list)  # one per forward its windows were in
    features: list[torch.Tensor] = field(default_factory=list)  # (l, N, E) per forward, fp32 unit rows

    @property
    def total(self) -> int:
        """The image's window count L (0 for a failed read)."""
        return 0 if self.cut is None else len(self.cut.windows)

    @property
    def complete(self) -> bool:
        """Whether the image can be finished: all its windows encoded, or it failed."""
        return self.error is not None or self.done == self.total


def predict_pooled(
    segmenter: Segmenter,
    queue: Iterator[tuple[ImageLike, Prepared[Any] | None]],
    labels: LabelsLike,
    kwargs: dict[str, Any],
    yield_errors: bool,
) -> Iterator[Prediction | OvssError]:
    """``predict`` on each image of ``queue`` in order, consecutive images' windows sharing backbone forwards.

    Holds the images whose windows wait for a forward (fewer than one forward's worth, plus the image just
    read) and the ones a forward completed until they are yielded; images are taken from ``queue`` only when
    the pool needs windows. ``kwargs["progress"]`` reports the windows of the image to be yielded next
    (``progress(0, L)`` first), including those encoded while an earlier image was finished. An OvssError of
    a forward fails every image with windows in it; a bad read fails only its image, in its place.
    """
    run = _PooledRun(segmenter, labels, kwargs, yield_errors)
    shape: tuple[object, ...] | None = None  # (padding, padded size) of the windows waiting in the pool
    cap = 0  # windows per forward of that shape
    try:
        for image, prepared in queue:
            entry = run.cut(image, prepared)
            if entry.cut is not None:
                key = (entry.cut.padding, entry.cut.padded_size)
                if key != shape:  # another crop shape: what waits of the last one is encoded first
                    yield from run.encode_waiting(0)
                    shape, cap = key, segmenter._windows_per_forward(entry.cut.padded_size)
            run.pool.append(entry)
            run.report()  # the first image's (0, L) before its first forward
            if cap:
                yield from run.encode_waiting(cap)
            yield from run.drain()
        yield from run.encode_waiting(0)
    finally:
        queue.close()  # type: ignore[attr-defined]  # a generator: stops the reader thread on an early exit


@dataclass
class _PooledRun:
    """The state of one pooled ``predict_many``: the pool of images in input order and what finishes them."""

    segmenter: Segmenter
    labels: LabelsLike
    kwargs: dict[str, Any]  # predict's keywords
    yield_errors: bool
    pool: deque[_Pooled] = field(default_factory=deque)  # images not yet yielded, in input order

    def cut(self, image: ImageLike, prepared: Prepared[Any] | None) -> _Pooled:
        """The image cut into windows (``set_image``'s first step), or the OvssError that reading it gave."""
        try:
            if image is None:  # as in the loop: not the previous image again
                raise OvssError(NONE_IMAGE)
            return _Pooled(self.segmenter._image_windows(image, None if prepared is None else (image, prepared)))
        except OvssError as error:
            return _Pooled(None, error)

    def encode_waiting(self, cap: int) -> Iterator[Prediction | OvssError]:
        """Forwards of ``cap`` windows while that many wait (``cap`` 0: every waiting window, in forwards of the
        per-forward cap), each followed by the images it completed, in order."""
        while True:
            waiting = [entry for entry in self.pool if not entry.complete]
            count = sum(entry.total - entry.done for entry in waiting)
            if count == 0 or count < cap:
                return
            first = waiting[0].cut
            assert first is not None  # waiting images have windows
            self.forward(waiting, cap or self.segmenter._windows_per_forward(first.padded_size))
            self.report()
            yield from self.drain()

    @torch.inference_mode()
    def forward(self, waiting: list[_Pooled], step: int) -> None:
        """One backbone forward of the next ``step`` waiting windows (or fewer), split back to their images."""
        pieces: list[tuple[_Pooled, ImageWindows, int, int]] = []  # (image, its windows, first window, stop)
        left = step
        for entry in waiting:
            if left == 0:
                break
            assert entry.cut is not None  # waiting images have windows
            take = min(left, entry.total - entry.done)
            pieces.append((entry, entry.cut, entry.done, entry.done + take))
            left -= take
        segmenter = self.segmenter
        try:
            out, features = segmenter._forward(segmenter.backbones(), _batch(pieces))  # features (l, N, E)
        except OvssError as error:  # a forward's error belongs to every image in it
            for entry, _, _, _ in pieces:
                entry.error = error
            return
        offset = 0
        for entry, _, start, stop in pieces:
            n = stop - start
            entry.outputs.append(_window_slice(out, offset, offset + n, segmenter.method.name))
            entry.features.append(features[offset : offset + n])  # (n, N, E)
            entry.done = stop
            offset += n

    def drain(self) -> Iterator[Prediction | OvssError]:
        """Finish and yield the images at the head of the pool whose windows are all encoded, in order."""
        while self.pool and self.pool[0].complete:
            result = self.finish(self.pool.popleft())
            if isinstance(result, OvssError) and not self.yield_errors:
                raise result
            yield result
            self.report()  # the caller now waits for the next image

    def finish(self, entry: _Pooled) -> Prediction | OvssError:
        """``predict`` on the image's encoded windows: its state made current, then merge, scores, maps, post."""
        if entry.error is not None:
            return entry.error
        assert entry.cut is not None
        features = entry.features[0] if len(entry.features) == 1 else torch.cat(entry.features)  # (L, N, E)
        self.segmenter.restore_image(entry.cut.state(gathered_outputs(entry.outputs), features))  # as set_image
        try:
            return self.segmenter.predict(None, self.labels, **self.kwargs)
        except OvssError as error:
            return error

    def report(self) -> None:
        """``progress(done, total)`` of the image the caller waits for: ``(0, L)`` first, then each advance."""
        progress: Progress | None = self.kwargs["progress"]
        entry = self.pool[0] if self.pool else None
        if progress is None or entry is None or entry.cut is None:
            return
        if entry.reported < 0:
            progress(0, entry.total)
            entry.reported = 0
        if entry.done > entry.reported:
            progress(entry.done, entry.total)
            entry.reported = entry.done


def _batch(pieces: list[tuple[_Pooled, ImageWindows, int, int]]) -> WindowBatch:
    """The windows of ``pieces`` as one batch; from one image it is exactly ``set_image``'s batch.

    From several images the batch holds their windows (each in its own image's pixels) and their common
    padding; its per-image fields (``image_size`` of the first image, no ``image`` / ``rgb``) are not every
    window's own: methods that read them do not pool (``MethodSpec.reads_image``).
    """
    _, first, start, stop = pieces[0]
    if len(pieces) == 1:
        return first.batch(start, stop)
    crops = torch.cat([cut.crops[start:stop] for _, cut, start, stop in pieces])  # (l, 3, h', w')
    windows = [window for _, cut, start, stop in pieces for window in cut.windows[start:stop]]
    return WindowBatch(crops, windows, first.padding, first.image_size)


def _window_slice(out: MethodOutput, start: int, stop: int, method: str) -> MethodOutput:
    """The part of a pooled forward's output that belongs to windows ``start:stop`` (one image's).

    Per-window diagnostics and tensor extras are sliced; per-image ``info`` is the same in every batch of a
    per-window method and is kept whole.

    Raises:
        OvssError: the output has something per image (a layout, a non-tensor extra): the method cannot pool
            (a plugin that should set ``MethodSpec.reads_image``); it stops the run, as it holds for every image.
    """
    if out.layout is not None or any(not isinstance(v, torch.Tensor) for v in out.extras.values()):
        raise OvssError(
            f"{method} returned per-image outputs (a layout or a non-tensor extra) from a forward of several "
            "images' windows, so it cannot pool them; run it without --pool-windows (pool_windows=False), or set "
            "reads_image=True in its MethodSpec"
        )
    window_info = {key: list(values[start:stop]) for key, values in out.window_info.items()}
    extras = {key: value[start:stop] for key, value in out.extras.items()}  # (n, ...)
    return MethodOutput(out.tokens[start:stop], out.grid, out.info, window_info, extras)
