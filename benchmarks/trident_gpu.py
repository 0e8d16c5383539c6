"""Trident cost on a GPU, end to end through ``ovss.load(...).set_image(...)`` / ``predict``.

    python benchmarks/trident_gpu.py             # CUDA: VOC-size and Cityscapes-size images, fp32 and fp16
    DEV=cpu python benchmarks/trident_gpu.py     # one VOC-size fp32 run on the CPU
    python benchmarks/trident_gpu.py --quick     # tiny models, a small image, one fp32 run (CPU unless DEV)

Weights are random and full size (tiny with ``--quick``): CLIP ViT-B/16 (vision tower only, so no vocabulary is
needed), DINO ViT-B/16 and SAM ViT-B; time and memory do not depend on the values. Refinement is forced to prompt
every region (``coarse_thresh=0``) and keep every mask (``iou_thresh=-1e9``): its worst case. Prints one line per run
(set_image and predict seconds of the last of 3 runs, peak CUDA memory, SAM passes, regions) and the share of
identical labels between fp16 and fp32; writes ``$OUT/trident_gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ovss.cli.bench_weights import random_dino_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/tiny.py: CLIP weights

EMBED = {False: 512, True: 64}  # joint embedding size E of the full-size / --quick CLIP


def models(quick: bool = False) -> tuple[object, object, object]:
    """Random CLIP ViT-B/16 (vision tower), DINO ViT-B/16 and SAM ViT-B; narrow ones with ``quick``."""
    from ovss.models.clip import build_clip
    from ovss.models.dino import build_vfm, convert_vfm_state_dict
    from ovss.models.sam import SamConfig, SamEncoderConfig, SamModel
    from tiny import tiny_clip_state_dict

    width, layers = (128, 3) if quick else (768, 12)
    sd = tiny_clip_state_dict(seed=0, width=width, layers=layers, embed_dim=EMBED[quick], text_width=64, text_layers=1)
    clip = build_clip({k: v for k, v in sd.items() if k.startswith("visual.")})  # vision-only: no tokenizer
    dino = build_vfm(*convert_vfm_state_dict(random_dino_state_dict(width, layers, patch=16, grid=14, seed=2)))
    if quick:  # 128-pixel input, 3 blocks, the last one global (as ovss.cli.bench_harness's quick SAM)
        config = SamConfig(SamEncoderConfig(16, 32, 3, 2, 8, 4, (2,), 64, 32), 32, 16, 1, 8, 64, 2, 3, 2, 32)
    else:  # SAM ViT-B
        config = SamConfig(SamEncoderConfig(16, 768, 12, 12, 64, 14, (2, 5, 8, 11), 3072, 256), 256, 16, 2, 8, 2048,
                           2, 3, 3, 256)  # fmt: skip
    torch.manual_seed(3)
    sam = SamModel(config).eval()
    with torch.no_grad():
        for p in sam.parameters():
            if p.dim() >= 2 and not p.abs().sum():  # zero-initialised projections: give attention some shape
                p.normal_(0, 0.02)
    return clip, dino, sam


def main() -> None:
    import ovss

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, a small image, one fp32 run (smoke test)")
    args = parser.parse_args()
    dev = os.environ.get("DEV", "cpu" if args.quick else "cuda")
    cuda, quick = dev == "cuda", dev == "cpu" or args.quick
    clip, dino, sam = models(args.quick)
    text = torch.nn.functional.normalize(torch.randn(21, EMBED[args.quick], generator=torch.Generator().manual_seed(0)))
    labels = [f"c{i}" for i in range(21)]
    rng = np.random.default_rng(0)
    images = {
        "voc": rng.integers(0, 256, (94, 125, 3) if args.quick else (375, 500, 3), dtype=np.uint8),
        "city": rng.integers(0, 256, (1024, 2048, 3), dtype=np.uint8),
    }
    city = {"short_side": 688, "split_halves": True, "cos_fac": 3.0, "refine_neg_cos": False}
    cases = [("trident", "voc", {}), ("trident+gla", "voc", {}), ("trident", "city", city)]
    res: dict[str, object] = {"torch": torch.__version__, "device": dev}
    for method, name, extra in cases[:1] if quick else cases:
        preds = {}
        for dtype in ("fp32",) if quick else ("fp32", "fp16"):
            kw = {"short_side": 448, "crop": 336, "stride": 224, "coarse_thresh": 0.0, "iou_thresh": -1e9, **extra}
            if args.quick:
                kw.update(short_side=112, crop=64, stride=32)
            seg = ovss.load(method, clip=clip, vfm=dino, sam=sam, device=dev, dtype=dtype, **kw)
            times = []
            for _ in range(1 if quick else 3):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                seg.set_image(images[name])
                encoded = time.perf_counter()
                pred = seg.predict(labels=labels, text_embeddings=text)
                if cuda:
                    torch.cuda.synchronize()
                times.append((encoded - start, time.perf_counter() - encoded))
            info = pred.config["method_info"]
            row = {
                "set_image_s": times[-1][0],
                "predict_s": times[-1][1],
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "sam": info.get("trident_sam"),
                "refine": info.get("trident_refine"),
                "windows": len(seg.current_windows()[0]),
            }
            preds[dtype] = pred.labels.cpu()
            res[f"{method}/{name}/{dtype}"] = row
            print(method, name, dtype, row, flush=True)
        if not quick:
            res[f"{method}/{name}/agree"] = float((preds["fp32"] == preds["fp16"]).float().mean())
            print(method, name, "fp16 = fp32 labels:", res[f"{method}/{name}/agree"], flush=True)
    (Path(os.environ.get("OUT", ".")) / "trident_gpu.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
