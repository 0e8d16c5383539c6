"""The persistent text-embedding cache: reuse across caches/segmenters, keys, switch, corruption, CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import ovss
from ovss.cli.main import main
from ovss.storage import file_cache
from ovss.text import disk_cache
from ovss.text.embeddings import EmbeddingCache, text_embeddings
from ovss.text.templates import IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_7, MASKCLIP_TEMPLATES
from ovss.text.tokenizer import Tokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
NAMES = ["sky", "potted plant", "person"]


class CountingTower:
    """A text tower stand-in: a fixed random map of the bag of token ids; counts calls and prompts."""

    def __init__(self, seed: int = 0) -> None:
        self.weight = torch.randn(49408, 8, generator=torch.Generator().manual_seed(seed))  # (V, E)
        self.calls = 0
        self.prompts = 0

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.prompts += tokens.shape[0]
        counts = torch.zeros(tokens.shape[0], 49408)  # (B, V)
        counts.scatter_add_(1, tokens, torch.ones(tokens.shape))
        counts[:, 0] = 0  # padding
        return counts @ self.weight  # (B, E)


@pytest.fixture(scope="module")
def tokenizer(bpe_path: Path) -> Tokenizer:
    return load_tokenizer(bpe_path)


def _cache_files() -> list[Path]:
    folder = disk_cache.cache_folder()
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_a_new_cache_reads_what_another_wrote(tokenizer: Tokenizer) -> None:
    first_tower = CountingTower()
    first = EmbeddingCache().get("m", first_tower, tokenizer, NAMES, IMAGENET_TEMPLATES_7)
    assert first_tower.prompts == 21
    files = _cache_files()
    assert len(files) == 1 and files[0].parent == Path(os.environ["OVSS_CACHE"]) / "text"

    tower = CountingTower()
    again = EmbeddingCache().get("m", tower, tokenizer, [NAMES[2], NAMES[0]], IMAGENET_TEMPLATES_7)
    assert tower.calls == 0  # a fresh in-memory cache (as in a new process): everything from disk
    assert torch.equal(again, first[[2, 0]])

    more = EmbeddingCache().get("m", tower, tokenizer, ["road", *NAMES], IMAGENET_TEMPLATES_7)
    assert tower.prompts == 7  # only "road" is encoded ...
    assert torch.equal(more[1:], first)
    expected = text_embeddings(CountingTower(), tokenizer, ["road"], IMAGENET_TEMPLATES_7)
    torch.testing.assert_close(more[:1], expected)
    meta = file_cache.read_metadata(files[0])
    assert json.loads(meta["names"]) == [*NAMES, "road"]  # ... and added to the same file


def test_the_key_is_model_templates_and_text_path_version(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = EmbeddingCache().get("m", CountingTower(), tokenizer, ["cat"], IMAGENET_TEMPLATES_7)
    for key, templates in [("other", IMAGENET_TEMPLATES_7), ("m", MASKCLIP_TEMPLATES), ("m", IMAGENET_TEMPLATES)]:
        tower = CountingTower(seed=1)
        other = EmbeddingCache().get(key, tower, tokenizer, ["cat"], templates)
        assert tower.prompts == len(templates) and not torch.allclose(other, base)
    reordered = list(IMAGENET_TEMPLATES_7)[::-1]  # other template text order: another file, same numbers
    tower = CountingTower()
    torch.testing.assert_close(EmbeddingCache().get("m", tower, tokenizer, ["cat"], reordered), base)
    assert tower.calls == 1 and len(_cache_files()) == 5
    monkeypatch.setattr(disk_cache, "TEXT_PATH_VERSION", disk_cache.TEXT_PATH_VERSION + 1)
    tower = CountingTower()
    EmbeddingCache().get("m", tower, tokenizer, ["cat"], IMAGENET_TEMPLATES_7)
    assert tower.calls == 1 and len(_cache_files()) == 6  # a newer text path never reads older files


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_switched_off_by_the_environment(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OVSS_TEXT_CACHE", value)
    EmbeddingCache().get("m", CountingTower(), tokenizer, NAMES, IMAGENET_TEMPLATES_7)
    tower = CountingTower()
    EmbeddingCache().get("m", tower, tokenizer, NAMES, IMAGENET_TEMPLATES_7)
    assert tower.prompts == 21 and _cache_files() == []
    EmbeddingCache(persistent=False).get("m", CountingTower(), tokenizer, NAMES, IMAGENET_TEMPLATES_7)
    monkeypatch.setenv("OVSS_TEXT_CACHE", "1")
    EmbeddingCache(persistent=False).get("m", CountingTower(), tokenizer, NAMES, IMAGENET_TEMPLATES_7)
    assert _cache_files() == []


def _write_corruptions(path: Path) -> list[bytes]:
    """Variants of a valid shard file's bytes that must all be rejected."""
    good = path.read_bytes()
    header_size = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + header_size])
    nan_data = bytearray(good)
    nan_data[8 + header_size : 8 + header_size + 4] = b"\x00\x00\xc0\x7f"  # first float: NaN
    foreign = dict(header)
    foreign["__metadata__"] = {**header["__metadata__"], "model": "another"}
    foreign_bytes = json.dumps(foreign).encode()
    return [
        b"",
        b"garbage that is not a safetensors file",
        good[: len(good) // 2],  # an interrupted copy
        bytes(nan_data),
        len(foreign_bytes).to_bytes(8, "little") + foreign_bytes + good[8 + header_size :],
    ]


def test_a_corrupt_file_is_ignored_with_a_warning_and_rewritten(tokenizer: Tokenizer) -> None:
    expected = EmbeddingCache().get("m", CountingTower(), tokenizer, NAMES, IMAGENET_TEMPLATES_7)
    (path,) = _cache_files()
    shard = disk_cache.TextEmbeddingShard("m", IMAGENET_TEMPLATES_7)
    for broken in _write_corruptions(path):
        path.write_bytes(broken)
        tower = CountingTower()
        with pytest.warns(UserWarning, match="ignoring the unreadable text-embedding cache file"):
            result = EmbeddingCache().get("m", tower, tokenizer, NAMES, IMAGENET_TEMPLATES_7)
        assert tower.prompts == 21 and torch.equal(result, expected)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a file still broken would warn
            stored = shard.load()  # rewritten whole
        assert list(stored) == NAMES and torch.equal(torch.stack([stored[n][0] for n in NAMES]), expected)
        assert _cache_files() == [path]  # no temporary file left
        path.write_bytes(broken)
        main(["cache", "info"])  # lists the broken file, does not fail


def test_an_unwritable_cache_warns_once_and_still_answers(tokenizer: Tokenizer) -> None:
    Path(os.environ["OVSS_CACHE"]).mkdir(parents=True, exist_ok=True)
    disk_cache.cache_folder().write_text("a file where the text folder should be")
    cache = EmbeddingCache()
    with pytest.warns(UserWarning, match="not cached on disk") as caught:
        first = cache.get("m", CountingTower(), tokenizer, NAMES[:1], IMAGENET_TEMPLATES_7)
        cache.get("m", CountingTower(), tokenizer, NAMES[1:], IMAGENET_TEMPLATES_7)
    assert len(caught) == 1
    torch.testing.assert_close(first, text_embeddings(CountingTower(), tokenizer, NAMES[:1], IMAGENET_TEMPLATES_7))


def test_an_interrupted_write_leaves_the_old_file(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    EmbeddingCache().get("m", CountingTower(), tokenizer, NAMES, IMAGENET_TEMPLATES_7)
    (path,) = _cache_files()
    good = path.read_bytes()

    def interrupted(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        EmbeddingCache().get("m", CountingTower(), tokenizer, ["road"], IMAGENET_TEMPLATES_7)
    assert _cache_files() == [path] and path.read_bytes() == good


def _add_names(folder: str, worker: int) -> None:
    shard = disk_cache.TextEmbeddingShard("m", ["a {}."], Path(folder))
    for i in range(15):
        shard.add({f"name {worker}-{i}": (torch.nn.functional.normalize(torch.randn(8), dim=0), False)})


def test_concurrent_writers_never_leave_a_broken_file(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_add_names, args=(str(tmp_path), w)) for w in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [process.exitcode for process in workers] == [0, 0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unreadable file would warn
        stored = disk_cache.TextEmbeddingShard("m", ["a {}."], tmp_path).load()
    assert {f"name {w}-14" for w in range(3)} & set(stored)  # the last write of some worker is there
    assert sorted(p.name for p in tmp_path.iterdir()) == [disk_cache.shard_name("m", ["a {}."])]


def test_truncation_warning_also_on_a_cache_hit(tokenizer: Tokenizer) -> None:
    long_name = "cat " * 80
    with pytest.warns(UserWarning, match="longer than CLIP's 77-token context"):
        EmbeddingCache().get("m", CountingTower(), tokenizer, ["dog", long_name], IMAGENET_TEMPLATES_7)
    tower = CountingTower()
    with pytest.warns(UserWarning, match="longer than CLIP's 77-token context") as caught:
        EmbeddingCache().get("m", tower, tokenizer, [long_name, "dog"], IMAGENET_TEMPLATES_7)
    assert tower.calls == 0 and len(caught) == 1


def test_a_second_segmenter_spends_no_time_on_text(tiny_clip, bpe_path: Path) -> None:
    calls: list[int] = []
    hook = tiny_clip.text.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        labels = ["sky", "road", "person", "pedestrian"]
        first = ovss.load("clearclip", clip=tiny_clip, tokenizer=bpe_path).encode_names(labels)
        assert sum(calls) == 4 * len(IMAGENET_TEMPLATES)
        calls.clear()
        second = ovss.load("clearclip", clip=tiny_clip, tokenizer=bpe_path).encode_names(labels[::-1])
        assert calls == []  # zero text-tower calls: every name came from the disk cache
        assert torch.equal(second, first.flip(0))
    finally:
        hook.remove()


def test_a_warm_cache_never_parses_the_vocabulary(
    tiny_clip, bpe_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ovss.text import tokenizer as tk

    labels = ["tree", "lamp post"]
    ovss.load("clearclip", clip=tiny_clip, tokenizer=bpe_path).encode_names(labels)  # fills the disk cache
    parsed: list[Path] = []
    real = tk.Tokenizer.from_bpe_file
    monkeypatch.setattr(tk.Tokenizer, "from_bpe_file", classmethod(lambda cls, p: parsed.append(p) or real(p)))
    tk._load_tokenizer_cached.cache_clear()  # as in a new process
    seg = ovss.load("clearclip", clip=tiny_clip, tokenizer=bpe_path)
    seg.encode_names(labels)
    assert parsed == []  # found and checked at load, never parsed: every name came from the disk cache
    seg.encode_names(["bench"])
    assert parsed == [bpe_path.resolve()]  # a new name parses it, once
    with pytest.raises(ovss.OvssError, match="holds neither vocab"):
        ovss.load("clearclip", clip=tiny_clip, tokenizer=tmp_path)  # an empty folder still fails at load
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ovss.OvssError, match="not a gzipped BPE file"):
        ovss.load("clearclip", clip=tiny_clip, tokenizer=tmp_path / "vocab.txt")


def test_cache_cli_info_and_clear(tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    EmbeddingCache().get("fingerprint:imagenet7", CountingTower(), tokenizer, NAMES, IMAGENET_TEMPLATES_7)
    EmbeddingCache().get("fingerprint:maskclip5", CountingTower(), tokenizer, NAMES[:1], MASKCLIP_TEMPLATES)
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(disk_cache.cache_folder()) in out and "(on, text path version 1)" in out
    assert "3 names x 7 templates  model fingerprint:imagenet7" in out
    assert "1 names x 5 templates  model fingerprint:maskclip5" in out and "2 files, 4 names" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 2 text-embedding cache files" in capsys.readouterr().out
    assert _cache_files() == []
    assert main(["cache", "info"]) == 0 and "0 files, 0 names" in capsys.readouterr().out


def test_cache_cli_does_not_import_torch() -> None:
    code = (
        "import sys; from ovss.cli.main import main; main(['cache', 'info']); main(['cache', 'clear']); "
        "print('torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
