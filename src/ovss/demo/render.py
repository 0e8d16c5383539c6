"""What the demo page shows besides the overlays: the window grid, an HTML colour legend, timings."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from ovss.output.files import class_areas
from ovss.output.overlay import class_palette

if TYPE_CHECKING:
    from ovss.demo.session import MethodResult
    from ovss.pipeline.windows import Window

WINDOW_COLOURS = ((255, 255, 255), (20, 20, 20))  # each window edge: a light line with a dark line inside


def draw_windows(
    picture: np.ndarray, windows: Sequence[Window], size: tuple[int, int], image_size: tuple[int, int]
) -> np.ndarray:
    """Draw the outline of every sliding window over the photo part of an overlay.

    Args:
        picture: (H', W', 3) uint8 RGB overlay whose top-left (H0, W0) region is the photo.
        windows: windows in processing pixels (``Segmenter.current_windows``).
        size: (H, W) processing size the windows live in.
        image_size: (H0, W0) size of the photo in the overlay.

    Returns:
        A new (H', W', 3) uint8 RGB image; the legend part is untouched.
    """
    H, W = size
    H0, W0 = image_size
    sy, sx = H0 / H, W0 / W  # processing pixels -> photo pixels
    width = max(1, round(min(H0, W0) / 400))  # line width in photo pixels
    canvas = Image.fromarray(picture)
    photo = canvas.crop((0, 0, W0, H0))
    draw = ImageDraw.Draw(photo)
    for win in windows:
        box = (round(win.x1 * sx), round(win.y1 * sy), round(win.x2 * sx) - 1, round(win.y2 * sy) - 1)
        draw.rectangle(box, outline=WINDOW_COLOURS[0], width=width)
        inner = (box[0] + width, box[1] + width, box[2] - width, box[3] - width)
        if inner[0] < inner[2] and inner[1] < inner[3]:
            draw.rectangle(inner, outline=WINDOW_COLOURS[1], width=width)
    canvas.paste(photo, (0, 0))
    return np.asarray(canvas, dtype=np.uint8).copy()  # (H', W', 3)


def legend_html(result: MethodResult) -> str:
    """The classes present in a result, as colour swatch + name + share of the image, in class order."""
    prediction = result.prediction
    areas = class_areas(prediction.compact_labels.cpu().numpy(), prediction.classes)  # pixels and shares
    names = [synonyms[0] for synonyms in prediction.classes]
    colours = class_palette(len(names))  # (C, 3) the overlay's colours
    rows = []
    for c, name in enumerate(names):
        if areas["classes"][c]["pixels"] == 0:
            continue
        r, g, b = (int(v) for v in colours[c])
        rows.append(
            f'<span class="ovss-legend-item"><span class="ovss-swatch" style="background: rgb({r}, {g}, {b})">'
            f'</span><span class="ovss-legend-name">{html.escape(name)}</span> '
            f"<small>{100 * areas['classes'][c]['area']:.1f}%</small></span>"
        )
    unlabelled = areas["unlabelled"]
    if unlabelled["pixels"]:
        rows.append(f'<span class="ovss-legend-item">unlabelled <small>{100 * unlabelled["area"]:.1f}%</small></span>')
    return f'<div class="ovss-legend">{"".join(rows)}</div>'


def timing_markdown(results: Sequence[MethodResult], set_image_calls: int) -> str:
    """A table of what each method took, saying when the image features came from the cache; with the image
    read once per click, it accounts for the whole click (the text embeddings are in the labels column)."""
    lines = [
        "| method | windows | image features | labels | overlay | total |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        features = "cached (fast path)" if r.cached else f"{r.encode_seconds:.2f} s"
        total = r.encode_seconds + r.predict_seconds + r.overlay_seconds
        lines.append(
            f"| {r.method} | {r.windows} | {features} | {r.predict_seconds:.2f} s | {r.overlay_seconds:.2f} s "
            f"| {total:.2f} s |"
        )
    read = results[0].read_seconds if results else 0.0
    lines.append(f"\nReading the image: {read:.2f} s. Image encodings since start: {set_image_calls}.")
    return "\n".join(lines)


def config_json(results: Sequence[MethodResult]) -> dict[str, Any]:
    """The resolved configuration per method, JSON-safe (tuples as lists, other objects as text)."""
    return {r.method: json.loads(json.dumps(r.config, default=str)) for r in results}
