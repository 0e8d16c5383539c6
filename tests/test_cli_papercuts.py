"""The command line's papercuts (issue 21, item 8): closed pipes, download messages and leftovers, the
models listing, OVSS_BPE_PATH's documentation, and libpng / OpenCV lines on stderr."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import ovss
from ovss.cli.main import main
from ovss.storage import hub
from ovss.text import disk_cache
from ovss.text.embeddings import EmbeddingCache
from ovss.text.templates import IMAGENET_TEMPLATES_7
from ovss.text.tokenizer import load_tokenizer
from tiny import save_openai_jit, tiny_clip_state_dict

REPO = Path(__file__).resolve().parents[1]
SRC = Path(ovss.__file__).resolve().parents[1]  # the package under test, also in the subprocesses


@pytest.mark.parametrize("command", [["methods"], ["models"], ["cache", "info"]])
def test_a_closed_pipe_ends_a_listing_quietly(command: list[str]) -> None:
    # `ovss methods | head`: the reader is gone before the listing is written (a pipe whose read end is closed)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ovss", *command], stdout=write_end, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.stderr == "" and done.returncode == 141


def test_models_lists_whether_each_file_is_cached(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    cache = Path(os.environ["OVSS_CACHE"])
    cache.mkdir(parents=True, exist_ok=True)
    (cache / hub.REGISTRY["ViT-B/16"].filename).write_bytes(b"weights")
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("KIND"))
    column = header.index("CACHED")
    table = lines[lines.index(header) + 1 :]
    rows = {line.split()[1]: line for line in table[: table.index("")]}  # then the Hugging Face cache's repositories
    assert rows["ViT-B/16"][column:].split()[0] == "yes"
    assert rows["ViT-B/32"][column:].split()[0] == "no"
    assert set(rows) == set(hub.available_models())


def test_download_offline_says_how_to_get_the_files_not_to_run_itself(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("OVSS_OFFLINE", "1")
    assert main(["download", "ViT-B/16"]) == 2
    err = capsys.readouterr().err
    assert "Unset OVSS_OFFLINE" in err and hub.REGISTRY["ViT-B/16"].url in err
    assert "`ovss download ViT-B/16" not in err and "fills a cache folder" not in err
    assert len(err.splitlines()) == 1


def test_a_failed_download_leaves_no_folder_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def unreachable(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    cache = tmp_path / "new" / "cache"
    monkeypatch.setenv("OVSS_CACHE", str(cache))
    monkeypatch.delenv("OVSS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("urllib.request.urlopen", unreachable)
    assert main(["download", "ViT-B/16", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Check the network connection" in err and "fills a cache folder" not in err
    assert not (tmp_path / "new").exists()
    with pytest.raises(hub.OvssError, match="could not be downloaded"):
        hub.resolve("ViT-B/16", progress=False)
    assert not (tmp_path / "new").exists()


def test_a_failed_text_cache_write_leaves_no_empty_folder(bpe_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(tensors: dict, filename: str, metadata: dict) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    tower = torch.nn.Embedding(49408, 8)
    with pytest.warns(UserWarning, match="not cached on disk"):
        EmbeddingCache().get("m", lambda t: tower(t).sum(1), load_tokenizer(bpe_path), ["sky"], IMAGENET_TEMPLATES_7)
    assert not disk_cache.cache_folder().exists()
    assert not Path(os.environ["OVSS_CACHE"]).exists() or not any(Path(os.environ["OVSS_CACHE"]).iterdir())


def test_ovss_bpe_path_is_documented_where_the_tokenizer_flag_is(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    assert "OVSS_BPE_PATH" in " ".join(capsys.readouterr().out.split())
    readme = (REPO / "README.md").read_text()
    assert "OVSS_BPE_PATH" in readme


def _png_with_a_bad_text_chunk(path: Path) -> Path:
    """A valid PNG whose tEXt chunk fails its CRC: libpng warns on stderr and decodes the image."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "hello")
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    data = bytearray(buffer.getvalue())
    at = data.find(b"tEXt")
    length = int.from_bytes(data[at - 4 : at], "big")
    data[at + 4 + length] ^= 0xFF  # the CRC's first byte
    path.write_bytes(bytes(data))
    return path


def test_libpng_warnings_become_one_ovss_warning_naming_the_image(bpe_path: Path, tmp_path: Path, capfd) -> None:
    clip = save_openai_jit(tiny_clip_state_dict(seed=0), tmp_path / "tiny.pt")
    photo = _png_with_a_bad_text_chunk(tmp_path / "odd.png")
    args = ["segment", str(photo), "--labels", "cat, sofa", "--clip", str(clip), "--tokenizer", str(bpe_path)]
    args += ["--out", str(tmp_path / "out"), "--short-side", "32", "--crop", "32", "--stride", "16", "--no-progress"]
    assert main(args) == 0
    err = capfd.readouterr().err
    assert "libpng warning" not in err, err
    warned = [line for line in err.splitlines() if line.startswith("ovss: warning:")]
    assert len(warned) == 1 and "odd.png" in warned[0] and "tEXt: CRC error" in warned[0], warned


class _TerminalStderr(io.TextIOWrapper):
    """The process's stderr (descriptor 2), claiming to be a terminal, so that progress bars are drawn."""

    def isatty(self) -> bool:
        return True


def test_progress_bars_survive_the_capture_of_library_lines(
    bpe_path: Path, tmp_path: Path, capfd, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = save_openai_jit(tiny_clip_state_dict(seed=0), tmp_path / "tiny.pt")
    photo = _png_with_a_bad_text_chunk(tmp_path / "odd.png")
    monkeypatch.setattr(sys, "stderr", _TerminalStderr(io.FileIO(2, "w", closefd=False), line_buffering=True))
    args = ["segment", str(photo), "--labels", "cat, sofa", "--clip", str(clip), "--tokenizer", str(bpe_path)]
    assert main([*args, "--out", str(tmp_path / "out"), "--short-side", "64", "--crop", "32", "--stride", "16"]) == 0
    sys.stderr.flush()
    err = capfd.readouterr().err
    assert "win/s" in err and "Traceback" not in err  # the window bar was drawn, and closed without an error
    assert "odd.png' was read, but its decoder reported: tEXt: CRC error" in err and "libpng warning" not in err
