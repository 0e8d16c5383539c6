"""Peak memory and time of the demo server on one big photo (issue 21, item 3), clicked in a real browser.

    python benchmarks/demo_memory.py [--size 6000] [--methods clearclip,naclip] [--quick] [--max-mb 2000]

Starts ``python -m ovss demo`` in a fresh process (2 threads) with random full-size ViT-B/16 weights
(``ovss.cli.bench_weights.write_random_weights``; ``--quick``: the tiny ones), opens the page in headless
Chromium (Debian's ``chromium`` through Playwright, as the browser test does), uploads a smooth random
``size x size`` photo, types three labels, clicks *Segment* and waits for every result; then clicks a pixel of
the first result. The server's peak RSS is ``VmHWM`` of its ``/proc/<pid>/status`` (Linux), read after
each step. Prints a Markdown table: the server's peak after loading, after the click and after the pixel
click, the click's wall time in the browser and the page's own timing table (which should account for it).
Target: 6000 x 6000, two methods, ViT-B/16, server peak under 2000 MB.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import child_env, vocab_path
from memory_bench import smooth_photo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_mb(pid: int) -> float:
    """The process's peak resident set size so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc: this benchmark needs Linux")


def wait_for(url: str, server: subprocess.Popen[bytes], log: Path, seconds: float = 300.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            output = log.read_text(errors="replace")
            sys.exit(f"ovss demo exited with {server.returncode} before serving:\n{output[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"ovss demo did not answer at {url} within {seconds:.0f} s")


def wait_for_results(page: Any, count: int, seconds: float = 1200.0) -> None:
    """Wait until the page shows ``count`` results; exit with the page's message when the click failed."""
    deadline = time.monotonic() + seconds
    while not all(page.locator(f"#ovss-result-{slot} img").is_visible() for slot in range(count)):
        for failure in ("#ovss-message", "#ovss-startup-error"):
            if page.locator(failure).is_visible():
                sys.exit(f"the demo did not segment: {page.locator(failure).inner_text()}")
        if time.monotonic() > deadline:
            sys.exit(f"no results on the page after {seconds:.0f} s")
        page.wait_for_timeout(500)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=6000, help="photo side in pixels (square)")
    parser.add_argument("--methods", default="clearclip,naclip", help="methods shown side by side (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="tiny random weights (a smoke test of the harness)")
    parser.add_argument("--max-mb", type=float, default=None, help="exit 1 when the server's peak is above this")
    args = parser.parse_args()
    from playwright.sync_api import expect, sync_playwright

    from ovss.cli.bench_weights import write_random_weights

    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("Debian's chromium is missing: apt-get install -y chromium")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip = write_random_weights(folder, quick=args.quick)["ViT-B/16"]
        photo = folder / f"photo{args.size}.png"
        smooth_photo(args.size, args.size).save(photo)  # type: ignore[attr-defined]
        port = free_port()
        env = {**child_env(folder / "cache"), "GRADIO_TEMP_DIR": str(folder / "gradio")}
        command = [sys.executable, "-m", "ovss", "demo", "--clip", clip, "--port", str(port)]
        command += ["--methods", ",".join(methods)]
        tokenizer = vocab_path()
        if tokenizer is not None:
            command += ["--tokenizer", tokenizer]
        log = folder / "demo.log"  # a file, not a pipe that nobody reads while the server runs
        with log.open("wb") as output:
            server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_for(url, server, log)
            loaded = peak_mb(server.pid)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.set_default_timeout(1_200_000)
                expect.set_options(timeout=1_200_000)  # a 36-megapixel photo takes a while on a CPU
                page.goto(url)
                page.locator("#ovss-image input[type=file]").set_input_files(str(photo))
                expect(page.locator("#ovss-image img")).to_be_visible()
                page.locator("#ovss-labels textarea").fill("sky, road, person")
                start = time.perf_counter()
                page.locator("#ovss-segment").click()
                wait_for_results(page, len(methods))
                expect(page.locator("#ovss-timings")).to_contain_text("Reading the image")
                clicked = time.perf_counter() - start
                after_click = peak_mb(server.pid)
                timings = page.locator("#ovss-timings").inner_text()
                page.locator("#ovss-result-0 img").click(position={"x": 5, "y": 5})
                expect(page.locator("#ovss-pixel textarea")).not_to_have_value("")
                after_pixel = peak_mb(server.pid)
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=60)
    weights = "ViT-B/16 tiny" if args.quick else "ViT-B/16"
    print("| methods | weights | photo | server peak MB: loaded / click / pixel | click s (browser) |")
    print("|---|---|---|---|---|")
    print(
        f"| {', '.join(methods)} | {weights} | {args.size}x{args.size} | {loaded:.0f} / {after_click:.0f} / "
        f"{after_pixel:.0f} | {clicked:.1f} |"
    )
    print("\nThe page's timing table:\n\n" + timings)
    if args.max_mb is not None and after_pixel > args.max_mb:
        sys.exit(f"server peak {after_pixel:.0f} MB is above --max-mb {args.max_mb:.0f}")


if __name__ == "__main__":
    main()
