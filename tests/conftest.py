"""Shared test fixtures: the ../shared folder beside the checkout (CI clones it there)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    override = os.environ.get("OVSS_SHARED_DIR")
    return Path(override) if override else REPO.parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """OVSS_CACHE points into pytest's temp folder for the whole session, whatever the caller's environment set.

    Session-scoped and autouse, so pytest sets it up before every module- or class-scoped fixture (fixtures are
    instantiated highest scope first): a module fixture that loads a TorchScript file or encodes names writes its
    prepared copy or text shard here, never into ``~/.cache/ovss`` nor into a CI cache folder (which would hide
    the leak). ``tests/test_cache_isolation.py`` checks both.
    """
    root = tmp_path_factory.mktemp("ovss-session-cache")
    with pytest.MonkeyPatch.context() as patch:
        _redirect_caches(patch, root)
        yield root


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own empty OVSS_CACHE on top of the session's: tests never see each other's files."""
    _redirect_caches(monkeypatch, tmp_path_factory.mktemp("ovss-cache"))


def _redirect_caches(patch: pytest.MonkeyPatch, root: Path) -> None:
    """ovss's cache and the Hugging Face cache and login (HF_HOME holds the token) inside ``root``: the suite
    never reads the user's ``~/.cache/huggingface`` (``ovss models`` lists it) nor writes into either cache."""
    patch.setenv("OVSS_CACHE", str(root))
    patch.setenv("HF_HOME", str(root / "huggingface"))
    patch.setenv("HF_HUB_CACHE", str(root / "huggingface" / "hub"))
    patch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ``shared/`` folder (assets, spec) that sits beside the repository."""
    path = _shared_dir()
    if not (path / "assets").is_dir():
        pytest.fail(
            f"shared assets not found at {path}; clone the project with shared/ beside it or set OVSS_SHARED_DIR"
        )
    return path


@pytest.fixture(scope="session")
def assets_dir(shared_dir: Path) -> Path:
    return shared_dir / "assets"


@pytest.fixture(scope="session")
def bpe_path(assets_dir: Path) -> Path:
    """The real CLIP BPE vocabulary (read from shared/, never shipped)."""
    return assets_dir / "clip-bpe-vocab" / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="session")
def tiny_state_dict() -> dict:
    """A tiny random CLIP (width 128 = 2 heads, 3 visual blocks) in the OpenAI layout."""
    from tiny import tiny_clip_state_dict

    return tiny_clip_state_dict(seed=0)


@pytest.fixture(scope="session")
def clip_file(tmp_path_factory: pytest.TempPathFactory, tiny_state_dict: dict) -> Path:
    """The tiny CLIP saved as OpenAI's TorchScript archive: what ``ovss segment --clip FILE`` reads."""
    from tiny import save_openai_jit

    return save_openai_jit(tiny_state_dict, tmp_path_factory.mktemp("weights") / "tiny-openai.pt")


@pytest.fixture(scope="session")
def tiny_clip(tiny_state_dict: dict):
    from ovss.models.clip import build_clip

    return build_clip(tiny_state_dict)


@pytest.fixture(scope="session")
def tiny_dino():
    """A tiny random DINO-like ViT (patch 8, width 128 = 2 heads, GELU, no ln_pre, conv bias, no projection)."""
    from tiny import tiny_dino_vit

    return tiny_dino_vit()


@pytest.fixture
def readers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads that read each image, in order (``Segmenter._read_and_resize`` recorded)."""
    import threading

    from ovss.predictor import Segmenter

    names: list[str] = []
    read = Segmenter._read_and_resize

    def recording(self: Segmenter, image: object) -> tuple[Any, Any]:
        names.append(threading.current_thread().name)
        return read(self, image)  # type: ignore[arg-type]

    monkeypatch.setattr(Segmenter, "_read_and_resize", recording)
    return names
