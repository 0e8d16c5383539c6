"""fp32 copies of TorchScript checkpoints in the cache, so that OpenAI's CLIP archives load without conversion.

OpenAI ships CLIP as TorchScript archives of fp16 weights (``ViT-B-16.pt``). Reading one means compiling its
code (``torch.jit.load``) and converting every tensor to fp32: about a third of a second for ViT-B/16 on two
CPU cores, at every run, a sixth of a one-photo ``ovss segment``. The first read stores the converted state
dict as one safetensors file under ``<cache>/prepared/``; later reads map that file (no copy, no conversion:
0.05 s). The file's name hashes the archive's absolute path (one copy per archive); its metadata holds the
archive's size, modification time and inode, so a replaced archive is read afresh and its copy replaced.
Copies are only ever replaced by an atomic rename, so a model mapped from one never changes. A prepared file
that cannot be read is ignored and rewritten; one that cannot be written costs nothing but the speed (a
warning says why).

``OVSS_PREPARED_CACHE=0`` turns this off; ``ovss cache clear`` deletes the files (and the text cache's). Only
reading and writing copies needs torch (``ovss cache info`` imports this module without it).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ovss.storage.file_cache import SafetensorsCache

if TYPE_CHECKING:
    from torch import Tensor

ENV_VAR = "OVSS_PREPARED_CACHE"  # "0" / "false" / "no" / "off": read TorchScript archives every time
SUBFOLDER = "prepared"  # inside hub.cache_dir()
FORMAT = "ovss-prepared-checkpoint"  # metadata tag
VERSION = 1  # bump when what is stored changes
PREPARED_CACHE = SafetensorsCache(SUBFOLDER, ENV_VAR, FORMAT)


def enabled() -> bool:
    """Whether prepared copies are used: ``OVSS_PREPARED_CACHE`` unset, or not one of 0/false/no/off."""
    return PREPARED_CACHE.enabled()


def cache_folder() -> Path:
    """``<ovss cache folder>/prepared``; not created here."""
    return PREPARED_CACHE.folder()


def _identity(source: Path) -> dict[str, str]:
    """What names one version of a source file: absolute path, size, modification time (ns) and inode."""
    stat = source.stat()
    return {
        "source": str(source.resolve()),
        "size": str(stat.st_size),
        "mtime_ns": str(stat.st_mtime_ns),
        "inode": str(stat.st_ino),
    }


def prepared_path(source: Path) -> Path:
    """Where the fp32 copy of ``source`` lives: one file per archive path, replaced when the archive changes."""
    key = json.dumps([VERSION, str(source.resolve())])
    return cache_folder() / f"{hashlib.sha256(key.encode('utf-8')).hexdigest()[:24]}.safetensors"


def fp32_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Floating tensors as fp32 and the others as they are, each a contiguous copy with its own storage (tied or
    view tensors of the archive would otherwise share memory, which safetensors refuses to store)."""
    import torch

    return {
        k: (v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone()).contiguous()
        for k, v in state_dict.items()
    }


def read_torchscript(source: Path) -> dict[str, Tensor]:
    """The state dict of a TorchScript archive in fp32, from its prepared copy when there is one.

    Args:
        source: the archive (``ovss.models.checkpoint.is_torchscript``).

    Returns:
        Every tensor of ``torch.jit.load(source).state_dict()``, floating ones as fp32.

    Raises:
        Whatever ``torch.jit.load`` raises for a broken archive (the caller turns it into one line).
    """
    import torch

    target = prepared_path(source) if enabled() else None
    if target is not None and target.is_file():
        state_dict = _read(target, source)
        if state_dict is not None:
            return state_dict
    with warnings.catch_warnings():  # torch.jit.load is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        state_dict = fp32_state_dict(dict(torch.jit.load(str(source), map_location="cpu").state_dict()))
    if target is not None:
        _write(target, source, state_dict)
    return state_dict


def _read(target: Path, source: Path) -> dict[str, Tensor] | None:
    """The prepared copy's tensors (memory-mapped); None, with a warning, when it is not a valid copy of source."""
    from ovss.storage.file_cache import read_metadata

    try:
        meta = read_metadata(target)
        expected = {"format": FORMAT, "version": str(VERSION), **_identity(source)}
        if meta.get("format") == FORMAT and any(meta.get(k) != v for k, v in expected.items()):
            return None  # the copy of an earlier version of the archive (or of ovss): replaced quietly
        meta, state_dict = PREPARED_CACHE.read(target)
        if json.loads(meta["keys"]) != sorted(state_dict):
            raise ValueError("its tensors are not the ones listed")
        return state_dict
    except (OSError, ValueError, KeyError) as error:
        warnings.warn(f"ignoring the prepared checkpoint {target} ({error}); it will be rewritten", stacklevel=4)
        return None


def _write(target: Path, source: Path, state_dict: dict[str, Tensor]) -> None:
    """Store the fp32 copy atomically; a warning (not an error) when the cache cannot be written."""
    from safetensors import SafetensorError

    from ovss.errors import OvssError

    metadata = {"version": str(VERSION), "keys": json.dumps(sorted(state_dict)), **_identity(source)}
    try:
        PREPARED_CACHE.write(target, state_dict, metadata)
    except (OSError, OvssError, SafetensorError, RuntimeError, ValueError) as error:
        message = getattr(error, "strerror", None) or error
        warnings.warn(
            f"cannot store a prepared copy of {source} in {target.parent} ({message}); it is converted again at "
            f"every load (set OVSS_CACHE to a writable folder, or {ENV_VAR}=0)",
            stacklevel=4,
        )
