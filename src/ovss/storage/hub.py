"""Named weights and assets (the registry of :mod:`ovss.storage.weights`): a cache folder and a checked download.

``resolve("ViT-B/16")`` returns the cached file, downloading it on first use (SHA-256 verified, written
atomically). Existing paths are returned unchanged, so every ``--clip`` / ``clip=`` argument may be either
a registered name or a local file. Nothing here runs at import time or inside a model constructor.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ovss.errors import OvssError
from ovss.storage.files import file_sha256
from ovss.storage.hf_hub import is_hub_id, resolve_hub
from ovss.storage.weights import DEFAULT_CLIP, DEFAULT_VFM, KINDS, REGISTRY, WeightsEntry

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_VFM",
    "KINDS",
    "REGISTRY",
    "WeightsEntry",
    "available_models",
    "cache_dir",
    "describe_file",
    "needed_files",
    "resolve",
]

_TIMEOUT_S = 30.0  # seconds a connection may stall before the download is abandoned
_CHUNK = 1 << 20  # bytes read per network call


# How each kind is named in messages, and the CLI flag / keyword that takes a local file instead.
_LABELS = {"clip": "CLIP weights", "vfm": "VFM weights", "tokenizer": "Tokenizer vocabulary", "sam": "SAM weights"}
_VERBS = {"clip": "are", "vfm": "are", "tokenizer": "is", "sam": "are"}
_SUPPLY = {
    "clip": "--clip PATH (or clip=PATH)",
    "vfm": "--vfm PATH (or vfm=PATH)",
    "tokenizer": "OVSS_BPE_PATH=PATH (or load_tokenizer(PATH))",
    "sam": "--sam PATH (or sam=PATH)",
}


def available_models(kind: str | None = None) -> list[str]:
    """Registered names, in registry order.

    Args:
        kind: ``"clip"``, ``"vfm"``, ``"tokenizer"`` or ``"sam"`` to list one kind; None lists all.

    Returns:
        Names accepted by :func:`resolve`, e.g. ``["ViT-B/16", "ViT-B/32", ...]`` for ``"clip"``.
    """
    if kind is not None:
        _check_kind(kind)
    return [name for name, entry in REGISTRY.items() if kind is None or entry.kind == kind]


def cache_dir() -> Path:
    """The download folder: ``$OVSS_CACHE``, else ``$XDG_CACHE_HOME/ovss``, else ``~/.cache/ovss``.

    The folder is not created here; :func:`resolve` creates it when it downloads.
    """
    if os.environ.get("OVSS_CACHE"):
        return Path(os.environ["OVSS_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ovss"
    return Path("~/.cache/ovss").expanduser()


def resolve(
    name_or_path: str,
    kind: str = "clip",
    *,
    download: bool = True,
    progress: bool = True,
    cache: str | os.PathLike[str] | None = None,
    advice: str | None = None,
) -> Path:
    """The local file for a registered name or a path, downloading a registered file if it is not cached.

    Args:
        name_or_path: an existing file or folder (returned unchanged), one of ``available_models(kind)``, or
            a Hub id ``hf-hub:ORG/NAME[@REVISION]`` (its snapshot folder in the Hugging Face cache, see
            :mod:`ovss.storage.hf_hub`).
        kind: ``"clip"``, ``"vfm"``, ``"tokenizer"`` or ``"sam"``; a registered name must be of this kind.
        download: allow a network download when the file is not cached. ``OVSS_OFFLINE=1`` or
            ``HF_HUB_OFFLINE=1`` in the environment forbid it too.
        progress: show a tqdm progress bar on stderr while downloading.
        cache: the cache folder to use instead of :func:`cache_dir`.
        advice: what the error of a failed download tells the user to do instead of the default (fetch the
            file elsewhere with ``ovss download``), e.g. for ``ovss download`` itself.

    Returns:
        Path of the file: ``cache_dir() / entry.filename`` for a registered name.

    Raises:
        OvssError: unknown name; a name of another kind; the file is not cached and cannot be downloaded
            (offline, network error); or its SHA-256 differs from the expected or recorded digest.
    """
    _check_kind(kind)
    if not name_or_path.strip():
        raise OvssError(f"empty {_LABELS[kind]} name; use one of: {', '.join(available_models(kind))}")
    if is_hub_id(name_or_path):
        if kind == "tokenizer":
            raise OvssError(
                f"'{name_or_path}' is a Hub repository, not a vocabulary file; a Hugging Face CLIP repository's own "
                "vocab.json + merges.txt are used when it is the CLIP weights"
            )
        return resolve_hub(name_or_path, kind, download=download, progress=progress).folder
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    entry = REGISTRY.get(name_or_path)
    if entry is None:
        names = available_models(kind)
        close = difflib.get_close_matches(name_or_path, names, n=len(names), cutoff=0.0)
        raise OvssError(
            f"{_LABELS[kind]} '{name_or_path}' is neither an existing path nor a registered name; "
            f"available (closest first): {', '.join(close)}"
        )
    if entry.kind != kind:
        raise OvssError(
            f"'{entry.name}' names {_LABELS[entry.kind]}, not {_LABELS[kind]}; "
            f"choose one of: {', '.join(available_models(kind))}"
        )
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    target = folder / entry.filename
    if target.is_file():
        _check_cached(entry, target)
        return target
    reason = offline_reason(download)
    if reason is None:
        try:
            _download(entry, target, progress)
            return target
        except (OSError, http.client.HTTPException, ValueError) as e:  # HTTP errors, timeouts, DNS, bad URL
            reason = _describe(e)
    missing = [e for e in needed_files(entry.name) if e is entry or not (folder / e.filename).is_file()]
    files = "; ".join(describe_file(e) for e in missing)
    them = "them" if len(missing) > 1 else "it"
    if advice is None:
        advice = (
            f"Fetch {them} elsewhere (`ovss download {entry.name}` fills a cache folder) and copy {them} to "
            f"{target.parent}, supply a local file with {_SUPPLY[kind]}, or set OVSS_CACHE to a folder that "
            f"holds {them}."
        )
    raise OvssError(
        f"{_LABELS[kind]} '{entry.name}' {_VERBS[kind]} not cached at {target} "
        f"and could not be downloaded ({reason}). Needed: {files}. {advice}"
    )


def needed_files(name: str) -> list[WeightsEntry]:
    """The registered files a name needs to run offline: itself, and for CLIP weights the BPE vocabulary.

    The vocabulary is left out when ``OVSS_BPE_PATH`` names a local one.

    Raises:
        OvssError: ``name`` is not registered.
    """
    entry = REGISTRY.get(name)
    if entry is None:
        names = available_models()
        close = difflib.get_close_matches(name, names, n=len(names), cutoff=0.0)
        raise OvssError(f"'{name}' is not a registered name; available (closest first): {', '.join(close)}")
    files = [entry]
    if entry.kind == "clip" and not os.environ.get("OVSS_BPE_PATH"):
        files.append(REGISTRY["clip-bpe"])
    return files


def check_offline(wanted: list[tuple[str, str]], *, download: bool = True, vocabulary: bool = True) -> None:
    """Before anything loads: when no download may happen, name every registered file still missing, at once.

    Args:
        wanted: ``(name_or_path, kind)`` of what a run will load; paths and unknown names are skipped (their
            own errors come from :func:`resolve`).
        download: as in :func:`resolve`; with a download allowed (and not ``OVSS_OFFLINE``) nothing is checked.
        vocabulary: whether CLIP weights also need the registered BPE vocabulary (no tokenizer was given).

    Raises:
        OvssError: one line listing every missing file with its URL and SHA-256, and how to supply them.
    """
    reason = offline_reason(download)
    if reason is None:
        return
    folder = cache_dir()
    missing: list[WeightsEntry] = []
    for name, kind in wanted:
        entry = REGISTRY.get(name)
        if Path(name).expanduser().exists() or entry is None or entry.kind != kind:
            continue
        for needed in needed_files(name):
            if needed.kind == "tokenizer" and not vocabulary:
                continue
            if not (folder / needed.filename).is_file() and needed not in missing:
                missing.append(needed)
    if missing:
        names = " ".join(f"'{e.name}'" if " " in e.name else e.name for e in missing)
        them = "them" if len(missing) > 1 else "it"
        raise OvssError(
            f"{len(missing)} file(s) needed for this run are not cached in {folder} and cannot be downloaded "
            f"({reason}): {'; '.join(describe_file(e) for e in missing)}. Fetch {them} on a machine with network "
            f"access (`ovss download {names} --cache DIR`) and copy {them} to {folder}, supply local files with "
            f"{', '.join(dict.fromkeys(_SUPPLY[e.kind] for e in missing))}, or set OVSS_CACHE to a folder that "
            f"holds {them}."
        )


def describe_missing(entry: WeightsEntry, folder: Path) -> str:
    """``SAM weights 'sam-vitb' are not cached at <folder>/<file>``: a registered file that is not there."""
    return f"{_LABELS[entry.kind]} '{entry.name}' {_VERBS[entry.kind]} not cached at {folder / entry.filename}"


def local_file_flags(entries: list[WeightsEntry]) -> str:
    """The flags (or keywords) that supply these files from local paths instead, e.g. ``--clip PATH (or ...)``."""
    return ", ".join(dict.fromkeys(_SUPPLY[entry.kind] for entry in entries))


def describe_file(entry: WeightsEntry) -> str:
    """``file <- URL (SHA-256 ...)``: what to fetch by hand for a registered file."""
    digest = entry.sha256 or "not registered; recorded at first use"
    return f"{entry.filename} <- {entry.url} (SHA-256 {digest})"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise OvssError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")


def offline_reason(download: bool) -> str | None:
    """Why no download may happen, or None when it may."""
    if not download:
        return "downloads disabled (download=False)"
    for var in ("OVSS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"offline mode: {var}={os.environ[var]}"
    return None


def _describe(error: BaseException) -> str:
    """A short, one-line reason for a failed download."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"network error: {error.reason}"
    return f"{type(error).__name__}: {error}".splitlines()[0]


def recorded_digest(target: Path) -> str:
    """The SHA-256 recorded beside a cached file without a registered digest (computed if none is)."""
    record = _record_path(target)
    return record.read_text().split()[0] if record.is_file() else file_sha256(target)


def _record_path(target: Path) -> Path:
    """Where the digest of a file without a registered SHA-256 is recorded."""
    return target.with_name(target.name + ".sha256")


def _check_cached(entry: WeightsEntry, target: Path) -> None:
    """Verify a cached file against the registered digest, or the digest recorded at its first use."""
    actual = file_sha256(target)
    record = _record_path(target)
    expected = entry.sha256
    if expected is None and record.is_file():
        expected = record.read_text().split()[0]
    if expected is None:
        with contextlib.suppress(OSError):  # first use of a copied-in file: remember it if we may write
            record.write_text(f"{actual}  {entry.filename}\n")
    elif actual != expected:
        raise OvssError(
            f"cached file {target} for '{entry.name}' has SHA-256 {actual}, expected {expected}; "
            "the file is corrupt or was replaced: delete it (and any .sha256 beside it) to download it again"
        )


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first (what a mkdir would create)."""
    missing: list[Path] = []
    current = folder.absolute()
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that are still empty; the others, and any error, are left alone."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another process wrote there), or gone: stop, its parents are not empty either
            return


def _download(entry: WeightsEntry, target: Path, progress: bool) -> None:
    """Stream ``entry.url`` into a temp file beside ``target``, verify it, then rename atomically.

    A failed download leaves nothing behind: neither the partial file nor the folders it created.
    """
    created = missing_folders(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _fetch(entry, target, progress)
    except BaseException:
        remove_empty_folders(created)
        raise


def _fetch(entry: WeightsEntry, target: Path, progress: bool) -> None:
    """The body of :func:`_download`, into an existing folder."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(entry.url, timeout=_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            with tqdm(
                total=int(length) if length else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=entry.filename,
                file=sys.stderr,
                disable=not progress,
            ) as bar:
                received = 0
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                    received += len(chunk)
        if length and received != int(length):
            raise ConnectionError(f"connection closed after {received} of {length} bytes")
        actual = digest.hexdigest()
        if entry.sha256 is not None and actual != entry.sha256:
            raise OvssError(
                f"download of '{entry.name}' from {entry.url} has SHA-256 {actual}, expected {entry.sha256}; "
                "the transfer was corrupted or the file changed upstream: try again, or supply a local file"
            )
        os.replace(tmp, target)
        if entry.sha256 is None:
            _record_path(target).write_text(f"{actual}  {entry.filename}\n")
    finally:
        tmp.unlink(missing_ok=True)
