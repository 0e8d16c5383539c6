"""What the benchmark scripts share: the CLIP BPE vocabulary ``ovss.load`` reads, a measured process's environment."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def vocab_path() -> str | None:
    """The CLIP BPE vocabulary for ``ovss.load``: OVSS_BPE_PATH, the shared assets beside the checkout, or None."""
    if os.environ.get("OVSS_BPE_PATH"):
        return os.environ["OVSS_BPE_PATH"]
    shared = REPO.parent / "shared" / "assets" / "clip-bpe-vocab" / "bpe_simple_vocab_16e6.txt.gz"
    return str(shared) if shared.is_file() else None  # None: the cached or downloaded vocabulary


def child_env(cache: Path, threads: int = 2) -> dict[str, str]:
    """The environment of a measured ``ovss`` process: this checkout's package first on PYTHONPATH, a private
    ``OVSS_CACHE``, ``threads`` OpenMP / MKL threads, the vocabulary (``OVSS_BPE_PATH``) when known, and ovss's
    own switches (fast exit, prepared and text caches) at their defaults."""
    env = {**os.environ, "OVSS_CACHE": str(cache), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    for name in ("OVSS_FAST_EXIT", "OVSS_PREPARED_CACHE", "OVSS_TEXT_CACHE"):
        env.pop(name, None)
    vocab = vocab_path()
    if vocab:
        env["OVSS_BPE_PATH"] = vocab
    return env
