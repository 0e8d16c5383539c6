"""What the Hugging Face cache holds that ovss can load (``ovss models``, ``ovss download``).

The cache is the one of :func:`ovss.storage.hf_hub.hub_cache_dir`, shared with transformers and open_clip;
``huggingface_hub.scan_cache_dir`` lists its repositories and revisions, and a revision is kept when it holds a
weights file of :data:`~ovss.storage.hf_hub.WEIGHT_FILES` and a config that says what it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ovss.storage.hf_hub import PREFIX, WEIGHT_FILES, hub_cache_dir

__all__ = ["CachedWeights", "cached_weights", "detect_kind"]


@dataclass(frozen=True)
class CachedWeights:
    """One revision in the Hugging Face cache that ovss can load."""

    kind: str  # "clip", "vfm" or "sam"
    name: str  # the id that loads it: hf-hub:ORG/NAME (main), @REF (another branch or tag) or @COMMIT
    commit: str  # the snapshot's commit
    file: str  # its weights file
    size: int  # bytes of the revision's files on disk


def detect_kind(folder: Path) -> str | None:
    """What a snapshot holds: ``"clip"`` (OpenCLIP files or a ``clip`` config), ``"vfm"`` (ViT / DINOv2 /
    DINOv3 config), ``"sam"``; None when nothing ovss reads (no config or another model type)."""
    if (folder / "open_clip_config.json").is_file() or any((folder / f).is_file() for f in WEIGHT_FILES["clip"][2:]):
        return "clip"
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        model_type = str(json.loads(config.read_text(encoding="utf-8")).get("model_type", ""))
    except (OSError, ValueError, AttributeError):
        return None
    if model_type.startswith("clip"):
        return "clip"
    if model_type in ("vit", "dinov2", "dinov2_with_registers", "dinov3_vit"):
        return "vfm"
    return "sam" if model_type == "sam" else None


def cached_weights(cache: Path | None = None) -> list[CachedWeights]:
    """Every model revision of the Hugging Face cache holding weights ovss can load, by repository then name.

    Args:
        cache: the cache folder; default :func:`hub_cache_dir`.

    Returns:
        One entry per cached revision with a weights file of :data:`WEIGHT_FILES` and a kind :func:`detect_kind`
        recognises; [] when the folder does not exist.
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils import CacheNotFound

    folder = cache if cache is not None else hub_cache_dir()
    try:
        info = scan_cache_dir(folder)
    except CacheNotFound:
        return []
    found: list[CachedWeights] = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.commit_hash):
            names = {f.file_name for f in revision.files}
            kind = detect_kind(Path(revision.snapshot_path))
            file = next((f for f in WEIGHT_FILES[kind] if f in names), None) if kind else None
            if kind is None or file is None:
                continue
            refs = sorted(revision.refs)
            suffix = "" if "main" in refs else f"@{refs[0] if refs else revision.commit_hash}"
            name = PREFIX + repo.repo_id + suffix
            found.append(CachedWeights(kind, name, revision.commit_hash, file, revision.size_on_disk))
    return found
