"""``ovss cache info`` and ``ovss cache clear``: the text-embedding cache and the prepared fp32 copies of
TorchScript checkpoints (:mod:`ovss.models.prepared`); no torch needed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "cache",
        help="show or clear the text-embedding cache and the prepared checkpoints",
        description=(
            "Class-name embeddings are stored under <cache folder>/text ($OVSS_CACHE, else "
            "$XDG_CACHE_HOME/ovss, else ~/.cache/ovss), one file per CLIP weights and template set, so a "
            "name is encoded once; OVSS_TEXT_CACHE=0 turns that cache off. TorchScript checkpoints (OpenAI's "
            "CLIP .pt) get an fp32 copy under <cache folder>/prepared, read in place of the archive; "
            "OVSS_PREPARED_CACHE=0 turns that off. Downloaded weights are not touched, nor is the Hugging Face "
            "cache of hf-hub: weights (`ovss models` lists it; huggingface_hub's `hf` command manages it)."
        ),
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("info", help="list the cached files").set_defaults(func=info)
    actions.add_parser("clear", help="delete every cached embedding file and prepared checkpoint").set_defaults(
        func=clear
    )


def info(args: argparse.Namespace) -> int:
    """One line per shard file (model key, templates, names, size), then the totals."""
    from ovss.text import disk_cache

    folder = disk_cache.cache_folder()
    state = "on" if disk_cache.enabled() else f"off ({disk_cache.CACHE_ENV_VAR}=0)"
    print(f"text-embedding cache: {folder} ({state}, text path version {disk_cache.TEXT_PATH_VERSION})")
    shards = disk_cache.shard_infos(folder)
    for shard in shards:
        size = f"{shard.size / 1024:.0f} KiB"
        if shard.model is None:
            print(f"  {shard.path.name}  {size:>9s}  unreadable ({shard.problem}); ignored and rewritten")
            continue
        note = f"; ignored: {shard.problem}" if shard.problem else ""
        contents = f"{shard.names} names x {shard.templates} templates"
        print(f"  {shard.path.name}  {size:>9s}  {contents}  model {shard.model}{note}")
    total = sum(shard.size for shard in shards)
    print(f"{len(shards)} files, {sum(s.names for s in shards)} names, {total / 1024:.0f} KiB")
    _prepared_info()
    return 0


def _prepared_info() -> None:
    """One line per prepared checkpoint (its source archive and size), then the total."""
    import json

    from ovss.models import prepared
    from ovss.storage.file_cache import cache_files, read_metadata

    folder = prepared.cache_folder()
    state = "on" if prepared.enabled() else f"off ({prepared.ENV_VAR}=0)"
    print(f"prepared checkpoints: {folder} ({state})")
    files = cache_files(folder)
    total = 0
    for path in files:
        size = path.stat().st_size
        total += size
        try:
            meta = read_metadata(path)
            what = f"fp32 copy of {meta['source']} ({len(json.loads(meta['keys']))} tensors)"
        except (OSError, ValueError, KeyError) as error:
            what = f"unreadable ({error}); ignored and rewritten"
        print(f"  {path.name}  {size / 2**20:7.0f} MiB  {what}")
    print(f"{len(files)} files, {total / 2**20:.0f} MiB")


def clear(args: argparse.Namespace) -> int:
    """Delete the text shards and the prepared checkpoints (and temporary files left by interrupted writes)."""
    from ovss.models import prepared
    from ovss.text import disk_cache

    for folder, what in ((disk_cache.cache_folder(), "text-embedding cache"), (prepared.cache_folder(), "prepared")):
        print(f"removed {_remove_all(folder)} {what} files from {folder}")
    return 0


def _remove_all(folder: Path) -> int:
    from ovss.errors import OvssError

    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []  # pathlib's glob includes .*.tmp files
    removed = 0
    for path in files:
        try:
            path.unlink()
        except FileNotFoundError:  # removed meanwhile by another process
            continue
        except OSError as error:
            raise OvssError(f"cannot delete '{path}': {error.strerror}; check the folder's permissions") from error
        removed += 1
    return removed
