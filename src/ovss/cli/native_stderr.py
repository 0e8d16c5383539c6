"""Messages that C libraries print straight to the process's stderr (libpng, OpenCV) as ovss's own warnings.

libpng's default warning handler (``libpng warning: iCCP: known incorrect sRGB profile``, ``tEXt: CRC
error``) and OpenCV's logger (``[ WARN:0@0.1] global loadsave.cpp ...``) write to file descriptor 2, past
Python's ``sys.stderr`` and its warning machinery. :func:`native_stderr_as_warnings` points descriptor 2 at
a temporary file while an image is read and segmented, keeps Python's own stderr output (progress bars,
warnings) going to the real stderr, and afterwards turns each captured line into one ``UserWarning``
naming the image: ``ovss: warning: photo.png: libpng: tEXt: CRC error (the image was read despite it)``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import TextIO

_OPENCV_PREFIX = re.compile(r"^\[\s*(WARN|INFO|ERROR)[^\]]*\]\s*(global\s+)?")  # "[ WARN:0@0.012] global "
_LIBPNG_PREFIX = "libpng warning: "


def translate(line: str) -> str:
    """One captured line in ovss's words: the library named first, its own decoration dropped."""
    text = line.strip()
    if text.startswith(_LIBPNG_PREFIX):
        return f"libpng: {text[len(_LIBPNG_PREFIX) :]} (the image was read despite it)"
    match = _OPENCV_PREFIX.match(text)
    if match:
        return f"OpenCV: {text[match.end() :]}"
    return text


def _writes_to_descriptor(stream: TextIO | None, descriptor: int) -> bool:
    try:
        return stream is not None and stream.fileno() == descriptor
    except (AttributeError, OSError, ValueError):  # pytest's capture, io.StringIO: no descriptor
        return False


@contextlib.contextmanager
def native_stderr_as_warnings(label: str) -> Iterator[None]:
    """While inside, C-level writes to stderr are collected; on leaving, each line becomes a ``UserWarning``
    ``"<label>: <translated line>"``. Where descriptor 2 cannot be redirected, nothing changes."""
    descriptor = 2
    try:
        sys.stderr.flush()
        saved = os.dup(descriptor)
    except (AttributeError, OSError, ValueError):
        yield
        return
    capture = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    python_stderr = sys.stderr
    own_stream: TextIO | None = None
    try:
        os.dup2(capture.fileno(), descriptor)
        if _writes_to_descriptor(python_stderr, descriptor):  # Python's writes keep going to the real stderr
            own_stream = open(  # noqa: SIM115 - closed in the finally below
                os.dup(saved), "w", buffering=1, encoding=python_stderr.encoding, errors="backslashreplace"
            )
            sys.stderr = own_stream
        yield
    finally:
        if own_stream is not None:
            with contextlib.suppress(OSError, ValueError):
                own_stream.flush()
            sys.stderr = python_stderr
            own_stream.close()
        os.dup2(saved, descriptor)
        os.close(saved)
        capture.seek(0)
        text = capture.read().decode("utf-8", errors="replace")
        capture.close()
    for line in text.splitlines():
        if line.strip():
            warnings.warn(f"{label}: {translate(line)}", UserWarning, stacklevel=3)
