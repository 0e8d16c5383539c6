"""What the image stage of :class:`~ovss.predictor.Segmenter` holds: an image cut into windows, and its features.

``set_image`` is two steps: :class:`ImageWindows` (read, resize, normalise, window, crop, pad) and the
encoding of its windows into an :class:`ImageState`; the pooled ``predict_many`` (:mod:`ovss.pipeline.pooled`)
runs the same two steps with several images' windows in one backbone forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ovss.methods.common import MethodOutput, WindowBatch
from ovss.pipeline.windows import Layout, Padding, Window


@dataclass
class ImageState:
    """What :meth:`Segmenter.set_image` keeps: the image stage's dense features and the geometry to stitch them."""

    rgb: np.ndarray  # (H0, W0, 3) uint8 original image
    pixels: torch.Tensor  # (3, H, W) CLIP-normalised image the windows were cut from (Trident: the canvas)
    windows: list[Window]  # L windows in processing pixels
    padding: Padding  # symmetric padding of every window
    padded_size: tuple[int, int]  # size of each window as fed to the backbone
    features: torch.Tensor  # (L', gr * gc, E) fp32 L2-normalised dense features on ``layout``'s windows
    grid: tuple[int, int]  # (gr, gc) token grid of the features
    info: dict[str, Any]  # method diagnostics, per image
    window_info: dict[str, list[Any]]  # method diagnostics, one entry per window (all sub-batches)
    layout: Layout  # where the features live: the input windows, or the method's own (Trident: SAM's grid)
    extras: dict[str, Any] = field(default_factory=dict)  # what MethodSpec.score / .post read (MethodOutput.extras)


@dataclass(frozen=True)
class ImageWindows:
    """An image cut into the windows the backbones take (the first step of ``set_image``)."""

    rgb: np.ndarray  # (H0, W0, 3) uint8 original image
    pixels: torch.Tensor  # (3, H, W) CLIP-normalised processing image (Trident: the canvas)
    windows: list[Window]  # L windows in processing pixels, all of one size
    padding: Padding  # symmetric padding of every window
    padded_size: tuple[int, int]  # (h', w') size of each window as fed to the backbone
    crops: torch.Tensor  # (L, 3, h', w') padded windows

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the processing image the windows live in."""
        return int(self.pixels.shape[-2]), int(self.pixels.shape[-1])

    def batch(self, start: int, stop: int) -> WindowBatch:
        """Windows ``start:stop`` as the method's ``run`` takes them."""
        crops = self.crops[start:stop]  # (l, 3, h', w')
        return WindowBatch(crops, self.windows[start:stop], self.padding, self.image_size, self.pixels, self.rgb)

    def state(self, out: MethodOutput, features: torch.Tensor) -> ImageState:
        """The image's :class:`ImageState` from its image stage's output and dense features (L', N, E)."""
        layout = out.layout or Layout(tuple(self.windows), self.padding, self.padded_size, self.image_size)
        return ImageState(
            self.rgb, self.pixels, self.windows, self.padding, self.padded_size, features, out.grid, out.info,
            out.window_info, layout, out.extras,
        )  # fmt: skip
