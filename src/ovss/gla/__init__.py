"""GLA (Global-Local Aligned) cross-window attention: an operator that composes with the base methods.

Pure tensor functions, no model code: the base method supplies the key features, values and optional
extra attention terms of all windows of an image (spec §4.8, §4.9, §9).

The public names are imported on first use, so ``ovss.gla.config`` (read by the method registry) stays
torch-free.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "GLA_RELEASE": "ovss.gla.config",
    "GLAConfig": "ovss.gla.config",
    "RowStats": "ovss.gla.cross_window",
    "attention_rows": "ovss.gla.cross_window",
    "choose_chunk_rows": "ovss.gla.chunking",
    "cross_window_attention": "ovss.gla.cross_window",
    "dynamic_shift": "ovss.gla.cross_window",
    "global_similarity_mean": "ovss.gla.cross_window",
    "proxy_anchors": "ovss.gla.anchors",
    "sharpen_weight": "ovss.gla.cross_window",
    "resolve_chunk_rows": "ovss.gla.chunking",
    "dense_attention_map": "ovss.gla.reference",
    "dense_cross_window_attention": "ovss.gla.reference",
    "SmoothingIndex": "ovss.gla.smoothing",
    "resolve_smoothing": "ovss.gla.smoothing",
    "smooth_queries": "ovss.gla.smoothing",
    "smoothing_index": "ovss.gla.smoothing",
}

__all__ = [
    "GLA_RELEASE",
    "GLAConfig",
    "RowStats",
    "SmoothingIndex",
    "attention_rows",
    "choose_chunk_rows",
    "cross_window_attention",
    "dense_attention_map",
    "dense_cross_window_attention",
    "dynamic_shift",
    "global_similarity_mean",
    "proxy_anchors",
    "resolve_chunk_rows",
    "resolve_smoothing",
    "sharpen_weight",
    "smooth_queries",
    "smoothing_index",
]

if TYPE_CHECKING:
    from ovss.gla.anchors import proxy_anchors
    from ovss.gla.chunking import choose_chunk_rows, resolve_chunk_rows
    from ovss.gla.config import GLA_RELEASE, GLAConfig
    from ovss.gla.cross_window import (
        RowStats,
        attention_rows,
        cross_window_attention,
        dynamic_shift,
        global_similarity_mean,
        sharpen_weight,
    )
    from ovss.gla.reference import dense_attention_map, dense_cross_window_attention
    from ovss.gla.smoothing import SmoothingIndex, resolve_smoothing, smooth_queries, smoothing_index


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ovss.gla' has no attribute {name!r}")
