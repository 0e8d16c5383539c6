"""Attention kernels at the real shapes, A/B interleaved in one process (docs/decisions.md, Attention kernels).

SAM ViT-B encoder attention (global 64 x 64 grid, batch 1; 25 windows of 14 x 14) with the slab size and the
folding of the position terms switched, and the ViTs' attention (DINO ViT-B/8 785 tokens, CLIP ViT-B/16 197
tokens, 12 heads of 64): fused ``scaled_dot_product_attention`` against explicit products with a softmax,
with each route's max abs error against float64 attention of the same (rounded) inputs.

    python tools/attention_bench.py [--repeats 5] [--threads 2]
    python tools/attention_bench.py --quick    # small grids and token counts, one repeat: a smoke test
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from ovss.models.sam.image_encoder import SamAttention
from ovss.tuning import Tuning


def best_ms(fns: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Minimum wall time (ms) of each function over ``repeats`` rounds, the functions interleaved per round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(t) for name, t in times.items()}


def sam_routes(size: int, batch: int, reduced: bool, repeats: int) -> None:
    """SAM attention: the default slabs + folding against one head's whole map with the terms added."""
    attn = SamAttention(768, 12, size).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(batch, size, size, 768)

    def run(chunk: int, fold: bool) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            return attn(x, attention_chunk=chunk, fold_positions=fold)

        return fn

    default = Tuning()
    fns = {
        "slabs+fold (default)": run(default.attention_chunk, default.fold_positions),
        "whole map, added": run(0, False),
    }
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=reduced):
        ms = best_ms(fns, repeats)
    for name, t in ms.items():
        print(f"sam {size}x{size} x{batch} {'bf16' if reduced else 'fp32'} {name:22s} {t:8.1f} ms")


def vit_routes(tokens: int, batch: int, dtype: torch.dtype, repeats: int) -> None:
    """ViT attention: SDPA against explicit products + softmax (whole map and 256-row slabs)."""
    q, k, v = (torch.randn(batch, 12, tokens, 64, dtype=torch.float64) * s for s in (1.5, 1.5, 1.0))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())  # (B, 12, n, 64)
    scale = 64**-0.5

    def explicit() -> torch.Tensor:
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v  # (B, 12, n, 64)

    def slabs() -> torch.Tensor:
        out = torch.empty_like(q)
        for s in range(0, tokens, 256):
            out[:, :, s : s + 256] = ((q[:, :, s : s + 256] * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return out

    fns: dict[str, Callable[[], torch.Tensor]] = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "explicit": explicit,
        "explicit, 256-row slabs": slabs,
    }
    with torch.no_grad():
        errors = {name: (fn().double() - exact).abs().max().item() for name, fn in fns.items()}
        ms = best_ms(fns, repeats)
    label = "bf16" if dtype == torch.bfloat16 else "fp32"
    for name, t in ms.items():
        print(f"vit n={tokens} x{batch} {label} {name:24s} {t:8.2f} ms  max err vs fp64 {errors[name]:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat (a smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats = 1 if args.quick else args.repeats
    sam_shapes = ((8, 1), (4, 2)) if args.quick else ((64, 1), (14, 25))  # (grid side, batch)
    vit_shapes = ((65, 1), (17, 2)) if args.quick else ((785, 1), (785, 4), (197, 4))  # (tokens, batch)
    for reduced in (False, True):
        for size, batch in sam_shapes:
            sam_routes(size, batch, reduced, repeats)
    for dtype in (torch.float32, torch.bfloat16):
        for tokens, batch in vit_shapes:
            vit_routes(tokens, batch, dtype, repeats)


if __name__ == "__main__":
    main()
