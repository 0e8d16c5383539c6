"""GLA (Global-Local Aligned) cross-window attention: an operator that composes with the base methods.

Pure tensor functions, no model code: the base method supplies the key features, values and optional
extra attention terms of all windows of an image (spec §4.8, §4.9, §9).
"""

from ovss.gla.config import GLA_RELEASE, GLAConfig
from ovss.gla.cross_window import (
    RowStats,
    attend_chunked,
    attention_rows,
    choose_chunk_rows,
    cross_window_attention,
    dynamic_shift,
    global_similarity_mean,
    proxy_anchors,
    sharpen_weight,
    window_index,
)
from ovss.gla.reference import dense_cross_window_attention
from ovss.gla.smoothing import SmoothingIndex, resolve_smoothing, smooth_queries, smoothing_index

__all__ = [
    "GLA_RELEASE",
    "GLAConfig",
    "RowStats",
    "SmoothingIndex",
    "attend_chunked",
    "attention_rows",
    "choose_chunk_rows",
    "cross_window_attention",
    "dense_cross_window_attention",
    "dynamic_shift",
    "global_similarity_mean",
    "proxy_anchors",
    "resolve_smoothing",
    "sharpen_weight",
    "smooth_queries",
    "smoothing_index",
    "window_index",
]
