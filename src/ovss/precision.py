"""Precision control: backbones may run under autocast (bf16 / fp16); statistics always run in fp32 (§2.9)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

REDUCED = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def backbone_precision(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autocast matrix products to ``dtype`` on ``device`` (no-op for fp32).

    Weights, the residual stream and LayerNorms stay fp32; only autocast-eligible ops (linear, conv, matmul)
    run in reduced precision, as in the releases' fp16 GPU runs.
    """
    if dtype not in REDUCED:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Disable autocast (CPU and CUDA) so similarities, proxies, normalisation and softmax run in fp32."""
    with torch.autocast(device_type="cpu", enabled=False), torch.autocast(device_type="cuda", enabled=False):
        yield
