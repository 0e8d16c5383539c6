"""SAM's input and output geometry (segment-anything ``utils/transforms.py`` and ``Sam.preprocess/postprocess``).

The encoder sees the image resized so that its long side is 1024 (``get_preprocess_shape``: scale, then
``int(x + 0.5)`` per side; PIL bilinear, which anti-aliases when shrinking), normalised with SAM's RGB
statistics on the 0-255 scale and zero-padded bottom/right to 1024 x 1024. Prompts are scaled to the resized
frame per axis; low-resolution mask logits go back through 1024 x 1024, a crop to the resized size, and a
resize to the original size (both bilinear, ``align_corners=False``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ovss.models.normalization import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGE_SIZE",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "ResizeLongestSide",
    "get_preprocess_shape",
    "postprocess_masks",
    "preprocess",
]

IMAGE_SIZE = 1024  # side of SAM's square encoder input in pixels
# SAM's RGB statistics on the 0-255 scale: 123.675, 116.28, 103.53 / 58.395, 57.12, 57.375 (ImageNet's x 255).
PIXEL_MEAN = tuple(255.0 * m for m in IMAGENET_MEAN)
PIXEL_STD = tuple(255.0 * s for s in IMAGENET_STD)


def get_preprocess_shape(old_h: int, old_w: int, long_side: int) -> tuple[int, int]:
    """(new_h, new_w) with the long side ``long_side``: each side scaled, then rounded half up (``int(x + 0.5)``)."""
    scale = long_side * 1.0 / max(old_h, old_w)
    new_h, new_w = old_h * scale, old_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


class ResizeLongestSide:
    """Resizes images to a long side of ``target_length`` and maps point and box coordinates the same way."""

    def __init__(self, target_length: int = IMAGE_SIZE) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (h, w, 3) uint8, PIL bilinear (anti-aliased when shrinking)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        h, w = get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))

    def apply_coords(self, coords: np.ndarray | Tensor, original_size: tuple[int, int]) -> np.ndarray | Tensor:
        """(..., 2) (x, y) pixel coordinates of an ``original_size`` (H, W) image -> the resized frame (float)."""
        old_h, old_w = original_size
        new_h, new_w = get_preprocess_shape(old_h, old_w, self.target_length)
        if isinstance(coords, Tensor):
            out = coords.clone().to(torch.float)  # (..., 2)
            out[..., 0] = out[..., 0] * (new_w / old_w)
            out[..., 1] = out[..., 1] * (new_h / old_h)
            return out
        array = np.array(coords, dtype=float)  # (..., 2)
        array[..., 0] = array[..., 0] * (new_w / old_w)
        array[..., 1] = array[..., 1] * (new_h / old_h)
        return array

    def apply_boxes(self, boxes: np.ndarray | Tensor, original_size: tuple[int, int]) -> np.ndarray | Tensor:
        """(B, 4) boxes (x0, y0, x1, y1) -> the resized frame, (B, 4) float."""
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)


def preprocess(x: Tensor, image_size: int = IMAGE_SIZE) -> Tensor:
    """Normalise with SAM's statistics and zero-pad bottom/right to ``image_size`` square.

    Args:
        x: (..., 3, h, w) float RGB on the 0-255 scale, h and w <= ``image_size``.

    Returns:
        (..., 3, image_size, image_size).
    """
    mean = torch.tensor(PIXEL_MEAN, dtype=x.dtype, device=x.device).view(-1, 1, 1)  # (3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=x.dtype, device=x.device).view(-1, 1, 1)  # (3, 1, 1)
    x = (x - mean) / std  # (..., 3, h, w)
    h, w = x.shape[-2:]
    if h > image_size or w > image_size:
        raise ValueError(f"image {h}x{w} is larger than SAM's {image_size}x{image_size} input; resize it first")
    return F.pad(x, (0, image_size - w, 0, image_size - h))  # (..., 3, S, S)


def postprocess_masks(
    masks: Tensor, input_size: tuple[int, int], original_size: tuple[int, int], image_size: int = IMAGE_SIZE
) -> Tensor:
    """Low-resolution mask logits back to the original image: up-sample, crop the padding, resize.

    Args:
        masks: (B, k, 256, 256) logits from the mask decoder.
        input_size: (h, w) of the resized image before padding.
        original_size: (H0, W0) to return.

    Returns:
        (B, k, H0, W0) logits (threshold at 0 for masks).
    """
    masks = F.interpolate(masks, (image_size, image_size), mode="bilinear", align_corners=False)  # (B, k, S, S)
    masks = masks[..., : input_size[0], : input_size[1]]  # (B, k, h, w)
    return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)  # (B, k, H0, W0)
