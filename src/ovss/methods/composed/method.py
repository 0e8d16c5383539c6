"""GLA as an operator on methods: ``X+gla`` runs base X with the cross-window attention of spec §4.8.

All windows of an image are processed jointly: blocks 0..10 (and the VFM) are ordinary batched passes over
the L windows; the last block's attention of every window sees the keys and values of all windows.
"""

from __future__ import annotations

import torch

from ovss.gla.chunking import resolve_chunk_rows
from ovss.gla.config import GLAConfig
from ovss.gla.cross_window import cross_window_attention, dynamic_shift
from ovss.gla.smoothing import resolve_smoothing, smooth_queries, smoothing_index
from ovss.methods.common import Backbones, MethodOutput, WindowBatch
from ovss.methods.composed.bases import ADAPTERS, CrossWindowParts
from ovss.methods.options import ComposedOptions
from ovss.precision import full_precision
from ovss.tuning import DEFAULT_TUNING


def initial_queries(
    keys: list[torch.Tensor], parts: CrossWindowParts, batch: WindowBatch, cfg: GLAConfig
) -> tuple[list[torch.Tensor], str]:
    """Q^(0) of every key set (§4.8.3): the keys themselves, or smoothed raw features; and the smoothing used.

    Args:
        keys: S key sets (M, D_s), window-major (``parts.key_sets`` flattened).

    Returns:
        S tensors (M, D_s) (fp32 when smoothed) and the resolved smoothing mode.
    """
    smoothing = resolve_smoothing(cfg.smoothing, parts.clip_internal)
    if smoothing == "off":
        return keys, smoothing
    pad = batch.padding
    boxes = [(w.y1 - pad.top, w.x1 - pad.left, w.y2 + pad.bottom, w.x2 + pad.right) for w in batch.windows]
    index = smoothing_index(boxes, parts.grid, parts.patch)
    return [smooth_queries(k, index, smoothing) for k in keys], smoothing


def cross_window_tokens(
    parts: CrossWindowParts, batch: WindowBatch, cfg: GLAConfig, *, sparse_below: int = DEFAULT_TUNING.sparse_below
) -> tuple[torch.Tensor, dict]:
    """Replace the base's per-window attention by GLA's cross-window attention (statistics in fp32).

    ``sparse_below``: :attr:`ovss.tuning.Tuning.sparse_below` (how the proxy means are summed).

    Returns:
        tokens (L, N, D) for the dense head, and diagnostics (L, M, chunk rows, smoothing).
    """
    L, N, _ = parts.values.shape
    M = L * N
    outputs: list[torch.Tensor] = []
    calls = [(parts.key_sets, parts.values), *(([k], v) for k, v in parts.extra_sets)]  # main call first
    for key_sets, values in calls:
        keys = [raw.reshape(M, -1) for raw in key_sets]  # S x (M, D_s)
        queries, smoothing = initial_queries(keys, parts, batch, cfg)
        main = not outputs
        y = cross_window_attention(
            keys,
            queries,
            values.reshape(M, -1).float(),  # (M, C) fp32, window-major
            L,
            cfg,
            prior=parts.prior,
            local_maps=parts.local_maps if main else None,
            local_count=parts.local_count if main else 0,
            sparse_below=sparse_below,
        )  # (M, C)
        outputs.append(y.view(L, N, -1))  # (L, N, C)
    tokens = parts.finish(parts.out_proj(*outputs))  # (L, N, D)
    chunk = resolve_chunk_rows(cfg, M, N)
    info = {**parts.info, "gla": {"windows": L, "tokens": M, "chunk_rows": chunk, "smoothing": smoothing}}
    return tokens, info


def run_composed(name: str, backbones: Backbones, batch: WindowBatch, opts: ComposedOptions) -> MethodOutput:
    """Run the composed method ``name`` (``X+gla``, ``proxyclip+gla+mlf``) on all windows of one image.

    Args:
        name: the composed method's registry name, the key of its adapter in ``ovss.methods.composed.bases.ADAPTERS``.
        backbones: CLIP (and the VFM where the base needs one).
        batch: all L windows of the image (GLA attends across them).
        opts: the method's composed options (base, GLA and an optional extra part).

    Returns:
        The tokens (L, N, D) for the dense head on the base's grid, with diagnostics.
    """
    parts = ADAPTERS[name](backbones, batch, opts)  # backbone passes (autocast if reduced precision)
    return gla_output(parts, batch, opts, sparse_below=backbones.tuning.sparse_below)


def gla_output(
    parts: CrossWindowParts, batch: WindowBatch, opts: ComposedOptions, *, sparse_below: int
) -> MethodOutput:
    """The GLA tokens of an adapter's parts, with diagnostics (``sparse_below``: the Segmenter's Tuning)."""
    with full_precision():  # similarities, proxies, normalisation and softmax in fp32 (spec §2.9)
        tokens, info = cross_window_tokens(parts, batch, opts.gla, sparse_below=sparse_below)
    if opts.gla.norm == "dynamic":
        info["gla"]["u"] = dynamic_shift(len(batch.windows) if opts.gla.kve else 1, opts.gla.lam1)
    return MethodOutput(tokens, parts.grid, info, parts.window_info, parts.extras)
