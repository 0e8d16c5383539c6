"""Images per second of ``ovss segment`` on a folder, as a user labels a collection (issue 22, item 2).

    python benchmarks/bulk_bench.py                       # 64 synthetic 500x375 JPEG photos, ClearCLIP, CPU
    python benchmarks/bulk_bench.py --images DIR          # your own photos (e.g. VOC val images), all of them
    python benchmarks/bulk_bench.py --short-side 224      # a quarter of the pixels: 4-5x less model time
    python benchmarks/bulk_bench.py --quick               # tiny weights, 8 small photos: a smoke test
    python benchmarks/bulk_bench.py --gpu-only            # only the GPU table (needs CUDA)

Weights: a full-size CLIP ViT-B/16 with random values, written as ``ovss bench --random`` writes them
(``ovss.cli.bench_weights.write_random_weights``); time does not depend on the values. Labels: the 21 VOC
classes with the method's default templates. The cache (``OVSS_CACHE``) is filled once by a one-image run
first (the weights' fp32 copy, the text embeddings), so every timed run is a warm run as a user's second one.

CPU table: every row is the whole command in fresh processes (``ovss segment DIR ...``), timed from start
to the last exit; images/s = images / wall seconds (model loading included, as a user waits for it):

* ``--read-ahead 0``, 1 process of 2 threads: the loop before issue 22 (each image read when its turn comes),
  still the default on the CPU;
* ``--read-ahead 2``, 1 process of 2 threads: the next two images decoded and resized on a worker thread;
* ``--shard 0/2`` and ``--shard 1/2`` at once, 2 processes of 1 thread each.

GPU table (when CUDA is available): the Python API (``ovss.load(...).predict_many``) in a fresh process per
cell, images/s over the photos after a two-image warm-up, and the peak GPU memory
(``torch.cuda.max_memory_allocated``) at several windows-per-forward (``window_batch``, with the
1024-token cap off) in fp32, fp16 and bf16, each image's windows in forwards of their own (the default) and
pooled (``predict_many(..., pool_windows=True)``: consecutive images' windows fill each forward; ``ovss
segment --pool-windows``). ClearCLIP runs with 224-px windows there (15 per photo, so a forward of 64 holds
windows of 4-5 photos only when pooled; its default 448-px windows are 2 per photo, too few to batch).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import child_env, vocab_path

VOC = (
    "background, aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, table, dog, horse, motorbike, "
    "person, plant, sheep, sofa, train, monitor"
)
GPU_SCRIPT = """
import json, sys, time
import torch
import ovss

clip, vocab, dtype, batch, pool, *paths = sys.argv[1:]
dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
seg = ovss.load("clearclip", clip=clip, tokenizer=vocab or None, device="cuda", dtype=dtypes[dtype], crop=224,
                stride=112, window_batch=int(batch), tuning={"window_tokens": 0})
labels = [name.strip() for name in sys.stdin.read().split(",")]
for prediction in seg.predict_many(paths[:2], labels, pool_windows=pool == "1"):  # warm-up: kernels, text
    prediction.labels
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
for prediction in seg.predict_many(paths, labels, pool_windows=pool == "1"):
    prediction.labels.cpu()
torch.cuda.synchronize()
print(json.dumps({"seconds": time.perf_counter() - start, "peak": torch.cuda.max_memory_allocated()}))
"""


def photos(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """``count`` photo-like JPEGs: smooth random colour fields with fine noise (JPEG decoding costs as a photo's)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        coarse = rng.integers(0, 256, size=(max(height // 40, 2), max(width // 40, 2), 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), np.int16)
        noisy = np.clip(smooth + rng.integers(-12, 13, size=smooth.shape), 0, 255).astype(np.uint8)
        path = folder / f"photo{seed:03d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
    return paths


def environment(cache: Path, threads: int) -> dict[str, str]:
    return child_env(cache, threads)


def timed(commands: list[list[str]], env: dict[str, str]) -> float:
    """Seconds from starting ``commands`` together to the last one's exit; exits on a failure."""
    start = time.perf_counter()
    children = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands]
    errors = [child.communicate()[1].decode("utf-8", "replace") for child in children]
    seconds = time.perf_counter() - start
    for child, err in zip(children, errors, strict=True):
        if child.returncode != 0:
            sys.exit(f"ovss segment failed ({child.returncode}):\n{err[-3000:]}")
    return seconds


def cpu_table(images: Path, count: int, clip: str, tmp: Path, extra: list[str]) -> None:
    base = [sys.executable, "-m", "ovss", "segment", str(images), "--labels", VOC, "--clip", clip, "-q", *extra]
    one = next(p for p in sorted(images.iterdir()) if p.is_file())
    warm = timed([[*base[:4], str(one), *base[5:], "--out", str(tmp / "warm")]], environment(tmp / "cache", 2))
    rows = [
        ("1 process x 2 threads, --read-ahead 0 (the loop before; the CPU default)", 2, [["--read-ahead", "0"]]),
        ("1 process x 2 threads, --read-ahead 2", 2, [["--read-ahead", "2"]]),
        ("--shard 0/2 + --shard 1/2: 2 processes x 1 thread, --read-ahead 2", 1,
         [["--shard", "0/2", "--read-ahead", "2"], ["--shard", "1/2", "--read-ahead", "2"]]),
    ]  # fmt: skip
    flags = " ".join(extra) or "(defaults)"
    print(f"CPU: {os.cpu_count()} CPUs, load average before {os.getloadavg()[0]:.2f}; {count} images in {images}; "
          f"flags {flags}; warm-up run (1 image, model load included) {warm:.1f} s")  # fmt: skip
    print("| run | wall s | images/s |")
    print("|---|---|---|")
    for number, (name, threads, flags) in enumerate(rows):
        out = tmp / f"out{number}"
        seconds = timed([[*base, "--out", str(out), *f] for f in flags], environment(tmp / "cache", threads))
        print(f"| {name} | {seconds:.1f} | {count / seconds:.2f} |", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def gpu_table(images: Path, clip: str, tmp: Path, batches: list[int]) -> None:
    paths = [str(p) for p in sorted(images.iterdir()) if p.is_file()]
    env = environment(tmp / "cache", 4)
    print(f"GPU: {len(paths)} images; ClearCLIP with 224-px windows (stride 112: 15 per 500x375 photo at short side "
          "448), random ViT-B/16, predict_many")  # fmt: skip
    print("| precision | windows per forward | images/s | peak GPU memory MiB | pooled: images/s | pooled: peak MiB |")
    print("|---|---|---|---|---|---|")
    for dtype in ("fp32", "fp16", "bf16"):
        for batch in batches:
            cells = []
            for pool in ("0", "1"):  # each image's windows alone, then --pool-windows
                script = [sys.executable, "-c", GPU_SCRIPT, clip, vocab_path() or "", dtype, str(batch), pool]
                command = [*script, *paths]
                done = subprocess.run(command, input=VOC, env=env, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    sys.exit(f"GPU run failed ({dtype}, {batch}, pool {pool}):\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                cells += [f"{len(paths) / result['seconds']:.1f}", f"{result['peak'] / 2**20:.0f}"]
            print(f"| {dtype} | {batch} | {' | '.join(cells)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, help="a folder of photos (default: synthetic 500x375 JPEGs)")
    parser.add_argument("--count", type=int, default=64, help="synthetic photos (default 64)")
    parser.add_argument("--weights-dir", type=Path, help="keep the random weights here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="tiny weights, 8 small photos: a smoke test")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU table")
    parser.add_argument("--short-side", help="CPU table: --short-side of every run (default: the method's, 448)")
    parser.add_argument("--batches", default="1,4,16,64", help="GPU windows per forward (default 1,4,16,64)")
    args = parser.parse_args()
    import torch

    from ovss.cli.bench_weights import write_random_weights

    tmp = Path(tempfile.mkdtemp(prefix="ovss-bulk-bench-"))
    try:
        weights = args.weights_dir or tmp / "weights"
        weights.mkdir(parents=True, exist_ok=True)
        clip = write_random_weights(weights, quick=args.quick)["ViT-B/16"]
        count = 8 if args.quick else args.count
        size = (120, 90) if args.quick else (500, 375)
        images = args.images or tmp / "photos"
        if args.images is None:
            photos(images, count, *size)
        elif not images.is_dir():
            sys.exit(f"--images {images} is not a folder")
        count = sum(1 for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        extra = ["--short-side", "64", "--crop", "64", "--stride", "32"] if args.quick else []
        extra += ["--short-side", args.short_side] if args.short_side else []
        if not args.gpu_only:
            cpu_table(images, count, clip, tmp, extra)
        if torch.cuda.is_available():
            gpu_table(images, clip, tmp, [int(b) for b in args.batches.split(",")])
        else:
            print("GPU: CUDA is not available here; the GPU table was not run")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
