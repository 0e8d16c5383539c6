"""Sliding-window enumeration (spec §2.2) and symmetric padding (spec §2.3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Window:
    """One crop of the processing image, in processing pixels (half-open: rows y1..y2-1, cols x1..x2-1)."""

    y1: int
    x1: int
    y2: int
    x2: int

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    @property
    def width(self) -> int:
        return self.x2 - self.x1


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[Window]:
    """Enumerate the windows of an ``height x width`` image exactly as mmseg's ``slide_inference``.

    Windows are visited row-major; the last row/column is shifted back to end at the image border.
    If the image is smaller than ``crop`` on a side, windows are smaller on that side.
    ``crop == 0`` means whole-image mode: one window covering the image.

    Args:
        height: processing-image rows H (>= 1).
        width: processing-image columns W (>= 1).
        crop: window side c in pixels (0 = whole image).
        stride: window stride s in pixels (>= 1; ignored when ``crop == 0``).

    Returns:
        The L windows, window index b = r * n_cols + q.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if crop == 0:
        return [Window(0, 0, height, width)]
    if crop < 0 or stride < 1:
        raise ValueError(f"crop must be >= 0 and stride >= 1, got crop={crop}, stride={stride}")
    n_rows = max(height - crop + stride - 1, 0) // stride + 1
    n_cols = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for r in range(n_rows):
        for q in range(n_cols):
            y1, x1 = r * stride, q * stride
            y2, x2 = min(y1 + crop, height), min(x1 + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            windows.append(Window(y1, x1, y2, x2))
    return windows


@dataclass(frozen=True)
class Padding:
    """Symmetric zero padding added around a window: pixels on each side."""

    top: int
    bottom: int
    left: int
    right: int


def symmetric_padding(height: int, width: int, multiple: int) -> Padding:
    """Padding that brings ``height x width`` up to a multiple of ``multiple`` (left = floor(delta / 2)).

    ``multiple <= 1`` means no padding.
    """
    if multiple <= 1:
        return Padding(0, 0, 0, 0)
    dh = (-height) % multiple
    dw = (-width) % multiple
    return Padding(dh // 2, dh - dh // 2, dw // 2, dw - dw // 2)


def pad_windows(windows: torch.Tensor, padding: Padding) -> torch.Tensor:
    """Zero-pad a batch of windows (zero in normalised space).

    Args:
        windows: (L, 3, h, w) normalised pixels.
        padding: pixels to add on each side.

    Returns:
        (L, 3, h + top + bottom, w + left + right).
    """
    if padding == Padding(0, 0, 0, 0):
        return windows
    return F.pad(windows, (padding.left, padding.right, padding.top, padding.bottom), value=0.0)
