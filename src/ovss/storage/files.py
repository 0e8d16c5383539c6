"""Output files that appear whole or not at all: write to a temporary file, then rename it into place.

A run that fails (an exception, Ctrl-C) part-way through writing never leaves a truncated PNG or ``.npy``
behind: the data goes to a hidden temporary file in the destination folder, which is renamed onto the
destination with ``os.replace`` (atomic on POSIX and Windows within one file system) only after the
writer returned. On failure the temporary file is removed and the destination is untouched.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ovss.errors import OvssError

# Attempts at finding an unused temporary name before giving up (collisions need 32 random bits to clash).
_MAX_TEMP_NAME_ATTEMPTS = 100


def _create_temp_file(folder: Path, name: str, suffix: str) -> Path:
    """Create an empty, unused, hidden file in ``folder`` and return its path.

    The file is created with mode 0o666 filtered by the process umask, so the final output gets the same
    permissions as a file written directly (``tempfile.mkstemp`` would give 0o600).
    """
    for _ in range(_MAX_TEMP_NAME_ATTEMPTS):
        candidate = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}"
        try:
            descriptor = os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        except OSError as error:  # read-only folder, no permission, full disk: one line, not a traceback
            raise OvssError(f"cannot write into '{folder}': {error.strerror}; choose a writable location") from error
        os.close(descriptor)
        return candidate
    raise OvssError(
        f"cannot create a temporary file in '{folder}'; remove stale '.{name}.*.tmp*' files there"
    )


def atomic_write(path: str | os.PathLike[str], write_fn: Callable[[Path], None]) -> Path:
    """Write a file through ``write_fn`` so that ``path`` either receives the complete file or nothing.

    ``write_fn`` is called with the path of an empty temporary file in the same folder as ``path`` (its
    name ends with the same suffix, so writers that look at the extension behave the same) and must write
    the complete content there. Afterwards the temporary file replaces ``path`` in one atomic rename.
    If ``write_fn`` raises (any exception, including ``KeyboardInterrupt``), the temporary file is
    removed, the exception propagates, and ``path`` is left as it was before the call (absent if it did
    not exist). Missing parent folders are created.

    Args:
        path: destination file.
        write_fn: writes the content to the path it receives; its return value is ignored.

    Returns:
        The destination path.

    Raises:
        OvssError: the destination is an existing folder, or its folder cannot be created.
    """
    destination = Path(path)
    if destination.is_dir():
        raise OvssError(f"cannot write '{destination}': it is a folder; give a file name instead")
    folder = destination.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OvssError(
            f"cannot create output folder '{folder}': {error.strerror}; choose a writable location"
        ) from error
    temp_path = _create_temp_file(folder, destination.name, destination.suffix)
    try:
        write_fn(temp_path)
        os.replace(temp_path, destination)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return destination


def _check_suffix(path: str | os.PathLike[str], suffix: str) -> None:
    """Reject a destination whose extension does not match the format written (e.g. PNG data in x.jpg)."""
    if Path(path).suffix.lower() != suffix:
        raise OvssError(f"output file '{path}' must end in '{suffix}'; rename it")


def save_png(path: str | os.PathLike[str], image: np.ndarray | Image.Image) -> Path:
    """Save an image as a PNG file, atomically.

    Args:
        path: destination, must end in ``.png``.
        image: a PIL image (any mode PNG supports, e.g. ``'P'`` with its palette), or a uint8 array of
            shape (H, W) (greyscale) or (H, W, 3) (RGB).

    Returns:
        The destination path.

    Raises:
        OvssError: wrong extension, or an array of another dtype or shape.
    """
    _check_suffix(path, ".png")
    if isinstance(image, Image.Image):
        pil_image = image
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
            raise OvssError(
                f"cannot save an array of dtype {array.dtype} and shape {array.shape} as PNG; "
                "expected uint8 of shape (H, W) or (H, W, 3)"
            )
        pil_image = Image.fromarray(np.ascontiguousarray(array))

    def write(temp_path: Path) -> None:
        pil_image.save(temp_path, format="PNG")

    return atomic_write(path, write)


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Save an array in NumPy ``.npy`` format (no pickled objects), atomically.

    Args:
        path: destination, must end in ``.npy``.
        array: any array with a non-object dtype.

    Returns:
        The destination path.
    """
    _check_suffix(path, ".npy")
    data = np.asarray(array)

    def write(temp_path: Path) -> None:
        # An open file object keeps np.save from appending a second ".npy" to the name.
        with open(temp_path, "wb") as file:
            np.save(file, data, allow_pickle=False)

    return atomic_write(path, write)


def save_text(path: str | os.PathLike[str], text: str) -> Path:
    """Save a string as a UTF-8 text file (e.g. a resolved config or a report), atomically.

    Args:
        path: destination file (any extension).
        text: content, written verbatim (no newline is added or translated).

    Returns:
        The destination path.
    """

    def write(temp_path: Path) -> None:
        temp_path.write_text(text, encoding="utf-8", newline="")

    return atomic_write(path, write)
