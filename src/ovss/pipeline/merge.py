"""Stitching per-window logits into one logit map over the processing image (spec §2.5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ovss.pipeline.windows import Padding, Window


def _per_window_paddings(padding: Padding | Sequence[Padding], num_windows: int) -> list[Padding]:
    """One padding per window: a single ``Padding`` is shared by all windows."""
    if isinstance(padding, Padding):
        return [padding] * num_windows
    paddings = list(padding)
    if len(paddings) != num_windows:
        raise ValueError(f"got {len(paddings)} paddings for {num_windows} windows")
    return paddings


def _per_window_sizes(
    padded_size: tuple[int, int] | Sequence[tuple[int, int]], num_windows: int
) -> list[tuple[int, int]]:
    """One padded (rows, cols) size per window: a single ``(h, w)`` pair is shared by all windows."""
    if len(padded_size) == 2:
        first, second = padded_size[0], padded_size[1]
        if isinstance(first, int) and isinstance(second, int):
            return [(first, second)] * num_windows
    sizes = []
    for size in padded_size:
        if isinstance(size, int):
            raise ValueError(
                f"padded_size must be (rows, cols) or one such pair per window, got {padded_size}"
            )
        sizes.append((int(size[0]), int(size[1])))
    if len(sizes) != num_windows:
        raise ValueError(f"got {len(sizes)} padded sizes for {num_windows} windows")
    return sizes


def _coverage_count(windows: Sequence[Window], image_size: tuple[int, int]) -> torch.Tensor:
    """Number of windows covering each processing pixel, (H, W) int64; raises if any pixel is uncovered."""
    height, width = image_size
    count = torch.zeros(height, width, dtype=torch.int64)  # (H, W)
    for window in windows:
        if not (0 <= window.y1 < window.y2 <= height and 0 <= window.x1 < window.x2 <= width):
            raise ValueError(f"window {window} lies outside the {height}x{width} image")
        count[window.y1 : window.y2, window.x1 : window.x2] += 1
    if bool((count == 0).any()):
        raise ValueError("the windows leave some pixels of the image uncovered")
    return count


def merge_window_logits(
    window_logits: torch.Tensor | Sequence[torch.Tensor],
    windows: Sequence[Window],
    padding: Padding | Sequence[Padding],
    padded_size: tuple[int, int] | Sequence[tuple[int, int]],
    image_size: tuple[int, int],
) -> torch.Tensor:
    """Average the up-sampled logits of overlapping windows over the processing image.

    Each window's logits are bilinearly up-sampled (half-pixel, ``align_corners=False``, no
    anti-aliasing) to the padded window size, i.e. the size of the tensor the backbone saw; the
    padding is cropped away (rows ``top .. top + h``, cols ``left .. left + w``); the result is
    added to a canvas at ``[y1:y2, x1:x2]``. The canvas is divided by the number of windows
    covering each pixel. Windows are processed one at a time, so the only large buffer is the
    (Q, H, W) output.

    Args:
        window_logits: (L, Q, gr, gc) logits on the token grid of each window, any float dtype; or a
            sequence of L tensors (Q, gr_b, gc_b) when windows differ in grid size.
        windows: the L windows in processing pixels (spec §2.2), same order as ``window_logits``.
        padding: padding added around every window before the backbone, or one ``Padding`` per window.
        padded_size: (rows, cols) of the padded window fed to the backbone, or one pair per window;
            must equal the window size plus its padding.
        image_size: (H, W) of the processing image.

    Returns:
        (Q, H, W) averaged logits, dtype ``promote_types(input dtype, float32)``, on the input device.

    Raises:
        ValueError: on inconsistent counts or sizes, a window outside the image, or an uncovered pixel.
    """
    if isinstance(window_logits, torch.Tensor):
        logits_list = list(window_logits.unbind(0))  # L x (Q, gr, gc)
    else:
        logits_list = list(window_logits)  # L x (Q, gr_b, gc_b)
    num_windows = len(windows)
    if num_windows == 0:
        raise ValueError("no windows to merge")
    if len(logits_list) != num_windows:
        raise ValueError(f"got logits for {len(logits_list)} windows but {num_windows} windows")
    paddings = _per_window_paddings(padding, num_windows)
    sizes = _per_window_sizes(padded_size, num_windows)
    num_queries = logits_list[0].shape[0]
    for logits in logits_list:
        if logits.dim() != 3 or logits.shape[0] != num_queries:
            raise ValueError(
                f"window logits must be (Q, gr, gc) with Q={num_queries}, got {tuple(logits.shape)}"
            )
    for window, pad, (rows, cols) in zip(windows, paddings, sizes, strict=True):
        if (window.height + pad.top + pad.bottom, window.width + pad.left + pad.right) != (rows, cols):
            raise ValueError(f"padded size {(rows, cols)} does not match window {window} with padding {pad}")

    device = logits_list[0].device
    dtype = torch.promote_types(logits_list[0].dtype, torch.float32)
    height, width = image_size
    count = _coverage_count(windows, image_size).to(device)  # (H, W)
    canvas = torch.zeros(num_queries, height, width, dtype=dtype, device=device)  # (Q, H, W)
    for logits, window, pad, (rows, cols) in zip(logits_list, windows, paddings, sizes, strict=True):
        up = F.interpolate(
            logits.to(dtype)[None], size=(rows, cols), mode="bilinear", align_corners=False, antialias=False
        )[0]  # (Q, rows, cols)
        crop = up[:, pad.top : pad.top + window.height, pad.left : pad.left + window.width]  # (Q, h, w)
        canvas[:, window.y1 : window.y2, window.x1 : window.x2] += crop
    canvas /= count.to(dtype)[None]  # (Q, H, W)
    return canvas


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize a logit map (half-pixel, ``align_corners=False``, no anti-aliasing).

    Args:
        logits: (Q, H, W) float logits.
        size: (H0, W0) target rows and columns, e.g. the original image size.

    Returns:
        (Q, H0, W0) logits, same dtype and device; the input itself when the size already matches.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (Q, H, W), got {tuple(logits.shape)}")
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]
