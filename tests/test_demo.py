"""`ovss demo` without a browser: the session against the plain API, the fast path, the handlers, the command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ovss
from ovss.cli.main import main
from ovss.demo.render import draw_windows, legend_html, timing_markdown
from ovss.demo.session import DemoSession, ModelPool, check_methods, parse_label_box, pixel_report, save_downloads
from ovss.errors import OvssError
from ovss.pipeline.windows import Window

SETTINGS = {"short_side": 96, "crop": 64, "stride": 32, "templates": "imagenet7"}
METHODS = ["clearclip", "clearclip+gla"]


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(72, 100, 3), dtype=np.uint8) for _ in range(2)]


@pytest.fixture()
def session(tiny_clip, bpe_path) -> DemoSession:
    return DemoSession(ModelPool(tiny_clip, tokenizer=bpe_path, **SETTINGS))


def _direct(tiny_clip, bpe_path, method, image, labels, **settings):
    """The plain API's answer: a fresh segmenter, one predict call."""
    seg = ovss.load(method, clip=tiny_clip, tokenizer=bpe_path, **{**SETTINGS, **settings})
    return seg.predict(image, labels, background=None)


def test_run_equals_the_api_and_draws_the_overlay(session, tiny_clip, bpe_path, photos):
    results = session.run(photos[0], "sky, road, person|pedestrian", METHODS)
    assert [r.method for r in results] == METHODS and session.set_image_calls == 2
    for r in results:
        expected = _direct(tiny_clip, bpe_path, r.method, photos[0], ["sky", "road", ["person", "pedestrian"]])
        assert torch.equal(r.prediction.labels, expected.labels)
        torch.testing.assert_close(r.prediction.logits, expected.logits)
        assert np.array_equal(r.overlay, expected.overlay())  # no window grid asked for
        assert r.overlay.shape[0] == 72 and r.overlay.shape[1] > 100  # legend panel on the right
        assert not r.cached and r.encode_seconds > 0 and r.windows == 8  # 96x133: 2 x 4 windows of 64, stride 32
        assert r.config["method"] == r.method and r.config["pipeline"]["crop"] == 64


def test_other_labels_and_thresholds_reuse_the_image_features(session, tiny_clip, bpe_path, photos):
    session.run(photos[0], "sky, road", METHODS)
    again = session.run(photos[0], "tree, car, sky", METHODS, logit_scale=20.0, bg_threshold=0.6)
    assert session.set_image_calls == 2  # the fast path: no image encoder ran
    assert all(r.cached and r.encode_seconds == 0.0 for r in again)
    for r in again:
        expected = _direct(tiny_clip, bpe_path, r.method, photos[0], ["tree", "car", "sky"], logit_scale=20.0,
                           bg_threshold=0.6)  # fmt: skip
        assert torch.equal(r.prediction.labels, expected.labels)
        assert (r.prediction.labels == -1).any()  # the threshold acted: some pixels stayed unlabelled
        assert r.config["pipeline"]["logit_scale"] == 20.0 and r.config["pipeline"]["bg_threshold"] == 0.6
    back = session.run(photos[0], "tree, car, sky", METHODS)  # 0 thresholds again: each method's own scale
    assert back[0].config["pipeline"]["logit_scale"] == 50.0 and back[0].config["pipeline"]["bg_threshold"] == 0.0


def test_features_are_kept_per_image(session, photos):
    first = session.run(photos[0], "sky, road", METHODS)
    session.run(photos[1], "sky, road", METHODS)
    assert session.set_image_calls == 4
    back = session.run(photos[0].copy(), "sky, road", METHODS)  # same pixels, another array: same key
    assert session.set_image_calls == 4 and all(r.cached for r in back)
    for a, b in zip(first, back, strict=True):
        assert torch.equal(a.prediction.labels, b.prediction.labels)
        torch.testing.assert_close(a.prediction.logits, b.prediction.logits)


def test_least_recently_used_image_is_dropped(tiny_clip, bpe_path, photos):
    session = DemoSession(ModelPool(tiny_clip, tokenizer=bpe_path, **SETTINGS), max_images=1)
    session.run(photos[0], "sky", ["clearclip"])
    session.run(photos[1], "sky", ["clearclip"])
    session.run(photos[0], "sky", ["clearclip"])
    assert session.set_image_calls == 3


def test_pool_shares_one_clip_and_names_the_weight_file(tmp_path, bpe_path):
    from tiny import save_openai_jit, tiny_clip_state_dict

    path = save_openai_jit(tiny_clip_state_dict(seed=0), tmp_path / "tiny.pt")
    calls = []

    def loader(method, **kw):
        calls.append(kw["clip"])
        return ovss.load(method, **kw)

    pool = ModelPool(str(path), tokenizer=bpe_path, loader=loader, **SETTINGS)
    a, b = pool.get("clearclip"), pool.get("clearclip+gla")
    assert a.clip is b.clip and calls[0] == str(path) and calls[1] is a.clip  # read once, then shared
    assert pool.config("clearclip+gla")["clip_path"] == str(path)  # not "<in-memory model>"
    assert pool.get("clearclip") is a and len(calls) == 2


@pytest.mark.parametrize(
    ("labels", "methods", "message"),
    [
        ("", METHODS, "the labels box is empty"),
        ("   ", METHODS, "the labels box is empty"),
        ("sky,,road", METHODS, "of the labels box 'sky,,road' is empty"),
        ("sky, road", [], "no method chosen"),
        ("sky, road", ["clearclip", "nope"], "nope"),
        ("sky, road", ["clearclip", "sclip", "naclip", "maskclip", "vanilla"], "at most 4"),
    ],
)
def test_bad_input_is_one_line_before_any_work(session, photos, labels, methods, message):
    with pytest.raises(OvssError, match=message) as info:
        session.run(photos[0], labels, methods)
    assert "\n" not in str(info.value) and session.set_image_calls == 0


def test_bad_image_and_settings_are_one_line(session, photos):
    with pytest.raises(OvssError, match="no image"):
        session.run(None, "sky", METHODS)
    with pytest.raises(OvssError, match=r"image array has shape \(20, 20, 5\)"):
        session.run(np.zeros((20, 20, 5), np.uint8), "sky", ["clearclip"])
    with pytest.raises(OvssError, match="bg_threshold must be a probability"):
        session.run(photos[0], "sky", METHODS, bg_threshold=1.5)
    with pytest.raises(OvssError, match="logit_scale must be > 0"):
        session.run(photos[0], "sky", METHODS, logit_scale=-1.0)
    assert session.set_image_calls == 0


def test_parsers_match_the_cli():
    assert parse_label_box("sky, person|pedestrian") == [["sky"], ["person", "pedestrian"]]
    assert check_methods(["clearclip", "clearclip", "naclip+gla"]) == ["clearclip", "naclip+gla"]


def test_window_grid_is_drawn_on_the_photo_only():
    picture = np.full((40, 70, 3), 128, np.uint8)  # photo 40x50 plus a 20-pixel legend
    windows = [Window(0, 0, 20, 20), Window(0, 20, 20, 40)]  # processing 20x40 = the photo at half size
    drawn = draw_windows(picture, windows, (20, 40), (40, 50))
    assert np.array_equal(drawn[:, 50:], picture[:, 50:])  # legend untouched
    assert (drawn[0, :50] == 255).all() and (drawn[:, 0] == 255).all()  # outer edge of the first window
    assert (drawn[39, :50] == 255).all() and (drawn[:, 49] == 255).all()  # far edges of the second window
    assert (drawn[1, 1:24] == 20).all() and (drawn[1, 26:49] == 20).all()  # the dark inner lines
    assert (drawn[10, 10] == 128).all() and (drawn[20, 30] == 128).all()  # window interiors untouched
    assert (drawn[10, 24:26] == 255).all()  # the seam: the first window ends at x = 24, the second starts at 25


def test_pixel_report_reads_the_probabilities(session, photos):
    r = session.run(photos[0], "sky, road, person", ["clearclip"], bg_threshold=0.5)[0]
    probs = r.prediction.probs  # (3, 72, 100)
    labels = r.prediction.labels
    y, x = (int(v) for v in torch.nonzero(labels >= 0)[0])
    c = int(labels[y, x])
    assert pixel_report(r, x, y).startswith(f"clearclip at ({x}, {y}): {['sky', 'road', 'person'][c]} (p = "
                                            f"{float(probs[c, y, x]):.2f}); runner-up")  # fmt: skip
    y, x = (int(v) for v in torch.nonzero(labels == -1)[0])
    assert "unlabelled (best:" in pixel_report(r, x, y)
    assert "outside the photo" in pixel_report(r, 100, 0)


def test_legend_and_timings(session, photos):
    results = session.run(photos[0], "sky, road, person", METHODS)
    present = {["sky", "road", "person"][c] for c in results[0].prediction.labels.unique().tolist()}
    text = legend_html(results[0])
    assert all(f'<span class="ovss-legend-name">{name}</span>' in text for name in present)
    assert text.count("ovss-swatch") == len(present)
    again = session.run(photos[0], "sky", METHODS)
    table = timing_markdown(again, session.set_image_calls)
    assert table.count("cached (fast path)") == 2 and "Image encodings since start: 2." in table


def test_progress_covers_windows_and_label_rows_and_the_table_the_whole_click(session, photos):
    import time

    reports: list[tuple[float, str]] = []
    start = time.perf_counter()
    results = session.run(photos[1], "sky, road", METHODS, progress=lambda f, text: reports.append((f, text)))
    wall = time.perf_counter() - start
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # never goes back, ends full
    for method in METHODS:  # each method's share: its windows, then its label rows, then its overlay
        assert any(text.startswith(f"{method}: encoding window") for _, text in reports)
        assert any(text.startswith(f"{method}: labelling row") for _, text in reports)
        assert any(text == f"{method}: drawing the overlay" for _, text in reports)
    accounted = results[0].read_seconds + sum(r.encode_seconds + r.predict_seconds + r.overlay_seconds for r in results)
    assert 0 < accounted <= wall  # the table's parts are disjoint pieces of the click
    table = timing_markdown(results, session.set_image_calls)
    assert "| overlay |" in table and "Reading the image:" in table


def test_downloads_are_the_prediction_files(session, photos, tmp_path):
    results = session.run(photos[0], "sky, road", METHODS)
    paths = save_downloads(results, tmp_path)
    stems = ["clearclip", "clearclip_gla"]
    assert [p.name for p in paths] == [f"{s}{end}" for s in stems for end in (".png", "_overlay.png", "_logits.npy")]
    assert np.array_equal(np.asarray(Image.open(paths[3])), results[1].prediction.labels.numpy())
    np.testing.assert_allclose(np.load(paths[5]), results[1].prediction.logits.numpy())
    with pytest.raises(OvssError, match="press Segment first"):
        save_downloads([], tmp_path)


# ------------------------------------------------------------------ the Gradio handlers (no browser)
def test_segment_handler_fills_the_slots_and_keeps_them_on_an_error(session, photos, tmp_path):
    from ovss.demo.app import segment
    from ovss.demo.upload import Upload

    out = segment(session, photos[0], "sky, road", METHODS, 0, 0.0, True)
    assert len(out) == 4 * 3 + 5  # 4 slots x (column, image, legend), timings, config, results, pixel box, message
    assert [out[3 * s].visible for s in range(4)] == [True, True, False, False]
    assert out[1].label == "clearclip" and out[4].label == "clearclip+gla"
    results = out[-3]
    shown = np.asarray(Image.open(out[1].value["path"]))  # the file the page shows: a lossless PNG
    assert np.array_equal(shown, results[0].overlay)
    assert not np.array_equal(results[0].overlay, results[0].prediction.overlay())  # the window grid is drawn
    assert set(out[-4]) == set(METHODS) and out[-2] == "" and out[-1].visible is False

    def is_skip(update) -> bool:
        return isinstance(update, dict) and update == {"__type__": "update"}

    failed = segment(session, photos[0], "", METHODS, 0, 0.0, False, previous=results)
    assert len(failed) == len(out)
    message = failed[-1]
    assert message.visible and "the labels box is empty" in message.value and "previous click" in message.value
    assert [failed[3 * s + 1].label for s in range(2)] == [
        "clearclip (previous result)",
        "clearclip+gla (previous result)",
    ]
    assert all(is_skip(failed[i]) for i in (0, 2, 3, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15))  # results, state kept
    assert failed[12].startswith("*Previous result:*") and "clearclip+gla" in failed[12]
    five = segment(session, photos[0], "sky", [*METHODS, "maskclip", "naclip", "sclip"], 0, 0.0, False)
    assert "5 methods chosen" in five[-1].value and five[12] == ""  # nothing shown before: nothing to keep

    broken = tmp_path / "server-copy-123.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = segment(session, Upload(str(broken), "holiday.png"), "sky", METHODS, 0, 0.0, False)
    assert "cannot read image 'holiday.png': not a decodable image file" in out[-1].value
    assert str(tmp_path) not in out[-1].value
    good = tmp_path / "good.png"
    Image.fromarray(photos[0]).save(good)
    out = segment(session, Upload(str(good), "good.png"), "sky, road", METHODS, 0, 0.0, False)
    direct = session.run(photos[0], "sky, road", METHODS)
    assert np.array_equal(out[-3][0].overlay, direct[0].overlay)  # the file decoded by ovss = the array


def test_download_and_pixel_handlers(session, photos):
    import gradio as gr

    from ovss.demo.app import pixel, prepare_downloads

    results = session.run(photos[0], "sky, road", METHODS)
    files = prepare_downloads(results)
    assert [Path(f).name for f in files][:3] == ["clearclip.png", "clearclip_overlay.png", "clearclip_logits.npy"]
    assert all(Path(f).is_file() for f in files) and len(files) == 6
    with pytest.raises(gr.Error, match="press Segment first"):
        prepare_downloads(None)
    assert pixel(results, 1, 3, 4) == pixel_report(results[1], 3, 4)
    assert pixel(results, 1, 3, 4).startswith("clearclip+gla at (3, 4): ")
    assert pixel(None, 0, 3, 4) == "" and pixel(results, 3, 3, 4) == ""  # nothing run yet / an empty slot


def test_page_builds_and_shows_missing_weights_in_one_line(tmp_path, monkeypatch):
    from ovss.demo.app import build_app

    monkeypatch.setenv("OVSS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("OVSS_OFFLINE", "1")
    session = DemoSession(ModelPool("ViT-B/16"))
    app = build_app(session)
    banner = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "ovss-startup-error")
    assert banner.visible and "not cached" in banner.value and "ViT-B-16.pt" in banner.value
    assert "\n" not in banner.value and session.load_error in banner.value


# ------------------------------------------------------------------ the command
def test_demo_without_gradio_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err == 'ovss: error: ovss demo needs Gradio, an optional extra: pip install "ovss[demo]"\n'


def test_demo_rejects_unknown_methods_before_loading(capsys):
    assert main(["demo", "--methods", "clearclip,nope", "--clip", "/nonexistent.pt"]) == 2
    assert "nope" in capsys.readouterr().err


def test_help_imports_neither_torch_nor_gradio():
    code = (
        "import sys; from ovss.cli.main import build_parser; build_parser().format_help(); "
        "print('torch' in sys.modules, 'gradio' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


def _serve_once(monkeypatch) -> None:
    """``block_thread`` closes the server at once, so ``main(["demo", ...])`` returns after starting it."""
    import gradio as gr

    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: self.close())


def test_demo_command_serves_the_page_and_prints_its_address(monkeypatch, capsys, tmp_path, bpe_path):
    from test_demo_browser import free_port
    from tiny import save_openai_jit, tiny_clip_state_dict

    _serve_once(monkeypatch)
    clip = save_openai_jit(tiny_clip_state_dict(seed=0), tmp_path / "tiny.pt")
    port = free_port()
    assert main(["demo", "--clip", str(clip), "--tokenizer", str(bpe_path), "--port", str(port)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"ovss demo: open http://127.0.0.1:{port}/ in a browser (Ctrl+C stops it)\n")
    assert "warning" not in err


def test_demo_command_without_weights_still_serves_and_warns(monkeypatch, capsys, tmp_path):
    from test_demo_browser import free_port

    _serve_once(monkeypatch)
    monkeypatch.setenv("OVSS_CACHE", str(tmp_path / "empty-cache"))
    assert main(["demo", "--offline", "--port", str(free_port())]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ovss demo: open http://127.0.0.1:")
    assert err.startswith("ovss: warning: 2 file(s) needed for this run are not cached") and err.count("\n") == 1


def test_a_label_set_is_encoded_once_for_all_methods(session, tiny_clip, photos, monkeypatch):
    calls = []
    encode = tiny_clip.encode_text
    spy = lambda tokens, **kw: calls.append(len(tokens)) or encode(tokens, **kw)  # noqa: E731
    monkeypatch.setattr(tiny_clip, "encode_text", spy)
    session.run(photos[0], "tree, car", METHODS)
    assert calls == [2 * 7]  # two names x seven templates, once for both methods (one CLIP, one template set)
    session.run(photos[0], "car, tree", METHODS, bg_threshold=0.3)
    assert calls == [2 * 7]  # cached


def test_labels_fail_before_any_image_is_encoded(photos):
    from ovss.models.clip import build_clip
    from tiny import tiny_clip_state_dict

    vision_only = build_clip({k: v for k, v in tiny_clip_state_dict(seed=0).items() if k.startswith("visual.")})
    session = DemoSession(ModelPool(vision_only, **SETTINGS))
    with pytest.raises(OvssError, match="text"):
        session.run(photos[0], "sky, road", METHODS)
    assert session.set_image_calls == 0
