"""The VOC colour map, palette PNGs, legend overlays and atomic output files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovss.errors import OvssError
from ovss.output.overlay import class_palette, overlay, palette, save_label_png, save_overlay
from ovss.pipeline.image import read_image
from ovss.storage.files import atomic_write, save_npy, save_png, save_text

VOC_LABELS = "voc2012-val-samples/labels"


def _colour_count(region: np.ndarray, colour: np.ndarray) -> int:
    """Number of pixels of an (H, W, 3) region exactly equal to ``colour``."""
    return int(np.all(region == colour, axis=2).sum())


def _is_grey(colour: np.ndarray) -> bool:
    return bool(colour[0] == colour[1] == colour[2])


# ----------------------------------------------------------------------------------------------------
# palette


def test_palette_hand_computed_entries() -> None:
    colours = palette(256)
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    expected = {
        0: (0, 0, 0),
        1: (128, 0, 0),
        2: (0, 128, 0),
        3: (128, 128, 0),
        4: (0, 0, 128),
        8: (64, 0, 0),  # bit 3 -> bit 6 of red
        15: (192, 128, 128),  # VOC person
        20: (0, 64, 128),  # VOC tvmonitor
        255: (224, 224, 192),  # VOC ignore
    }
    for class_id, colour in expected.items():
        assert tuple(colours[class_id]) == colour, class_id


def test_palette_matches_voc_label_pngs(assets_dir: Path) -> None:
    stored = np.array(Image.open(assets_dir / VOC_LABELS / "0_label.png").getpalette(), dtype=np.uint8)
    np.testing.assert_array_equal(palette(256), stored.reshape(-1, 3)[:256])


def test_palette_prefix_and_distinctness() -> None:
    np.testing.assert_array_equal(palette(21), palette(256)[:21])
    assert palette(0).shape == (0, 3)
    colours = palette(1000)
    assert len({tuple(colour) for colour in colours}) == 1000  # ids beyond 255 keep distinct colours
    with pytest.raises(ValueError):
        palette(-1)


# ----------------------------------------------------------------------------------------------------
# save_label_png


def test_label_png_round_trip(tmp_path: Path) -> None:
    labels = np.random.default_rng(0).integers(0, 256, (17, 23))  # (17, 23) int64 ids incl. 255
    path = save_label_png(labels, tmp_path / "labels.png")
    with Image.open(path) as stored:
        assert stored.mode == "P"
        np.testing.assert_array_equal(np.asarray(stored), labels)
        np.testing.assert_array_equal(np.array(stored.getpalette()[:768]).reshape(256, 3), palette(256))
    np.testing.assert_array_equal(read_image(path), palette(256)[labels])  # colours decode to the palette


def test_label_png_round_trip_real_voc_labels(assets_dir: Path, tmp_path: Path) -> None:
    labels = np.asarray(Image.open(assets_dir / VOC_LABELS / "166_label.png"))  # (513, 513) ids 0..20, 255
    save_label_png(labels, tmp_path / "166.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "166.png")), labels)


def test_label_png_custom_palette(tmp_path: Path) -> None:
    colours = np.array([[1, 2, 3], [250, 100, 0]], dtype=np.uint8)  # (2, 3)
    labels = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    save_label_png(labels, tmp_path / "custom.png", palette=colours)
    np.testing.assert_array_equal(read_image(tmp_path / "custom.png"), colours[labels])


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([[0, 65536]]), "0..65536"),
        (np.array([[-1, 3]]), "-1..3"),
        (np.zeros((2, 2), np.float32), "integer"),
        (np.zeros((2, 2, 1), np.uint8), "integer"),
    ],
)
def test_label_png_rejects_bad_ids_and_writes_nothing(tmp_path: Path, labels: np.ndarray, message: str) -> None:
    with pytest.raises(OvssError, match=message):
        save_label_png(labels, tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == []


def test_label_png_beyond_255_ids_is_16_bit(tmp_path: Path) -> None:
    labels = (np.arange(12 * 40).reshape(12, 40) * 97 % 60000).astype(np.int64)  # ids up to ~60000
    path = save_label_png(labels, tmp_path / "wide.png")
    stored = np.asarray(Image.open(path))
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, labels)
    small = save_label_png(np.array([[0, 3]]), tmp_path / "small16.png", bit_depth=16)
    assert np.asarray(Image.open(small)).dtype == np.uint16
    with pytest.raises(OvssError, match=r"8-bit label PNG stores ids 0\.\.255"):
        save_label_png(np.array([[0, 256]]), tmp_path / "forced8.png", bit_depth=8)
    assert not (tmp_path / "forced8.png").exists()


def test_class_palette_gives_every_class_a_bright_distinct_colour() -> None:
    colours = class_palette(300).astype(np.int64)  # (300, 3)
    assert colours.shape == (300, 3) and class_palette(0).shape == (0, 3)
    assert colours.max(axis=1).min() >= 191  # nothing dark: class 0 is no shadow
    assert (colours.max(axis=1) - colours.min(axis=1)).min() >= 60  # nothing grey
    assert len({tuple(c) for c in colours[:64]}) == 64
    np.testing.assert_array_equal(class_palette(10), class_palette(300)[:10])  # a prefix is stable
    first_ten = colours[:10]
    gaps = np.abs(first_ten[:, None] - first_ten[None]).sum(-1) + 1000 * np.eye(10, dtype=np.int64)  # (10, 10)
    assert gaps.min() >= 40  # the first classes are easy to tell apart


# ----------------------------------------------------------------------------------------------------
# overlay


def _scene() -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8)  # (64, 48, 3)
    labels = np.full((64, 48), 1, dtype=np.int64)  # (64, 48)
    labels[32:, :] = 3
    labels[:8, :8] = 255  # ignore: left as is
    return image, labels


def test_overlay_blends_class_colours_by_hand() -> None:
    image, labels = _scene()
    image[20, 20] = (10, 20, 30)  # class 1, colour (128, 0, 0)
    image[40, 5] = (11, 200, 255)  # class 3, colour (128, 128, 0)
    result = overlay(image, labels, ["background", "cat", "dog", "bird"], alpha=0.5)
    assert result.dtype == np.uint8 and result.shape[0] == 64 and result.shape[1] > 48
    assert tuple(result[20, 20]) == (69, 10, 15)  # 0.5 * (10, 20, 30) + 0.5 * (128, 0, 0)
    assert tuple(result[40, 5]) == (70, 164, 128)  # (5.5 + 64, 100 + 64, 127.5 + 0) rounded half up
    np.testing.assert_array_equal(result[:8, :8], image[:8, :8])
    colours = palette(4)[labels.clip(0, 3)].astype(np.float64)  # (64, 48, 3)
    expected = np.floor(0.3 * image + 0.7 * colours + 0.5)  # (64, 48, 3)
    expected[:8, :8] = image[:8, :8]
    np.testing.assert_array_equal(overlay(image, labels, ["a", "b", "c", "d"], alpha=0.7)[:64, :48], expected)


def test_overlay_blends_band_by_band_like_the_whole_image() -> None:
    """An image of several bands (> 2**20 pixels) blends every row as the formula says, with a -1 region kept."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(1100, 1000, 3), dtype=np.uint8)  # 1.1 MP: two bands
    labels = rng.integers(-1, 3, size=(1100, 1000)).astype(np.int16)  # (H, W), -1: unlabelled
    result = overlay(image, labels, ["a", "b", "c"], alpha=0.4)
    colours = palette(3)[labels.clip(0, 2)].astype(np.float32)  # (H, W, 3)
    expected = np.floor(np.float32(0.6) * image.astype(np.float32) + np.float32(0.4) * colours + 0.5).astype(np.uint8)
    expected[labels < 0] = image[labels < 0]
    np.testing.assert_array_equal(result[:1100, :1000], expected)


def test_overlay_alpha_extremes() -> None:
    image, labels = _scene()
    names = ["background", "cat", "dog", "bird"]
    np.testing.assert_array_equal(overlay(image, labels, names, alpha=0.0)[:64, :48], image)
    solid = overlay(image, labels, names, alpha=1.0)[:64, :48]
    np.testing.assert_array_equal(solid[32:], np.broadcast_to(palette(4)[3], (32, 48, 3)))


def test_overlay_legend_lists_only_present_classes() -> None:
    image, labels = _scene()
    result = overlay(image, labels, ["background", "cat", "dog", "bird"], font_size=12)
    legend = result[:, 48:]  # (64, legend width, 3)
    colours = palette(4)
    assert _colour_count(legend, colours[1]) >= 25  # swatches of present classes 1 and 3
    assert _colour_count(legend, colours[3]) >= 25
    assert _colour_count(legend, colours[2]) == 0  # class 2 is absent
    dark_grey = (legend.max(axis=2) < 64) & (legend.min(axis=2) == legend.max(axis=2))  # (64, legend width)
    assert dark_grey.sum() > 20  # anti-aliased black text of the names (class 0, black, is absent)
    wider = overlay(image, labels, ["background", "a cat with a long name", "dog", "bird"], font_size=12)
    assert wider.shape[1] > result.shape[1]


def test_overlay_legend_wraps_into_columns() -> None:
    image = np.zeros((160, 600, 3), dtype=np.uint8)
    labels = np.arange(160 * 600).reshape(160, 600) % 30  # all 30 classes present
    names = [f"class {index}" for index in range(30)]
    result = overlay(image, labels, names, font_size=12)
    assert result.shape[0] == 160  # does not grow taller than the image: several columns instead
    legend = result[:, 600:]
    colours = palette(30)
    for class_id in range(30):
        if not _is_grey(colours[class_id]):
            assert _colour_count(legend, colours[class_id]) >= 25, class_id


def _legend_of(names: list[str], size: int = 64) -> np.ndarray:
    """The legend panel of an overlay whose classes are ``names``, all present."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    labels = np.arange(size * size).reshape(size, size) % len(names)
    return overlay(image, labels, names, font_size=16)[:, size:]


def test_overlay_legend_draws_names_in_any_script() -> None:
    from ovss.output.fonts import FAMILY, _fc_match

    assert _fc_match(FAMILY) is not None, "no font through fontconfig: install fonts-noto-core fonts-noto-cjk"
    missing = "\u0378"  # an unassigned code point: every font draws its "missing glyph" box
    with pytest.warns(UserWarning, match="no installed font has the character"):
        boxes = [_legend_of([f"ab{missing}"]), _legend_of([f"ab{missing}{missing}"])]
    for name in ("café", "straße", "日本", "\U0001f600"):
        legend = _legend_of([name])
        drawn = _legend_of([name[:-1] + missing])  # the same name with its last character a box
        assert legend.shape != drawn.shape or not np.array_equal(legend, drawn), name
    glyphs = [_legend_of([char]) for char in "é日本\U0001f600"]  # each its own glyph, not four equal boxes
    for i, first in enumerate(glyphs):
        for second in glyphs[i + 1 :]:
            assert first.shape != second.shape or not np.array_equal(first, second)
    assert not np.array_equal(boxes[0], boxes[1])


def test_overlay_legend_stays_narrow_with_many_or_long_names() -> None:
    from ovss.output.fonts import LegendFont

    names = [f"class number {index}" for index in range(1000)]
    image = np.zeros((320, 320, 3), dtype=np.uint8)
    labels = np.arange(320 * 320).reshape(320, 320) % 1000  # all 1000 classes present
    result = overlay(image, labels, names)
    assert result.shape[0] == 320 and 320 < result.shape[1] <= 2 * 320  # was 3842 px wide
    legend = result[:, 320:]
    colours = palette(1000)
    assert _colour_count(legend, colours[1]) >= 25 and _colour_count(legend, colours[999]) == 0  # counted, not drawn
    font = LegendFont(16)
    long_name = "a class with a very long descriptive name " * 5
    short = font.shorten(long_name, 12 * font.line_height)
    assert short.endswith("…") and long_name.startswith(short[:-1]) and font.width(short) <= 12 * font.line_height
    assert font.shorten("cat", 12 * font.line_height) == "cat"
    assert _legend_of([long_name]).shape[1] <= 15 * font.line_height  # swatch, gap, 12 line heights, margins
    more = overlay(image, labels, names)
    np.testing.assert_array_equal(more, result)  # deterministic


def test_overlay_legend_without_fonts_uses_pillow_s_and_warns_once(monkeypatch) -> None:
    from ovss.output import fonts

    monkeypatch.setattr(fonts, "_fc_match", lambda pattern: None)  # no fontconfig
    monkeypatch.setattr(fonts, "_warned", set())
    with pytest.warns(UserWarning, match="no font found through fontconfig") as caught:
        first = _legend_of(["cat", "dog"])
        _legend_of(["café"])
    assert len([w for w in caught if "fontconfig" in str(w.message)]) == 1
    assert first.shape[0] == 64 and (first.max(axis=2) < 64).sum() > 20  # the names are still drawn


def test_overlay_tiny_image_and_no_classes() -> None:
    image = np.full((2, 3, 3), 200, dtype=np.uint8)
    labels = np.array([[0, 1, 1], [1, 1, 0]])
    result = overlay(image, labels, ["sky", "road"], alpha=0.5)
    assert result.shape[0] > 2  # grows to fit one legend row; the image keeps its top-left corner
    assert tuple(result[0, 1]) == (164, 100, 100)  # 0.5 * 200 + 0.5 * (128, 0, 0)
    ignored = overlay(image, np.full((2, 3), 255), ["sky", "road"])
    np.testing.assert_array_equal(ignored, image)


def test_overlay_rejects_bad_input() -> None:
    image, labels = _scene()
    names = ["a", "b", "c", "d"]
    with pytest.raises(OvssError, match="size"):
        overlay(image, labels[:10], names)
    with pytest.raises(OvssError, match="integer label map"):
        overlay(image, labels.astype(np.float32), names)
    with pytest.raises(OvssError, match="alpha"):
        overlay(image, labels, names, alpha=1.5)
    with pytest.raises(OvssError, match="RGB image"):
        overlay(image[..., 0], labels, names)
    with pytest.raises(OvssError, match="4 are needed"):
        overlay(image, labels, names, palette=palette(3))


def test_save_overlay_writes_the_overlay(tmp_path: Path) -> None:
    image, labels = _scene()
    names = ["background", "cat", "dog", "bird"]
    path = save_overlay(tmp_path / "out" / "overlay.png", image, labels, names, alpha=0.4)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), overlay(image, labels, names, alpha=0.4))


# ----------------------------------------------------------------------------------------------------
# atomic output files


def test_atomic_write_success_leaves_only_the_file(tmp_path: Path) -> None:
    seen: list[Path] = []

    def write(temp_path: Path) -> None:
        seen.append(temp_path)
        temp_path.write_bytes(b"complete")

    result = atomic_write(tmp_path / "sub" / "result.bin", write)
    assert result == tmp_path / "sub" / "result.bin"
    assert result.read_bytes() == b"complete"
    assert seen[0].parent == result.parent and seen[0].suffix == ".bin" and seen[0] != result
    assert sorted(path.name for path in result.parent.iterdir()) == ["result.bin"]
    reference = tmp_path / "reference.bin"
    reference.write_bytes(b"x")
    assert (os.stat(result).st_mode & 0o777) == (os.stat(reference).st_mode & 0o777)  # not 0o600


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_atomic_write_failure_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    def write(temp_path: Path) -> None:
        temp_path.write_bytes(b"partial")
        raise error

    with pytest.raises(type(error)):
        atomic_write(tmp_path / "result.png", write)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_failure_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "result.txt"
    path.write_text("old")

    def write(temp_path: Path) -> None:
        temp_path.write_text("new but incomplete")
        raise OSError("interrupted")

    with pytest.raises(OSError, match="interrupted"):
        atomic_write(path, write)
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_write_refuses_a_folder(tmp_path: Path) -> None:
    with pytest.raises(OvssError, match="folder"):
        atomic_write(tmp_path, lambda temp_path: temp_path.touch())


def test_save_npy_png_text_round_trip(tmp_path: Path) -> None:
    logits = np.random.default_rng(2).standard_normal((3, 5, 7)).astype(np.float32)  # (Q, H, W)
    np.testing.assert_array_equal(np.load(save_npy(tmp_path / "logits.npy", logits)), logits)
    image = np.random.default_rng(3).integers(0, 256, (5, 6, 3), dtype=np.uint8)  # (5, 6, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(save_png(tmp_path / "image.png", image))), image)
    grey = image[..., 1]  # (5, 6)
    np.testing.assert_array_equal(np.asarray(Image.open(save_png(tmp_path / "grey.png", grey))), grey)
    assert save_text(tmp_path / "config.json", '{\n  "a": 1\n}').read_bytes() == b'{\n  "a": 1\n}'
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "config.json",
        "grey.png",
        "image.png",
        "logits.npy",
    ]


def test_save_helpers_reject_bad_input_and_write_nothing(tmp_path: Path) -> None:
    with pytest.raises(OvssError, match=r"must end in '\.png'"):
        save_png(tmp_path / "image.jpg", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(OvssError, match="float32"):
        save_png(tmp_path / "image.png", np.zeros((2, 2, 3), np.float32))
    with pytest.raises(OvssError, match=r"must end in '\.npy'"):
        save_npy(tmp_path / "logits.npz", np.zeros(3))
    with pytest.raises(ValueError):
        save_npy(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))  # no pickles
    assert list(tmp_path.iterdir()) == []
