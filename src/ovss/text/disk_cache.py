"""The persistent text-embedding cache: one safetensors file per (weights, template set) under ``<cache>/text/``.

A *shard* holds every name embedded so far with one CLIP (its weights' fingerprint) and one template set:
a float32 tensor ``embeddings`` (N, E) and, in the safetensors metadata, the names in row order, the names
whose prompts were cut to CLIP's 77-token context, the model key, the templates and
:data:`TEXT_PATH_VERSION`. The file name is a hash of the last three, so a change of weights, templates or
text path never reads an old file.

A shard is only ever replaced whole (``ovss.storage.files.atomic_write``: temporary file + rename), after
re-reading it, so concurrent processes and interrupted writes never leave a truncated file; two processes
adding names at the same moment can at worst drop one's additions, which are then recomputed next time.
A file that cannot be read back (corrupt, foreign, mismatched) is ignored with a warning and rewritten.

Reading the headers (:func:`read_metadata`, :func:`shard_infos`, used by ``ovss cache info``) needs no torch.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ovss.errors import OvssError
from ovss.storage.file_cache import SafetensorsCache, cache_files, read_metadata

if TYPE_CHECKING:
    import torch

# Bump when anything that changes the numbers of the text path changes (tokenizer, text tower, prompt
# filling, ensembling): files written by another version are then never read (their names differ).
TEXT_PATH_VERSION = 1
CACHE_ENV_VAR = "OVSS_TEXT_CACHE"  # "0" / "false" / "no" / "off": no persistent text cache at all
FORMAT = "ovss-text-embeddings"  # metadata tag of a shard
SUBFOLDER = "text"  # inside hub.cache_dir()
_TENSOR = "embeddings"  # the one tensor of a shard, (N, E) float32
TEXT_CACHE = SafetensorsCache(SUBFOLDER, CACHE_ENV_VAR, FORMAT)


def enabled() -> bool:
    """Whether the persistent cache is on: ``OVSS_TEXT_CACHE`` unset, or not one of 0/false/no/off."""
    return TEXT_CACHE.enabled()


def cache_folder() -> Path:
    """``<ovss cache folder>/text`` (``$OVSS_CACHE/text``, else ``~/.cache/ovss/text``); not created here."""
    return TEXT_CACHE.folder()


def shard_name(model_key: str, templates: Sequence[str]) -> str:
    """File name of the shard of one (model, template set, text path version)."""
    key = json.dumps([TEXT_PATH_VERSION, model_key, list(templates)], ensure_ascii=False)
    return f"{hashlib.sha256(key.encode('utf-8')).hexdigest()[:24]}.safetensors"


@dataclass(frozen=True)
class ShardInfo:
    """What ``ovss cache info`` prints about one shard file."""

    path: Path  # the file
    size: int  # bytes on disk
    model: str | None  # model key (weights fingerprint and template set name); None: unreadable
    templates: int  # number of prompt templates
    names: int  # number of names embedded
    version: str  # TEXT_PATH_VERSION that wrote it
    problem: str | None  # why the file would be ignored (corrupt, foreign, older text path); None: fine


def shard_infos(folder: Path) -> list[ShardInfo]:
    """One :class:`ShardInfo` per ``*.safetensors`` file in ``folder`` (none when it is missing), by name.

    Hidden files (``.<name>.<pid>.<random>.tmp.safetensors``: writes in progress) are left out.
    """
    infos = []
    for path in cache_files(folder):
        size = 0
        try:
            size = path.stat().st_size
            meta = read_metadata(path)
            if meta.get("format") != FORMAT:
                raise ValueError(f"not an {FORMAT} file")
            names = json.loads(meta["names"])
            templates = json.loads(meta["templates"])
        except (OSError, ValueError, KeyError) as error:
            infos.append(ShardInfo(path, size, None, 0, 0, "?", str(error)))
            continue
        version = meta.get("version", "?")
        problem = None if version == str(TEXT_PATH_VERSION) else f"written by text path version {version}"
        infos.append(ShardInfo(path, size, meta.get("model"), len(templates), len(names), version, problem))
    return infos


# One cached name: its (E,) float32 row and whether its prompts were cut to the 77-token context.
Entry = tuple["torch.Tensor", bool]


class TextEmbeddingShard:
    """The shard file of one (model key, template set): read it whole, add names to it atomically.

    Args:
        model_key: identifies the text tower's weights and the template set (as ``EmbeddingCache.get``).
        templates: the prompt templates (their exact text is part of the key).
        folder: where the shard lives; None: :func:`cache_folder` at construction time.
    """

    def __init__(self, model_key: str, templates: Sequence[str], folder: Path | None = None) -> None:
        self.model_key = model_key
        self.templates = list(templates)
        self.path = (cache_folder() if folder is None else folder) / shard_name(model_key, templates)

    def load(self) -> dict[str, Entry]:
        """Every name stored in the shard; empty when the file is missing, or unreadable (with a warning)."""
        if not self.path.is_file():
            return {}
        try:
            return self._read()
        except (OSError, ValueError, KeyError, TypeError) as error:
            warnings.warn(
                f"ignoring the unreadable text-embedding cache file {self.path} ({error}); it will be rewritten",
                UserWarning,
                stacklevel=3,
            )
            return {}

    def add(self, entries: Mapping[str, Entry]) -> None:
        """Store names (re-reading the file first to keep what other processes added), replacing it atomically.

        Raises:
            OvssError: the cache folder or file cannot be written.
        """
        import torch
        from safetensors import SafetensorError

        merged = {**(self._read_quietly()), **entries}
        names = list(merged)
        rows = torch.stack([merged[name][0].float().cpu() for name in names]).contiguous()  # (N, E)
        metadata = {
            "version": str(TEXT_PATH_VERSION),
            "model": self.model_key,
            "templates": json.dumps(self.templates, ensure_ascii=False),
            "names": json.dumps(names, ensure_ascii=False),
            "truncated": json.dumps([name for name in names if merged[name][1]], ensure_ascii=False),
        }
        from ovss.storage.hub import missing_folders, remove_empty_folders

        created = missing_folders(self.path.parent)  # a failed write leaves no empty <cache>/text/ behind
        try:
            TEXT_CACHE.write(self.path, {_TENSOR: rows}, metadata)
        except (OSError, SafetensorError) as error:  # e.g. a full disk: the old file is untouched
            remove_empty_folders(created)
            raise OvssError(f"cannot write '{self.path}': {getattr(error, 'strerror', None) or error}") from error
        except BaseException:
            remove_empty_folders(created)
            raise

    def _read_quietly(self) -> dict[str, Entry]:
        try:
            return self._read() if self.path.is_file() else {}
        except (OSError, ValueError, KeyError, TypeError):
            return {}  # replaced by the file being written

    def _read(self) -> dict[str, Entry]:
        """Parse and check the shard; ValueError/KeyError/TypeError/OSError when it is not a valid one."""
        import torch

        meta = read_metadata(self.path)
        if meta.get("format") != FORMAT or meta.get("version") != str(TEXT_PATH_VERSION):
            raise ValueError(f"not an {FORMAT} file of text path version {TEXT_PATH_VERSION}")
        if meta.get("model") != self.model_key or json.loads(meta["templates"]) != self.templates:
            raise ValueError("written for another model or template set")
        names = json.loads(meta["names"])
        truncated = set(json.loads(meta["truncated"]))
        _, tensors = TEXT_CACHE.read(self.path)
        rows = tensors[_TENSOR]  # (N, E)
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ValueError("the names are not a list of strings")
        if len(set(names)) != len(names):
            raise ValueError("a name is stored twice")
        if rows.dtype != torch.float32 or rows.ndim != 2 or rows.shape[0] != len(names):
            raise ValueError(f"embeddings of shape {tuple(rows.shape)} do not match {len(names)} names")
        if not torch.isfinite(rows).all() or ((rows.norm(dim=1) - 1).abs() > 1e-3).any():  # rows are unit-norm
            raise ValueError("embeddings are not unit-norm rows")
        return {name: (row.clone(), name in truncated) for name, row in zip(names, rows, strict=True)}
