"""Prepared fp32 copies of TorchScript checkpoints: same tensors as the archive, reused, refreshed, switchable."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from ovss.cli.main import main
from ovss.models import prepared
from ovss.models.formats import load_clip_state_dict
from tiny import save_openai_jit, tiny_clip_state_dict


@pytest.fixture()
def archive(tmp_path: Path) -> Path:
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in tiny_clip_state_dict(seed=3).items()}
    return save_openai_jit(sd, tmp_path / "tiny-fp16.pt")  # fp16 like OpenAI's ViT-B-16.pt


@pytest.fixture()
def jit_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda path, *a, **k: calls.append(str(path)) or real(path, *a, **k))
    return calls


def _reference(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated
        sd = torch.jit.load(str(path)).state_dict()
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _prepared_files() -> list[Path]:
    folder = prepared.cache_folder()
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def test_the_second_load_reads_the_prepared_copy(archive: Path, jit_loads: list[str]) -> None:
    expected = _reference(archive)
    jit_loads.clear()
    first, info = load_clip_state_dict(archive)
    assert jit_loads == [str(archive)] and len(_prepared_files()) == 1
    second, again = load_clip_state_dict(archive)
    assert jit_loads == [str(archive)]  # no second torch.jit.load: the fp32 copy was read
    assert info == again and info.format == "openai-jit"
    assert first.keys() == second.keys()
    for key, value in second.items():
        assert value.dtype == first[key].dtype and torch.equal(value, first[key]), key
        if key in expected:
            assert torch.equal(value, expected[key].reshape(value.shape)), key  # the archive's values, in fp32
    assert all(v.dtype == torch.float32 for v in second.values() if v.is_floating_point())


def test_a_replaced_archive_is_read_afresh(archive: Path, jit_loads: list[str]) -> None:
    load_clip_state_dict(archive)
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in tiny_clip_state_dict(seed=4).items()}
    save_openai_jit(sd, archive)  # new contents, same path
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    loaded, _ = load_clip_state_dict(archive)
    assert len(jit_loads) == 2 and len(_prepared_files()) == 1  # the copy is replaced, not added to
    assert torch.equal(loaded["visual.conv1.weight"], sd["visual.conv1.weight"].float())
    again, _ = load_clip_state_dict(archive)
    assert len(jit_loads) == 2 and torch.equal(again["visual.conv1.weight"], loaded["visual.conv1.weight"])


def test_a_corrupt_copy_is_ignored_and_rewritten(archive: Path, jit_loads: list[str]) -> None:
    good, _ = load_clip_state_dict(archive)
    (path,) = _prepared_files()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut short
    with pytest.warns(UserWarning, match="ignoring the prepared checkpoint"):
        again, _ = load_clip_state_dict(archive)
    assert len(jit_loads) == 2 and torch.equal(again["visual.proj"], good["visual.proj"])
    assert path.stat().st_size == len(data)  # rewritten whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_clip_state_dict(archive)
    assert len(jit_loads) == 2


def test_switched_off_and_unwritable(archive: Path, jit_loads: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVSS_PREPARED_CACHE", "0")
    load_clip_state_dict(archive)
    load_clip_state_dict(archive)
    assert len(jit_loads) == 2 and _prepared_files() == []
    monkeypatch.setenv("OVSS_PREPARED_CACHE", "1")
    blocker = archive.parent / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("OVSS_CACHE", str(blocker))  # the cache "folder" is a file: nothing can be written
    with pytest.warns(UserWarning, match="cannot store a prepared copy"):
        loaded, _ = load_clip_state_dict(archive)
    assert len(jit_loads) == 3 and loaded["visual.conv1.weight"].dtype == torch.float32


def test_cache_cli_lists_and_clears_prepared_copies(archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_clip_state_dict(archive)
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert f"fp32 copy of {archive.resolve()}" in out and "1 files" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 1 prepared files" in capsys.readouterr().out
    assert _prepared_files() == []


def test_an_archive_with_tied_tensors_is_prepared(tmp_path: Path, jit_loads: list[str]) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)
            self.b.weight = self.a.weight  # one tensor under two names

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    path = tmp_path / "tied.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Tied().half()).save(str(path))
    first = prepared.read_torchscript(path)
    second = prepared.read_torchscript(path)
    assert len(jit_loads) == 1 and len(_prepared_files()) == 1
    assert torch.equal(second["b.weight"], first["a.weight"]) and second["a.weight"].dtype == torch.float32


def test_a_users_safetensors_file_is_not_mapped_under_the_model(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from ovss.models.checkpoint import read_checkpoint

    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1024)}, str(path))
    sd, container = read_checkpoint(path, "CLIP", "fix")
    save_file({"x": torch.ones(1024)}, str(path))  # rewritten in place, as a training loop would
    assert container == "safetensors" and float(sd["x"].sum()) == 0.0
