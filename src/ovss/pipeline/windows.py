"""Sliding-window enumeration (spec §2.2), symmetric padding (spec §2.3) and the windowings methods choose.

A method's *windowing* (``MethodSpec.windowing``) turns the normalised processing image into the image its
windows are cut from and the windows themselves: ``"sliding"`` cuts them from the image as it is (every method
but Trident); ``"canvas"`` first resizes the image to a canvas whose sides are multiples of 16 and at least one
window (Trident, spec §4.12.2 step 2). A :class:`Layout` says where a method's output tokens live for stitching.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


@dataclass(frozen=True)
class Layout:
    """Where per-window outputs live: windows of a processing image, each padded to the same size (spec §2.5)."""

    windows: tuple[Window, ...]  # row-major windows in processing pixels
    padding: Padding  # symmetric padding of every window
    padded_size: tuple[int, int]  # (rows, cols) of each padded window
    image_size: tuple[int, int]  # (H, W) of the processing image

    @staticmethod
    def whole(size: tuple[int, int]) -> Layout:
        """One unpadded window covering a ``size`` image (an output already on one whole-image grid)."""
        return Layout((Window(0, 0, size[0], size[1]),), Padding(0, 0, 0, 0), size, size)


CANVAS_MULTIPLE = 16  # canvas sides are multiples of the 16-pixel patch of Trident's backbones


def canvas_size(height: int, width: int, crop: int) -> tuple[int, int]:
    """The canvas H' x W' of Trident's sub-image stage (spec §4.12.2 step 2, release ``preprocess_image``).

    Sides that are both multiples of 16 are kept; otherwise the long side is rounded up to a multiple of 16
    and each side is scaled by the same ratio (floored) and rounded up to a multiple of 16. Each side is at
    least ``crop`` so that every window is a full c x c.

    Example: 448 x 597 (VOC 375 x 500 at S = 448) -> 464 x 608; 688 x 1376 (Cityscapes) is kept.
    """
    m = CANVAS_MULTIPLE
    if height % m or width % m:
        long = max(height, width)
        target = m * math.ceil(long / m)
        height = m * math.ceil((height * target // long) / m)
        width = m * math.ceil((width * target // long) / m)
    return max(height, crop), max(width, crop)


def resize_canvas(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (half-pixel, no antialias) resize of the normalised (3, H, W) image to the canvas."""
    if tuple(pixels.shape[-2:]) == size:
        return pixels
    return F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False)[0]  # (3, H', W')


def sliding(pixels: torch.Tensor, crop: int, stride: int) -> tuple[torch.Tensor, list[Window]]:
    """Windows cut from the processing image as it is: (3, H, W) unchanged and :func:`sliding_windows`."""
    return pixels, sliding_windows(int(pixels.shape[-2]), int(pixels.shape[-1]), crop, stride)


def canvas(pixels: torch.Tensor, crop: int, stride: int) -> tuple[torch.Tensor, list[Window]]:
    """Windows cut from the image resized to :func:`canvas_size` (Trident): (3, H', W') and its windows."""
    size = canvas_size(int(pixels.shape[-2]), int(pixels.shape[-1]), crop)
    return resize_canvas(pixels, size), sliding_windows(*size, crop, stride)


# MethodSpec.windowing -> (pixels (3, H, W), crop, stride) -> (pixels the windows are cut from, windows)
WINDOWINGS: dict[str, Callable[[torch.Tensor, int, int], tuple[torch.Tensor, list[Window]]]] = {
    "sliding": sliding,
    "canvas": canvas,
}
