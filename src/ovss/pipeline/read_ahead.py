"""Read the next images on a worker thread while the model works on the current one (``Segmenter.predict_many``).

Decoding (OpenCV / Pillow) and the keep-ratio resize release the GIL, so one worker thread overlaps them
with the backbone. At most ``depth`` images are read ahead of the one being segmented, so memory stays
bounded (``depth + 1`` decoded images). What a read raises (``OvssError`` for a bad file) and the decoder
warnings it gives are kept with the image and handed over when the caller takes that image: errors and
warnings appear in input order, with the same text as a read in the caller's thread.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from ovss.pipeline.decoder_messages import deferred_warnings

Item = TypeVar("Item")
Value = TypeVar("Value")


@dataclass(frozen=True)
class Prepared(Generic[Value]):
    """The outcome of preparing one item on the worker thread."""

    value: Value | None  # what ``prepare`` returned; None when it raised
    error: Exception | None  # what ``prepare`` raised, re-raised by :meth:`get` in the caller's thread
    warnings: tuple[str, ...]  # decoder warnings of the read, issued by :meth:`get`

    def get(self) -> Value:
        """Issue the read's warnings, then return its value or raise its error."""
        for message in self.warnings:
            warnings.warn(message, UserWarning, stacklevel=2)
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


def _prepare_one(prepare: Callable[[Item], Value], item: Item) -> Prepared[Value]:
    with deferred_warnings() as caught:
        try:
            return Prepared(prepare(item), None, tuple(caught))
        except Exception as error:  # handed to the caller, who raises it in order
            return Prepared(None, error, tuple(caught))


def prepare_ahead(
    items: Iterable[Item], prepare: Callable[[Item], Value], depth: int = 2
) -> Iterator[tuple[Item, Prepared[Value]]]:
    """Yield ``(item, prepare(item))`` in order, preparing up to ``depth`` later items on one worker thread.

    Args:
        items: the inputs, consumed lazily (at most ``depth + 1`` ahead of the caller).
        prepare: the function run on the worker thread (e.g. read and resize an image).
        depth: items prepared ahead of the one the caller holds (>= 1).

    Yields:
        Each item with its :class:`Prepared` outcome (call ``.get()`` for the value).

    Closing the generator (or leaving a ``for`` loop early) cancels the queued reads and waits for the
    running one, so no thread outlives it.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    source = iter(items)
    pending: deque[tuple[Item, Future[Prepared[Value]]]] = deque()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ovss-read-ahead")
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) <= depth:  # the current item and ``depth`` after it
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((item, pool.submit(_prepare_one, prepare, item)))
            if not pending:
                return
            item, future = pending.popleft()
            yield item, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
