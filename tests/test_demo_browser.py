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
    expect(page.get_by_text("the labels box is empty").first).to_be_visible()
