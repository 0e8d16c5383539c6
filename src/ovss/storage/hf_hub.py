"""Weights from the Hugging Face Hub: ``hf-hub:ORG/NAME`` or ``hf-hub:ORG/NAME@REVISION`` ids.

Files go through ``huggingface_hub`` into the standard Hugging Face cache (``HF_HUB_CACHE``, else
``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), the one transformers and open_clip use: no second copy.
Only the files a loader reads are fetched: the first weights file of :data:`WEIGHT_FILES` the repository
holds (the order the loaders read a folder in) and the configs / vocabulary beside it (:data:`SIDE_FILES`).
The snapshot folder is then read like a local Hugging Face / OpenCLIP folder.

``HF_HUB_OFFLINE=1`` and ``OVSS_OFFLINE=1`` (or ``download=False``) mean cache only. Tokens are read by
``huggingface_hub`` itself (``HF_TOKEN``, ``hf auth login``), or passed as ``token=``. Every failure is one
:class:`~ovss.errors.OvssError` naming the repository, revision or file and the fix.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from ovss.errors import OvssError
from ovss.storage.files import file_sha256

__all__ = [
    "PREFIX",
    "SIDE_FILES",
    "WEIGHT_FILES",
    "HubId",
    "HubWeights",
    "hub_cache_dir",
    "is_hub_id",
    "parse_hub_id",
    "resolve_hub",
]

PREFIX = "hf-hub:"
# Weights files looked for, in this order (the order ovss's loaders read a model folder in): Hugging Face
# ``CLIPModel`` / ``Dinov2WithRegistersModel`` / ``DINOv3ViTModel`` / ``SamModel``, then OpenCLIP's.
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
WEIGHT_FILES: dict[str | None, tuple[str, ...]] = {
    "clip": (*_HF_WEIGHTS, "open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    "vfm": _HF_WEIGHTS,
    "sam": _HF_WEIGHTS,
    None: (*_HF_WEIGHTS, "open_clip_model.safetensors", "open_clip_pytorch_model.bin"),  # kind unknown (download)
}
# Files read beside the weights when the repository has them: configs (heads, activation, input statistics)
# and the Hugging Face CLIP tokenizer's vocabulary.
_CLIP_SIDE = ("config.json", "preprocessor_config.json", "open_clip_config.json", "vocab.json", "merges.txt")
SIDE_FILES: dict[str | None, tuple[str, ...]] = {
    "clip": _CLIP_SIDE,
    "vfm": ("config.json",),
    "sam": ("config.json",),
    None: _CLIP_SIDE,
}
_LABELS = {"clip": "CLIP weights", "vfm": "VFM weights", "sam": "SAM weights", None: "weights"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HOW_TOKEN = "set HF_TOKEN=hf_... in the environment or run `hf auth login` (or pass token=... to ovss.load)"


@dataclass(frozen=True)
class HubId:
    """A parsed ``hf-hub:ORG/NAME@REVISION`` id."""

    repo_id: str  # "ORG/NAME"
    revision: str | None  # branch, tag or commit; None: the default branch ("main")

    @property
    def name(self) -> str:
        """The id as written: ``hf-hub:ORG/NAME`` or ``hf-hub:ORG/NAME@REVISION``."""
        return PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class HubWeights:
    """Where a Hub repository's weights were found in the Hugging Face cache."""

    name: str  # the id as given, e.g. "hf-hub:facebook/dinov3-vitb16-pretrain-lvd1689m"
    repo_id: str  # "ORG/NAME"
    revision: str  # what was asked: a branch, tag or commit ("main" when none)
    commit: str  # the commit the revision resolved to (40 hex digits)
    folder: Path  # the snapshot folder (read like a local model folder)
    file: str  # the weights file inside it, e.g. "model.safetensors"
    sha256: str  # SHA-256 of the weights file (the LFS object id the Hub serves as its ETag)
    size: int  # bytes of the weights file

    def record(self, role: str) -> dict[str, Any]:
        """The entries of a segmenter's config record: ``<role>_path``, ``_revision``, ``_file``, ``_sha256``."""
        return {
            role: self.name,
            f"{role}_path": str(self.folder),
            f"{role}_revision": self.commit,
            f"{role}_file": self.file,
            f"{role}_sha256": self.sha256,
        }


def is_hub_id(name: object) -> TypeGuard[str]:
    """Whether ``name`` is a string starting with ``hf-hub:``."""
    return isinstance(name, str) and name.startswith(PREFIX)


def parse_hub_id(name: str) -> HubId:
    """``hf-hub:ORG/NAME[@REVISION]`` -> :class:`HubId`.

    Raises:
        OvssError: no ``ORG/NAME`` after the prefix, an empty revision, or a name the Hub does not allow.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    body = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    repo_id, at, revision = body.partition("@")
    repo_id = repo_id.strip()
    if at and not revision.strip():
        raise OvssError(f"'{name}' has an empty revision after '@'; write {PREFIX}{repo_id}@BRANCH_TAG_OR_COMMIT")
    if repo_id.count("/") != 1:
        raise OvssError(
            f"'{name}' does not name a Hub repository; write {PREFIX}ORG/NAME (e.g. "
            f"{PREFIX}facebook/dinov3-vitb16-pretrain-lvd1689m), optionally @REVISION"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        reason = str(e).splitlines()[0]
        raise OvssError(f"'{name}' is not a valid Hub repository id ({reason}); write {PREFIX}ORG/NAME") from e
    return HubId(repo_id, revision.strip() or None)


def hub_cache_dir() -> Path:
    """The Hugging Face cache, read from the environment now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub`` (as ``huggingface_hub`` resolves it)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else None
    return (base or Path("~/.cache").expanduser()) / "huggingface" / "hub"


def hub_endpoint() -> str:
    """The Hub's address: ``HF_ENDPOINT`` read now, else ``huggingface_hub``'s (https://huggingface.co)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline_reason(download: bool) -> str | None:
    """Why nothing may be fetched from the Hub now (``download=False``, ``OVSS_OFFLINE``, ``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    from ovss.storage.hub import offline_reason as registry_offline_reason

    reason = registry_offline_reason(download)
    if reason is None and constants.HF_HUB_OFFLINE:  # set before huggingface_hub was imported
        reason = "offline mode: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) was set when huggingface_hub was imported"
    return reason


def resolve_hub(
    name: str,
    kind: str | None = None,
    *,
    download: bool = True,
    token: str | None = None,
    progress: bool = True,
    advice: str | None = None,
) -> HubWeights:
    """Download (or find in the Hugging Face cache) the files ovss reads from a Hub repository.

    Args:
        name: ``hf-hub:ORG/NAME`` or ``hf-hub:ORG/NAME@REVISION`` (branch, tag or commit).
        kind: ``"clip"``, ``"vfm"`` or ``"sam"``: which weights files are looked for (:data:`WEIGHT_FILES`);
            None: any (``ovss download``).
        download: allow network access; ``OVSS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` forbid it too. Without
            it only the cache is read.
        token: a Hub access token; None: ``huggingface_hub``'s own (``HF_TOKEN``, ``hf auth login``).
        progress: show ``huggingface_hub``'s progress bars.
        advice: what the error of an impossible download tells the user to do instead of the default (run
            ``ovss download`` where the Hub can be reached), e.g. for ``ovss download`` itself.

    Returns:
        The snapshot folder holding the weights and their configs, with the resolved commit and hash.

    Raises:
        OvssError: gated or private repository without access, missing repository / revision / weights
            file, offline with nothing cached, or the Hub unreachable with nothing cached.
    """
    hub_id = parse_hub_id(name)
    reason = offline_reason(download)
    if reason is None:
        try:
            return _fetch(hub_id, name, kind, token, progress)
        except OvssError:
            raise
        except Exception as e:  # the Hub client's errors are many: HTTP, network, validation, parsing
            unreachable = _unreachable(e)
            if unreachable is None:
                raise _hub_error(e, hub_id, name, token) from e
            reason = unreachable  # no connection: fall back to the cache, as huggingface_hub does
    found = _from_cache(hub_id, name, kind)
    if found is not None:
        return found
    retry = "unset it" if reason.startswith("offline mode") else "check the connection (or HTTPS_PROXY) and retry"
    if reason.startswith("downloads disabled"):
        retry = "allow downloads (download=True, no --offline)"
    if advice is None:
        advice = (
            f"Run `ovss download {name}` where the Hub can be reached (then copy that cache folder here and point "
            f"HF_HUB_CACHE or HF_HOME at it), or {retry}."
        )
    raise OvssError(
        f"{_LABELS[kind]} '{name}' are not in the Hugging Face cache {hub_cache_dir()} and cannot be downloaded "
        f"({reason}). {advice}"
    )


def _fetch(hub_id: HubId, name: str, kind: str | None, token: str | None, progress: bool) -> HubWeights:
    """List the repository at the revision, pick the weights and download them with their configs."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    endpoint = hub_endpoint()
    info = HfApi(endpoint=endpoint).model_info(
        hub_id.repo_id, revision=hub_id.revision, files_metadata=True, token=token
    )
    present = {sibling.rfilename for sibling in info.siblings or ()}
    weights = next((f for f in WEIGHT_FILES[kind] if f in present), None)
    if weights is None:
        raise _no_weights(name, kind, sorted(present), f"commit {info.sha}")
    silence = not progress and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        for file in (weights, *(f for f in SIDE_FILES[kind] if f in present)):
            path = hf_hub_download(
                hub_id.repo_id,
                file,
                revision=hub_id.revision,
                cache_dir=hub_cache_dir(),
                token=token,
                endpoint=endpoint,
            )
    finally:
        if silence:
            enable_progress_bars()
    return _describe(hub_id, name, Path(str(path)).parent, weights)


def _from_cache(hub_id: HubId, name: str, kind: str | None) -> HubWeights | None:
    """The cached snapshot of the revision holding one of the weights files, or None."""
    from huggingface_hub import try_to_load_from_cache

    for file in WEIGHT_FILES[kind]:
        path = try_to_load_from_cache(hub_id.repo_id, file, cache_dir=hub_cache_dir(), revision=hub_id.revision)
        if isinstance(path, str):
            return _describe(hub_id, name, Path(path).parent, file)
    return None


def _describe(hub_id: HubId, name: str, folder: Path, file: str) -> HubWeights:
    """The record of a snapshot: its folder name is the commit; the blob's name is the file's ETag."""
    path = folder / file
    blob = Path(os.path.realpath(path)).name  # blobs/<etag>: the SHA-256 for LFS files, else the git blob id
    sha256 = blob if _SHA256.match(blob) else file_sha256(path)
    return HubWeights(
        name=name,
        repo_id=hub_id.repo_id,
        revision=hub_id.revision or "main",
        commit=folder.name,
        folder=folder,
        file=file,
        sha256=sha256,
        size=path.stat().st_size,
    )


def _no_weights(name: str, kind: str | None, present: list[str], where: str) -> OvssError:
    """No weights file of a layout ovss reads in the repository."""
    wanted = ", ".join(WEIGHT_FILES[kind])
    if any(f.endswith(".index.json") for f in present):
        problem = "holds a sharded checkpoint (*.index.json), which ovss does not read"
    else:
        shown = ", ".join(present[:8]) + (f" (+{len(present) - 8} more)" if len(present) > 8 else "")
        problem = f"holds none of {wanted} (it holds: {shown or 'no files'})"
    return OvssError(
        f"Hub repository '{name}' ({where}) {problem}; choose a repository in the Hugging Face (transformers) "
        "or OpenCLIP layout, or another revision"
    )


def _unreachable(error: Exception) -> str | None:
    """A short reason when ``error`` means the Hub could not be reached (no HTTP answer), else None."""
    from huggingface_hub.utils import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return "offline mode: HF_HUB_OFFLINE"
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        return f"the Hub answered HTTP {status}" if status is not None and status >= 500 else None
    module = type(error).__module__
    network = isinstance(error, (ConnectionError, TimeoutError))
    if network or module.startswith(("httpx", "httpcore", "requests", "urllib3")):
        return f"the Hub at {hub_endpoint()} could not be reached: {type(error).__name__}: {_first_line(error)}"
    return None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines or [""])[0][:200]


def _hub_error(error: Exception, hub_id: HubId, name: str, token: str | None) -> OvssError:
    """One line for an error of the Hub client: what was looked for, and how to fix it."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{hub_endpoint()}/{hub_id.repo_id}"
    sent = token is not None or get_token() is not None
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, GatedRepoError):
        if sent and status == 403:
            return OvssError(
                f"Hub repository '{hub_id.repo_id}' is gated and the token sent has no access to it: accept its "
                f"licence at {page} with the account of that token (access may need approval), or use another "
                f"token: {_HOW_TOKEN}"
            )
        return OvssError(
            f"Hub repository '{hub_id.repo_id}' is gated and no token with access was sent: accept its licence at "
            f"{page}, then {_HOW_TOKEN}"
        )
    if isinstance(error, RepositoryNotFoundError):
        private = (
            "or the token sent has no access to a private repository"
            if sent
            else f"or it is private and no token was sent ({_HOW_TOKEN})"
        )
        return OvssError(
            f"Hub repository '{hub_id.repo_id}' was not found at {hub_endpoint()} ({private}); check the name at {page}"
        )
    if isinstance(error, RevisionNotFoundError):
        return OvssError(
            f"Hub repository '{hub_id.repo_id}' has no revision '{hub_id.revision}' (a branch, tag or commit); "
            f"see {page}/tree/main for its branches and commits, or drop '@{hub_id.revision}' for main"
        )
    if isinstance(error, EntryNotFoundError):
        return OvssError(
            f"Hub repository '{name}' lacks a file ovss asked for ({_first_line(error)}); check the files at {page}"
        )
    if isinstance(error, HfHubHTTPError):
        return OvssError(f"the Hub refused '{name}' (HTTP {status}: {_first_line(error)}); check the id at {page}")
    return OvssError(f"'{name}' could not be fetched from the Hub ({type(error).__name__}: {_first_line(error)})")
