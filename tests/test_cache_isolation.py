"""The test suite never writes into the user's cache (``~/.cache/ovss``) nor into a cache folder the caller set.

A module-scoped fixture is set up before any function-scoped one, so a per-test ``OVSS_CACHE`` redirect alone
lets module fixtures (loading a TorchScript file, encoding names) write their prepared copies and text shards
into the real cache. ``conftest._session_cache`` redirects for the whole session; these tests would fail without it,
in CI too (where ``OVSS_CACHE`` is set: the module fixture would see that folder instead of pytest's).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ovss.storage import hub

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def module_cache_root() -> Path:
    """The cache folder a module-scoped fixture would write into (set up before any per-test fixture)."""
    return hub.cache_dir()


def test_module_fixtures_see_a_cache_inside_pytests_temp_folder(
    module_cache_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.getbasetemp().resolve()
    assert module_cache_root.resolve().is_relative_to(base), f"{module_cache_root} is outside {base}"


def test_each_test_gets_its_own_empty_cache(module_cache_root: Path) -> None:
    assert hub.cache_dir() != module_cache_root and not any(hub.cache_dir().iterdir())


_LEAKY_MODULE = '''
"""A module fixture that fills the cache the way the suite's module fixtures do (prepared copy + text shard)."""

import pytest

import ovss
from ovss.storage import hub
from tiny import save_openai_jit, tiny_clip_state_dict


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory, bpe_path):
    archive = save_openai_jit(tiny_clip_state_dict(seed=0), tmp_path_factory.mktemp("weights") / "tiny-ViT.pt")
    seg = ovss.load("clearclip", clip=str(archive), tokenizer=str(bpe_path), templates="imagenet7")
    seg.encode_names(["cat", "dog"])
    return seg, hub.cache_dir()


def test_the_fixture_wrote_its_cache(segmenter):
    _, root = segmenter
    assert sorted(p.parent.name for p in root.rglob("*.safetensors")) == ["prepared", "text"]
'''


def test_a_module_fixture_leaves_the_home_cache_untouched(tmp_path: Path, shared_dir: Path) -> None:
    """Run pytest on a module with a cache-filling module fixture, HOME in a temp folder and no OVSS_CACHE."""
    (tmp_path / "test_leaky.py").write_text(textwrap.dedent(_LEAKY_MODULE))
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("OVSS_CACHE", "XDG_CACHE_HOME", "PYTEST_ADDOPTS")}
    env.update(
        HOME=str(home),
        OVSS_OFFLINE="1",
        OVSS_SHARED_DIR=str(shared_dir),
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO / "src"), env.get("PYTHONPATH", "")]),
    )
    basetemp = tmp_path / "basetemp"
    plugins = ["-p", "conftest", "-p", "no:cacheprovider"]  # tests/conftest.py, the file under test
    where = ["--rootdir", str(tmp_path), "-c", os.devnull, "--basetemp", str(basetemp)]
    command = [sys.executable, "-m", "pytest", "-q", *plugins, *where, str(tmp_path / "test_leaky.py")]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    assert not (home / ".cache").exists(), sorted(str(p) for p in (home / ".cache").rglob("*"))
    assert len(list(basetemp.rglob("prepared/*.safetensors"))) == 1  # the prepared copy went to pytest's folder


def test_the_hugging_face_cache_and_login_are_the_tests_own(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.getbasetemp().resolve()
    for variable in ("HF_HOME", "HF_HUB_CACHE"):
        assert Path(os.environ[variable]).resolve().is_relative_to(base), variable
    assert "HF_TOKEN" not in os.environ
