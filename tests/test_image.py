"""Image decoding, the keep-ratio resize and CLIP / ImageNet normalisation (spec §2.1)."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovss.errors import OvssError
from ovss.output.overlay import palette
from ovss.pipeline.image import (
    MAX_IMAGE_PIXELS,
    bgr_to_rgb_inplace,
    clip_normalize,
    imagenet_from_clip,
    read_image,
    resize_short_side,
    resized_shape,
)

VOC = "voc2012-val-samples"
CITYSCAPES_FRAME = "cityscapes-val-sample/frankfurt_000000_000294_leftImg8bit.png"


def _random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)  # (H, W, 3)


# ----------------------------------------------------------------------------------------------------
# resize


@pytest.mark.parametrize(
    ("height", "width", "short_side", "expected"),
    [
        (375, 500, 336, (336, 448)),  # spec: 500x375 (W x H) -> 448x336
        (1024, 2048, 560, (560, 1120)),  # spec: Cityscapes 2048x1024 -> 1120x560
        (500, 375, 336, (448, 336)),  # portrait: same ratio, transposed
        (333, 517, 336, (336, 522)),  # 517 * 336 / 333 = 521.66 -> int(522.16) = 522
        (2, 3, 3, (3, 5)),  # r = 1.5, W = 4.5 -> int(5.0) = 5: halves round up, not to even
        (10, 20, 336, (336, 672)),  # up-scaling by 33.6
        (1, 1, 336, (336, 336)),  # a 1x1 image is valid
        (100, 3000, 336, (68, 2048)),  # long-side cap: r = 2048 / 3000, H = 68.27 -> 68
        (513, 513, 224, (224, 224)),
    ],
)
def test_resized_shape_matches_hand_computed_sizes(
    height: int, width: int, short_side: int, expected: tuple[int, int]
) -> None:
    assert resized_shape(height, width, short_side) == expected


def test_resized_shape_custom_cap_and_no_resize() -> None:
    assert resized_shape(400, 1000, 336, max_long_side=600) == (240, 600)  # r = min(0.6, 0.84)
    assert resized_shape(375, 500, None) == (375, 500)


@pytest.mark.parametrize("short_side", [0, -5])
def test_resized_shape_rejects_non_positive_target(short_side: int) -> None:
    with pytest.raises(OvssError, match="short_side"):
        resized_shape(10, 10, short_side)


def test_resize_equals_cv2_bit_exactly_on_real_images(assets_dir: Path) -> None:
    image = read_image(assets_dir / VOC / "images" / "0_image.png")  # (513, 513, 3)
    resized = resize_short_side(image, 336)
    assert resized.shape == (336, 336, 3) and resized.dtype == np.uint8
    np.testing.assert_array_equal(resized, cv2.resize(image, (336, 336), interpolation=cv2.INTER_LINEAR))
    frame = read_image(assets_dir / CITYSCAPES_FRAME)  # (128, 256, 3)
    upscaled = resize_short_side(frame, 560)
    assert upscaled.shape == (560, 1120, 3)
    np.testing.assert_array_equal(upscaled, cv2.resize(frame, (1120, 560), interpolation=cv2.INTER_LINEAR))


@pytest.mark.parametrize(("name", "short_side"), [(f"{VOC}/images/8_image.png", 224), (CITYSCAPES_FRAME, 560)])
def test_resize_is_half_pixel_bilinear_without_antialiasing(assets_dir: Path, name: str, short_side: int) -> None:
    # Independent float implementation (PyTorch): equal up to OpenCV's fixed-point rounding (1 grey level).
    image = read_image(assets_dir / name)
    resized = resize_short_side(image, short_side)
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()  # (1, 3, H0, W0)
    reference = F.interpolate(
        pixels, size=resized.shape[:2], mode="bilinear", align_corners=False, antialias=False
    )  # (1, 3, H, W)
    reference_uint8 = reference[0].permute(1, 2, 0).round().clamp(0, 255).numpy()  # (H, W, 3)
    assert np.abs(reference_uint8 - resized.astype(np.float32)).max() <= 1.0


def test_resize_none_returns_input() -> None:
    image = _random_rgb(7, 9)
    assert resize_short_side(image, None) is image


# ----------------------------------------------------------------------------------------------------
# read_image: files


def test_read_png_is_rgb(assets_dir: Path) -> None:
    path = assets_dir / VOC / "images" / "1_image.png"
    image = read_image(path)
    assert image.shape == (513, 513, 3) and image.dtype == np.uint8 and image.flags.c_contiguous
    np.testing.assert_array_equal(image, np.asarray(Image.open(path).convert("RGB")))
    np.testing.assert_array_equal(read_image(str(path)), image)


def test_read_palette_png_gives_palette_colours(assets_dir: Path) -> None:
    # The VOC label PNGs are palette PNGs; colour decoding must equal the RGB-rendered ground truth.
    label_path = assets_dir / VOC / "labels" / "20_label.png"
    decoded = read_image(label_path)
    np.testing.assert_array_equal(decoded, read_image(assets_dir / VOC / "targets_color" / "20_target.png"))
    indices = np.asarray(Image.open(label_path))  # (H, W) palette indices
    np.testing.assert_array_equal(decoded, palette(256)[indices])


def test_read_jpeg_applies_exif_orientation(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # (H, W, 3): left half red, right half black
    pixels[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    image = read_image(path)
    assert image.shape == (40, 20, 3)  # rotated: the left column is now the top row
    assert image[:15, :, 0].min() > 200 and image[:15, :, 1:].max() < 50  # top: red (RGB order)
    assert image[25:].max() < 50  # bottom: black
    from_pil = read_image(Image.open(path))  # PIL input: same orientation handling
    assert from_pil.shape == (40, 20, 3)
    assert np.abs(from_pil.astype(int) - image.astype(int)).max() <= 2


def test_read_greyscale_and_rgba_png(tmp_path: Path) -> None:
    grey = np.arange(6 * 5, dtype=np.uint8).reshape(6, 5) * 8  # (6, 5)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_image(tmp_path / "grey.png"), np.stack([grey] * 3, axis=2))
    rgba = np.zeros((4, 3, 4), dtype=np.uint8)  # (4, 3, 4) fully transparent, colour kept
    rgba[..., :3] = _random_rgb(4, 3)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgba[..., :3])


def test_read_16_bit_png_keeps_high_byte(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    grey16 = rng.integers(0, 65536, (5, 7), dtype=np.uint16)  # (5, 7)
    cv2.imwrite(str(tmp_path / "grey16.png"), grey16)
    np.testing.assert_array_equal(read_image(tmp_path / "grey16.png"), np.stack([grey16 >> 8] * 3, axis=2))
    rgb16 = rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)  # (5, 7, 3) RGB
    cv2.imwrite(str(tmp_path / "rgb16.png"), np.ascontiguousarray(rgb16[..., ::-1]))  # OpenCV writes BGR
    np.testing.assert_array_equal(read_image(tmp_path / "rgb16.png"), (rgb16 >> 8).astype(np.uint8))


def test_read_1x1_png(tmp_path: Path) -> None:
    Image.fromarray(np.array([[[10, 20, 30]]], dtype=np.uint8)).save(tmp_path / "dot.png")
    np.testing.assert_array_equal(read_image(tmp_path / "dot.png"), [[[10, 20, 30]]])


def test_read_gif(tmp_path: Path) -> None:
    pixels = np.zeros((6, 8, 3), dtype=np.uint8)  # (6, 8, 3), four flat colours survive GIF quantisation
    pixels[:3, :4], pixels[:3, 4:], pixels[3:, :4] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "flat.gif")
    np.testing.assert_array_equal(read_image(tmp_path / "flat.gif"), pixels)


def test_pillow_fallback_for_formats_opencv_cannot_decode(tmp_path: Path) -> None:
    pixels = _random_rgb(9, 11, seed=2)
    path = tmp_path / "image.tga"
    Image.fromarray(pixels).save(path)
    assert cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR) is None  # the fallback is needed
    np.testing.assert_array_equal(read_image(path), pixels)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims the given size, followed by one tiny IDAT chunk and IEND (no real pixels)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(16))) + chunk(b"IEND", b"")
    )


def test_unreadable_files_raise_ovss_error_naming_the_file(tmp_path: Path, assets_dir: Path) -> None:
    png_bytes = (assets_dir / VOC / "images" / "0_image.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png_bytes[: len(png_bytes) // 2])
    jpeg_path = tmp_path / "full.jpg"
    Image.fromarray(_random_rgb(64, 64)).save(jpeg_path)
    jpeg_bytes = jpeg_path.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])
    (tmp_path / "notes.jpg").write_text("not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    for name in ["truncated.png", "truncated.jpg", "notes.jpg", "empty.png", "garbage.png", "missing.png"]:
        with pytest.raises(OvssError, match=name.replace(".", r"\.")):
            read_image(tmp_path / name)
    with pytest.raises(OvssError, match="not a decodable image file"):
        read_image(tmp_path / "notes.jpg")
    with pytest.raises(OvssError, match="not found"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(OvssError, match="folder"):
        read_image(tmp_path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(15000, 15000))  # claims 225 megapixels
    with pytest.raises(OvssError, match=r"megapixels.*resize it first"):
        read_image(path)
    huge_view = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (15000, 15000, 3))  # no memory used
    assert huge_view.shape[0] * huge_view.shape[1] > MAX_IMAGE_PIXELS
    with pytest.raises(OvssError, match="megapixels"):
        read_image(huge_view)


def _png_with_chunk(pixels: np.ndarray, kind: bytes, data: bytes, *, bad_crc: bool = False) -> bytes:
    """A PNG of ``pixels`` with one extra ancillary chunk before IDAT (optionally with a wrong CRC)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    png = buffer.getvalue()
    crc = 0 if bad_crc else zlib.crc32(kind + data) & 0xFFFFFFFF
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    at = png.index(b"IDAT") - 4
    return png[:at] + chunk + png[at:]


def test_decoder_complaints_become_one_ovss_warning(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    pixels = _random_rgb(32, 48)
    path = tmp_path / "damaged.png"
    path.write_bytes(_png_with_chunk(pixels, b"tEXt", b"key\x00value", bad_crc=True))
    with pytest.warns(UserWarning) as caught:
        image = read_image(path)
    np.testing.assert_array_equal(image, pixels)  # the pixels are intact
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "damaged.png" in messages[0] and "CRC error" in messages[0]
    assert "libpng" not in capfd.readouterr().err  # nothing raw on stderr


def test_harmless_colour_profile_notes_are_silenced(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    pixels = _random_rgb(16, 16, seed=1)
    path = tmp_path / "profile.png"
    path.write_bytes(_png_with_chunk(pixels, b"iCCP", b"icc\x00\x00" + zlib.compress(b"x" * 200)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        image = read_image(path)
    np.testing.assert_array_equal(image, pixels)
    assert capfd.readouterr().err == ""


def test_bgr_to_rgb_in_place_equals_the_reversed_copy() -> None:
    for shape in [(1, 1, 3), (3, 5, 3), (257, 131, 3)]:
        bgr = _random_rgb(*shape[:2], seed=shape[0])
        expected = np.ascontiguousarray(bgr[:, :, ::-1])  # the old path: a second full-size array
        converted = bgr_to_rgb_inplace(bgr)
        assert converted is bgr  # no copy
        np.testing.assert_array_equal(converted, expected)
    strided = _random_rgb(20, 30)[:, ::2]  # not C-contiguous: converted through a copy, same values
    np.testing.assert_array_equal(bgr_to_rgb_inplace(strided), strided[:, :, ::-1])


def test_read_png_equals_opencv_imread_reversed(tmp_path: Path) -> None:
    pixels = _random_rgb(123, 77, seed=5)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    reference = cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]  # (H, W, 3) mmcv's decode, as RGB
    image = read_image(path)
    np.testing.assert_array_equal(image, reference)
    assert image.flags.c_contiguous and image.flags.writeable


# ----------------------------------------------------------------------------------------------------
# read_image: arrays and PIL images


def test_read_array_layouts_and_dtypes() -> None:
    rgb = _random_rgb(4, 5)
    result = read_image(rgb)
    np.testing.assert_array_equal(result, rgb)
    result[0, 0] = 0
    assert not np.shares_memory(result, rgb)  # a copy, never a view of the input
    grey = rgb[..., 0]  # (4, 5)
    np.testing.assert_array_equal(read_image(grey), np.stack([grey] * 3, axis=2))
    np.testing.assert_array_equal(read_image(grey[..., None]), np.stack([grey] * 3, axis=2))
    rgba = np.concatenate([rgb, np.zeros((4, 5, 1), np.uint8)], axis=2)  # (4, 5, 4)
    np.testing.assert_array_equal(read_image(rgba), rgb)
    deep = np.array([[0, 255, 256, 65535]], dtype=np.uint16)  # (1, 4)
    np.testing.assert_array_equal(read_image(deep)[0, :, 0], [0, 0, 1, 255])
    mask = np.array([[True, False]])  # (1, 2)
    np.testing.assert_array_equal(read_image(mask), [[[255, 255, 255], [0, 0, 0]]])


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4, 3), np.float32), "dtype float32"),
        (np.zeros((4, 4, 3), np.int64), "dtype int64"),
        (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\)"),
        (np.zeros((2, 4, 4, 3), np.uint8), r"shape \(2, 4, 4, 3\)"),
        (np.zeros((4,), np.uint8), r"shape \(4,\)"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
    ],
)
def test_read_array_rejects_bad_input(array: np.ndarray, message: str) -> None:
    with pytest.raises(OvssError, match=message):
        read_image(array)


def test_read_pil_images() -> None:
    rgb = _random_rgb(3, 4)
    rgba = Image.fromarray(np.concatenate([rgb, np.full((3, 4, 1), 7, np.uint8)], axis=2))
    np.testing.assert_array_equal(read_image(rgba), rgb)
    indexed = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8))
    indexed.putpalette(palette(3).tobytes())
    np.testing.assert_array_equal(read_image(indexed), palette(3)[[[0, 1], [2, 1]]])


def test_read_rejects_unsupported_type() -> None:
    with pytest.raises(OvssError, match="list"):
        read_image([[0, 1]])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# normalisation


def test_clip_normalize_hand_computed() -> None:
    image = np.array([[[0, 128, 255], [122, 117, 104]]], dtype=np.uint8)  # (1, 2, 3) RGB
    x = clip_normalize(image)
    assert x.shape == (3, 1, 2) and x.dtype == torch.float32
    expected = [
        [(0 - 122.771) / 68.501, (122 - 122.771) / 68.501],  # red channel
        [(128 - 116.746) / 66.632, (117 - 116.746) / 66.632],  # green
        [(255 - 104.094) / 70.323, (104 - 104.094) / 70.323],  # blue
    ]
    np.testing.assert_allclose(x[:, 0, :].numpy(), expected, rtol=0, atol=1e-6)


def test_clip_normalize_is_float32_arithmetic_then_cast(assets_dir: Path) -> None:
    image = read_image(assets_dir / VOC / "images" / "23_image.png")[:40, :50]  # (40, 50, 3)
    mean = np.array([122.771, 116.746, 104.094], dtype=np.float32)
    std = np.array([68.501, 66.632, 70.323], dtype=np.float32)
    expected = ((image.astype(np.float32) - mean) / std).transpose(2, 0, 1)  # (3, 40, 50)
    np.testing.assert_array_equal(clip_normalize(image).numpy(), expected)
    half = clip_normalize(image, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, torch.from_numpy(expected).to(torch.bfloat16))


def _whole_tensor_normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The former implementation: the whole (3, H, W) image as float32 at once, then (x - mean) / std."""
    pixels = torch.tensor(image).permute(2, 0, 1).to(torch.float32)  # (3, H, W)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)
    return ((pixels - mean_t) / std_t).contiguous()  # (3, H, W)


@pytest.mark.parametrize(
    ("mean", "std"),
    [
        ((122.771, 116.746, 104.094), (68.501, 66.632, 70.323)),  # mmseg's rounded OpenAI statistics
        ((0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255), (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)),
        ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
    ],
)
def test_clip_normalize_per_channel_equals_the_whole_tensor_path(
    assets_dir: Path, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    images = [read_image(assets_dir / VOC / "images" / "23_image.png"), _random_rgb(257, 131, seed=3)]
    every_value = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)  # (16, 16, 3) all 256 levels
    for image in [*images, every_value, images[1][:, ::3]]:  # the last one is not C-contiguous
        expected = _whole_tensor_normalize(image, mean, std)
        result = clip_normalize(image, mean=mean, std=std)
        assert result.is_contiguous() and result.dtype == torch.float32
        assert torch.equal(result, expected)
        assert torch.equal(clip_normalize(image, dtype=torch.float16, mean=mean, std=std), expected.half())


def test_clip_normalize_does_not_modify_or_share_the_image() -> None:
    image = _random_rgb(20, 30, seed=4)
    before = image.copy()
    normalized = clip_normalize(image)
    normalized.fill_(0)
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32)])
def test_clip_normalize_rejects_non_rgb_uint8(bad: np.ndarray) -> None:
    with pytest.raises(OvssError, match="read_image"):
        clip_normalize(bad)


def test_imagenet_from_clip_equals_direct_imagenet_normalisation(assets_dir: Path) -> None:
    image = read_image(assets_dir / VOC / "images" / "114_image.png")[:32, :48]  # (32, 48, 3)
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    direct = ((image / 255.0 - mean) / std).transpose(2, 0, 1)  # (3, 32, 48) float64
    converted = imagenet_from_clip(clip_normalize(image))
    assert converted.dtype == torch.float32
    np.testing.assert_allclose(converted.numpy(), direct, rtol=0, atol=2e-5)
    batch = torch.stack([clip_normalize(image), clip_normalize(image[::-1].copy())])  # (2, 3, 32, 48)
    converted_batch = imagenet_from_clip(batch)
    np.testing.assert_allclose(converted_batch[1].numpy(), direct[:, ::-1], rtol=0, atol=2e-5)
    assert imagenet_from_clip(batch.half()).dtype == torch.float16
    with pytest.raises(ValueError, match="3, H, W"):
        imagenet_from_clip(torch.zeros(4, 8, 8))


def test_other_stderr_output_during_a_decode_is_passed_through(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ovss.pipeline.image as image_module

    path = tmp_path / "plain.png"
    Image.fromarray(_random_rgb(8, 8)).save(path)
    real_imdecode = cv2.imdecode

    def chatty_imdecode(data: np.ndarray, flags: int) -> np.ndarray | None:
        os.write(2, b"some other library: hello\n")  # written to descriptor 2 while the decoder runs
        return real_imdecode(data, flags)

    monkeypatch.setattr(image_module.cv2, "imdecode", chatty_imdecode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_image(path)
    assert capfd.readouterr().err == "some other library: hello\n"


def test_concurrent_reads_give_descriptor_2_back(tmp_path, monkeypatch) -> None:
    """Two threads decoding at once: each capture saves and restores the real stderr, never the other's file."""
    import os
    import threading
    import time

    import cv2

    import ovss.pipeline.image as image_module

    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), np.zeros((8, 8, 3), np.uint8))
    decode = cv2.imdecode

    def slow_decode(*args, **kwargs):
        time.sleep(0.3)
        return decode(*args, **kwargs)

    monkeypatch.setattr(image_module.cv2, "imdecode", slow_decode)
    before = os.fstat(2)
    threads = [threading.Thread(target=image_module.read_image, args=(path,)) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)  # the second starts while the first holds descriptor 2
    for thread in threads:
        thread.join()
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
