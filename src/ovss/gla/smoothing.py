"""Initial-query smoothing of GLA (spec §4.8.3, GLA Appendix C Eq. 17) through index tables.

Each token is averaged with its up-to-8 grid neighbours in its own window, N(i), and with the tokens of
other windows whose patch has the same top-left processing pixel, O(i). Both sets are stored as padded
index tables of shape (M, K) (K <= 8 for N(i), K <= L - 1 for O(i)) built with a hash of the top-left
pixel, so smoothing costs O(M * 9 * D) and never forms an M x M mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ovss.errors import OvssError
from ovss.pipeline.windows import Window

SMOOTHING_MODES = ("eq17", "release_proxyclip")


@dataclass(frozen=True)
class SmoothingIndex:
    """Neighbour tables of the M = L * N tokens of one image (window-major; row-major grid per window).

    Attributes:
        neighbours: (M, 8) long, N(i): own-window grid neighbours at Chebyshev distance 1; M pads.
        others: (M, K) long, O(i): tokens of other windows with the same top-left processing pixel;
            M pads; K = max_i |O(i)| (0 when no patch is shared).
        num_neighbours: (M,) long, |N(i)| in 3..8 (fewer at window borders; 0 for a 1 x 1 grid).
        num_others: (M,) long, |O(i)| in 0..L-1.
    """

    neighbours: Tensor
    others: Tensor
    num_neighbours: Tensor
    num_others: Tensor


def resolve_smoothing(mode: str, clip_internal_keys: bool) -> str:
    """Resolve ``gla_smoothing``: ``auto`` is ``eq17`` for CLIP-internal keys and ``off`` for DINO keys.

    Returns:
        One of ``off``, ``eq17``, ``release_proxyclip``.
    """
    if mode == "auto":
        return "eq17" if clip_internal_keys else "off"
    if mode not in ("off", *SMOOTHING_MODES):
        raise OvssError(f"gla_smoothing must be auto, off, eq17 or release_proxyclip, got {mode!r}")
    return mode


def smoothing_index(
    window_boxes: Sequence[Window | tuple[int, int, int, int]], grid: tuple[int, int], patch: int
) -> SmoothingIndex:
    """Index tables for `smooth_queries`.

    Token t = r * cols + c of window b (image index b * N + t) has top-left processing pixel
    (y1_b + r * patch, x1_b + c * patch); tokens of different windows match only when these are equal
    (a border-shifted window whose offset is not a multiple of the patch matches nothing).

    Args:
        window_boxes: the L windows as `Window` or (y1, x1, y2, x2) in processing pixels; (y1, x1) is the
            top-left pixel of the window's token (0, 0) (subtract any padding first).
        grid: (rows, cols) token grid of every window, N = rows * cols.
        patch: patch side in processing pixels (16 for CLIP, 8 for DINO-B/8).

    Returns:
        The `SmoothingIndex` of the M = L * N tokens.
    """
    rows, cols = grid
    n, num_windows = rows * cols, len(window_boxes)
    m = num_windows * n
    r = torch.arange(n) // cols  # (N,)
    c = torch.arange(n) % cols  # (N,)
    local = []
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr == 0 and dc == 0:
                continue
            inside = (r + dr >= 0) & (r + dr < rows) & (c + dc >= 0) & (c + dc < cols)  # (N,)
            local.append(torch.where(inside, (r + dr) * cols + (c + dc), -1))  # (N,)
    table = torch.stack(local, dim=1)  # (N, 8) local index or -1
    offset = (torch.arange(num_windows) * n)[:, None, None]  # (L, 1, 1)
    neighbours = torch.where(table >= 0, table + offset, m).reshape(m, 8)  # (M, 8)

    groups: dict[tuple[int, int], list[int]] = {}  # top-left pixel -> tokens of all windows
    for b, box in enumerate(window_boxes):
        y1, x1 = (box.y1, box.x1) if isinstance(box, Window) else (box[0], box[1])
        for t in range(n):
            groups.setdefault((y1 + (t // cols) * patch, x1 + (t % cols) * patch), []).append(b * n + t)
    other_lists: list[list[int]] = [[] for _ in range(m)]
    for members in groups.values():
        for i in members:
            other_lists[i] = [j for j in members if j != i]
    width = max((len(o) for o in other_lists), default=0)
    others = torch.full((m, width), m, dtype=torch.long)  # (M, K)
    for i, o in enumerate(other_lists):
        others[i, : len(o)] = torch.tensor(o, dtype=torch.long)
    return SmoothingIndex(
        neighbours=neighbours,
        others=others,
        num_neighbours=(neighbours < m).sum(dim=1),
        num_others=(others < m).sum(dim=1),
    )


def _gather_sum(feats: Tensor, table: Tensor) -> Tensor:
    """Sum of feats over each row's table entries (pad index M adds 0); O(M * K * D) time, O(M * D) memory."""
    padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])  # (M + 1, D)
    total = torch.zeros_like(feats)  # (M, D)
    for col in table.to(feats.device).T:  # K columns of (M,)
        total += padded[col]  # (M, D)
    return total


def smooth_queries(q: Tensor, index: SmoothingIndex, mode: str = "eq17") -> Tensor:
    """Smoothed initial anchors Q^(0) of all M tokens (computed once, before the row chunks).

    ``eq17`` (paper Eq. 17, release ClearCLIP path), on the raw features:
        Q0_i = (Q_i + sum_{N(i)} Q_j + sum_{O(i)} Q_k) / (1 + |N(i)| + |O(i)|).
    ``release_proxyclip`` (release's optional ProxyCLIP-path smoothing): the mean of the L2-normalised
    features over N(i) and O(i), the token itself excluded; a token with both sets empty keeps its own
    normalised feature.

    Args:
        q: (M, D) raw features (e.g. CLIP q or k with heads concatenated, or DINO tokens), any float dtype.
        index: tables from `smoothing_index` for the same M tokens.
        mode: ``eq17`` or ``release_proxyclip``.

    Returns:
        (M, D) fp32 anchors (not normalised; GLA normalises before the first similarity).
    """
    if q.shape[0] != index.neighbours.shape[0]:
        raise ValueError(f"q has {q.shape[0]} tokens, the index {index.neighbours.shape[0]}")
    num_n = index.num_neighbours.to(q.device)  # (M,)
    num_o = index.num_others.to(q.device)  # (M,)
    if mode == "eq17":
        feats = q.float()  # (M, D) raw
        total = feats + _gather_sum(feats, index.neighbours) + _gather_sum(feats, index.others)  # (M, D)
        return total / (1 + num_n + num_o).float()[:, None]  # (M, D)
    if mode == "release_proxyclip":
        feats = F.normalize(q.float(), dim=-1)  # (M, D) unit rows
        total = _gather_sum(feats, index.neighbours) + _gather_sum(feats, index.others)  # (M, D)
        count = (num_n + num_o)[:, None]  # (M, 1)
        return torch.where(count > 0, total / count.clamp(min=1).float(), feats)  # (M, D)
    raise OvssError(f"smoothing mode must be one of {SMOOTHING_MODES}, got {mode!r}")
