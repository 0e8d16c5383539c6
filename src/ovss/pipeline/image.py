"""Image loading, the test-time keep-ratio resize and CLIP / ImageNet normalisation (spec §2.1).

Images travel through ovss as (H, W, 3) uint8 **RGB** arrays (segment-anything's convention). Files are
decoded exactly as the reference numbers were produced (mmcv ``imread(path, 'color')``: OpenCV, 8-bit,
3 channels, EXIF orientation applied) and only then turned from OpenCV's BGR into RGB.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, ImageOps

from ovss.errors import OvssError
from ovss.models.normalization import (  # every RGB statistic is defined once, there
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_MEAN,
    OPENAI_STD,
)
from ovss.models.normalization import MMSEG_OPENAI_MEAN as CLIP_MEAN  # OpenAI's, mmseg-rounded, 0-255 scale
from ovss.models.normalization import MMSEG_OPENAI_STD as CLIP_STD
from ovss.pipeline.decoder_messages import decoder_messages, warn_decoder_messages

# Long-side cap of the test-time resize (mmseg ``Resize(scale=(2048, S))``).
DEFAULT_MAX_LONG_SIDE = 2048
# Largest image accepted, in pixels (~179 MP): twice Pillow's default MAX_IMAGE_PIXELS, the size at which
# Pillow itself refuses a file as a possible decompression bomb.
MAX_IMAGE_PIXELS = 178_956_970

ImageSource = str | os.PathLike[str] | np.ndarray | Image.Image

_EXPECTED_ARRAY = "expected (H, W, 3) RGB, (H, W, 4) RGBA, (H, W, 1) or (H, W) greyscale"
_PIL_16_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _check_pixel_count(height: int, width: int, what: str) -> None:
    """Refuse images so large that decoding them could exhaust memory (decompression-bomb guard)."""
    if height * width > MAX_IMAGE_PIXELS:
        raise OvssError(
            f"{what} is {width}x{height} = {height * width / 1e6:.0f} megapixels, more than the "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit; resize it first"
        )


def _rgb_from_array(array: np.ndarray, what: str) -> npt.NDArray[np.uint8]:
    """Convert an image array of any accepted layout and dtype to a fresh (H, W, 3) uint8 RGB array.

    Accepted: (H, W), (H, W, 1), (H, W, 3) RGB, (H, W, 4) RGBA (alpha dropped); uint8, uint16 (high byte,
    ``value >> 8`` as OpenCV's 16-to-8-bit conversion) or bool (False -> 0, True -> 255).
    """
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise OvssError(f"{what} has shape {array.shape}; {_EXPECTED_ARRAY}")
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise OvssError(f"{what} is empty (shape {array.shape}); {_EXPECTED_ARRAY} with H, W >= 1")
    _check_pixel_count(height, width, what)
    if array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * np.uint8(255)
    elif array.dtype.kind == "u" and array.dtype.itemsize == 1:
        pixels = array.astype(np.uint8)
    elif array.dtype.kind == "u" and array.dtype.itemsize == 2:
        pixels = (array.astype(np.uint16) >> 8).astype(np.uint8)
    else:
        raise OvssError(
            f"{what} has dtype {array.dtype}; expected uint8 (0-255), uint16 or bool; "
            "convert floats in [0, 1] with (x * 255).round().astype(np.uint8)"
        )
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]  # (H, W, 1)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)  # (H, W, 3)
    return np.ascontiguousarray(pixels[:, :, :3])  # (H, W, 3)


def _read_only_rgb(array: np.ndarray) -> bool:
    """An array ``read_image`` may keep without copying: read-only, (H, W, 3) uint8, C-contiguous, not empty."""
    return (
        not array.flags.writeable
        and array.dtype == np.uint8
        and array.ndim == 3
        and array.shape[2] == 3
        and array.shape[0] > 0
        and array.shape[1] > 0
        and array.flags.c_contiguous
    )


def _rgb_from_pil(image: Image.Image, what: str) -> npt.NDArray[np.uint8]:
    """Apply the EXIF orientation of a PIL image and convert it to (H, W, 3) uint8 RGB (alpha dropped)."""
    width, height = image.size
    _check_pixel_count(height, width, what)
    oriented = ImageOps.exif_transpose(image)
    if oriented.mode in _PIL_16_BIT_MODES:
        return _rgb_from_array(np.asarray(oriented), what)  # 16-bit greyscale: high byte, as OpenCV
    return np.array(oriented.convert("RGB"), dtype=np.uint8)  # (H, W, 3)


def _probe_pixel_count(path: Path) -> None:
    """Read only the header (with Pillow, from the file: no copy of its bytes) and refuse oversized images."""
    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as error:
        raise OvssError(
            f"cannot read image '{path}': more than {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels (possible "
            "decompression bomb); resize it first"
        ) from error
    except Exception:  # Pillow cannot parse the header; OpenCV may still decode it (checked afterwards).
        return
    _check_pixel_count(height, width, f"image '{path}'")


def _read_image_file(path: Path) -> npt.NDArray[np.uint8]:
    """Decode an image file like mmcv ``imread(path, 'color')``, then convert BGR to RGB."""
    if not path.exists():
        raise OvssError(f"cannot read image '{path}': file not found; check the path")
    if path.is_dir():
        raise OvssError(f"cannot read image '{path}': it is a folder; give an image file")
    try:
        data = np.fromfile(path, dtype=np.uint8)  # (n_bytes,) the encoded file
    except OSError as error:
        raise OvssError(f"cannot read image '{path}': {error.strerror}; check the file") from error
    if data.size == 0:
        raise OvssError(f"cannot read image '{path}': the file is empty; give an image file")
    _probe_pixel_count(path)
    with decoder_messages() as messages:
        try:
            decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)  # (H, W, 3) uint8 BGR or None
        except cv2.error:
            decoded = None
    if decoded is not None:
        del data  # the encoded bytes are no longer needed: free them before the Python caller's next step
        warn_decoder_messages(path, messages)
        _check_pixel_count(decoded.shape[0], decoded.shape[1], f"image '{path}'")
        return bgr_to_rgb_inplace(decoded)  # (H, W, 3) RGB, no second full-size copy
    # OpenCV lacks a decoder for this format (e.g. TGA, PCX, ICO): fall back to Pillow.
    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            image.load()
            return _rgb_from_pil(image, f"image '{path}'")
    except OvssError:
        raise
    except Exception as error:
        raise OvssError(
            f"cannot read image '{path}': not a decodable image file (truncated or not an image)"
        ) from error


def bgr_to_rgb_inplace(image: np.ndarray) -> npt.NDArray[np.uint8]:
    """Swap the first and last channel of a C-contiguous (H, W, 3) uint8 array in place and return it.

    The same values as ``np.ascontiguousarray(image[:, :, ::-1])`` without a second full-size array
    (243 MB for a 9000 x 9000 photo).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or not image.flags.c_contiguous:
        return np.ascontiguousarray(image[:, :, ::-1])  # (H, W, 3) not in OpenCV's layout: a copy
    cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)  # (H, W, 3) channels swapped in place
    return image


def read_image(source: ImageSource) -> npt.NDArray[np.uint8]:
    """Load an image as an (H0, W0, 3) uint8 RGB array.

    * A path is decoded with OpenCV exactly as mmcv ``imread(path, 'color')`` does (EXIF orientation
      applied; greyscale and palette images expanded to 3 channels; alpha dropped; 16-bit reduced to
      8-bit), then converted from BGR to RGB. Formats OpenCV cannot decode are read with Pillow.
    * An array is (H, W, 3) uint8 RGB (segment-anything's convention); also accepted: (H, W) and
      (H, W, 1) greyscale, (H, W, 4) RGBA (alpha dropped), uint16 (reduced with ``value >> 8``, as
      OpenCV does) and bool (0 / 255). Float arrays are refused.
    * A PIL image gets its EXIF orientation applied and is converted to RGB.

    Args:
        source: image file path, array or PIL image.

    Returns:
        A new (H0, W0, 3) uint8 array in RGB channel order, values 0..255 (never a view of ``source``), except
        for a read-only (H, W, 3) uint8 C-contiguous array, which is returned as it is (no copy: nothing can
        change it through that array; the demo shares one decoded upload between its methods this way).

    Raises:
        OvssError: missing, unreadable, corrupt or non-image file; an array of another dtype or shape or
            an empty image; an image of more than ``MAX_IMAGE_PIXELS`` pixels; an unsupported type.
    """
    if isinstance(source, (str, os.PathLike)):
        return _read_image_file(Path(source))
    if isinstance(source, np.ndarray):
        if _read_only_rgb(source):
            _check_pixel_count(source.shape[0], source.shape[1], "image array")
            return source  # nothing can change it through this array: shared, not copied
        return _rgb_from_array(source, "image array")
    if isinstance(source, Image.Image):
        return _rgb_from_pil(source, "PIL image")
    raise OvssError(
        f"cannot read an image from a {type(source).__name__}; give a file path, a numpy array or a PIL image"
    )


def resized_shape(
    height: int, width: int, short_side: int | None, max_long_side: int = DEFAULT_MAX_LONG_SIDE
) -> tuple[int, int]:
    """Size after the keep-ratio resize of mmseg ``Resize(scale=(max_long_side, short_side))``.

    r = min(long / max(H0, W0), short / min(H0, W0)) with long = max(max_long_side, short_side) and
    short = min(max_long_side, short_side) (mmcv ``rescale_size``; for short_side <= max_long_side this
    is the short side becoming ``short_side`` unless the long side would exceed ``max_long_side``);
    H = int(H0 r + 0.5), W = int(W0 r + 0.5). Up-scaling is allowed. A side that would round to 0 (only
    for extremely elongated images, where mmcv fails) is kept at 1.

    Args:
        height: original rows H0 (>= 1).
        width: original columns W0 (>= 1).
        short_side: target short side S in pixels (>= 1), or None for no resize.
        max_long_side: cap of the long side in pixels (>= 1).

    Returns:
        (H, W), the processing size in pixels.

    Raises:
        OvssError: a non-positive size or target.
    """
    if height < 1 or width < 1:
        raise OvssError(f"image size must be positive, got {height}x{width} (rows x columns)")
    if short_side is None:
        return height, width
    if short_side < 1 or max_long_side < 1:
        raise OvssError(
            f"resize targets must be positive, got short_side={short_side}, max_long_side={max_long_side}; "
            "use short_side=None to keep the original size"
        )
    long_edge, short_edge = max(max_long_side, short_side), min(max_long_side, short_side)
    ratio = min(long_edge / max(height, width), short_edge / min(height, width))
    new_height = max(int(height * ratio + 0.5), 1)
    new_width = max(int(width * ratio + 0.5), 1)
    return new_height, new_width


def resize_short_side(
    image: np.ndarray, short_side: int | None, max_long_side: int = DEFAULT_MAX_LONG_SIDE
) -> np.ndarray:
    """Keep-ratio test-time resize (spec §2.1): short side to ``short_side``, long side at most the cap.

    The size follows ``resized_shape``; pixels are interpolated with ``cv2.resize(..., INTER_LINEAR)``
    (bilinear, half-pixel centres, no anti-aliasing), exactly as mmcv ``imrescale``.

    Args:
        image: (H0, W0, 3) uint8 RGB image (any array ``cv2.resize`` accepts works the same way).
        short_side: target short side S in pixels, or None to return ``image`` itself, unchanged.
        max_long_side: cap of the long side in pixels.

    Returns:
        The (H, W, 3) resized image, same dtype as ``image``.
    """
    if short_side is None:
        return image
    new_height, new_width = resized_shape(image.shape[0], image.shape[1], short_side, max_long_side)
    return cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_LINEAR)  # (H, W, 3)


def clip_normalize(
    image: np.ndarray,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> torch.Tensor:
    """Normalise an RGB image with a CLIP model's statistics: (pixel - mean) / std on the 0-255 scale.

    The arithmetic is done in float32 (on ``device``); the result is then cast to ``dtype``. The default
    statistics are mmseg's rounded OpenAI values; a model's own come from
    ``clip.input_norm.pixel_statistics()`` (:class:`ovss.models.normalization.InputNorm`).

    Args:
        image: (H, W, 3) uint8 RGB image.
        device: device of the returned tensor.
        dtype: dtype of the returned tensor.
        mean: per-channel RGB mean on the 0-255 scale.
        std: per-channel RGB standard deviation on the 0-255 scale (> 0).

    Returns:
        (3, H, W) tensor, channel order RGB, values roughly in [-1.8, 2.2].

    Raises:
        OvssError: ``image`` is not an (H, W, 3) uint8 array.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise OvssError(
            f"clip_normalize needs an (H, W, 3) uint8 RGB image, got dtype {image.dtype} and shape "
            f"{image.shape}; load it with read_image first"
        )
    height, width = image.shape[:2]
    source = torch.from_numpy(np.ascontiguousarray(image))  # (H, W, 3) uint8, shares the array's memory
    # One float32 channel at a time, written into the result: the same elementwise (x - mean) / std in float32
    # as on the whole (3, H, W) tensor, without its uint8 copy and three full-size float temporaries.
    normalized = torch.empty(3, height, width, dtype=torch.float32, device=device)  # (3, H, W)
    for channel in range(3):
        plane = normalized[channel]  # (H, W) view
        plane.copy_(source[:, :, channel])  # uint8 -> float32, onto the device
        plane.sub_(float(np.float32(mean[channel]))).div_(float(np.float32(std[channel])))
    return normalized if dtype == torch.float32 else normalized.to(dtype)  # (3, H, W) contiguous


def imagenet_from_clip(
    x: torch.Tensor,
    clip_mean: tuple[float, float, float] = OPENAI_MEAN,
    clip_std: tuple[float, float, float] = OPENAI_STD,
) -> torch.Tensor:
    """Re-normalise CLIP-normalised pixels with ImageNet statistics (the input DINO expects, spec §4.7 step 1).

    Exactly the ProxyCLIP / GLA-CLIP releases' arithmetic, in float32: un-normalise with the CLIP statistics on
    the 0-1 scale, y = x * clip_std + clip_mean (multiply, then add; two roundings, no fused multiply-add),
    then (y - IMAGENET_MEAN) / IMAGENET_STD. This is not pixel / 255: ``clip_normalize`` used mmseg's rounded
    0-255 statistics, so the two differ by up to ~1.6e-5, which GLA's hard cut-offs would turn into logit
    differences near 1e-2. A pure per-channel affine map: apply any zero padding after it.

    Args:
        x: (..., 3, H, W) CLIP-normalised RGB pixels (output of ``clip_normalize``).
        clip_mean: the CLIP model's RGB mean on the 0-1 scale (default OpenAI's, unrounded).
        clip_std: the CLIP model's RGB standard deviation on the 0-1 scale (default OpenAI's, unrounded).

    Returns:
        (..., 3, H, W) tensor of the same dtype and device, ImageNet-normalised, roughly in [-2.2, 2.7].

    Raises:
        ValueError: ``x`` has no channel dimension of size 3 at position -3.
    """
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected a (..., 3, H, W) tensor, got shape {tuple(x.shape)}")
    mean = torch.tensor(clip_mean, dtype=torch.float32, device=x.device).view(3, 1, 1)  # (3, 1, 1)
    std = torch.tensor(clip_std, dtype=torch.float32, device=x.device).view(3, 1, 1)  # (3, 1, 1)
    in_mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)  # (3, 1, 1)
    in_std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)  # (3, 1, 1)
    unit_pixels = x.to(torch.float32) * std  # (..., 3, H, W) rounded to fp32 before the add, as the releases
    unit_pixels = unit_pixels + mean  # (..., 3, H, W) in [0, 1]
    return ((unit_pixels - in_mean) / in_std).to(x.dtype)  # (..., 3, H, W)
