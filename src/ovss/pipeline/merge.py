"""Stitching per-window logits into one logit map, and bilinear resizing, one row band at a time (spec §2.5).

Nothing here needs a whole (Q, H, W) map: :func:`resize_rows` computes any band of output rows of a
bilinear resize from the few source rows it reads, and :class:`StitchedLogits` computes any band of the
full-resolution logit map (window up-sampling, crop, overlap average, resize to H0 x W0) from the small
per-window logits. The whole-map functions are the same code with one band covering every row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ovss.pipeline.windows import Padding, Window


def bilinear_taps(
    in_size: int, out_size: int, start: int, stop: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of output positions ``start .. stop - 1`` of a 1-D bilinear resize.

    Half-pixel convention (``align_corners=False``, no anti-aliasing) as PyTorch computes it: ratio
    ``in/out`` in ``dtype``, source ``ratio * (i + 0.5) - 0.5`` rounded once to ``dtype`` (PyTorch's
    CPU kernel evaluates it as one fused multiply-add) and clamped at 0; the upper neighbour is clamped to
    the last input position.

    Args:
        in_size: input length n_in >= 1.
        out_size: output length n_out >= 1.
        start: first output position, in [0, n_out].
        stop: one past the last output position, in [start, n_out].
        dtype: float dtype of the weights (the dtype of the data being resized).

    Returns:
        ``(i0, i1, w0, w1)``: (stop - start,) int64 indices in [0, n_in) and weights in [0, 1] with
        ``out[i] = w0[i] * x[i0[i]] + w1[i] * x[i1[i]]``.
    """
    ratio = torch.tensor(in_size, dtype=dtype) / out_size  # () in dtype, as PyTorch
    dst = torch.arange(start, stop, dtype=torch.float64)  # (n,)
    src = ((dst + 0.5) * ratio.double() - 0.5).to(dtype).clamp_(min=0)  # (n,) one rounding
    i0 = src.floor().long().clamp_(max=in_size - 1)  # (n,)
    w1 = (src - i0.to(dtype)).clamp_(0, 1)  # (n,)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)  # (n,)
    return i0, i1, 1 - w1, w1


def source_span(
    in_size: int, out_size: int, start: int, stop: int, dtype: torch.dtype = torch.float32
) -> tuple[int, int]:
    """The input rows ``[first, last)`` that output rows ``[start, stop)`` of a bilinear resize of a
    ``dtype`` map read (the taps are computed in the data's dtype, so pass it for non-fp32 maps)."""
    if start >= stop:
        return 0, 0
    i0, i1, _, _ = bilinear_taps(in_size, out_size, start, stop, dtype)
    return int(i0.min()), int(i1.max()) + 1


def resize_rows(
    rows: torch.Tensor, first: int, in_height: int, size: tuple[int, int], start: int, stop: int
) -> torch.Tensor:
    """Rows ``start .. stop - 1`` of the bilinear resize of a map to ``size``, from the rows they read.

    Exactly the rows of the whole resize (same arithmetic per element): the rows are interpolated first,
    at the input width (:func:`bilinear_taps`), then every row is resized along its columns with
    PyTorch's 1-D linear kernel (same half-pixel convention). Agrees with ``F.interpolate(...,
    mode="bilinear", align_corners=False)`` to float round-off (the two passes round separately).

    Args:
        rows: (C, k, w) rows ``first .. first + k - 1`` of a (C, in_height, w) float map; they must
            include :func:`source_span` of the output rows.
        first: index of the first row held in ``rows``.
        in_height: rows of the whole input map.
        size: (H_out, W_out) of the whole output map.
        start: first output row.
        stop: one past the last output row.

    Returns:
        (C, stop - start, W_out) output rows, dtype and device of ``rows``.
    """
    out_height, out_width = size
    i0, i1, a0, a1 = (t.to(rows.device) for t in bilinear_taps(in_height, out_height, start, stop, rows.dtype))
    if int(i0.min()) < first or int(i1.max()) >= first + rows.shape[1]:
        held = f"{first}..{first + rows.shape[1] - 1}"
        raise ValueError(f"rows {held} do not hold the source rows of output rows {start}..{stop - 1}")
    top = rows.index_select(1, i0 - first).mul_(a0[:, None])  # (C, n, w)
    band = top.add_(rows.index_select(1, i1 - first).mul_(a1[:, None]))  # (C, n, w)
    if rows.shape[-1] == out_width:
        return band
    return F.interpolate(band, size=out_width, mode="linear", align_corners=False)  # (C, n, W_out)


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize a whole logit map (half-pixel, ``align_corners=False``, no anti-aliasing).

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
    return resize_rows(logits, 0, logits.shape[1], size, 0, size[0])


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


class StitchedLogits:
    """Per-window logits and their geometry; computes any row band of the stitched, resized logit map.

    Rows ``[r0, r1)`` of the (Q, H0, W0) map need rows :func:`source_span` of the (Q, H, W) merged map,
    and each merged row needs only the windows covering it, up-sampled only on the rows it reads. So
    a band costs O(Q x band x W0) memory and the result equals the same rows of the whole computation
    (:meth:`full`) exactly.
    """

    def __init__(
        self,
        window_logits: torch.Tensor | Sequence[torch.Tensor],
        windows: Sequence[Window],
        padding: Padding | Sequence[Padding],
        padded_size: tuple[int, int] | Sequence[tuple[int, int]],
        image_size: tuple[int, int],
        output_size: tuple[int, int] | None = None,
    ) -> None:
        """Validate the geometry once.

        Args:
            window_logits: (L, Q, gr, gc) logits on the token grid of each window, any float dtype; or a
                sequence of L tensors (Q, gr_b, gc_b) when windows differ in grid size.
            windows: the L windows in processing pixels (spec §2.2), same order as ``window_logits``.
            padding: padding added around every window before the backbone, or one ``Padding`` per window.
            padded_size: (rows, cols) of the padded window fed to the backbone, or one pair per window;
                must equal the window size plus its padding.
            image_size: (H, W) of the processing image.
            output_size: (H0, W0) of the output map (default: the processing size, no resize).

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
        self.dtype = torch.promote_types(logits_list[0].dtype, torch.float32)
        self.device = logits_list[0].device
        self.window_logits = [t.to(self.dtype) for t in logits_list]  # L x (Q, gr_b, gc_b)
        self.windows = list(windows)
        self.paddings = paddings
        self.padded_sizes = sizes
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.output_size = self.image_size if output_size is None else (int(output_size[0]), int(output_size[1]))
        self.num_queries = int(num_queries)
        self.count = _coverage_count(windows, self.image_size).to(self.device)  # (H, W) int64

    def merged_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the (Q, H, W) overlap average at the processing size.

        Each covering window's logits are bilinearly up-sampled (half-pixel) to its padded size, only on
        the needed rows, the padding is cropped away and the result added at ``[y1:y2, x1:x2]``; the sum
        is divided by the number of windows covering each pixel.

        Returns:
            (Q, stop - start, W) logits, dtype ``promote_types(input dtype, float32)``.
        """
        width = self.image_size[1]
        canvas = torch.zeros(self.num_queries, stop - start, width, dtype=self.dtype, device=self.device)
        for logits, win, pad, (rows, cols) in zip(
            self.window_logits, self.windows, self.paddings, self.padded_sizes, strict=True
        ):
            lo, hi = max(start, win.y1), min(stop, win.y2)  # image rows this window adds to
            if lo >= hi:
                continue
            a, b = lo - win.y1 + pad.top, hi - win.y1 + pad.top  # the same rows in the padded window
            first, last = source_span(logits.shape[1], rows, a, b, self.dtype)
            up = resize_rows(logits[:, first:last], first, logits.shape[1], (rows, cols), a, b)  # (Q, n, cols)
            canvas[:, lo - start : hi - start, win.x1 : win.x2] += up[:, :, pad.left : pad.left + win.width]
        canvas /= self.count[start:stop].to(self.dtype)[None]  # (Q, n, W)
        return canvas

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the (Q, H0, W0) logit map: merged, then bilinearly resized to H0 x W0.

        Returns:
            (Q, stop - start, W0) logits, dtype ``promote_types(input dtype, float32)``.
        """
        if not 0 <= start <= stop <= self.output_size[0]:
            raise ValueError(f"rows {start}..{stop} outside the {self.output_size[0]}-row output")
        if self.output_size == self.image_size:
            return self.merged_rows(start, stop)
        height = self.image_size[0]
        first, last = source_span(height, self.output_size[0], start, stop, self.dtype)
        merged = self.merged_rows(first, last)  # (Q, k, W)
        return resize_rows(merged, first, height, self.output_size, start, stop)  # (Q, n, W0)

    def full(self) -> torch.Tensor:
        """The whole (Q, H0, W0) logit map (one band covering every row)."""
        return self.rows(0, self.output_size[0])


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
    covering each pixel. See :class:`StitchedLogits` for the arguments; this is its whole map.

    Returns:
        (Q, H, W) averaged logits, dtype ``promote_types(input dtype, float32)``, on the input device.

    Raises:
        ValueError: on inconsistent counts or sizes, a window outside the image, or an uncovered pixel.
    """
    return StitchedLogits(window_logits, windows, padding, padded_size, image_size).full()
