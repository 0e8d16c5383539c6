"""The named-model hub: registry contents, cache folder, and checked downloads from a local HTTP server."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ovss.errors import OvssError
from ovss.models.formats import load_clip_state_dict
from ovss.storage import hub
from ovss.storage.hub import WeightsEntry, available_models, cache_dir, resolve
from tiny import save_openai_jit, tiny_clip_state_dict

PAYLOAD = bytes(range(256)) * 40  # 10 KiB served as "tiny.pt"
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class Server:
    root: Path  # folder served
    url: str  # http://127.0.0.1:PORT
    hits: list[str]  # request paths, in order


class _Handler(SimpleHTTPRequestHandler):
    hits: list[str]

    def do_GET(self) -> None:
        self.hits.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        return


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "tiny.pt").write_bytes(PAYLOAD)
    hits: list[str] = []
    handler = type("Handler", (_Handler,), {"hits": hits})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    try:
        yield Server(root, f"http://127.0.0.1:{httpd.server_address[1]}", hits)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder named by OVSS_CACHE, with offline switches cleared."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("OVSS_CACHE", str(folder))
    monkeypatch.delenv("OVSS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return folder


def register(monkeypatch: pytest.MonkeyPatch, url: str, sha256: str | None, name: str = "tiny") -> WeightsEntry:
    entry = replace(hub.REGISTRY["ViT-B/16"], name=name, url=url, sha256=sha256, filename="tiny.pt")
    monkeypatch.setitem(hub.REGISTRY, name, entry)
    return entry


def test_download_caches_verifies_and_reuses(
    server: Server, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    register(monkeypatch, f"{server.url}/tiny.pt", PAYLOAD_SHA)
    path = resolve("tiny", progress=True)
    assert path == cache / "tiny.pt"
    assert path.read_bytes() == PAYLOAD
    assert server.hits == ["/tiny.pt"]
    assert "tiny.pt" in capsys.readouterr().err  # tqdm bar on stderr
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.pt"]  # no temp file, no digest record
    assert resolve("tiny") == path
    assert resolve("tiny", download=False) == path
    assert server.hits == ["/tiny.pt"]  # later resolves do not touch the network


def test_checksum_mismatch_leaves_nothing_behind(server: Server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "0" * 64
    register(monkeypatch, f"{server.url}/tiny.pt", wrong)
    with pytest.raises(OvssError) as error:
        resolve("tiny", progress=False)
    assert f"has SHA-256 {PAYLOAD_SHA}, expected {wrong}" in str(error.value)
    assert not cache.exists()  # neither the partial file nor the folder the download created


def test_unknown_digest_is_recorded_then_enforced(server: Server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, f"{server.url}/tiny.pt", None)
    path = resolve("tiny", progress=False)
    record = cache / "tiny.pt.sha256"
    assert record.read_text().split() == [PAYLOAD_SHA, "tiny.pt"]
    assert resolve("tiny") == path and server.hits == ["/tiny.pt"]
    path.write_bytes(PAYLOAD[:-1] + b"x")  # the cached file changes behind our back
    with pytest.raises(OvssError, match=rf"cached file .*tiny\.pt for 'tiny' has SHA-256 \w+, expected {PAYLOAD_SHA}"):
        resolve("tiny")


def test_cached_file_with_wrong_registered_digest_is_refused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, "http://127.0.0.1:9/tiny.pt", PAYLOAD_SHA)
    cache.mkdir()
    (cache / "tiny.pt").write_bytes(b"something else")
    with pytest.raises(OvssError, match=r"delete it .* to download it again"):
        resolve("tiny")


def test_copied_in_file_is_used_offline(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, "http://127.0.0.1:9/tiny.pt", PAYLOAD_SHA)
    monkeypatch.setenv("OVSS_OFFLINE", "1")
    cache.mkdir()
    (cache / "tiny.pt").write_bytes(PAYLOAD)
    assert resolve("tiny") == cache / "tiny.pt"
    assert not (cache / "tiny.pt.sha256").exists()  # a registered digest needs no record
    register(monkeypatch, "http://127.0.0.1:9/tiny.pt", None)
    assert resolve("tiny") == cache / "tiny.pt"
    assert (cache / "tiny.pt.sha256").read_text().split()[0] == PAYLOAD_SHA  # trusted on first use


@pytest.mark.parametrize("variable", ["OVSS_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_mode_names_file_cache_and_flag(
    variable: str, server: Server, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(monkeypatch, f"{server.url}/tiny.pt", PAYLOAD_SHA)
    monkeypatch.setenv(variable, "1")
    monkeypatch.delenv("OVSS_BPE_PATH", raising=False)
    with pytest.raises(OvssError) as error:
        resolve("tiny")
    message = str(error.value)
    bpe = hub.REGISTRY["clip-bpe"]
    assert message == (
        f"CLIP weights 'tiny' are not cached at {cache / 'tiny.pt'} and could not be downloaded "
        f"(offline mode: {variable}=1). Needed: tiny.pt <- {server.url}/tiny.pt (SHA-256 {PAYLOAD_SHA}); "
        f"{bpe.filename} <- {bpe.url} (SHA-256 {bpe.sha256}). Fetch them elsewhere (`ovss download tiny` fills "
        f"a cache folder) and copy them to {cache}, supply a local file with --clip PATH (or clip=PATH), or set "
        "OVSS_CACHE to a folder that holds them."
    )
    assert "\n" not in message
    cache.mkdir()
    (cache / bpe.filename).write_bytes(b"cached vocabulary")  # a cached vocabulary is not listed again
    with pytest.raises(OvssError, match=r"Needed: tiny.pt <- \S+ \(SHA-256 [0-9a-f]{64}\)\. Fetch it elsewhere"):
        resolve("tiny")
    assert server.hits == []


def test_network_failures_become_clear_errors(server: Server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, f"{server.url}/missing.pt", PAYLOAD_SHA)
    with pytest.raises(
        OvssError, match=r"could not be downloaded \(HTTP 404 .*\)\. Needed: .*supply a local file with --clip"
    ):
        resolve("tiny", progress=False)
    with pytest.raises(OvssError, match=r"could not be downloaded \(downloads disabled"):
        resolve("tiny", download=False)
    assert not cache.exists()


def test_vfm_and_tokenizer_messages_name_their_flags(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVSS_OFFLINE", "1")
    with pytest.raises(OvssError, match=r"^VFM weights 'dino-vitb8' are not cached .*--vfm PATH \(or vfm=PATH\)"):
        resolve("dino-vitb8", kind="vfm")
    with pytest.raises(OvssError, match=r"^Tokenizer vocabulary 'clip-bpe' is not cached .*OVSS_BPE_PATH=PATH"):
        resolve("clip-bpe", kind="tokenizer")


def test_real_bpe_vocabulary_downloads_with_its_registered_digest(
    server: Server, cache: Path, assets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "bpe_simple_vocab_16e6.txt.gz"
    (server.root / name).write_bytes((assets_dir / "clip-bpe-vocab" / name).read_bytes())
    entry = hub.REGISTRY["clip-bpe"]
    monkeypatch.setitem(hub.REGISTRY, "clip-bpe", replace(entry, url=f"{server.url}/{name}"))
    path = resolve("clip-bpe", kind="tokenizer", progress=False)
    assert path == cache / entry.filename
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256


def test_downloaded_checkpoint_loads(server: Server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = tiny_clip_state_dict(vocab_size=100)
    served = save_openai_jit(sd, server.root / "ViT-tiny.pt")
    register(monkeypatch, f"{server.url}/ViT-tiny.pt", hashlib.sha256(served.read_bytes()).hexdigest())
    loaded, info = load_clip_state_dict(resolve("tiny", progress=False))
    assert info.format == "openai-jit" and info.act == "quick_gelu"
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_cache_dir_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OVSS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "ovss"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "ovss"
    monkeypatch.setenv("OVSS_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_existing_paths_are_returned_as_is(tmp_path: Path) -> None:
    weights = tmp_path / "my weights.pt"
    weights.write_bytes(b"x")
    assert resolve(str(weights)) == weights
    assert resolve(str(tmp_path), kind="vfm") == tmp_path


def test_unknown_name_lists_available_names_closest_first() -> None:
    with pytest.raises(OvssError) as error:
        resolve("ViT-B/61")
    message = str(error.value)
    assert "'ViT-B/61' is neither an existing path nor a registered name" in message
    listed = message.split("available (closest first): ")[1].split(", ")
    assert sorted(listed) == sorted(available_models("clip"))
    assert listed[0] == "ViT-B/16"
    with pytest.raises(OvssError, match=r"'dino-vitb8' names VFM weights, not CLIP weights"):
        resolve("dino-vitb8")
    with pytest.raises(OvssError, match=r"unknown kind 'sam2'"):
        available_models("sam2")


def test_registry_contents() -> None:
    clip = available_models("clip")
    assert clip[:4] == ["ViT-B/16", "ViT-B/32", "ViT-L/14", "ViT-L/14@336px"]
    assert hub.DEFAULT_CLIP == "ViT-B/16" and hub.DEFAULT_VFM == "dino-vitb8"
    assert {
        "ViT-B-16/laion2b_s34b_b88k",
        "ViT-B-16-quickgelu/metaclip_400m",
        "ViT-L-14/laion2b_s32b_b82k",
    } <= set(clip)
    assert set(available_models("vfm")) == {
        "dino-vitb8",
        "dino-vitb16",
        "dino-vits8",
        "dino-vits16",
        "dinov2-vitb14-reg",
        "dinov2-vitl14-reg",
        "dinov3_vitb16",
    }
    assert available_models("tokenizer") == ["clip-bpe"]
    assert available_models() == list(hub.REGISTRY)
    entries = list(hub.REGISTRY.values())
    assert len({e.filename for e in entries}) == len(entries)  # one cache folder, no collisions
    for entry in entries:  # the architecture facts the weights cannot tell are registered
        assert (entry.heads is None) == (entry.kind == "tokenizer"), entry.name
    assert hub.REGISTRY["ViT-L/14"].heads == (16, 12) and hub.REGISTRY["dino-vits8"].heads == (6, 0)
    for entry in entries:
        assert entry.kind in hub.KINDS and entry.url.startswith("https://")
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        if entry.format == "openai-jit":  # openai/CLIP checks the hex path component of the URL
            assert entry.sha256 == entry.url.split("/")[-2] and entry.act == "quick_gelu"
    assert hub.REGISTRY["ViT-B/16"].url.endswith(
        "/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt"
    )
    assert hub.REGISTRY["ViT-B-16/laion2b_s34b_b88k"].act == "gelu"
    assert hub.REGISTRY["ViT-L-14/laion2b_s32b_b82k"].mean == (0.5, 0.5, 0.5)
    assert hub.REGISTRY["ViT-B-16-quickgelu/metaclip_400m"].act == "quick_gelu"
    assert hub.REGISTRY["dino-vitb8"].url == (
        "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"
    )


def test_registered_bpe_digest_matches_the_shared_asset(assets_dir: Path) -> None:
    data = (assets_dir / "clip-bpe-vocab" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    assert hashlib.sha256(data).hexdigest() == hub.REGISTRY["clip-bpe"].sha256


def test_download_command_fills_a_cache_with_weights_and_vocabulary(
    server: Server, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ovss.cli.main import main

    monkeypatch.delenv("OVSS_BPE_PATH", raising=False)
    register(monkeypatch, f"{server.url}/tiny.pt", None)
    vocab = b"not really a vocabulary"
    (server.root / "vocab.gz").write_bytes(vocab)
    bpe = replace(hub.REGISTRY["clip-bpe"], url=f"{server.url}/vocab.gz", sha256=hashlib.sha256(vocab).hexdigest())
    monkeypatch.setitem(hub.REGISTRY, "clip-bpe", bpe)
    target = tmp_path / "for-the-cluster"
    assert main(["download", "tiny", "--cache", str(target), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert sorted(server.hits) == ["/tiny.pt", "/vocab.gz"]
    assert (target / "tiny.pt").read_bytes() == PAYLOAD and (target / bpe.filename).read_bytes() == vocab
    assert f"tiny: {target / 'tiny.pt'} (SHA-256 {PAYLOAD_SHA})" in out
    assert not cache.exists()  # the usual cache was not touched
    # offline, with the copied folder as cache, everything resolves without the network
    monkeypatch.setenv("OVSS_CACHE", str(target))
    monkeypatch.setenv("OVSS_OFFLINE", "1")
    assert resolve("tiny") == target / "tiny.pt" and resolve("clip-bpe", kind="tokenizer") == target / bpe.filename
    assert main(["download", "nope"]) == 2
    assert "'nope' is not a registered name" in capsys.readouterr().err
    assert len(server.hits) == 2


def test_load_resolves_the_vocabulary_before_any_image(tiny_clip, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ovss

    monkeypatch.delenv("OVSS_BPE_PATH", raising=False)
    monkeypatch.setenv("OVSS_OFFLINE", "1")
    bpe = hub.REGISTRY["clip-bpe"]
    with pytest.raises(OvssError, match=rf"^Tokenizer vocabulary 'clip-bpe' is not cached .*{bpe.sha256}"):
        ovss.load("clearclip", clip=tiny_clip)


def test_load_offline_names_every_missing_file_at_once(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """proxyclip+gla offline with an empty cache: CLIP weights, vocabulary and DINO in one line, before loading."""
    import ovss

    monkeypatch.delenv("OVSS_BPE_PATH", raising=False)
    monkeypatch.setenv("OVSS_OFFLINE", "1")
    with pytest.raises(OvssError) as error:
        ovss.load("proxyclip+gla")
    message = str(error.value)
    for name in ("ViT-B/16", "clip-bpe", "dino-vitb8"):
        entry = hub.REGISTRY[name]
        assert f"{entry.filename} <- {entry.url}" in message
        assert entry.sha256 is None or entry.sha256 in message
    assert message.startswith("3 file(s) needed") and "\n" not in message
    assert "ovss download ViT-B/16 clip-bpe dino-vitb8 --cache DIR" in message
    cache.mkdir()
    (cache / hub.REGISTRY["clip-bpe"].filename).write_bytes(b"cached")  # a cached file is not listed
    with pytest.raises(OvssError, match=r"^2 file\(s\) needed"):
        ovss.load("proxyclip+gla")
    with pytest.raises(OvssError, match=r"^1 file\(s\) needed .*dino"):  # a given CLIP still needs DINO
        ovss.load("proxyclip", clip=str(cache / hub.REGISTRY["clip-bpe"].filename), tokenizer="x")


def test_download_of_a_method_fetches_the_weights_it_asks_for(
    server: Server, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ovss download trident`` = CLIP's default + Trident's own VFM and SAM (MethodSpec.weights), nothing else."""
    from ovss.cli.main import main

    fetched: list[str] = []
    monkeypatch.setattr(hub, "resolve", lambda name, **kw: fetched.append(name) or cache / name.replace("/", "_"))
    monkeypatch.setattr(hub, "recorded_digest", lambda path: "x")
    assert main(["download", "trident", "--quiet"]) == 0
    assert fetched == ["ViT-B/16", "clip-bpe", "dino-vitb16", "sam-vitb"]
    assert main(["download", "proxyclip+gla", "--quiet"]) == 0
    assert fetched[4:] == ["ViT-B/16", "clip-bpe", "dino-vitb8"]
