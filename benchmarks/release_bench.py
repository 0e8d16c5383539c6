"""NACLIP side by side with its release (issue 23, item 1): the same weights, image and settings, measured alike.

    git clone https://github.com/sinahmr/NACLIP ~/NACLIP        # the release (written against commit defb7c9)
    python benchmarks/release_bench.py --naclip-repo ~/NACLIP   # random full-size ViT-B/16, 3 image sizes
    python benchmarks/release_bench.py --naclip-repo ~/NACLIP --clip ViT-B-16.pt --pamr 10   # real weights, PAMR

Each measurement is a fresh process with ``--threads`` torch threads, the two sides alternating one process at a
time for ``--rounds`` rounds (the side that starts alternates too); the table gives the medians over the rounds.

* **ovss**: ``ovss bench``'s own image job (:func:`ovss.cli.bench_harness.measure`): ``ovss.load("naclip")``,
  then ``set_image`` + ``predict`` with 20 random unit text embeddings, one warm-up, the median of ``--repeats``
  timed runs, each checked for other processes' CPU and redone when disturbed; peak RSS from the OS.
* **release**: the checkout's own ``clip/model.py``, ``pamr.py`` and ``NACLIP`` class (``naclip.py``, its
  ``predict`` -> ``forward_slide`` -> ``postprocess_result``), imported with stand-ins for the mmseg / mmengine
  names it imports (the mmseg base class and registry are not used by ``predict``). The model is built as its
  ``clip.load(path, device="cpu", jit=False)`` builds it (``build_model``, then ``float()``) and the attributes
  its ``__init__`` sets are set to the release defaults (reduced architecture, NACLIP attention, std 5,
  ``pamr_steps`` from ``--pamr``, logit scale 40, stride 112, crop 224) with the same 20 text embeddings
  (its ``__init__`` would encode the names from files). The timed run is what its mmseg test pipeline does to an
  image, then ``predict``: rescale so the short side is 336 (long side at most 2048; ``mmcv.imrescale``,
  bilinear, on the BGR image), BGR -> RGB, normalise with its mean/std, ``predict``. Timed with the same
  quiet-checked runs, peak RSS likewise.

The two label maps are compared (they are equal when ovss follows the release, ``ovss.load("naclip")``'s
defaults being the release's with PAMR off; ``--pamr 10`` is the release's own default, and ovss's preset
``naclip-pamr``). Weights: the release rounds the image tower's product weights to fp16 when it builds the model
(``convert_weights``, then ``float()`` on the CPU), which changes nothing for OpenAI's files (stored in fp16); the
random stand-in is therefore written in fp16 too. An fp32 ``--clip`` file makes the two sides' weights differ.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

from common import child_env

NAMES = 20  # text embeddings, as ovss bench's image job uses


def _module(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _release_naclip(repo: Path, clip_path: str, pamr_steps: int) -> Any:
    """The release's NACLIP object on the CPU in fp32, built as its ``__init__`` would (see the module doc)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    stand_ins: dict[str, dict[str, Any]] = {  # the names naclip.py imports; predict() uses none of them but PixelData
        "mmengine": {}, "mmengine.structures": {"PixelData": lambda **kw: types.SimpleNamespace(**kw)},
        "mmseg": {}, "mmseg.models": {}, "mmseg.models.data_preprocessor": {"SegDataPreProcessor": object},
        "mmseg.models.segmentors": {"BaseSegmentor": nn.Module},
        "mmseg.registry": {"MODELS": types.SimpleNamespace(register_module=lambda: lambda cls: cls)},
        "clip": {}, "prompts": {}, "prompts.imagenet_template": {"openai_imagenet_template": []},
    }  # fmt: skip
    for name, attributes in stand_ins.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module
    model = _module("naclip_release_model", repo / "clip" / "model.py")
    sys.modules["pamr"] = _module("pamr", repo / "pamr.py")
    release = _module("naclip_release", repo / "naclip.py")
    try:  # clip.load(path, jit=False): the state dict of a TorchScript archive, else a plain state dict
        state_dict = torch.jit.load(clip_path, map_location="cpu").eval().state_dict()
    except RuntimeError:
        state_dict = torch.load(clip_path, map_location="cpu")
    seg = release.NACLIP.__new__(release.NACLIP)
    nn.Module.__init__(seg)
    seg.net = model.build_model(state_dict).float()  # clip.load on "cpu"
    E = seg.net.visual.output_dim
    seg.query_features = F.normalize(torch.randn(NAMES, E, generator=torch.Generator().manual_seed(0)), dim=-1)
    seg.query_idx = torch.arange(NAMES)
    seg.num_queries = NAMES
    seg.dtype = seg.query_features.dtype
    seg.net.visual.set_params("reduced", "naclip", 5.0)
    seg.logit_scale, seg.prob_thd, seg.slide_stride, seg.slide_crop, seg.align_corners = 40, 0.0, 112, 224, False
    seg.pamr = release.PAMR(pamr_steps, dilations=(8, 16)) if pamr_steps > 0 else None
    return seg


def release_child(job: dict[str, Any]) -> dict[str, Any]:
    """One release measurement in this (fresh) process, timed as ``ovss bench`` times ovss."""
    import os

    import cv2
    import numpy as np
    import torch

    from ovss.cli.bench_harness import bench_image, peak_rss_bytes
    from ovss.cli.bench_machine import QuietPolicy, proc_load_source, timed_runs

    torch.set_num_threads(job["threads"])
    seg = _release_naclip(Path(job["repo"]), job["clip"], job["pamr"])
    rgb = bench_image(job["image"])  # (H0, W0, 3) uint8, the pixels ovss bench uses
    mean = torch.tensor([122.771, 116.746, 104.094]).view(3, 1, 1)
    std = torch.tensor([68.501, 66.632, 70.323]).view(3, 1, 1)
    last: list[Any] = []

    def one_run() -> None:
        bgr = rgb[..., ::-1]  # LoadImageFromFile
        h, w = bgr.shape[:2]
        scale = min(2048 / max(h, w), 336 / min(h, w))  # Resize(scale=(2048, 336), keep_ratio=True)
        bgr = cv2.resize(bgr, (int(w * scale + 0.5), int(h * scale + 0.5)), interpolation=cv2.INTER_LINEAR)
        x = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))  # PackSegInputs
        x = (x[[2, 1, 0]].float() - mean) / std  # SegDataPreProcessor: bgr_to_rgb, normalise
        sample = types.SimpleNamespace(metainfo={"ori_shape": (h, w)})
        sample.set_data = lambda data: sample.__dict__.update(data)
        with torch.no_grad():
            seg.predict(x[None], [sample])
        last[:] = [sample.pred_sem_seg.data[0]]

    one_run()  # warm-up
    load = proc_load_source([os.getpid(), os.getppid()])
    timing = timed_runs(one_run, job["repeats"], QuietPolicy(), load)
    np.save(job["labels_out"], last[0].numpy())
    return {"seconds": statistics.median(timing["seconds"]), "redone": timing["redone"],
            "disturbed_runs": timing["disturbed_runs"], "peak_rss_bytes": peak_rss_bytes()}  # fmt: skip


def measure_side(side: str, args: argparse.Namespace, size: str, labels_out: Path, env: dict[str, str]) -> dict:
    if side == "ovss":
        from ovss.cli.bench_harness import measure

        job = {"kind": "image", "method": "naclip", "dtype": "fp32", "image": size, "repeats": args.repeats,
               "threads": args.threads, "clip": args.clip, "labels_out": str(labels_out), "count_flops": False,
               "settings": {"pamr_steps": args.pamr} if args.pamr else {}}  # fmt: skip
        return measure(job, env)
    job = {"repo": str(args.naclip_repo), "clip": args.clip, "pamr": args.pamr, "image": size,
           "repeats": args.repeats, "threads": args.threads, "labels_out": str(labels_out)}  # fmt: skip
    done = subprocess.run([sys.executable, __file__, "--release-child", json.dumps(job)], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode:
        sys.exit(f"the release run failed ({size}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--naclip-repo", type=Path, help="a checkout of github.com/sinahmr/NACLIP")
    parser.add_argument("--clip", help="OpenAI ViT-B/16 weights (.pt); default: random full-size ones in fp16")
    parser.add_argument("--sizes", default="512x512,375x500,1024x2048", help="random test images HxW")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per process (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pamr", type=int, default=0, help="PAMR steps on both sides (release default: 10)")
    parser.add_argument("--release-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.release_child:
        print(json.dumps(release_child(json.loads(args.release_child))))
        return
    if args.naclip_repo is None or not (args.naclip_repo / "naclip.py").is_file():
        sys.exit("give --naclip-repo: a checkout of https://github.com/sinahmr/NACLIP (its naclip.py, clip/, pamr.py)")
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        if args.clip is None:  # random full-size weights held in fp16, as OpenAI's files hold them: the
            import torch  # release rounds every product weight to fp16 when it builds the model (convert_weights)

            from ovss.cli.bench_weights import write_random_weights

            state = torch.load(write_random_weights(Path(tmp))["ViT-B/16"], map_location="cpu")
            args.clip = str(Path(tmp) / "ViT-B-16-fp16.pt")
            torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, args.clip)
        env = child_env(Path(tmp) / "cache", args.threads)
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in range(args.rounds):
            for size in args.sizes.split(","):
                for side in ("release", "ovss") if r % 2 == 0 else ("ovss", "release"):
                    result = measure_side(side, args, size, Path(tmp) / f"{side}-{size}.npy", env)
                    results.setdefault((size, side), []).append(result)
                    print(f"round {r} {size} {side}: {result['seconds']:.3f} s, redone {result['redone']}",
                          file=sys.stderr, flush=True)  # fmt: skip
        print(f"NACLIP fp32, {args.threads} threads, PAMR {args.pamr}, median over {args.rounds} rounds")
        print("| image | release s | ovss s | ovss / release | release peak GiB | ovss peak GiB | labels equal |")
        print("|---|---|---|---|---|---|---|")
        for size in args.sizes.split(","):
            rel, own = results[(size, "release")], results[(size, "ovss")]
            t_rel = statistics.median(x["seconds"] for x in rel)
            t_own = statistics.median(x["seconds"] for x in own)
            equal = (np.load(Path(tmp) / f"release-{size}.npy") == np.load(Path(tmp) / f"ovss-{size}.npy")).mean()
            peaks = [max(x["peak_rss_bytes"] for x in side) / 2**30 for side in (rel, own)]
            print(f"| {size} | {t_rel:.3f} | {t_own:.3f} | {t_own / t_rel:.2f}× | {peaks[0]:.2f} | {peaks[1]:.2f} "
                  f"| {100 * equal:.2f} % |")  # fmt: skip


if __name__ == "__main__":
    main()
