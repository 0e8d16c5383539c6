"""Precision control: backbones may run under autocast (bf16 / fp16); statistics always run in fp32 (§2.9)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch

REDUCED = (torch.bfloat16, torch.float16)
# Whether autocast_weights keeps reduced copies, for the `backbone_precision` block that is running (a context
# variable: scoped to that block and thread, set from the Segmenter's Tuning; nn.Module calls carry no keywords).
_KEEP_COPIES: contextvars.ContextVar[bool] = contextvars.ContextVar("ovss_keep_reduced_copies", default=True)


@contextlib.contextmanager
def backbone_precision(device: torch.device, dtype: torch.dtype, *, keep_reduced_copies: bool = True) -> Iterator[None]:
    """Autocast matrix products to ``dtype`` on ``device`` (no-op for fp32).

    Only autocast-eligible ops (linear, conv, matmul, attention) run in reduced precision, as in the
    releases' fp16 GPU runs. Weights stay fp32 (except the product weights ``ovss.load`` stores reduced,
    :func:`store_reduced`: the values the casts would give), and so does the residual stream: the ViT casts its
    patch embedding back to fp32 (:meth:`ovss.models.vit.VisionTransformer.embed`) and every reduced branch output
    is added to that fp32 stream (type promotion gives fp32). LayerNorms compute in fp32 and return the
    stream's fp32. Similarities, softmax and statistics are wrapped in :func:`full_precision`.
    Checked end to end by ``tests/test_precision.py``.

    ``keep_reduced_copies`` (:attr:`ovss.tuning.Tuning.keep_reduced_copies`): inside this block, whether
    :func:`autocast_weights` casts the weights once per dtype (True) or leaves the casts to autocast (False);
    bit-identical either way.
    """
    if dtype not in REDUCED:
        yield
        return
    token = _KEEP_COPIES.set(keep_reduced_copies)
    try:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield
    finally:
        _KEEP_COPIES.reset(token)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Disable autocast (CPU and CUDA) so similarities, proxies, normalisation and softmax run in fp32."""
    with torch.autocast(device_type="cpu", enabled=False), torch.autocast(device_type="cuda", enabled=False):
        yield


_COPIES = "_reduced_weight_copies"  # module attribute: {dtype: (versions, device, copies)}


def autocast_weights(
    module: torch.nn.Module, *weights: torch.Tensor | None, like: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, ...]:
    """The tensors to pass to a matrix product: ``weights`` as given, or their cached autocast-dtype copies.

    Autocast casts every fp32 argument of a product to its dtype on every call (its own cast cache holds
    only leaves that require grad, which frozen weights do not). Under autocast this returns copies cast
    once per dtype with the same ``.to(dtype)`` rounding, kept on ``module`` and made again if a weight
    changes (in-place update, another device), so results are bit-identical to plain autocast. Outside
    autocast, for weights that require grad, or inside ``backbone_precision(..., keep_reduced_copies=False)``:
    ``weights`` unchanged.

    Weights already in the autocast dtype (:func:`store_reduced`) are returned as they are (no copy); outside
    autocast, weights whose dtype differs from the input ``like`` are returned upcast to its dtype.

    Args:
        module: the layer that owns the weights (holds the copies).
        weights: its weight and bias tensors (None entries stay None).
        like: the product's other operand (its dtype, outside autocast, is the one the weights are cast to).
    """
    first = next(w for w in weights if w is not None)
    device = first.device.type
    if like is not None and first.dtype != like.dtype and not torch.is_autocast_enabled(device):
        # weights stored reduced (:func:`store_reduced`) used by an fp32 product outside autocast: their values,
        # upcast exactly to the input's dtype
        return tuple(None if w is None else w.to(like.dtype) for w in weights)
    if not (_KEEP_COPIES.get() and torch.is_autocast_enabled(device)):
        return weights
    if any(w is not None and w.requires_grad for w in weights) and torch.is_grad_enabled():
        return weights
    dtype = torch.get_autocast_dtype(device)
    if first.dtype == dtype:
        return weights
    versions = tuple(None if w is None else (0 if w.is_inference() else w._version, w.data_ptr()) for w in weights)
    cache: dict[torch.dtype, Any] = module.__dict__.setdefault(_COPIES, {})
    entry = cache.get(dtype)
    if entry is None or entry[0] != versions or entry[1] != first.device:
        with torch.no_grad():
            copies = tuple(None if w is None else w.detach().to(dtype) for w in weights)
        entry = cache[dtype] = (versions, first.device, copies)
    return entry[2]


def store_reduced(weights: list[torch.Tensor], dtype: torch.dtype) -> int:
    """Store the given fp32 parameters in ``dtype`` (in place of their fp32 values); returns the bytes freed.

    Under autocast a product casts its fp32 weights to the autocast dtype (or :func:`autocast_weights` keeps that
    cast as a copy, beside the fp32 weights). A model whose products only ever run reduced needs just the cast
    values: storing them instead of the fp32 ones gives bit-identical products at half the memory (no fp32 +
    reduced pair). An fp32 product outside autocast then uses the reduced values upcast (:func:`autocast_weights`
    with ``like``). Used by ``ovss.load`` for the image backbones it reads from files for a bf16 / fp16
    segmenter (:attr:`ovss.tuning.Tuning.reduced_weights`); never on a model the caller passed in.
    """
    if dtype not in REDUCED:
        raise ValueError(f"store_reduced needs bf16 or fp16, got {dtype}")
    freed = 0
    with torch.no_grad():
        for p in weights:
            if p.dtype == torch.float32:
                freed += p.numel() * (p.element_size() - torch.finfo(dtype).bits // 8)
                p.data = p.data.to(dtype)
    return freed
