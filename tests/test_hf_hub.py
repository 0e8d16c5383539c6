"""``hf-hub:ORG/NAME[@REVISION]`` ids against a local stand-in for the Hub (tests/hub_server.py, no network).

What is fetched (only the weights file the loaders read and its configs, into the standard Hugging Face cache),
the revision pin, the cache-only modes (HF_HUB_OFFLINE, OVSS_OFFLINE, download=False, an unreachable Hub),
tokens (HF_TOKEN, an explicit token, the token never sent to the storage host), the one-line errors (gated,
private, missing repository / revision / weights), and the commands ``ovss download`` and ``ovss models``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants, hf_hub_download

from hub_env import use_fake_hub
from hub_repos import (
    CLIP_HF,
    DINOV2,
    DINOV3,
    GOOD_TOKEN,
    NO_WEIGHTS,
    OPEN_CLIP,
    PRIVATE,
    PRIVATE_TOKEN,
    SAM,
    SHARDED,
    build_hub,
    models,
)
from hub_server import FakeHub
from ovss.cli.main import main
from ovss.errors import OvssError
from ovss.storage import hub as registry
from ovss.storage.hf_hub import SIDE_FILES, WEIGHT_FILES, parse_hub_id, resolve_hub


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    server = build_hub(**models())  # type: ignore[arg-type]
    yield server
    server.stop()


@pytest.fixture
def cache(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return use_fake_hub(monkeypatch, hub, tmp_path)


def _served(hub: FakeHub, repo_id: str, name: str, revision: str = "main") -> bytes:
    tree = hub.repos[repo_id].tree(revision)
    assert tree is not None
    return tree[1][name]


def test_ids_are_parsed_and_bad_ids_fail_in_one_line() -> None:
    assert parse_hub_id("hf-hub:org/name").repo_id == "org/name"
    assert parse_hub_id("hf-hub:org/name").revision is None
    pinned = parse_hub_id("hf-hub:org/name@v1.0")
    assert (pinned.repo_id, pinned.revision, pinned.name) == ("org/name", "v1.0", "hf-hub:org/name@v1.0")
    with pytest.raises(OvssError, match="does not name a Hub repository; write hf-hub:ORG/NAME"):
        parse_hub_id("hf-hub:just-a-name")
    with pytest.raises(OvssError, match="empty revision after '@'"):
        parse_hub_id("hf-hub:org/name@")
    with pytest.raises(OvssError, match="not a valid Hub repository id"):
        parse_hub_id("hf-hub:org/na me")


def test_only_the_files_the_loader_reads_are_fetched_into_the_hf_cache(hub: FakeHub, cache: Path) -> None:
    got = resolve_hub(f"hf-hub:{CLIP_HF}", "clip")
    commit = hub.repos[CLIP_HF].refs["main"]
    assert got.folder == cache / "models--openai--clip-vit-base-patch16" / "snapshots" / commit
    assert (got.commit, got.file, got.revision) == (commit, "model.safetensors", "main")
    fetched = sorted(p.name for p in got.folder.iterdir())
    assert fetched == ["config.json", "merges.txt", "model.safetensors", "preprocessor_config.json", "vocab.json"]
    served = _served(hub, CLIP_HF, "model.safetensors")
    assert got.sha256 == hashlib.sha256(served).hexdigest() and got.size == len(served)
    assert (got.folder / "model.safetensors").read_bytes() == served  # through the 302 to the storage host
    record = got.record("clip")
    assert record == {
        "clip": f"hf-hub:{CLIP_HF}",
        "clip_path": str(got.folder),
        "clip_revision": commit,
        "clip_file": "model.safetensors",
        "clip_sha256": got.sha256,
    }


def test_each_kind_looks_for_its_layouts(hub: FakeHub, cache: Path) -> None:
    assert resolve_hub(f"hf-hub:{OPEN_CLIP}", "clip").file == "open_clip_model.safetensors"
    assert sorted(p.name for p in resolve_hub(f"hf-hub:{OPEN_CLIP}", "clip").folder.iterdir()) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    assert resolve_hub(f"hf-hub:{SAM}", "sam").file == "model.safetensors"
    assert sorted(p.name for p in resolve_hub(f"hf-hub:{DINOV2}", "vfm").folder.iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    with pytest.raises(OvssError, match=r"holds none of model.safetensors, pytorch_model.bin \(it holds: "):
        resolve_hub(f"hf-hub:{OPEN_CLIP}", "vfm")  # OpenCLIP files are CLIP weights only


def test_the_file_lists_are_the_loaders_folder_orders() -> None:
    from ovss.models import dino, formats
    from ovss.models.sam import loader

    assert WEIGHT_FILES["clip"] == formats._FOLDER_FILES
    assert WEIGHT_FILES["vfm"] == dino._FOLDER_FILES and WEIGHT_FILES["sam"] == loader._FOLDER_FILES
    assert set(SIDE_FILES["vfm"]) <= set(SIDE_FILES["clip"])


def test_a_pinned_revision_selects_the_old_commit(hub: FakeHub, cache: Path) -> None:
    repo = hub.repos[DINOV3]
    old, new = repo.refs["v1.0"], repo.refs["main"]
    assert old != new
    by_tag = resolve_hub(f"hf-hub:{DINOV3}@v1.0", "vfm", token=GOOD_TOKEN)
    by_sha = resolve_hub(f"hf-hub:{DINOV3}@{old}", "vfm", token=GOOD_TOKEN)
    latest = resolve_hub(f"hf-hub:{DINOV3}", "vfm", token=GOOD_TOKEN)
    assert by_tag.commit == by_sha.commit == old and by_tag.revision == "v1.0" and latest.commit == new
    assert by_tag.sha256 == hashlib.sha256(_served(hub, DINOV3, "model.safetensors", "v1.0")).hexdigest()
    assert by_tag.sha256 != latest.sha256
    assert (by_tag.folder / "model.safetensors").read_bytes() == _served(hub, DINOV3, "model.safetensors", old)


def test_gated_repository_without_access_names_the_licence_page_and_the_token(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = f"{hub.url}/{DINOV3}"
    with pytest.raises(OvssError) as no_token:
        resolve_hub(f"hf-hub:{DINOV3}", "vfm")
    message = str(no_token.value)
    assert "\n" not in message and f"'{DINOV3}' is gated" in message and page in message
    assert "HF_TOKEN=" in message and "hf auth login" in message
    monkeypatch.setenv("HF_TOKEN", "hf_someone_else")
    with pytest.raises(OvssError, match=r"the token sent has no access to it: accept its licence at") as refused:
        resolve_hub(f"hf-hub:{DINOV3}", "vfm")
    assert page in str(refused.value)
    assert not any(cache.glob("models--facebook--dinov3*/snapshots/*/*"))


def test_tokens_reach_the_hub_but_never_the_storage_host(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = len(hub.requests)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)  # as after `hf auth login` or `export HF_TOKEN=...`
    assert resolve_hub(f"hf-hub:{DINOV3}", "vfm").file == "model.safetensors"
    sent = hub.requests[start:]
    assert any(path.startswith(f"/{DINOV3}/resolve/") and auth == f"Bearer {GOOD_TOKEN}" for _, path, auth in sent)
    assert [auth for _, path, auth in sent if path.startswith("/cdn/")] == [None]
    monkeypatch.delenv("HF_TOKEN")
    start = len(hub.requests)
    assert resolve_hub(f"hf-hub:{PRIVATE}", "clip", token=PRIVATE_TOKEN).file == "model.safetensors"  # explicit
    assert {auth for _, path, auth in hub.requests[start:] if not path.startswith("/cdn/")} == {
        f"Bearer {PRIVATE_TOKEN}"
    }


def test_private_or_missing_repository_revision_and_weights_are_one_line(hub: FakeHub, cache: Path) -> None:
    with pytest.raises(OvssError, match=rf"'{PRIVATE}' was not found at .*or it is private and no token was sent"):
        resolve_hub(f"hf-hub:{PRIVATE}", "clip")
    with pytest.raises(OvssError, match=r"'nobody/nothing' was not found at .* check the name at"):
        resolve_hub("hf-hub:nobody/nothing", "clip")
    with pytest.raises(OvssError, match=rf"'{CLIP_HF}' has no revision 'v9' \(a branch, tag or commit\)"):
        resolve_hub(f"hf-hub:{CLIP_HF}@v9", "clip")
    with pytest.raises(OvssError, match=r"holds none of model.safetensors, pytorch_model.bin \(it holds: README"):
        resolve_hub(f"hf-hub:{NO_WEIGHTS}", "sam")
    with pytest.raises(OvssError, match=r"holds a sharded checkpoint"):
        resolve_hub(f"hf-hub:{SHARDED}", "vfm")


def test_offline_switches_read_the_cache_without_a_request(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = resolve_hub(f"hf-hub:{DINOV2}", "vfm")
    pinned = resolve_hub(f"hf-hub:{DINOV3}@v1.0", "vfm", token=GOOD_TOKEN)
    start = len(hub.requests)
    assert resolve_hub(f"hf-hub:{DINOV2}", "vfm", download=False) == first
    for var in ("HF_HUB_OFFLINE", "OVSS_OFFLINE"):
        with monkeypatch.context() as env:
            env.setenv(var, "1")
            assert resolve_hub(f"hf-hub:{DINOV2}", "vfm") == first
            assert resolve_hub(f"hf-hub:{DINOV3}@v1.0", "vfm") == pinned  # no token needed for the cache
            with pytest.raises(OvssError, match=rf"not in the Hugging Face cache .*\(offline mode: {var}=1\)"):
                resolve_hub(f"hf-hub:{SAM}", "sam")
    with monkeypatch.context() as env:  # set before huggingface_hub was imported
        env.setattr(constants, "HF_HUB_OFFLINE", True)
        assert resolve_hub(f"hf-hub:{DINOV2}", "vfm") == first
    assert hub.requests[start:] == []
    with pytest.raises(OvssError, match=rf"Run `ovss download hf-hub:{SAM}` where the Hub can be reached"):
        resolve_hub(f"hf-hub:{SAM}", "sam", download=False)


def test_an_unreachable_hub_falls_back_to_the_cache(hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = resolve_hub(f"hf-hub:{DINOV2}", "vfm")
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    assert resolve_hub(f"hf-hub:{DINOV2}", "vfm") == first
    with pytest.raises(OvssError, match=rf"cannot be downloaded \(the Hub at {dead} could not be reached"):
        resolve_hub(f"hf-hub:{SAM}", "sam")


def test_ovss_download_with_the_hub_unreachable_does_not_say_run_ovss_download(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    assert main(["download", f"hf-hub:{SAM}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the Hub at {dead} could not be reached" in err and "HTTPS_PROXY" in err
    assert "ovss download" not in err and "Traceback" not in err


def test_the_registry_resolver_passes_hub_ids_on(hub: FakeHub, cache: Path) -> None:
    assert registry.resolve(f"hf-hub:{SAM}", kind="sam") == resolve_hub(f"hf-hub:{SAM}", "sam").folder
    with pytest.raises(OvssError, match="is a Hub repository, not a vocabulary file"):
        registry.resolve(f"hf-hub:{CLIP_HF}", kind="tokenizer")
    with pytest.raises(OvssError, match="'ViT-B/16' are not cached at"):
        registry.resolve("ViT-B/16", kind="clip", download=False)  # registry names still go to the ovss cache


def test_ovss_download_fetches_a_hub_repository(hub: FakeHub, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download", f"hf-hub:{SAM}", f"hf-hub:{OPEN_CLIP}", "--quiet"]) == 0
    out = capsys.readouterr().out
    commit = hub.repos[SAM].refs["main"]
    sha = hashlib.sha256(_served(hub, SAM, "model.safetensors")).hexdigest()
    assert f"hf-hub:{SAM}: {cache / 'models--facebook--sam-vit-base' / 'snapshots' / commit}" in out
    assert f"revision {commit}" in out and f"model.safetensors SHA-256 {sha}" in out
    assert "open_clip_model.safetensors" in out and f"Hugging Face cache: {cache}" in out
    assert main(["download", f"hf-hub:{DINOV3}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is gated" in err and "HF_TOKEN" in err and "Traceback" not in err


def test_ovss_download_offline_names_the_fix(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", f"hf-hub:{SAM}"]) == 2
    err = capsys.readouterr().err
    assert "needs network access" in err and "HF_HUB_OFFLINE" in err and f"hf-hub:{SAM}" in err


def test_ovss_models_lists_the_usable_repositories_of_the_hf_cache(
    hub: FakeHub, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models"]) == 0
    assert f"Hugging Face cache: {cache}" in capsys.readouterr().out  # an empty cache is listed as such
    resolve_hub(f"hf-hub:{SAM}", "sam")
    resolve_hub(f"hf-hub:{OPEN_CLIP}", "clip")
    resolve_hub(f"hf-hub:{DINOV3}@v1.0", "vfm", token=GOOD_TOKEN)
    resolve_hub(f"hf-hub:{DINOV2}", "vfm")
    hf_hub_download(NO_WEIGHTS, "config.json", cache_dir=cache)  # a cached repository without weights: not listed
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines()]
    rows = {row[1]: row for row in table if len(row) > 2 and row[1].startswith("hf-hub:")}
    main_of = {repo: hub.repos[repo].refs["main"][:12] for repo in (DINOV2, OPEN_CLIP, SAM)}
    assert {name: row[:3] for name, row in rows.items()} == {
        f"hf-hub:{DINOV2}": ["vfm", f"hf-hub:{DINOV2}", main_of[DINOV2]],
        f"hf-hub:{DINOV3}@v1.0": ["vfm", f"hf-hub:{DINOV3}@v1.0", hub.repos[DINOV3].refs["v1.0"][:12]],
        f"hf-hub:{OPEN_CLIP}": ["clip", f"hf-hub:{OPEN_CLIP}", main_of[OPEN_CLIP]],
        f"hf-hub:{SAM}": ["sam", f"hf-hub:{SAM}", main_of[SAM]],
    }
    assert rows[f"hf-hub:{SAM}"][-2:] == ["MiB", "model.safetensors"]
    assert rows[f"hf-hub:{OPEN_CLIP}"][-1] == "open_clip_model.safetensors"


def test_every_hub_counterpart_names_a_registry_entry_and_parses() -> None:
    from ovss.storage.weights import HUB_IDS, REGISTRY

    assert set(HUB_IDS) <= set(REGISTRY) and "clip-bpe" not in HUB_IDS
    assert HUB_IDS["ViT-B/16"] == f"hf-hub:{CLIP_HF}" and HUB_IDS["dinov3_vitb16"] == f"hf-hub:{DINOV3}"
    assert HUB_IDS["sam-vitb"] == f"hf-hub:{SAM}" and HUB_IDS["ViT-B-16/laion2b_s34b_b88k"] == f"hf-hub:{OPEN_CLIP}"
    for hub_id in HUB_IDS.values():
        assert parse_hub_id(hub_id).revision is None
