"""Wall time of the whole ``ovss segment`` command on one photo, as a user runs it (issue 10: under 2 s warm).

    python benchmarks/cli_bench.py                     # ClearCLIP at 448, 20 VOC names, fp32 and bf16
    python benchmarks/cli_bench.py --runs 9 --method naclip --dtype fp32
    python benchmarks/cli_bench.py --quick             # tiny weights: a smoke test in seconds

Weights: a full-size CLIP ViT-B/16 with random values saved as OpenAI ships it (a TorchScript archive of fp16
tensors, ``ViT-B-16.pt``) in ``--weights-dir`` (default: a temporary folder); time does not depend on the values.
Each run is a fresh process of the installed console script (``ovss segment IMAGE --labels ... --out ...``),
timed from start to exit, with its peak RSS from ``os.wait4``. The cache folder (``OVSS_CACHE``) starts empty:

* first run: cold caches: the archive is compiled, converted and its fp32 copy stored; the 20 x 80 prompts go
  through the text tower and are stored;
* warm runs (``--runs``, median and range): both caches hit, which is what every later run of a user costs.

Prints Markdown rows for the README.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, vocab_path

from ovss.cli.options import add_device_flags, add_method_flag, dtypes_of, method_of

sys.path.insert(0, str(REPO / "tests"))  # tests/tiny.py: saving a TorchScript archive like OpenAI's

NAMES = (
    "aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, table, dog, horse, motorbike, person, "
    "plant, sheep, sofa, train, monitor"
)
IMAGE = REPO.parent / "shared" / "assets" / "voc2012-val-samples" / "images" / "1_image.png"


def write_archive(folder: Path, quick: bool) -> Path:
    """A random CLIP ViT-B/16 (tiny with ``quick``) as an fp16 TorchScript archive, unless present."""
    path = folder / f"ViT-B-16-{'tiny' if quick else 'random'}.pt"
    if path.exists():
        return path
    from ovss.cli.bench_weights import random_clip_state_dict
    from tiny import save_openai_jit

    sizes = (128, 12, 128, 1, 64) if quick else (768, 12, 512, 12, 512)
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in random_clip_state_dict(*sizes, seed=0).items()}
    folder.mkdir(parents=True, exist_ok=True)
    return save_openai_jit(sd, path)


def command() -> list[str]:
    """The console script installed beside this Python (not a shell shim), else ``python -m ovss``."""
    script = Path(sys.executable).parent / "ovss"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ovss"]


def run_once(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds from start to exit, peak RSS in MiB) of one process; raises on a non-zero exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"ovss segment failed (exit {proc.returncode}): {stderr.strip()}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_method_flag(parser)
    add_device_flags(parser, device=False, dtype_default="fp32,bf16", several=True)
    parser.add_argument("--runs", type=int, default=5, help="warm runs per precision (median reported)")
    parser.add_argument("--image", type=Path, default=IMAGE)
    parser.add_argument("--weights-dir", type=Path, default=None, help="keep the random archive here")
    parser.add_argument("--quick", action="store_true", help="tiny weights: a smoke test")
    args = parser.parse_args()
    method, dtypes = method_of(args), dtypes_of(args)
    if not args.image.is_file():
        raise SystemExit(f"image {args.image} not found; pass --image PATH (the VOC samples live in ../shared)")
    tmp = Path(tempfile.mkdtemp(prefix="ovss-cli-bench-"))
    try:
        archive = write_archive(args.weights_dir or tmp / "weights", args.quick)
        env = {**os.environ, "OVSS_CACHE": str(tmp / "cache")}
        env.pop("OVSS_FAST_EXIT", None)
        env.pop("OVSS_PREPARED_CACHE", None)
        env.pop("OVSS_TEXT_CACHE", None)
        vocab = vocab_path()
        if vocab:
            env["OVSS_BPE_PATH"] = vocab
        extra = ["--short-side", "64", "--crop", "64", "--stride", "32"] if args.quick else []
        print(f"`ovss segment` one {args.image.name} photo, 20 names, {method}, {os.cpu_count()} CPUs, "
              f"random ViT-B/16 {'(tiny) ' if args.quick else ''}as an fp16 TorchScript archive")
        print("| precision | first run (cold caches) | warm runs: median (min-max) | peak RSS |")
        print("|---|---|---|---|")
        for dtype in dtypes:
            out = tmp / f"out-{dtype}"

            def once(out: Path = out, dtype: str = dtype) -> tuple[float, float]:
                shutil.rmtree(out, ignore_errors=True)
                base = [*command(), "segment", str(args.image), "--labels", NAMES, "--method", method]
                flags = ["--clip", str(archive), "--dtype", dtype, "--out", str(out), "-q", *extra]
                return run_once([*base, *flags], env)

            first = once()
            warm = [once() for _ in range(args.runs)]
            times = [t for t, _ in warm]
            spread = f"{statistics.median(times):.2f} s ({min(times):.2f}-{max(times):.2f})"
            print(f"| {dtype} | {first[0]:.2f} s | {spread} | {max(r for _, r in warm):.0f} MiB |")
            shutil.rmtree(tmp / "cache", ignore_errors=True)  # the next precision starts cold as well
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
