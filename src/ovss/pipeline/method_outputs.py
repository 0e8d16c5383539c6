"""The image stage's window batches joined into one :class:`~ovss.methods.common.MethodOutput` (``set_image``)."""

from __future__ import annotations

from typing import Any

import torch

from ovss.methods.common import MethodOutput


def gathered_outputs(outputs: list[MethodOutput]) -> MethodOutput:
    """One output from the image stage's window batches: per-window diagnostics and tensor extras concatenated.

    Per-image facts (grid, info, layout) are the same in every batch; the last batch's are kept.
    """
    last = outputs[-1]
    window_info: dict[str, list[Any]] = {}
    extras: dict[str, list[Any]] = {}
    info: dict[str, Any] = {}
    for out in outputs:
        info.update(out.info)
        for key, values in out.window_info.items():
            window_info[key] = window_info.get(key, []) + list(values)
        for key, value in out.extras.items():
            extras.setdefault(key, []).append(value)
    joined = {key: values[0] if len(values) == 1 else torch.cat(values) for key, values in extras.items()}  # (L, ...)
    return MethodOutput(last.tokens, last.grid, info, window_info, joined, last.layout)
