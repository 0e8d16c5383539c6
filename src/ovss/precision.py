"""Precision control: backbones may run under autocast (bf16 / fp16); statistics always run in fp32 (§2.9)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

REDUCED = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def backbone_precision(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autocast matrix products to ``dtype`` on ``device`` (no-op for fp32).

    Only autocast-eligible ops (linear, conv, matmul, attention) run in reduced precision, as in the
    releases' fp16 GPU runs. Weights stay fp32, and so does the residual stream: the ViT casts its patch
    embedding back to fp32 (:meth:`ovss.models.vit.VisionTransformer.embed`) and every reduced branch output
    is added to that fp32 stream (type promotion gives fp32). LayerNorms compute in fp32 and return the
    stream's fp32. Similarities, softmax and statistics are wrapped in :func:`full_precision`.
    Checked end to end by ``tests/test_precision.py``.
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
