"""What the C image decoders (libpng, libjpeg, OpenCV) print about a file they still decode, as ovss warnings.

``read_image`` (:mod:`ovss.pipeline.image`) captures file descriptor 2 around a decode
(:func:`decoder_messages`) and turns the decoder's lines into one warning per file
(:func:`warn_decoder_messages`); a read-ahead thread collects them instead (:func:`deferred_warnings`).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# What libpng / libjpeg / OpenCV print about a file they still decode. Colour-profile (iCCP / sRGB) complaints
# are harmless (the pixels are unaffected: OpenCV ignores the profile) and are dropped; the rest become one
# ovss warning per file. Lines from anything else that wrote to stderr meanwhile are passed through unchanged.
_DECODER_PREFIXES = ("libpng warning:", "libpng error:", "Corrupt JPEG data", "Premature end of JPEG", "[ WARN:")
_HARMLESS_DECODER_MESSAGES = ("iCCP:", "sRGB:", "known incorrect sRGB profile", "cHRM:", "gAMA:")
_STDERR_LOCK = threading.Lock()
_DEFERRED = threading.local()  # .sink: a list collecting this thread's decoder warnings (see deferred_warnings)


@contextmanager
def deferred_warnings() -> Iterator[list[str]]:
    """Collect the decoder warnings ``read_image`` gives in this thread instead of issuing them.

    A read-ahead thread (:mod:`ovss.pipeline.read_ahead`) hands them to the caller, which issues them when it
    takes the image, so they appear in input order, next to that image's other messages.
    """
    sink: list[str] = []
    _DEFERRED.sink = sink
    try:
        yield sink
    finally:
        _DEFERRED.sink = None


@contextmanager
def decoder_messages() -> Iterator[list[str]]:
    """Capture what C libraries write to file descriptor 2 while the block runs; yields the decoder lines.

    The C decoders write to the process's stderr directly, past Python's ``sys.stderr``; the descriptor is
    pointed at a temporary file for the block (one block at a time), then restored.
    """
    messages: list[str] = []
    with _STDERR_LOCK:  # one capture at a time, from saving descriptor 2 to restoring it (threads share it)
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no usable descriptor 2 (e.g. a windowless process): nothing to capture
            yield messages
            return
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield messages
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                text = capture.read().decode("utf-8", "replace")
                for line in text.splitlines():
                    if line.strip().startswith(_DECODER_PREFIXES):
                        messages.append(line.strip())
                    elif line and sys.stderr is not None:
                        print(line, file=sys.stderr)  # someone else's output: passed through


def warn_decoder_messages(path: Path, messages: list[str]) -> None:
    """One ovss warning for a file the decoders complained about (harmless colour-profile notes dropped)."""
    kept: list[str] = []
    for line in messages:
        text = line.removeprefix("libpng warning:").removeprefix("libpng error:").strip()
        if not any(harmless in text for harmless in _HARMLESS_DECODER_MESSAGES) and text not in kept:
            kept.append(text)
    if kept:
        message = f"image '{path}' was read, but its decoder reported: {'; '.join(kept)} (the file may be damaged)"
        sink = getattr(_DEFERRED, "sink", None)
        if sink is not None:  # a read-ahead thread: the caller issues it when it takes the image
            sink.append(message)
        else:
            warnings.warn(message, stacklevel=4)
