"""`ovss demo` in a real browser: headless Chromium (Debian's ``chromium``) drives the page served with tiny weights.

The page's screenshot is written to ``docs/demo.png`` when ``OVSS_UPDATE_SCREENSHOT=1``, else into the test's
temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ovss
from ovss.demo.app import build_app, launch
from ovss.demo.session import DemoSession, ModelPool

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"short_side": 224, "crop": 112, "stride": 56, "templates": "imagenet7"}
METHODS = ["clearclip", "clearclip+gla"]
LABELS = "sky, person|astronaut, flag, wall"
CLASSES = [["sky"], ["person", "astronaut"], ["flag"], ["wall"]]
SIZE = 256  # the photo's side in pixels


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> tuple[Path, np.ndarray]:
    from skimage import data

    rgb = np.asarray(Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.BICUBIC))
    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    Image.fromarray(rgb).save(path)
    return path, rgb


@pytest.fixture(scope="module")
def served(tiny_clip, bpe_path) -> Iterator[tuple[DemoSession, str]]:
    session = DemoSession(ModelPool(tiny_clip, tokenizer=bpe_path, **SETTINGS))
    note = "Served by the browser test with tiny random weights: the labels below mean nothing."
    app = build_app(session, METHODS, title="ovss demo (tiny random weights)", note=note)
    url = launch(app, "127.0.0.1", free_port())
    yield session, url
    app.close()


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is missing: apt-get install -y chromium (scripts/test.sh installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])  # CI runs as root
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(30_000)
        page.goto(served[1])
        yield page
        browser.close()


def _legend_names(page, slot: int) -> list[str]:
    return page.locator(f"#ovss-legend-{slot} .ovss-legend-name").all_inner_texts()


def test_two_methods_side_by_side_then_the_fast_path_then_an_error(page, served, photo, tiny_clip, bpe_path,
                                                                    tmp_path):  # fmt: skip
    from playwright.sync_api import expect

    session, _ = served
    path, rgb = photo
    page.locator("#ovss-image input[type=file]").set_input_files(str(path))
    expect(page.locator("#ovss-image img")).to_be_visible()
    page.locator("#ovss-labels textarea").fill(LABELS)
    page.locator("#ovss-windows input").check()
    page.locator("#ovss-segment").click()
    for slot, method in enumerate(METHODS):
        expect(page.locator(f"#ovss-legend-{slot} .ovss-legend-item").first).to_be_visible()
        width, height = page.locator(f"#ovss-result-{slot} img").evaluate("e => [e.naturalWidth, e.naturalHeight]")
        assert height == SIZE and width > SIZE  # the photo at full size, the legend panel on its right
        expected = ovss.load(method, clip=tiny_clip, tokenizer=bpe_path, **SETTINGS).predict(rgb, CLASSES)
        present = [CLASSES[c][0] for c in expected.labels.unique().tolist() if c >= 0]
        assert _legend_names(page, slot) == present
    assert session.set_image_calls == 2
    shot = REPO / "docs" / "demo.png" if os.environ.get("OVSS_UPDATE_SCREENSHOT") == "1" else tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)

    page.locator("#ovss-result-0 img").click(position={"x": 5, "y": 5})  # a pixel of the photo, not the legend
    expect(page.locator("#ovss-pixel textarea")).to_have_value(
        re.compile(r"^clearclip at \(\d+, \d+\): (sky|person|flag|wall) \(p = 0\.\d\d\)")
    )

    page.locator("#ovss-labels textarea").fill("tree, car, sky")
    page.locator("#ovss-segment").click()
    expect(page.locator("#ovss-timings")).to_contain_text("cached (fast path)")
    assert page.locator("#ovss-timings").inner_text().count("cached (fast path)") == 2
    assert set(_legend_names(page, 0)) <= {"tree", "car", "sky"}
    assert session.set_image_calls == 2  # other labels: no image encoder ran

    page.locator("#ovss-labels textarea").fill("")
    page.locator("#ovss-segment").click()
    _expect_failure(page, "the labels box is empty")
    page.screenshot(path=str(tmp_path / "failure.png"))


def _expect_failure(page, text: str) -> None:
    """The message next to the button says ``text``; the results stay, titled "previous result"; no Error badge."""
    from playwright.sync_api import expect

    message = page.locator("#ovss-message")
    expect(message).to_be_visible()
    expect(message).to_contain_text(text)
    assert message.inner_text().count("\n") <= 1  # the one-line error (and a line on the results kept)
    for slot, method in enumerate(METHODS):
        expect(page.locator(f"#ovss-result-{slot} img")).to_be_visible()  # the previous overlays stay
        expect(page.locator(f"#ovss-result-{slot}")).to_contain_text(f"{method} (previous result)")
    expect(page.locator("#ovss-timings")).to_contain_text("Previous result")
    assert page.get_by_text("Error", exact=True).count() == 0  # no red badge on the outputs, no toast
    box = message.bounding_box()
    assert box is not None and box["y"] + box["height"] <= 900  # next to the button, in view


def test_the_segment_button_is_in_view_and_the_icons_leave_the_legend_free(page, served, photo, tmp_path):
    from playwright.sync_api import expect

    page.goto(served[1])
    page.set_viewport_size({"width": 1400, "height": 900})
    button = page.locator("#ovss-segment").bounding_box()
    assert button is not None and button["y"] + button["height"] <= 900  # no scrolling needed at 1400x900
    page.locator("#ovss-image input[type=file]").set_input_files(str(photo[0]))
    names = ["aeroplane", "café", "straße", "日本", "\U0001f600", "a class with a very long descriptive name " * 3]
    page.locator("#ovss-labels textarea").fill(", ".join(names))
    page.locator("#ovss-segment").click()
    picture = page.locator("#ovss-result-0 img")
    expect(picture).to_be_visible()
    expect(page.locator("#ovss-legend-0 .ovss-legend-item").first).to_be_visible()
    shown = _legend_names(page, 0)
    assert shown and set(shown) <= {name.strip() for name in names}  # the page's legend has the full names
    page.screenshot(path=str(tmp_path / "scripts.png"))
    image_box = picture.bounding_box()
    icons = page.locator("#ovss-result-0 .icon-button-wrapper button").all()  # download, full screen
    assert len(icons) == 2
    for icon in icons:
        icon_box = icon.bounding_box()
        assert icon_box is not None and image_box is not None
        assert icon_box["y"] + icon_box["height"] <= image_box["y"]  # above the picture, not over its legend

    many = ", ".join(f"class number {index}" for index in range(1000))
    page.locator("#ovss-labels textarea").fill(many)
    page.locator("#ovss-segment").click()
    expect(page.locator("#ovss-result-0")).not_to_contain_text("previous result")
    expect(page.locator("#ovss-timings")).to_contain_text("cached (fast path)")
    width = picture.evaluate("e => e.naturalWidth")
    assert SIZE < width <= 2 * SIZE  # the legend wraps and counts the rest instead of growing 3842 px wide


def test_a_corrupt_upload_is_ovss_s_one_line(page, served, photo, tmp_path):
    from playwright.sync_api import expect

    for name, data in (("broken.png", b"not a picture"), ("cut.png", photo[0].read_bytes()[:400])):
        page.goto(served[1])
        path = tmp_path / name
        path.write_bytes(data)
        page.locator("#ovss-image input[type=file]").set_input_files(str(path))
        page.locator("#ovss-labels textarea").fill(LABELS)
        page.locator("#ovss-segment").click()
        message = page.locator("#ovss-message")
        expect(message).to_contain_text(f"cannot read image '{name}': not a decodable image file")
        text = message.inner_text()
        assert "gradio" not in text.lower() and "/tmp" not in text and "preprocess" not in text
        assert page.get_by_text("Error", exact=True).count() == 0
    page.screenshot(path=str(tmp_path / "corrupt.png"))
