"""GLA cost benchmarks (issue: GLA memory and latency targets), on real-size randomly initialised models.

    python benchmarks/gla_bench.py memory   # peak extra memory of the GLA step, 560x1120 image, 36 windows
    python benchmarks/gla_bench.py latency  # GLA-ProxyCLIP vs ProxyCLIP end to end, 336x448 image, 6 windows

Random weights have the real shapes (CLIP ViT-B/16, DINO ViT-B/8), so time and memory are those of the real
models. Memory is the growth of the process's peak resident set (``ru_maxrss``) across the GLA step, measured
in a fresh subprocess after its inputs exist, so it counts every allocation of the step (fp32, CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from ovss.gla.config import GLAConfig
from ovss.gla.cross_window import cross_window_attention
from ovss.models.clip import CLIP
from ovss.models.vit import VisionTransformer, ViTConfig


def random_vit(cfg: ViTConfig, seed: int) -> VisionTransformer:
    """A ViT with the given architecture and ViT-style random weights (N(0, 0.02), LayerNorm = 1)."""
    torch.manual_seed(seed)
    model = VisionTransformer(cfg)
    for name, p in model.named_parameters():
        if "ln" in name and name.endswith("weight"):
            torch.nn.init.ones_(p)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        else:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval().requires_grad_(False)


def clip_b16() -> CLIP:
    return CLIP(random_vit(ViTConfig(16, 768, 12, 12, 14, 512), 0), None, "random-vit-b16")


def dino_b8() -> VisionTransformer:
    cfg = ViTConfig(8, 768, 12, 12, 28, None, act="gelu", eps=1e-6, pre_norm=False, patch_bias=True)
    return random_vit(cfg, 1)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def memory_worker(windows: int, tokens: int, budget_mb: float) -> dict:
    """Run the GLA step once on random inputs of the given size; report the growth of peak RSS."""
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    M, D, H, d = windows * tokens, 768, 12, 64
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(M, D, generator=g)  # (M, D) stand-in DINO features
    values = torch.randn(H, M, d, generator=g)  # (H, M, d)
    cfg = GLAConfig(memory_budget_mb=budget_mb)
    warm = cross_window_attention(keys[: 2 * tokens], values[:, : 2 * tokens], None, 2, cfg)  # load kernels
    del warm
    before = _peak_mib()
    start = time.perf_counter()
    out = cross_window_attention(keys, values, None, windows, cfg)
    seconds = time.perf_counter() - start
    extra = _peak_mib() - before
    inputs_mib = (keys.numel() + values.numel() + out.numel()) * 4 / 2**20
    return {
        "M": M,
        "windows": windows,
        "budget_mb": budget_mb,
        "peak_extra_mib": round(extra, 1),
        "inputs_and_output_mib": round(inputs_mib, 1),
        "seconds": round(seconds, 1),
    }


def bench_memory(args: argparse.Namespace) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, 'benchmarks'); from gla_bench import memory_worker; "
        f"print(json.dumps(memory_worker({args.windows}, {args.tokens}, {args.budget_mb})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_latency(args: argparse.Namespace) -> dict:
    import ovss

    clip, dino = clip_b16(), dino_b8()
    image = np.random.default_rng(0).integers(0, 256, size=(args.height, args.width, 3), dtype=np.uint8)
    text = torch.nn.functional.normalize(torch.randn(21, 512), dim=-1)
    labels = [f"class{i}" for i in range(21)]
    times: dict[str, list[float]] = {}
    for method in ("proxyclip", "proxyclip+gla"):
        seg = ovss.load(method, clip=clip, vfm=dino, short_side=None, crop=224, stride=112, tokenizer="unused")
        seg.predict(image, labels, text_embeddings=text)  # warm-up
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            seg.predict(image, labels, text_embeddings=text)
            runs.append(time.perf_counter() - start)
        times[method] = runs
        windows = len(seg.current_windows()[0])
    base, gla = statistics.median(times["proxyclip"]), statistics.median(times["proxyclip+gla"])
    return {
        "image": f"{args.height}x{args.width}",
        "windows": windows,
        "threads": torch.get_num_threads(),
        "proxyclip_s": round(base, 2),
        "proxyclip+gla_s": round(gla, 2),
        "ratio": round(gla / base, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--windows", type=int, default=36)
    m.add_argument("--tokens", type=int, default=784, help="tokens per window (DINO B/8 at 224 px: 28 x 28)")
    m.add_argument("--budget-mb", type=float, default=GLAConfig().memory_budget_mb)
    lat = sub.add_parser("latency")
    lat.add_argument("--height", type=int, default=336)
    lat.add_argument("--width", type=int, default=448)
    lat.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = bench_memory(args) if args.what == "memory" else bench_latency(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
