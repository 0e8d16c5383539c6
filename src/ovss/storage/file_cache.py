"""One helper for ovss's two on-disk safetensors caches: text embeddings and prepared checkpoints.

Both caches are folders of ``*.safetensors`` files under the ovss cache folder, tagged by a format name in the
safetensors metadata, turned off by an environment switch, replaced only whole by an atomic rename (so a
reader never sees a half-written file and a mapped file never changes), and listed by ``ovss cache info``.
:class:`SafetensorsCache` holds what they share; what each stores and how it checks a file stay with its owner
(:mod:`ovss.text.disk_cache`, :mod:`ovss.models.prepared`).

Reading headers (:func:`read_metadata`, :meth:`SafetensorsCache.files`) needs no torch.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_MAX_HEADER_BYTES = 100_000_000  # the safetensors limit


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a file, read from its JSON header alone (no torch).

    Raises:
        ValueError: not a safetensors file, or one without string metadata.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) != 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", prefix)
        if not 0 < size <= _MAX_HEADER_BYTES:
            raise ValueError(f"header size {size} is not plausible")
        raw = file.read(size)
    if len(raw) != size:
        raise ValueError("header cut short")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"header is not JSON ({error})") from error
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("no string metadata")
    return metadata


def cache_files(folder: Path) -> list[Path]:
    """The ``*.safetensors`` files of a folder by name, without hidden ones (writes in progress); none when
    the folder is missing."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.glob("*.safetensors") if not path.name.startswith("."))


@dataclass(frozen=True)
class SafetensorsCache:
    """A folder of tagged safetensors files inside the ovss cache folder."""

    subfolder: str  # inside ovss.storage.hub.cache_dir(), e.g. "text"
    env_var: str  # "0" / "false" / "no" / "off" turns the cache off, e.g. "OVSS_TEXT_CACHE"
    format: str  # metadata tag "format" of every file it writes

    def enabled(self) -> bool:
        """Whether the cache is used: ``env_var`` unset, or not one of 0/false/no/off."""
        from ovss.fields import switched_on

        return switched_on(self.env_var)

    def folder(self) -> Path:
        """``<ovss cache folder>/<subfolder>``; not created here."""
        from ovss.storage.hub import cache_dir

        return cache_dir() / self.subfolder

    def files(self) -> list[Path]:
        """The cache's files (:func:`cache_files` of :meth:`folder`)."""
        return cache_files(self.folder())

    def write(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Store ``tensors`` with ``metadata`` (tagged with the format) at ``path``, replacing it atomically.

        Raises:
            OSError, safetensors.SafetensorError, ovss.errors.OvssError: the folder or file cannot be written;
                the file that was there (if any) is untouched.
        """
        from safetensors.torch import save_file

        from ovss.storage.files import atomic_write

        tagged = {"format": self.format, **metadata}
        atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=tagged))

    def read(self, path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        """The metadata and the (memory-mapped) tensors of one of the cache's files.

        Raises:
            ValueError: not a file of this cache's format, or unreadable as safetensors (e.g. cut short).
            OSError: the file cannot be read.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        meta = read_metadata(path)
        if meta.get("format") != self.format:
            raise ValueError(f"not an {self.format} file")
        try:
            return meta, load_file(str(path), device="cpu")
        except (SafetensorError, RuntimeError) as error:  # e.g. "smaller than the required mapping size"
            raise ValueError(str(error)) from error
