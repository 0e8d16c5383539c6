"""GLA (Global-Local Aligned) cross-window attention: an operator that composes with the base methods.

`cross_window_attention` is the one operator every ``X+gla`` method runs: the base supplies key sets,
values, initial queries and optional prior / own-window maps of all windows of an image (spec §4.8, §4.9,
§9); `dense_cross_window_attention` is its float64 M x M reference.
"""

from ovss.gla.config import GLA_RELEASE, GLAConfig
from ovss.gla.cross_window import (
    RowStats,
    attention_rows,
    choose_chunk_rows,
    cross_window_attention,
    dynamic_shift,
    global_similarity_mean,
    proxy_anchors,
    resolve_chunk_rows,
    sharpen_weight,
)
from ovss.gla.reference import dense_attention_map, dense_cross_window_attention
from ovss.gla.smoothing import SmoothingIndex, resolve_smoothing, smooth_queries, smoothing_index

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
