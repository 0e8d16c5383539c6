"""The Gradio page of ``ovss demo``: a thin layer over :class:`~ovss.demo.session.DemoSession`.

Requests are queued one at a time (``default_concurrency_limit=1``): the segmenters are shared, and the
page's settings are applied to them for the duration of a request.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from ovss.demo.render import config_json, legend_html, timing_markdown
from ovss.demo.session import MAX_METHODS, DemoSession, MethodResult, pixel_report, save_downloads
from ovss.demo.upload import photo_input, read_upload
from ovss.errors import OvssError

DEFAULT_METHODS = ("clearclip", "clearclip+gla")
INTRO = (
    "# ovss: open-vocabulary segmentation, method against method\n"
    "Drop in a photo, type a few class names, and compare what each method labels; tick *show the windows* "
    "to see the sliding-window seams that GLA works on. Click a pixel of a result to see its class and probability."
)
EXAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image's bundled photos (no download)
FAST_PATH_NOTE = (
    "**Fast path:** each method keeps the image features of the last few images (keyed by a hash of the "
    "pixels). Changing only the labels, the logit scale or the background threshold re-runs just the text "
    "side and the labelling, not the image encoders."
)
CSS = """
.ovss-legend { display: flex; flex-wrap: wrap; gap: 0.3em 1em; }
.ovss-legend-item { display: inline-flex; align-items: center; gap: 0.35em; }
.ovss-swatch { display: inline-block; width: 1em; height: 1em; border: 1px solid #606060; }
#ovss-message { border-left: 4px solid #d92d20; padding: 0.2em 0.6em; background: #fef3f2; }
/* a result's download / full-screen icons sit above the picture, not over the legend drawn into it */
.ovss-result .icon-button-wrapper { position: static; justify-content: flex-end; margin: 0 0 2px auto; }
"""
STALE = " (previous result)"  # appended to a result's label when the last click failed


def example_files(folder: Path) -> list[str]:
    """scikit-image's example photos written as PNGs into ``folder``; empty without scikit-image."""
    from PIL import Image

    from ovss.cli.segment import example_image

    paths = []
    for name in EXAMPLE_PHOTOS:
        try:
            rgb = example_image(name)
        except OvssError:  # scikit-image missing or without this photo: offer the others
            continue
        path = folder / f"{name}.png"
        Image.fromarray(rgb).save(path)
        paths.append(str(path))
    return paths


def _slot_updates(results: Sequence[MethodResult]) -> list[Any]:
    """Per slot: the column's visibility, the overlay (labelled with the method), the HTML legend."""
    updates: list[Any] = []
    for slot in range(MAX_METHODS):
        if slot < len(results):
            r = results[slot]
            shown = r.overlay if r.overlay_file is None else str(r.overlay_file)  # the session's PNG: no re-encoding
            picture = gr.Image(value=shown, label=r.method, format="png")  # lossless: exact class colours
            updates += [gr.Column(visible=True), picture, legend_html(r)]
        else:
            updates += [gr.Column(visible=False), gr.Image(value=None), ""]
    return updates


def segment(
    session: DemoSession,
    image: Any,
    labels: str | None,
    chosen: list[str] | None,
    logit_scale: float | None,
    bg_threshold: float,
    show_windows: bool,
    progress: Callable[..., Any] | None = None,
    previous: list[MethodResult] | None = None,
) -> list[Any]:
    """The *Segment* button: slot updates, timings, configuration, the results (page state), the pixel box, message.

    A bad input (an :class:`OvssError`: empty labels, too many methods, a corrupt file...) changes nothing
    but the message next to the button, which says what is wrong and that the results shown, if any, are
    those of the previous click (their titles say "previous result").

    Args:
        previous: the results shown now (the page state), kept and marked when this click fails.
    """
    report = None if progress is None else (lambda fraction, text: progress(fraction, desc=text))
    try:
        started = time.perf_counter()
        rgb = read_upload(image)
        results = session.run(
            rgb,
            labels,
            chosen,
            logit_scale=logit_scale or None,  # 0 or empty: each method's own
            bg_threshold=bg_threshold,
            show_windows=show_windows,
            progress=report,
            decode_seconds=time.perf_counter() - started,
        )
    except OvssError as err:
        return _failed(str(err), previous or [], session.set_image_calls)
    timings = timing_markdown(results, session.set_image_calls)
    return [*_slot_updates(results), timings, config_json(results), results, "", gr.Markdown("", visible=False)]


def _failed(message: str, previous: Sequence[MethodResult], set_image_calls: int) -> list[Any]:
    """Outputs of a click that failed: the message shown, the previous results kept and marked as such."""
    slots: list[Any] = []
    for slot in range(MAX_METHODS):
        if slot < len(previous):
            slots += [gr.skip(), gr.Image(label=previous[slot].method + STALE), gr.skip()]
        else:
            slots += [gr.skip(), gr.skip(), gr.skip()]
    text = f"**Not segmented:** {message}"
    if previous:
        text += "  \nThe results below are those of the previous click."
        timings = "*Previous result:*\n\n" + timing_markdown(previous, set_image_calls)
    else:
        timings = ""
    return [*slots, timings, gr.skip(), gr.skip(), gr.skip(), gr.Markdown(text, visible=True)]


def prepare_downloads(results: list[MethodResult] | None) -> list[str]:
    """The *Prepare the files* button: each method's label map PNG, overlay and logits, in a new folder."""
    try:
        folder = tempfile.mkdtemp(prefix="ovss-demo-")
        return [str(path) for path in save_downloads(results or [], folder)]
    except OvssError as err:
        raise gr.Error(str(err), print_exception=False) from None


def pixel(results: list[MethodResult] | None, slot: int, x: int, y: int) -> str:
    """A click on the overlay of ``slot`` at (x, y) in image pixels: the class there and its probability."""
    if not results or slot >= len(results):
        return ""
    return pixel_report(results[slot], x, y)


def build_app(
    session: DemoSession,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    title: str = "ovss demo",
    note: str = "",
    labels: str = "",
    bg_threshold: float = 0.0,
) -> gr.Blocks:
    """The page: inputs on the left, one overlay + legend per method side by side, timings and configuration.

    Args:
        session: does the work; its segmenters for ``methods`` are built here, so a missing weight file is
            reported on the page (one line) instead of on the first click.
        methods: the methods ticked at first (default: clearclip and clearclip+gla).
        title: the browser tab's title.
        note: a line shown under the introduction (e.g. that the weights are tiny random ones).
        labels: the labels box's first text (``ovss demo --labels`` / ``--labels-file``).
        bg_threshold: the background threshold slider's first value (``ovss demo --bg-threshold``).
    """
    import ovss

    startup_error = session.warm_up(methods)
    examples_dir = Path(tempfile.mkdtemp(prefix="ovss-demo-examples-"))

    def on_segment(
        image: Any,
        labels: str,
        chosen: list[str],
        logit_scale: float | None,
        bg_threshold: float,
        show_windows: bool,
        previous: list[MethodResult] | None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008  (Gradio's way of asking for a progress bar)
    ) -> list[Any]:
        return segment(session, image, labels, chosen, logit_scale, bg_threshold, show_windows, progress, previous)

    def on_select(slot: int) -> Callable[..., str]:
        def report(results: list[MethodResult] | None, evt: gr.SelectData) -> str:
            x, y = (int(v) for v in evt.index)
            return pixel(results, slot, x, y)

        return report

    with gr.Blocks(title=title, analytics_enabled=False) as app:  # a local tool: no telemetry calls
        gr.Markdown(INTRO + (f"\n\n*{note}*" if note else ""))
        gr.Markdown(
            f"**Cannot load the models:** {startup_error}",
            visible=startup_error is not None,
            elem_id="ovss-startup-error",
        )
        results_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                image = photo_input(
                    label="image",
                    type="filepath",  # decoded by ovss in the handler (demo/upload.py), not by Gradio
                    sources=["upload", "clipboard"],
                    height=300,
                    elem_id="ovss-image",
                )
                label_box = gr.Textbox(
                    labels,
                    label="labels",
                    placeholder="sky, road, person|pedestrian",
                    info="classes separated by commas, synonyms by '|' (as in ovss segment --labels)",
                    elem_id="ovss-labels",
                )
                button = gr.Button("Segment", variant="primary", elem_id="ovss-segment")
                message = gr.Markdown(visible=False, elem_id="ovss-message")  # why the last click failed
                chosen = gr.CheckboxGroup(
                    ovss.available_methods(),
                    value=list(methods),
                    label="methods",
                    info=f"one to {MAX_METHODS}",
                    elem_id="ovss-methods",
                )
                with gr.Row():
                    logit_scale = gr.Number(
                        0, label="logit scale", minimum=0.0, info="0: each method's own", elem_id="ovss-logit-scale"
                    )
                    threshold = gr.Slider(
                        0.0,
                        1.0,
                        value=bg_threshold,
                        step=0.01,
                        label="background threshold",
                        info="below it: class 'background' if listed, else unlabelled",
                    )
                show_windows = gr.Checkbox(False, label="show the windows (seams)", elem_id="ovss-windows")
                photos = example_files(examples_dir)
                if photos:
                    gr.Examples(photos, inputs=[image], label="example photos (scikit-image)")
                gr.Markdown(FAST_PATH_NOTE)
            with gr.Column(scale=3):
                slots: list[Any] = []
                images = []
                with gr.Row(equal_height=False):
                    for slot in range(MAX_METHODS):
                        with gr.Column(visible=False, min_width=240) as column:
                            overlay = gr.Image(
                                label=f"method {slot + 1}",
                                interactive=False,
                                format="png",
                                buttons=["download", "fullscreen"],
                                elem_id=f"ovss-result-{slot}",
                                elem_classes=["ovss-result"],
                            )
                            legend = gr.HTML(elem_id=f"ovss-legend-{slot}")
                        slots += [column, overlay, legend]
                        images.append(overlay)
                pixel_box = gr.Textbox(label="pixel (click a result)", interactive=False, elem_id="ovss-pixel")
                timings = gr.Markdown(elem_id="ovss-timings")
                with gr.Accordion("resolved configuration", open=False):
                    config = gr.JSON()
                with gr.Accordion("downloads: label maps (PNG) and logits (.npy)", open=False):
                    download = gr.Button("Prepare the files")
                    files = gr.File(file_count="multiple", label="files")
        one_queue: dict[str, Any] = {"concurrency_id": "ovss-models", "concurrency_limit": 1}  # one at a time
        button.click(
            on_segment,
            inputs=[image, label_box, chosen, logit_scale, threshold, show_windows, results_state],
            outputs=[*slots, timings, config, results_state, pixel_box, message],
            **one_queue,
        )
        download.click(prepare_downloads, inputs=[results_state], outputs=[files], **one_queue)
        for slot, overlay in enumerate(images):
            overlay.select(on_select(slot), inputs=[results_state], outputs=[pixel_box], **one_queue)
    app.queue(default_concurrency_limit=1)
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None) -> str:
    """Start serving the page in the background and return its address (``app.block_thread()`` waits)."""
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # no web fonts
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,  # an error Gradio raises itself shows its message (ovss errors go to #ovss-message)
        theme=theme,
        css=CSS,
        footer_links=[],
    )
    return str(url)
