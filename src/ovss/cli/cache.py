"""``ovss cache info`` and ``ovss cache clear``: the persistent text-embedding cache (no torch needed)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "cache",
        help="show or clear the text-embedding cache",
        description=(
            "Class-name embeddings are stored under <cache folder>/text ($OVSS_CACHE, else "
            "$XDG_CACHE_HOME/ovss, else ~/.cache/ovss), one file per CLIP weights and template set, so a "
            "name is encoded once. OVSS_TEXT_CACHE=0 turns the cache off. Downloaded weights are not touched."
        ),
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("info", help="list the cached embedding files").set_defaults(func=info)
    actions.add_parser("clear", help="delete every cached embedding file").set_defaults(func=clear)


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
    return 0


def clear(args: argparse.Namespace) -> int:
    """Delete the shard files (and temporary files left by interrupted writes) of the text folder."""
    from ovss.errors import OvssError
    from ovss.text import disk_cache

    folder = disk_cache.cache_folder()
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
    print(f"removed {removed} text-embedding cache files from {folder}")
    return 0
