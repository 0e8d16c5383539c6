"""Peak memory of one ``predict`` on a large photo with many classes (issue 9, "Memory").

    python benchmarks/memory_bench.py [--size 2000] [--classes 171] [--method clearclip] [--logits none]

Builds a random full-size CLIP ViT-B/16 (OpenAI layout, 12 + 12 blocks, 768 / 512 wide), saves it as a
plain OpenAI ``.pt`` file in a temporary folder, writes a random ``size x size`` PNG, and measures in a
fresh Python process (2 threads): ``ovss.load(method, clip=FILE).predict(PNG, labels, text_embeddings=T)``.
The text embeddings are random unit rows, so the 171 x 80 prompt encodings (minutes on a CPU, and not the
pixel pipeline this measures) are skipped; the text tower is still loaded. Peak RSS is read from the OS
(``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs`` after loading), so the row
reports the load peak, the predict peak and the whole-process peak separately, as a Markdown table row.
Target: 2000 x 2000, 171 classes, ClearCLIP, whole-process peak under 1.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import vocab_path

REPO = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, sys, time
import numpy as np
import torch

torch.set_num_threads(2)


def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


import ovss

clip_path, image_path, classes, method, logits_dtype, vocab = sys.argv[1:7]
classes = int(classes)
t0 = time.perf_counter()
seg = ovss.load(method, clip=clip_path, tokenizer=vocab or None, download=False)
load_s = time.perf_counter() - t0
load_peak = hwm_mb()
gen = torch.Generator().manual_seed(0)
text = torch.nn.functional.normalize(torch.randn(classes, seg.clip.visual.cfg.output_dim, generator=gen), dim=-1)
labels = [f"class {i}" for i in range(classes)]
reset_hwm()
t0 = time.perf_counter()
result = seg.predict(image_path, labels, text_embeddings=text)
if logits_dtype != "none":
    result.maps.logits({"fp16": torch.float16, "fp32": torch.float32}[logits_dtype])
predict_s = time.perf_counter() - t0
predict_peak = hwm_mb()
print(json.dumps({"load_peak_mb": load_peak, "predict_peak_mb": predict_peak, "load_s": load_s,
                  "predict_s": predict_s, "labels_shape": list(result.labels.shape),
                  "windows": len(seg.current_windows()[0])}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2000, help="image side in pixels (square image)")
    parser.add_argument("--classes", type=int, default=171, help="number of classes (one name each)")
    parser.add_argument("--method", default="clearclip")
    parser.add_argument(
        "--logits",
        default="none",
        choices=["none", "fp16", "fp32"],
        help="also build the full-resolution logits in this dtype (as --save-logits does)",
    )
    parser.add_argument("--width", type=int, default=768, help="vision width (768 = ViT-B; smaller for a dry run)")
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests"))
    from tiny import save_openai_plain, tiny_clip_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sd = tiny_clip_state_dict(
            seed=0, width=args.width, layers=12, patch=16, grid=14, embed_dim=512, text_width=512, text_layers=12
        )
        clip_path = save_openai_plain(sd, folder / "ViT-B-16-random.pt")
        del sd
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, size=(args.size, args.size, 3), dtype=np.uint8)
        image_path = folder / "photo.png"
        Image.fromarray(image).save(image_path)
        env_cmd = [
            sys.executable,
            "-c",
            MEASURE,
            str(clip_path),
            str(image_path),
            str(args.classes),
            args.method,
            args.logits,
            vocab_path() or "",
        ]
        env = {
            "PYTHONPATH": str(REPO / "src"),
            "OMP_NUM_THREADS": "2",
            "MKL_NUM_THREADS": "2",
            "PATH": "/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/tmp"),
        }
        done = subprocess.run(env_cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            sys.exit(f"measurement failed:\n{done.stderr}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
    peak = max(r["load_peak_mb"], r["predict_peak_mb"])
    print(
        "| method | image | classes | windows | logits | load peak MB | predict peak MB | process peak MB | predict s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.method} | {args.size}x{args.size} | {args.classes} | {r['windows']} | {args.logits} "
        f"| {r['load_peak_mb']:.0f} | {r['predict_peak_mb']:.0f} | {peak:.0f} | {r['predict_s']:.1f} |"
    )


if __name__ == "__main__":
    main()
