"""Output files that appear whole or not at all: write to a temporary file, then rename it into place.

A run that fails (an exception, Ctrl-C) part-way through writing never leaves a truncated PNG or ``.npy``
behind: the data goes to a hidden temporary file in the destination folder, which is renamed onto the
destination with ``os.replace`` (atomic on POSIX and Windows within one file system) only after the
writer returned. On failure the temporary file is removed and the destination is untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ovss.errors import OvssError

# Attempts at finding an unused temporary name before giving up (collisions need 32 random bits to clash).
_MAX_TEMP_NAME_ATTEMPTS = 100
# This machine in temporary names (a hash of its name): a sweep removes only its own dead writers' files,
# never those of a live writer on another machine sharing the folder (``ovss segment --shard`` on a cluster).
_WRITER = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()  # 8 characters: a long
# host name must not push a long stem's temporary name past the file system's 255 bytes
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.[0-9a-f]{8}\.tmp[^/]*$")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's bytes, read 1 MB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _create_temp_file(folder: Path, name: str, suffix: str) -> Path:
    """Create an empty, unused, hidden file in ``folder`` and return its path.

    The file is created with mode 0o666 filtered by the process umask, so the final output gets the same
    permissions as a file written directly (``tempfile.mkstemp`` would give 0o600).
    """
    for _ in range(_MAX_TEMP_NAME_ATTEMPTS):
        candidate = folder / f".{name}.{_WRITER}-{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}"
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


def sweep_temp_files(folder: str | os.PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Remove the temporary files that killed writers of this machine left in ``folder`` (and below it).

    A process killed mid-write (SIGKILL, power loss) cannot remove its hidden temporary file; the finished
    files are never touched. Only files named by :func:`atomic_write` on this machine whose process is gone
    are removed (a live writer's, or another machine's, are kept).

    Args:
        folder: where to look.
        recursive: also look in every folder below it.

    Returns:
        The removed paths.
    """
    removed: list[Path] = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for path in root.rglob(".*.tmp*") if recursive else root.glob(".*.tmp*"):
        match = _TEMP_NAME.match(path.name)
        if match is None or match["host"] != _WRITER or _process_alive(int(match["pid"])) or not path.is_file():
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


PNG_COMPRESSION = 3  # zlib level of save_rgb_png: 3-4x faster than Pillow's 6 on photos, ~15 % larger files


def save_rgb_png(path: str | os.PathLike[str], rgb: np.ndarray, *, consume: bool = False) -> Path:
    """Save an (H, W, 3) uint8 RGB array as a PNG file, atomically, without a full-size copy of it.

    Pillow's PNG writer first copies an RGB array into its own 4-bytes-a-pixel image (324 MB for a
    9000 x 9000 overlay); OpenCV's writes the array itself, but in BGR order. So the channels of ``rgb`` are
    swapped in place while it is encoded, and swapped back afterwards unless ``consume`` (the array is then
    left in BGR order: for an array nobody reads afterwards, e.g. a freshly rendered overlay). Meanwhile no
    other thread may read the array. The file holds the pixels ``rgb`` had before the call.

    Args:
        path: destination, must end in ``.png``.
        rgb: C-contiguous, writeable (H, W, 3) uint8 RGB array.
        consume: leave ``rgb`` in BGR order (saves one pass over it).

    Returns:
        The destination path.

    Raises:
        OvssError: wrong extension, or an array of another dtype, shape or layout.
    """
    _check_suffix(path, ".png")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or not rgb.flags.c_contiguous:
        raise OvssError(
            f"cannot save an array of dtype {rgb.dtype}, shape {rgb.shape} as an RGB PNG; expected a "
            "C-contiguous uint8 array of shape (H, W, 3)"
        )
    if not rgb.flags.writeable:  # a read-only array cannot be swapped in place: Pillow's copy it is
        return save_png(path, rgb)
    cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR, dst=rgb)  # (H, W, 3) channels swapped in place
    try:
        encoded_ok, encoded = cv2.imencode(".png", rgb, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    finally:
        if not consume:
            cv2.cvtColor(rgb, cv2.COLOR_BGR2RGB, dst=rgb)  # (H, W, 3) back to RGB
    if not encoded_ok:
        raise OvssError(f"OpenCV could not encode a {rgb.shape[1]}x{rgb.shape[0]} PNG for '{path}'")

    def write(temp_path: Path) -> None:
        encoded.tofile(temp_path)

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
