"""``ovss download NAME...``: fill the cache with registered weights (and the BPE vocabulary) for offline use."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ovss.errors import OvssError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "download",
        help="download named weights (and the CLIP vocabulary) into the cache, for machines without internet",
        description=(
            "Download registered files into the cache folder ($OVSS_CACHE, else $XDG_CACHE_HOME/ovss, else "
            "~/.cache/ovss), checking their SHA-256. CLIP names bring the BPE vocabulary with them. Copy the "
            "folder to an offline machine and point OVSS_CACHE at it. Hub ids (hf-hub:ORG/NAME, optionally "
            "@REVISION) go into the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub), shared with "
            "transformers: only the weights file ovss reads and its configs are fetched. Gated or private "
            "repositories need a token: HF_TOKEN=hf_... in the environment, or `hf auth login` once."
        ),
    )
    p.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        help="registered weights, e.g. ViT-B/16 dino-vitb8 (see: ovss models), Hugging Face Hub ids, e.g. "
        "hf-hub:facebook/dinov3-vitb16-pretrain-lvd1689m, or methods, e.g. trident: the weights the method "
        "loads by default (see: ovss methods)",
    )
    p.add_argument(
        "--cache",
        metavar="DIR",
        help="cache folder to fill with registered files (default: the usual cache folder); Hub ids go to the "
        "Hugging Face cache (set HF_HUB_CACHE to choose it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=download)


def download(args: argparse.Namespace) -> int:
    """Resolve every file the names need (all names are checked before anything is downloaded)."""
    from ovss.methods.registry import available_methods, needed_weights
    from ovss.storage import hub
    from ovss.storage.hf_hub import is_hub_id, parse_hub_id

    hub_ids = [parse_hub_id(name).name for name in args.names if is_hub_id(name)]  # malformed ids fail here
    names: list[str] = []
    for name in (n for n in args.names if not is_hub_id(n)):  # a method: the weights it asks for by default
        names += needed_weights([name]) if name in available_methods() and name not in hub.REGISTRY else [name]
    files: dict[str, hub.WeightsEntry] = {}
    for name in dict.fromkeys(names):
        files.update({e.name: e for e in hub.needed_files(name)})  # unknown names fail here, first
    folder = Path(args.cache).expanduser() if args.cache else hub.cache_dir()
    missing = [entry for entry in files.values() if not (folder / entry.filename).is_file()]
    by_hand = "; ".join(hub.describe_file(entry) for entry in missing)
    reason = hub.offline_reason(True)
    if missing and reason is not None:  # `ovss download` must not tell the user to run `ovss download`
        switches = " and ".join(var for var in ("OVSS_OFFLINE", "HF_HUB_OFFLINE") if var in reason) or "it"
        raise OvssError(
            f"`ovss download` needs network access, but downloads are off ({reason}): "
            f"{'; '.join(hub.describe_missing(entry, folder) for entry in missing)}. Unset {switches} for this "
            f"command, fetch the file(s) by hand into {folder} ({by_hand}), or skip the download and supply "
            f"local files with {hub.local_file_flags(missing)}"
        )
    advice = (
        "Check the network connection (behind a proxy, set HTTPS_PROXY) and run the command again, or fetch "
        f"the file by hand (URL and SHA-256 above) into {folder}."
    )
    _check_hub_online(hub_ids)
    for entry in files.values():
        path = hub.resolve(entry.name, kind=entry.kind, progress=not args.quiet, cache=args.cache, advice=advice)
        digest = entry.sha256 or hub.recorded_digest(path)
        print(f"{entry.name}: {path} (SHA-256 {digest})")
    if files:
        print(f"cache: {folder} (offline, point OVSS_CACHE at a copy of it)")
    if hub_ids:
        _download_hub(hub_ids, progress=not args.quiet)
    return 0


def _check_hub_online(names: list[str]) -> None:
    """Offline, every Hub id must already be in the Hugging Face cache (else one line saying how to fetch it)."""
    from ovss.storage.hf_hub import hub_cache_dir, offline_reason, resolve_hub

    reason = offline_reason(True)
    if reason is None:
        return
    missing = []
    for name in names:
        try:
            resolve_hub(name, download=False)
        except OvssError:
            missing.append(name)
    if missing:
        raise OvssError(
            f"`ovss download` needs network access, but downloads are off ({reason}): {', '.join(missing)} "
            f"not in the Hugging Face cache {hub_cache_dir()}. Unset OVSS_OFFLINE / HF_HUB_OFFLINE for this "
            "command, or run it where the Hub can be reached and copy that cache folder here"
        )


def _download_hub(names: list[str], progress: bool) -> None:
    """Fetch each Hub repository's weights and configs into the Hugging Face cache; one line each."""
    from ovss.storage.hf_cache import detect_kind
    from ovss.storage.hf_hub import hub_cache_dir, resolve_hub

    for name in names:
        advice = (  # `ovss download` must not tell the user to run `ovss download`
            "Check the connection (behind a proxy, set HTTPS_PROXY) and run the command again, or run it where the "
            "Hub can be reached and copy that cache folder here (point HF_HUB_CACHE or HF_HOME at it)."
        )
        got = resolve_hub(name, progress=progress, advice=advice)
        kind = detect_kind(got.folder) or "unknown kind"
        print(f"{name}: {got.folder} (revision {got.commit}, {got.file} SHA-256 {got.sha256}, {kind})")
    print(
        f"Hugging Face cache: {hub_cache_dir()} (shared with transformers; offline, set HF_HUB_CACHE to a copy "
        "of it and HF_HUB_OFFLINE=1)"
    )
