"""Visualising label maps: colour maps, label PNGs of class ids (8-bit palette or 16-bit), legend overlays.

Two colour maps: ``palette`` is the PASCAL VOC map (id 0 black), kept for benchmark label maps where class 0
is background; ``class_palette`` gives every class a bright colour, for user label sets where class 0 is
an ordinary class (``ovss segment``, ``Prediction.save``).
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from ovss.errors import OvssError
from ovss.output.fonts import LegendFont
from ovss.storage.files import save_png

# Number of ids the VOC colour-map bit trick gives distinct colours to (3 x 8 bits of the id).
_MAX_PALETTE_IDS = 2**24
# Legend layout, in multiples of the font's line height.
_LEGEND_MARGIN = 0.5  # empty border around the legend
_LEGEND_ROW_SPACING = 1.4  # distance between the tops of two legend rows
_LEGEND_GAP = 0.4  # space between a swatch and its name, and between columns
_LEGEND_BACKGROUND = (255, 255, 255)  # legend panel colour (RGB)
_BAND_PIXELS = 1 << 20  # pixels blended at a time (about 30 MB of temporaries)
_LEGEND_TEXT = (0, 0, 0)  # class-name colour (RGB)
_SWATCH_OUTLINE = (96, 96, 96)  # 1-pixel frame around each swatch, visible for pale colours (RGB)
_LEGEND_NAME_WIDTH = 12  # longest name drawn, in line heights; longer ones end in "…"
_LEGEND_MIN_WIDTH = 16  # the legend is at most max(image width, this many line heights) wide


def rows_per_band(width: int) -> int:
    """Rows of a label map processed at a time by the writers (about ``_BAND_PIXELS`` pixels, at least 1)."""
    return max(_BAND_PIXELS // max(width, 1), 1)


def palette(n: int) -> npt.NDArray[np.uint8]:
    """The PASCAL VOC colour map: distinct RGB colours for class ids 0..n-1.

    Bit j of the id goes to bit 7 - j // 3 of the red (j % 3 == 0), green (1) or blue (2) channel, so
    0 -> black, 1 -> (128, 0, 0), 2 -> (0, 128, 0), 15 -> (192, 128, 128), 255 -> (224, 224, 192). The first
    256 colours are those of VOC's ``SegmentationClass`` PNGs; later ids keep getting distinct colours.

    Args:
        n: number of colours, 0 <= n <= 2**24.

    Returns:
        (n, 3) uint8 array of RGB colours.
    """
    return _voc_color_map(n)


def _voc_color_map(n: int) -> npt.NDArray[np.uint8]:
    """Implementation of ``palette`` (a separate name, since ``palette`` is also a parameter name below)."""
    if not 0 <= n <= _MAX_PALETTE_IDS:
        raise ValueError(f"palette size must be in [0, {_MAX_PALETTE_IDS}], got {n}")
    remaining_bits = np.arange(n, dtype=np.int64)  # (n,) id bits not yet distributed
    colors = np.zeros((n, 3), dtype=np.int64)  # (n, 3)
    for bit in range(8):
        for channel in range(3):
            colors[:, channel] |= ((remaining_bits >> channel) & 1) << (7 - bit)
        remaining_bits >>= 3
    return colors.astype(np.uint8)


# Golden-ratio hue steps keep successive classes far apart on the colour wheel; the (saturation, value)
# pairs cycle so that classes with close hues still differ, and a value >= 0.75 keeps every colour bright.
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
_SATURATION_VALUE = ((0.85, 0.95), (0.55, 0.85), (0.95, 0.75))


def class_palette(n: int) -> npt.NDArray[np.uint8]:
    """Bright, distinct RGB colours for user classes 0..n-1 (no class is black or grey).

    Class i gets hue ``(0.05 + 0.618... * i) mod 1`` with (saturation, value) cycling through
    (0.85, 0.95), (0.55, 0.85), (0.95, 0.75): the brightest channel is >= 191 and the colour is never grey.

    Args:
        n: number of colours, >= 0.

    Returns:
        (n, 3) uint8 array of RGB colours.
    """
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    colors = np.zeros((n, 3), dtype=np.uint8)  # (n, 3)
    for i in range(n):
        hue = (0.05 + _GOLDEN_RATIO_CONJUGATE * i) % 1.0
        saturation, value = _SATURATION_VALUE[i % len(_SATURATION_VALUE)]
        rgb = colorsys.hsv_to_rgb(hue, saturation, value)
        colors[i] = [round(255 * channel) for channel in rgb]
    return colors


def _check_palette(colors: np.ndarray, needed: int) -> npt.NDArray[np.uint8]:
    """Validate a user palette: (K, 3) uint8 with at least ``needed`` rows."""
    if colors.ndim != 2 or colors.shape[1] != 3 or colors.dtype != np.uint8:
        raise OvssError(
            f"palette must be a (K, 3) uint8 array of RGB colours, got dtype {colors.dtype} and shape "
            f"{colors.shape}; see ovss.output.overlay.palette"
        )
    if colors.shape[0] < needed:
        raise OvssError(f"palette has {colors.shape[0]} colours but {needed} are needed; give more colours")
    return colors


def save_label_png(
    labels: np.ndarray, path: str | os.PathLike[str], palette: np.ndarray | None = None, bit_depth: int | None = None
) -> Path:
    """Save a map of class ids as a PNG whose pixel values are the ids themselves.

    8-bit: a palette ('P' mode) PNG, ids 0..255 (255 is the usual "ignore" / "unlabelled" id), shown in
    colour by image viewers. 16-bit: a greyscale PNG, ids 0..65535, for label sets of more than 255
    classes (viewers show it dark; the ids are exact). Read back the ids with
    ``np.asarray(PIL.Image.open(path))`` (never via the RGB colours). The file is written atomically.

    Args:
        labels: (H, W) integer (or bool) class ids in 0..255 (8-bit) or 0..65535 (16-bit).
        path: destination, must end in ``.png``.
        palette: (K, 3) uint8 RGB colours of ids 0..K-1 of an 8-bit map (K <= 256; missing entries are black);
            default: the VOC colour map.
        bit_depth: 8 or 16; None: 8 when every id fits in 0..255, else 16.

    Returns:
        The destination path.

    Raises:
        OvssError: not a 2-D integer array, ids outside the bit depth's range, or an invalid palette.
    """
    if labels.ndim != 2 or labels.dtype.kind not in "iub":
        raise OvssError(f"label map must be an (H, W) integer array, got dtype {labels.dtype} and shape {labels.shape}")
    low, high = (int(labels.min()), int(labels.max())) if labels.size > 0 else (0, 0)
    if bit_depth is None:
        bit_depth = 8 if high <= 255 else 16
    if bit_depth not in (8, 16):
        raise OvssError(f"a label PNG has 8 or 16 bits per pixel, got bit_depth={bit_depth}")
    top = 2**bit_depth - 1
    if low < 0 or high > top:
        raise OvssError(
            f"a {bit_depth}-bit label PNG stores ids 0..{top}, but the label map holds ids {low}..{high}; "
            "save it with save_npy instead"
        )
    if bit_depth == 16:
        return save_png(path, Image.fromarray(np.ascontiguousarray(labels.astype(np.uint16))))  # mode 'I;16'
    colors = _voc_color_map(256) if palette is None else _check_palette(palette, 0)
    if colors.shape[0] > 256:
        colors = colors[:256]
    full_palette = np.zeros((256, 3), dtype=np.uint8)  # (256, 3) unused entries black
    full_palette[: colors.shape[0]] = colors
    indexed = Image.fromarray(np.ascontiguousarray(labels.astype(np.uint8)))  # mode 'L', (H, W)
    indexed.putpalette(full_palette.tobytes())  # becomes mode 'P'
    return save_png(path, indexed)


def _legend_panel(
    class_ids: Sequence[int], class_names: Sequence[str], colors: np.ndarray, height: int, width: int, font_size: int
) -> Image.Image:
    """Draw swatch + name rows for ``class_ids``, top to bottom, wrapping into columns to fit ``height``.

    Names wider than ``_LEGEND_NAME_WIDTH`` line heights end in "…"; the panel is at most
    max(``width``, ``_LEGEND_MIN_WIDTH`` line heights) wide, and when the classes do not fit, the last row
    says how many more there are (e.g. "… 985 more").
    """
    font = LegendFont(font_size)
    line_height = font.line_height
    margin = max(int(_LEGEND_MARGIN * line_height), 1)
    row_step = max(int(_LEGEND_ROW_SPACING * line_height), 2)
    gap = max(int(_LEGEND_GAP * line_height), 1)
    swatch = line_height
    rows_per_column = max((height - 2 * margin) // row_step, 1)
    names = {c: font.shorten(class_names[c], _LEGEND_NAME_WIDTH * line_height) for c in class_ids}
    max_width = max(width, _LEGEND_MIN_WIDTH * line_height)
    columns: list[list[int]] = []
    column_widths: list[int] = []
    used = 2 * margin - gap
    hidden = 0
    for start in range(0, len(class_ids), rows_per_column):
        column = list(class_ids[start : start + rows_per_column])
        column_width = swatch + gap + max(font.width(names[c]) for c in column)
        if columns and used + gap + column_width > max_width:  # no room: the last row counts the rest
            hidden = len(class_ids) - start + 1
            columns[-1][-1] = -1
            break
        columns.append(column)
        column_widths.append(column_width)
        used += gap + column_width
    more = f"… {hidden} more"
    if hidden:
        column_widths[-1] = max(column_widths[-1], font.width(more))
    panel_width = margin + sum(column_widths) + gap * (len(columns) - 1) + margin
    panel_height = max(height, 2 * margin + min(len(class_ids), rows_per_column) * row_step)
    panel = Image.new("RGB", (panel_width, panel_height), _LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(panel)
    x = margin
    for column, column_width in zip(columns, column_widths, strict=True):
        for row, class_id in enumerate(column):
            y = margin + row * row_step
            if class_id < 0:
                font.draw(draw, (x, y), more, _LEGEND_TEXT)
                continue
            color = tuple(int(value) for value in colors[class_id])
            draw.rectangle((x, y, x + swatch - 1, y + swatch - 1), fill=color, outline=_SWATCH_OUTLINE)
            font.draw(draw, (x + swatch + gap, y), names[class_id], _LEGEND_TEXT)
        x += column_width + gap
    return panel


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    alpha: float = 0.5,
    palette: np.ndarray | None = None,
    font_size: int | None = None,
) -> npt.NDArray[np.uint8]:
    """Blend class colours over an image and append a legend of the classes present.

    Each pixel with a class id c in [0, K) becomes round((1 - alpha) * pixel + alpha * colour[c]); pixels
    with other ids (e.g. 255 = ignore, or negative) keep their colour. To the right of the image, a white
    legend panel lists the classes present, in class order, as a colour swatch and the class name; the
    list wraps into further columns when it is taller than the image. Names are drawn in any script (fonts
    found through fontconfig, see ``ovss.output.fonts``); a long name ends in "…", and the legend is at most
    as wide as the image (or 16 text lines, if wider): classes beyond are counted on its last row
    ("… 985 more"). The full names are those given here. The image occupies the top-left
    (H, W) region of the result; the result is taller than H only if the image is shorter than one
    legend row.

    Args:
        image: (H, W, 3) uint8 RGB image.
        labels: (H, W) integer class ids.
        class_names: K names shown in the legend (e.g. canonical class names), in class-id order.
        alpha: weight of the class colour, in [0, 1].
        palette: (K', 3) uint8 RGB colours with K' >= K; default: the VOC colour map.
        font_size: legend text height in pixels; default: H / 40, clamped to [12, 48].

    Returns:
        (max(H, legend height), W + legend width, 3) uint8 RGB image; just the blended (H, W, 3) image
        when no pixel has a class id in [0, K).

    Raises:
        OvssError: mismatched or invalid shapes or dtypes, no class names, ``alpha`` outside [0, 1].
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise OvssError(f"overlay needs an (H, W, 3) uint8 RGB image, got dtype {image.dtype} and shape {image.shape}")
    if labels.shape != image.shape[:2] or labels.dtype.kind not in "iub":
        raise OvssError(
            f"overlay needs an integer label map of the image's size {image.shape[:2]}, got dtype "
            f"{labels.dtype} and shape {labels.shape}; resize the labels to the image first"
        )
    if len(class_names) == 0:
        raise OvssError("overlay needs the class names; give one name per class id")
    if not 0.0 <= alpha <= 1.0:
        raise OvssError(f"overlay alpha must be in [0, 1], got {alpha}")
    num_classes = len(class_names)
    colors = _voc_color_map(num_classes) if palette is None else _check_palette(palette, num_classes)
    height, width = labels.shape
    band = rows_per_band(width)  # no full-size int64 / float32 temporaries
    seen = np.zeros(num_classes, dtype=bool)  # (K,) classes with at least one pixel
    for start in range(0, height, band):
        ids = labels[start : start + band].astype(np.int64)  # (n, W)
        seen[ids[(ids >= 0) & (ids < num_classes)]] = True
    present = [int(class_id) for class_id in np.flatnonzero(seen)]  # ascending class order
    if not present:
        return image.copy()  # (H, W, 3) nothing to blend
    if font_size is None:
        font_size = min(max(round(height / 40), 12), 48)
    legend = _legend_panel(present, class_names, colors, height, width, font_size)
    canvas = np.empty((max(height, legend.height), width + legend.width, 3), dtype=np.uint8)  # (H', W + lw, 3)
    canvas[...] = _LEGEND_BACKGROUND
    canvas[: legend.height, width:] = np.asarray(legend)
    for start in range(0, height, band):
        stop = min(start + band, height)
        block = canvas[start:stop, :width]  # (n, W, 3) view of the result
        block[...] = image[start:stop]
        ids = labels[start:stop].astype(np.int64)  # (n, W)
        valid = (ids >= 0) & (ids < num_classes)  # (n, W)
        class_colors = colors[ids[valid]].astype(np.float32)  # (n_valid, 3)
        mixed = (1.0 - alpha) * block[valid].astype(np.float32) + alpha * class_colors  # (n_valid, 3)
        block[valid] = np.floor(mixed + 0.5).astype(np.uint8)
    return canvas  # (H', W + legend width, 3)


def save_overlay(
    path: str | os.PathLike[str],
    image: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    alpha: float = 0.5,
    palette: np.ndarray | None = None,
) -> Path:
    """Render ``overlay(image, labels, class_names, alpha, palette)`` and save it as a PNG, atomically.

    Args:
        path: destination, must end in ``.png``.
        image: (H, W, 3) uint8 RGB image.
        labels: (H, W) integer class ids.
        class_names: K names shown in the legend, in class-id order.
        alpha: weight of the class colour, in [0, 1].
        palette: (K', 3) uint8 RGB colours with K' >= K; default: the VOC colour map.

    Returns:
        The destination path.
    """
    return save_png(path, overlay(image, labels, class_names, alpha=alpha, palette=palette))
