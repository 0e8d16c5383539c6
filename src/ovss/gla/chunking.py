"""Memory of the GLA operator's row chunks (spec §9.2): how many query rows R per chunk, and reused buffers.

Every step of the operator is row-wise given all M keys, so rows are processed R at a time and the O(R * M)
buffers bound the memory; :func:`choose_chunk_rows` picks R from a budget, :class:`Scratch` keeps the (R, M)
buffers of one call alive across its steps and chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ovss.gla.config import GLAConfig

# Bytes per entry of an R x M chunk at the step's peak: similarity/Attn fp32 (4), proxy mask bool (1) and its
# fp32 copy for the mean (4), masking bool (1), softmax output (4), allocator slack. The spec's estimate is 9
# (§9.2); 18 is what the GLA step alone measured on CPU (17 bytes per entry).
BYTES_PER_ENTRY = 18


class Scratch:
    """(R, M) work buffers reused by every step and row chunk of one operator call.

    A fresh (R, M) fp32 tensor is 88 MB for a Cityscapes image (R = 784, M = 28,224); glibc maps blocks over
    32 MB anew at every allocation, so each one costs its page faults again (about 30 ms here), and a chunk
    takes four of them: 15 % of the step. Products and the softmax write into these buffers instead (``out=``),
    with the same kernels, so the results are bit-identical.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A ``shape`` view of buffer ``name`` (grown when too small); its old contents are garbage."""
        size = shape[0] * shape[1]
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < size or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buf[:size].view(shape)


def choose_chunk_rows(num_tokens: int, window_tokens: int, budget_mb: float) -> int:
    """Rows per chunk R from a memory budget for the O(R * M) buffers (§9.2 default).

    Peak of the row-chunk buffers is about R * M * BYTES_PER_ENTRY bytes (measured). R is one window (R = N)
    when that fits the budget, otherwise the largest divisor of N that fits, at least 1. Larger chunks are
    not faster: the element-wise passes over an (R, M) buffer run better from cache when it is small, and
    the products are large enough either way. The O(M * D) inputs (keys, anchors, values) do not depend on R
    and are not counted.

    Args:
        num_tokens: M = L * N.
        window_tokens: N, tokens per window.
        budget_mb: budget in MiB (2**20 bytes).

    Returns:
        R in 1..N (Cityscapes `gla`, M = 28,224, N = 784, 1024 MiB: 784, a 398 MB buffer).
    """
    fit = int(budget_mb * 2**20) // (num_tokens * BYTES_PER_ENTRY)  # rows that fit
    divisors = [r for r in range(1, window_tokens + 1) if window_tokens % r == 0 and r <= fit]
    return max(divisors, default=1)


def resolve_chunk_rows(cfg: GLAConfig, num_tokens: int, window_tokens: int) -> int:
    """R: ``cfg.chunk_rows`` if set, else `choose_chunk_rows` from ``cfg.memory_budget_mb``."""
    return cfg.chunk_rows or choose_chunk_rows(num_tokens, window_tokens, cfg.memory_budget_mb)
