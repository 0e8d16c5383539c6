"""What the benchmark scripts share: where the CLIP BPE vocabulary that ``ovss.load`` reads comes from."""

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
