"""Point ``huggingface_hub`` at the local :class:`hub_server.FakeHub` and at a private cache, for one test.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and the token file's path into
``huggingface_hub.constants`` when it is imported, so both the environment (what ovss reads at call time) and
those constants are patched. No token of the machine's user (``HF_TOKEN``, ``hf auth login``) leaks in.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants

from hub_server import FakeHub


def use_fake_hub(monkeypatch: pytest.MonkeyPatch, hub: FakeHub, root: Path) -> Path:
    """Route every Hub request of this test to ``hub`` with an empty cache under ``root``; returns the cache."""
    cache = root / "hf-home" / "hub"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache.parent / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(cache.parent / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OVSS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return cache
