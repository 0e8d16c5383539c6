"""GLA cost benchmarks, measured end to end through what users run: ``ovss.load(...).set_image(...)``/``predict``.

    python benchmarks/gla_bench.py memory     # 560x1120, 36 windows: peak RSS of GLA-ProxyCLIP (and CASS) vs ProxyCLIP
    python benchmarks/gla_bench.py latency    # 336x448, 6 windows: GLA-ProxyCLIP (and CASS) latency vs ProxyCLIP
    python benchmarks/gla_bench.py precision  # every registered method: bf16 vs fp32 latency and label agreement
    python benchmarks/gla_bench.py all        # the three, sharing one set of weight files
    python benchmarks/gla_bench.py latency --quick   # tiny models and a small image: a smoke test in seconds

Weights: a full-size CLIP ViT-B/16 (OpenAI TorchScript archive, like ``ViT-B-16.pt``) and DINO ViT-B/8 (the
facebookresearch ``dino_vitbase8_pretrain.pth`` layout) with random values are written to a temporary folder
(or ``--weights-dir``) and loaded by path, as a user would. Time and memory do not depend on the values.
Text embeddings are random unit vectors passed to ``predict``; ``ovss.load`` still reads the BPE vocabulary
(``OVSS_BPE_PATH``, the ``shared/`` assets beside the checkout, or the ovss cache).

Every measurement runs in a fresh process (``sys.executable`` running this file's ``_child`` mode) with
``torch.set_num_threads(--threads)``; its peak resident set is read from the OS (``VmHWM`` of
``/proc/self/status``, or ``ru_maxrss``) and includes the loaded models. Latency is the median of
``--repeats`` runs of ``set_image`` + ``predict`` after one warm-up, all inside that one process.
Each mode prints Markdown rows for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from common import vocab_path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/tiny.py: CLIP weights and their file formats

GIB = 2.0**30
COMPARED = ("proxyclip", "proxyclip+gla", "cass", "cass+gla")  # the memory and latency modes' methods
LABELS = ["person", "sky", "grass", "rocket", "flag", "wall", "background"]  # the precision mode's names


# ----------------------------------------------------------------------------------------------- weights
def dino_state_dict(width: int, layers: int, patch: int, grid: int, seed: int) -> dict[str, torch.Tensor]:
    """Random DINO ViT weights in the facebookresearch/dino key layout (ViT-style init: N(0, 0.02), LN = 1)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return 0.02 * torch.randn(*shape, generator=g)

    sd = {
        "cls_token": randn(1, 1, width),
        "pos_embed": randn(1, 1 + grid * grid, width),
        "patch_embed.proj.weight": randn(width, 3, patch, patch),
        "patch_embed.proj.bias": torch.zeros(width),
    }
    for i in range(layers):
        p = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd[p + norm + ".weight"], sd[p + norm + ".bias"] = torch.ones(width), torch.zeros(width)
        sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = randn(3 * width, width), torch.zeros(3 * width)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = randn(width, width), torch.zeros(width)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = randn(4 * width, width), torch.zeros(4 * width)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = randn(width, 4 * width), torch.zeros(width)
    sd["norm.weight"], sd["norm.bias"] = torch.ones(width), torch.zeros(width)
    return sd


def write_weights(folder: Path, quick: bool) -> tuple[Path, Path]:
    """Write random CLIP ViT-B/16 and DINO ViT-B/8 checkpoints (tiny ones with ``quick``) unless present."""
    from tiny import save_openai_jit, save_openai_plain, tiny_clip_state_dict

    tag = "tiny" if quick else "base"
    clip_path, dino_path = folder / f"clip-vitb16-{tag}.pt", folder / f"dino-vitb8-{tag}.pth"
    if not clip_path.exists():
        if quick:  # 12 blocks: GCLIP's block search needs depth; narrow, a 1-block text tower, plain .pt (fast)
            save_openai_plain(tiny_clip_state_dict(seed=0, width=128, layers=12, text_layers=1), clip_path)
        else:
            sd = tiny_clip_state_dict(seed=0, width=768, layers=12, embed_dim=512, text_width=512, text_layers=12)
            save_openai_jit(sd, clip_path)
    if not dino_path.exists():
        width, layers = (128, 2) if quick else (768, 12)
        torch.save(dino_state_dict(width, layers, patch=8, grid=28, seed=1), dino_path)
    return clip_path, dino_path


def write_sam_weights(folder: Path, quick: bool) -> tuple[Path, Path]:
    """Random DINO ViT-B/16 and SAM ViT-B (official key layout) for ``trident`` / ``trident+gla`` unless present.

    ``quick``: a tiny DINO (patch 16) and a tiny SAM (128-pixel input, 3 blocks, the last global).
    """
    from ovss.models.sam import SamConfig, SamEncoderConfig, SamModel

    tag = "tiny" if quick else "base"
    dino_path, sam_path = folder / f"dino-vitb16-{tag}.pth", folder / f"sam-vitb-{tag}.pth"
    if not dino_path.exists():
        width, layers = (128, 2) if quick else (768, 12)
        torch.save(dino_state_dict(width, layers, patch=16, grid=14, seed=2), dino_path)
    if not sam_path.exists():
        if quick:
            enc = SamEncoderConfig(16, 32, 3, 2, 8, 4, (2,), 64, 32)
            cfg = SamConfig(enc, 32, 16, 1, 8, 64, 2, 3, 2, 32)
        else:  # SAM ViT-B: 12 blocks of 768, global blocks 2, 5, 8, 11, 64 x 64 tokens; 256-d decoder
            enc = SamEncoderConfig(16, 768, 12, 12, 64, 14, (2, 5, 8, 11), 3072, 256)
            cfg = SamConfig(enc, 256, 16, 2, 8, 2048, 2, 3, 3, 256)
        torch.manual_seed(3)
        sd = SamModel(cfg).state_dict()
        torch.save({k.replace(".attn.in_proj_", ".attn.qkv."): v for k, v in sd.items()}, sam_path)
    return dino_path, sam_path


# ----------------------------------------------------------------------------------------------- one process
def peak_rss_bytes() -> int:
    """Peak resident set of this process from the OS: VmHWM (Linux), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def child(job: dict) -> dict:
    """One measurement (runs in a fresh process): load, then warm-up + timed set_image / predict."""
    torch.set_num_threads(job["threads"])
    import ovss
    from ovss.methods import get_method

    sam_based = get_method(job["method"]).needs_sam  # trident: DINO ViT-B/16 and SAM
    seg = ovss.load(
        job["method"],
        clip=job["clip"],
        vfm=job["dino16"] if sam_based else job["dino"],
        sam=job["sam"] if sam_based else None,
        dtype=job["dtype"],
        tokenizer=job["tokenizer"],
        download=False,
        **job["geometry"],
    )
    if job["image"] == "astronaut":
        from skimage.data import astronaut

        image = astronaut()  # (512, 512, 3) uint8
    else:
        image = np.random.default_rng(0).integers(0, 256, size=(job["height"], job["width"], 3), dtype=np.uint8)
    dim = seg.clip.visual.head(torch.zeros(1, 1, seg.clip.visual.cfg.width)).shape[-1]  # E
    text = torch.nn.functional.normalize(torch.randn(len(LABELS), dim, generator=torch.Generator().manual_seed(0)))
    times = []
    for _ in range(job["warmup"] + job["repeats"]):
        start = time.perf_counter()
        seg.set_image(image)
        pred = seg.predict(labels=LABELS, text_embeddings=text)
        times.append(time.perf_counter() - start)
    if job.get("labels_out"):
        np.save(job["labels_out"], pred.labels)
    return {
        "method": job["method"],
        "dtype": job["dtype"],
        "image": f"{image.shape[0]}x{image.shape[1]}",
        "windows": len(seg.current_windows()[0]),
        "seconds": statistics.median(times[job["warmup"] :]),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def measure(job: dict) -> dict:
    """Run `child` in a fresh interpreter and return what it reports."""
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "_child", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        raise SystemExit(f"measurement {job['method']} ({job['dtype']}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- modes
def _job(args: argparse.Namespace, method: str, **kw: object) -> dict:
    job = {
        "method": method,
        "clip": str(args.clip_path),
        "dino": str(args.dino_path),
        "dino16": str(getattr(args, "dino16_path", "")),
        "sam": str(getattr(args, "sam_path", "")),
        "dtype": "fp32",
        "threads": args.threads,
        "warmup": 1,
        "repeats": args.repeats,
        "image": "random",
        "tokenizer": vocab_path(),
    }
    job.update(kw)
    return job


def bench_memory(args: argparse.Namespace) -> list[str]:
    h, w = (112, 224) if args.quick else (560, 1120)
    crop, stride = (56, 28) if args.quick else (224, 112)
    geometry = {"short_side": None, "crop": crop, "stride": stride}
    res = {
        m: measure(_job(args, m, height=h, width=w, geometry=geometry, warmup=0, repeats=1))
        for m in COMPARED
    }
    base, gla = res["proxyclip"], res["proxyclip+gla"]
    extra = (gla["peak_rss_bytes"] - base["peak_rss_bytes"]) / GIB
    rows = [
        "| method | image | windows | peak RSS (GiB) | set_image + predict (s) |",
        "|---|---|---|---|---|",
    ]
    for r in res.values():
        rows.append(
            f"| {r['method']} | {r['image']} | {r['windows']} | {r['peak_rss_bytes'] / GIB:.2f} | {r['seconds']:.2f} |"
        )
    rows.append(f"| GLA - ProxyCLIP | | | {extra:+.2f} (target <= +2) | {gla['seconds'] - base['seconds']:+.2f} |")
    return rows


def bench_latency(args: argparse.Namespace) -> list[str]:
    h, w = (112, 168) if args.quick else (336, 448)
    crop, stride = (56, 28) if args.quick else (224, 112)
    geometry = {"short_side": None, "crop": crop, "stride": stride}
    res = {m: measure(_job(args, m, height=h, width=w, geometry=geometry)) for m in COMPARED}
    base = res["proxyclip"]
    rows = [
        f"| method | image | windows | latency (s, median of {args.repeats}) | vs ProxyCLIP |",
        "|---|---|---|---|---|",
    ]
    for r in res.values():
        ratio = r["seconds"] / base["seconds"]
        rows.append(f"| {r['method']} | {r['image']} | {r['windows']} | {r['seconds']:.2f} | {ratio:.2f}x |")
    rows.append("| target | | | | GLA <= 1.20x |")
    return rows


def bench_precision(args: argparse.Namespace) -> list[str]:
    import ovss
    from ovss.methods import get_method

    methods = args.methods or ovss.available_methods()
    if any(get_method(m).needs_sam for m in methods):
        args.dino16_path, args.sam_path = write_sam_weights(args.weights_folder, args.quick)
    geometry = {"short_side": 112, "crop": 56, "stride": 28} if args.quick else {}
    rows = [
        "| method | fp32 (s) | bf16 (s) | bf16 / fp32 | identical labels |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            res = {}
            geo = dict(geometry)
            if get_method(method).needs_sam and args.quick:
                geo.update(crop=64, stride=32)  # trident's windows are multiples of 16 pixels
            for dtype in ("fp32", "bf16"):
                out = str(Path(tmp) / f"{method}-{dtype}.npy")
                res[dtype] = measure(_job(args, method, dtype=dtype, image="astronaut", geometry=geo, labels_out=out))
                res[dtype]["labels"] = np.load(out)
            same = float((res["fp32"]["labels"] == res["bf16"]["labels"]).mean())
            t32, t16 = res["fp32"]["seconds"], res["bf16"]["seconds"]
            rows.append(f"| {method} | {t32:.2f} | {t16:.2f} | {t16 / t32:.2f}x | {100 * same:.2f} % |")
    return rows


@contextmanager
def weights(args: argparse.Namespace) -> Iterator[None]:
    if args.weights_dir:
        folder = Path(args.weights_dir)
        folder.mkdir(parents=True, exist_ok=True)
        args.clip_path, args.dino_path = write_weights(folder, args.quick)
        args.weights_folder = folder  # DINO ViT-B/16 and SAM are written there when a SAM-based method runs
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.clip_path, args.dino_path = write_weights(Path(tmp), args.quick)
        args.weights_folder = Path(tmp)
        yield


MODES = {"memory": bench_memory, "latency": bench_latency, "precision": bench_precision}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=[*MODES, "all"])
    parser.add_argument("--quick", action="store_true", help="tiny models and a small image (smoke test)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every measurement (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (median)")
    parser.add_argument("--methods", nargs="*", help="precision: these methods (default: every registered one)")
    parser.add_argument("--weights-dir", help="write / reuse the random checkpoints here instead of a temp folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with weights(args):
        for mode in MODES if args.mode == "all" else [args.mode]:
            print(f"\n### {mode}{' (quick)' if args.quick else ''}, {args.threads} threads\n", flush=True)
            print("\n".join(MODES[mode](args)), flush=True)


if __name__ == "__main__":
    main()
