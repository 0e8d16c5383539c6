"""Device check: trident / trident+gla with full-size random CLIP ViT-B/16, DINO ViT-B/16 and SAM ViT-B on CUDA."""
import json, os, sys, time
from pathlib import Path
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "benchmarks")]
import numpy as np
import torch
import ovss
from gla_bench import dino_state_dict
from ovss.models.clip import build_clip
from ovss.models.dino import build_vfm, convert_vfm_state_dict
from ovss.models.sam import SamConfig, SamEncoderConfig, SamModel
from tiny import tiny_clip_state_dict

out = Path(os.environ.get("OUT", "/tmp"))
res = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
dev = os.environ.get("DEV", "cuda")
quick = dev == "cpu"
cuda = dev == "cuda"
sd = tiny_clip_state_dict(seed=0, width=768, layers=12, embed_dim=512, text_width=512, text_layers=1)
clip = build_clip({k: v for k, v in sd.items() if k.startswith("visual.")})  # vision-only: no tokenizer needed
dino = build_vfm(*convert_vfm_state_dict(dino_state_dict(768, 12, patch=16, grid=14, seed=2)))
enc = SamEncoderConfig(16, 768, 12, 12, 64, 14, (2, 5, 8, 11), 3072, 256)
torch.manual_seed(3)
sam = SamModel(SamConfig(enc, 256, 16, 2, 8, 2048, 2, 3, 3, 256)).eval()
with torch.no_grad():
    for n, p in sam.named_parameters():
        if p.dim() >= 2 and not p.abs().sum():
            p.normal_(0, 0.02)
text = torch.nn.functional.normalize(torch.randn(21, 512, generator=torch.Generator().manual_seed(0)))
labels = [f"c{i}" for i in range(21)]
rng = np.random.default_rng(0)
images = {"voc": rng.integers(0, 256, (375, 500, 3), dtype=np.uint8),
          "city": rng.integers(0, 256, (1024, 2048, 3), dtype=np.uint8)}
cases = [("trident", "voc", {}), ("trident+gla", "voc", {}),
         ("trident", "city", {"short_side": 688, "split_halves": True, "cos_fac": 3.0, "refine_neg_cos": False})]
for method, name, extra in cases[:1] if quick else cases:
    preds = {}
    for dtype in ("fp32",) if quick else ("fp32", "fp16"):
        kw = {"short_side": 448, "crop": 336, "stride": 224, "coarse_thresh": 0.0, "iou_thresh": -1e9, **extra}
        seg = ovss.load(method, clip=clip, vfm=dino, sam=sam, device=dev, dtype=dtype, **kw)
        times = []
        for rep in range(1 if quick else 3):
            if cuda:
                torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            seg.set_image(images[name])
            t1 = time.perf_counter()
            p = seg.predict(labels=labels, text_embeddings=text)
            if cuda:
                torch.cuda.synchronize()
            times.append((t1 - t, time.perf_counter() - t1))
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        preds[dtype] = p.labels.cpu()
        info = p.config["method_info"]
        res[f"{method}/{name}/{dtype}"] = {"set_image_s": times[-1][0], "predict_s": times[-1][1], "peak_gib": peak,
            "sam": info.get("trident_sam"), "refine": info.get("trident_refine"), "windows": len(seg._state.windows)}
        print(method, name, dtype, res[f"{method}/{name}/{dtype}"], flush=True)
    if quick:
        continue
    res[f"{method}/{name}/agree"] = float((preds["fp32"] == preds["fp16"]).float().mean())
    print(method, name, "agree", res[f"{method}/{name}/agree"], flush=True)
(out / "trident_gpu.json").write_text(json.dumps(res, indent=1))
