"""Text-embedding time, cold and warm, through what users run: ``ovss.load(...).encode_names(names)``.

    python benchmarks/text_bench.py                          # VOC21, PC59, COCO-Stuff-171, ADE-150
    python benchmarks/text_bench.py --full voc21 pc59       # also the 77-position path on these (slow)
    python benchmarks/text_bench.py --quick                  # a tiny text tower: a smoke test in seconds

Weights: a full-size CLIP ViT-B/16 (text tower: width 512, 12 blocks, 77 positions) with random values is
written to a temporary folder (or ``--weights-dir``) and loaded by path; time does not depend on the values.
Names: the benchmark's ``plain`` name set (``ovss.eval.names.load_names``, synonyms flattened), 80 templates.

Every measurement runs in a fresh process (``sys.executable`` running this file's ``_child`` mode) with
``torch.set_num_threads(--threads)`` and times ``encode_names`` alone (not the model load):

* cold: an empty ``OVSS_CACHE``: every name goes through the text tower (length-sorted batches cut to their
  longest prompt) and is written to ``<cache>/text``;
* warm: a second process on the same cache folder: every name is read from disk, no text-tower call;
* A/B (``--full [NAMES]``, all selected name sets when none is given): in one more process with the cache
  off, ``ovss.text.embeddings.text_embeddings`` with the cut, then with ``trim=False`` (all 77 positions,
  the path before the cut); their ratio is the speed-up, and the largest difference of the 77-position
  embeddings to the cold ones is printed.

Prints Markdown rows for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import vocab_path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/tiny.py: CLIP weights in the OpenAI layout

DATASETS = {"voc21": "VOC21", "pc59": "PC59", "coco_stuff": "COCO-Stuff-171", "ade20k": "ADE-150"}


def write_weights(folder: Path, quick: bool) -> Path:
    """A random CLIP ViT-B/16 checkpoint (a tiny one with ``quick``) unless present."""
    from tiny import save_openai_plain, tiny_clip_state_dict

    path = folder / f"clip-vitb16-{'tiny' if quick else 'base'}.pt"
    if not path.exists():
        if quick:
            sd = tiny_clip_state_dict(seed=0, width=64, layers=1, text_width=64, text_layers=1)
        else:
            sd = tiny_clip_state_dict(seed=0, width=768, layers=12, embed_dim=512, text_width=512, text_layers=12)
        save_openai_plain(sd, path)
    return path


def child(job: dict) -> dict:
    """One measurement in a fresh process: load, then time the text embeddings of the names."""
    torch.set_num_threads(job["threads"])
    import ovss
    from ovss.eval.names import load_names
    from ovss.text.embeddings import text_embeddings
    from ovss.text.templates import TEMPLATE_SETS

    names = [name for synonyms in load_names(job["dataset"]) for name in synonyms]
    seg = ovss.load("vanilla", clip=job["clip"], tokenizer=job["tokenizer"], download=False)
    seg.tokenizer  # noqa: B018  (load the vocabulary before the clock starts)
    if job["mode"] == "full":  # A/B in one process (cut, then 77 positions): the ratio survives a busy machine
        templates = TEMPLATE_SETS[seg.pipeline.templates]
        start = time.perf_counter()
        text_embeddings(seg.clip.encode_text, seg.tokenizer, names, templates)
        cut_seconds = time.perf_counter() - start
        start = time.perf_counter()
        embeddings = text_embeddings(seg.clip.encode_text, seg.tokenizer, names, templates, trim=False)
        seconds = time.perf_counter() - start
        np.save(job["out"], embeddings.numpy())
        return {"names": len(names), "seconds": seconds, "cut_seconds": cut_seconds}
    start = time.perf_counter()
    embeddings = seg.encode_names(names)
    seconds = time.perf_counter() - start
    np.save(job["out"], embeddings.numpy())
    return {"names": len(names), "seconds": seconds}


def measure(job: dict, cache: Path, text_cache: bool) -> dict:
    """Run `child` in a fresh interpreter on the cache folder ``cache`` and return what it reports."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(job["threads"]),
        "MKL_NUM_THREADS": str(job["threads"]),
        "OVSS_CACHE": str(cache),
        "OVSS_TEXT_CACHE": "1" if text_cache else "0",
    }
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "_child", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        raise SystemExit(f"measurement {job['dataset']} ({job['mode']}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(args: argparse.Namespace, clip: Path, work: Path) -> None:
    """One Markdown row per name set, printed as soon as it is measured."""
    print("| names | Q | prompts | cold (s) | warm (s) | A/B: 77 positions (s) | cut (s) | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for dataset in args.datasets:
        cache = work / f"cache-{dataset}"  # empty: cold
        base = {"dataset": dataset, "clip": str(clip), "tokenizer": vocab_path(), "threads": args.threads}
        out = {mode: str(work / f"{dataset}-{mode}.npy") for mode in ("full", "cold", "warm")}
        with_full = args.full is not None and (not args.full or dataset in args.full)
        full = measure({**base, "mode": "full", "out": out["full"]}, cache, False) if with_full else None
        cold = measure({**base, "mode": "cold", "out": out["cold"]}, cache, True)
        warm = measure({**base, "mode": "warm", "out": out["warm"]}, cache, True)
        if not np.array_equal(np.load(out["cold"]), np.load(out["warm"])):
            raise SystemExit(f"{dataset}: the warm (cached) embeddings differ from the cold ones")
        q = cold["names"]
        ab = "- | - | - | -"
        if full is not None:
            diff = np.abs(np.load(out["full"]) - np.load(out["cold"])).max()
            ab = (
                f"{full['seconds']:.1f} | {full['cut_seconds']:.1f} | {full['seconds'] / full['cut_seconds']:.1f}x | "
                f"{diff:.1e}"
            )
        name = DATASETS[dataset]
        print(f"| {name} | {q} | {q * 80} | {cold['seconds']:.1f} | {warm['seconds']:.3f} | {ab} |", flush=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument(
        "--full", nargs="*", choices=list(DATASETS), help="also time the 77-position path on these (none: all; slow)"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny text tower (smoke test)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every measurement (default 2)")
    parser.add_argument("--weights-dir", help="write / reuse the random checkpoint here instead of a temp folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = Path(args.weights_dir) if args.weights_dir else work
        folder.mkdir(parents=True, exist_ok=True)
        clip = write_weights(folder, args.quick)
        print(f"\n### text embeddings{' (quick)' if args.quick else ''}, {args.threads} threads, 80 templates\n")
        bench(args, clip, work)


if __name__ == "__main__":
    main()
