"""Reading checkpoint files, shared by the CLIP loader (:mod:`ovss.models.formats`) and the VFM loader
(:mod:`ovss.models.dino`): one place for the file sniffing, the safe unpickling, the wrapper unwrapping,
the Hugging Face folder layout, q/k/v joining and the JSON configs that sit beside the weights.

Every function takes ``what`` ("CLIP" / "VFM") and ``fix`` (the one-line remedy) so its errors read as
the caller's own: ``"{what} checkpoint {path} ...; {fix}"``.
"""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from ovss.errors import OvssError
from ovss.models.prepared import read_torchscript

__all__ = [
    "WRAPPER_PREFIXES",
    "folder_weights",
    "is_safetensors",
    "is_torchscript",
    "join_qkv",
    "read_checkpoint",
    "read_json",
    "unwrap_state_dict",
]

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / torch.compile key prefixes


def folder_weights(folder: Path, names: Sequence[str], what: str, fix: str) -> Path:
    """The weights file inside a Hugging Face / open_clip model folder: the first of ``names`` present.

    Raises:
        OvssError: the folder holds a sharded checkpoint (``*.index.json``) or none of ``names``.
    """
    for name in names:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise OvssError(f"{what} folder {folder} holds a sharded checkpoint, which ovss does not read; {fix}")
    raise OvssError(
        f"{what} folder {folder} holds none of {', '.join(names)}; point at the weights file or at a "
        "Hugging Face model folder"
    )


def is_torchscript(path: Path) -> bool:
    """TorchScript archives hold ``code/`` and ``constants.pkl``; ``torch.save`` zips hold neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length followed by a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") < path.stat().st_size


def read_checkpoint(path: Path, what: str, fix: str) -> tuple[object, str]:
    """Load a file's object without running pickled code.

    Returns:
        The loaded object (a TorchScript archive becomes its state dict, in fp32: see
        :mod:`ovss.models.prepared`) and the container: ``"jit"``, ``"safetensors"`` or ``"pickle"``.

    Raises:
        OvssError: unreadable, truncated, not a checkpoint, or pickled Python objects besides tensors.
    """
    try:
        if is_torchscript(path):
            return read_torchscript(path), "jit"  # fp32, from its prepared copy after the first read
        with warnings.catch_warnings():  # odd pickles warn before failing
            warnings.simplefilter("ignore", UserWarning)
            if is_safetensors(path):
                # safetensors maps the file; models take these tensors as their weights (assign), so they are
                # copied: a user file rewritten in place must not change (or, truncated, crash) a loaded model.
                return {k: v.clone() for k, v in load_file(str(path), device="cpu").items()}, "safetensors"
            return torch.load(path, map_location="cpu", weights_only=True), "pickle"
    except Exception as e:  # torch.load on a broken file raises anything from EOFError to KeyError
        message = str(e)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if unsafe:
            raise OvssError(
                f"{what} checkpoint {path} stores Python objects besides tensors ({unsafe[1]}), which ovss "
                "does not unpickle; re-save only its state dict with torch.save(state_dict, path)"
            ) from e
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        reason = "not a valid pickle" if "Weights only load failed" in message else (lines or [""])[0]
        raise OvssError(
            f"{what} checkpoint {path} could not be read ({type(e).__name__}: {reason[:200]}); the file may "
            f"be truncated or not a checkpoint: download it again or {fix}"
        ) from e


def unwrap_state_dict(
    obj: object, source: str, what: str, fix: str, wrappers: Sequence[str] = ("state_dict", "model")
) -> tuple[dict[str, Tensor], bool]:
    """Descend wrapper dicts (``{"state_dict": ...}``) and strip ``module.`` / ``_orig_mod.`` prefixes.

    Args:
        obj: what :func:`read_checkpoint` returned.
        wrappers: keys of wrapper dicts, tried in order at every level that holds no tensor.

    Returns:
        The tensors by key (non-tensor entries dropped) and whether any wrapper or prefix was removed.

    Raises:
        OvssError: no dict of tensors inside.
    """
    wrapped = False
    while isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in wrappers if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj, wrapped = inner, True
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise OvssError(f"{what} checkpoint {source} holds a {type(obj).__name__}, not a state dict of tensors; {fix}")
    sd: dict[str, Tensor] = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, Tensor):
            while key.startswith(WRAPPER_PREFIXES):
                key = key[len(next(p for p in WRAPPER_PREFIXES if key.startswith(p))) :]
                wrapped = True
            sd[key] = value
    return sd, wrapped


def join_qkv(parts: Mapping[str, Tensor], names: tuple[str, str, str]) -> Tensor | None:
    """Concatenate separate query / key / value projections into the fused in-projection.

    Args:
        parts: the projections present, keyed by the names in ``names`` (weights (D, D) or biases (D,)).
        names: the keys of query, key and value, e.g. ``("q", "k", "v")`` or ``("query", "key", "value")``.

    Returns:
        (3D, D) or (3D,) in q, k, v order; None when one of the three is missing.
    """
    if set(parts) != set(names):
        return None
    return torch.cat([parts[n] for n in names], dim=0)  # (3D, D) or (3D,)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a config file beside the weights.

    Raises:
        OvssError: unreadable, not JSON, or not an object.
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OvssError(f"{path} is not valid JSON ({e}); fix or delete the file") from e
    if not isinstance(value, dict):
        raise OvssError(f"{path} holds a JSON {type(value).__name__}, not an object; fix or delete the file")
    return value
