"""How far reduced precision (bf16 / fp16 autocast) moves each stage of a method, and whether labels can flip.

Real weights (the evidence that counts):

    python tools/precision_agreement.py IMAGES... --labels-file classes.txt \
        --method proxyclip --method proxyclip+gla [--clip ViT-B/16] [--vfm dino-vitb8] [--dtype bf16]

A "tamed" random ViT-B/16 + DINO-B/8 (``precision_tamed.py``: attention entropies, DINO similarity structure
and logit margins brought to trained-model levels; the text embeddings are built from the first image):

    python tools/precision_agreement.py --tamed IMAGES... --method clearclip --method proxyclip+gla \
        --short-side 336 --crop 224 --stride 112 [--device cuda] [--dtype fp16] [--quick: narrow towers, a smoke test]

Per method and image it reports the error budget, fp32 vs reduced on the same windows:

* ``cos_*``: cosine of fp32 and reduced features per token (median and 0.1 % quantile; ``1 - cos`` is shown)
  for CLIP's last-block input (``clip_x11``), the VFM features (``vfm``) and the dense features (``dense``);
* ``drift``: per pixel the largest change of a class's scaled logit (``logit_scale * cosine``), median / p99 /
  max; ``margin``: the fp32 top-2 margin of the scaled logits (p1 / p10 / median);
* ``at_risk_pct``: pixels whose fp32 margin is below the p99 drift (a flip is possible only below 2 x the
  pixel's own drift: ``flippable_pct``), and ``agree_pct`` the labels that actually agree;
* for ``X+gla`` the hard cut-offs of GLA re-derived in float64 from both feature sets: entries whose proxy-set
  membership (``s > rho``, per step) or ``A >= theta`` mask differ, their share of the selected entries, the
  rows touched and the fp32 attention mass on flipped mask entries; ``floor`` is the same count between fp32 and
  float64 arithmetic on the *same* fp32 features (the thresholds' own sensitivity).

Statistics, proxies, normalisation and softmax stay fp32 in ovss whatever the dtype; only the backbones'
matrix products are reduced. Extra ``ovss.load`` keywords: ``--opt key=value``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/common.py

from common import vocab_path

import ovss
from ovss.cli.options import (
    add_device_flags,
    add_methods_flag,
    add_setting_flags,
    add_weight_flags,
    methods_of,
    options_of,
    pipeline_of,
    weights_of,
)
from ovss.cli.segment import collect_inputs
from ovss.labels import flatten_labels, normalize_labels, read_labels_file
from ovss.methods.common import Backbones, WindowBatch, tokens_before_last_block
from ovss.methods.composed.bases import ADAPTERS
from ovss.methods.composed.method import initial_queries
from ovss.methods.proxyclip import vfm_features
from ovss.pipeline.windows import pad_windows
from ovss.precision import backbone_precision, full_precision
from ovss.predictor import Segmenter

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _q(t: torch.Tensor, q: float) -> float:
    return float(torch.quantile(t.double().flatten()[:: max(1, t.numel() // 1_000_000)], q))


def _cos_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """1 - cos of two (..., D) feature sets per token: median and 0.1 % worst."""
    gap = 1 - F.cosine_similarity(a.double(), b.double(), dim=-1)  # (...,)
    return {"median": float(f"{_q(gap, 0.5):.3g}"), "p99.9": float(f"{_q(gap, 0.999):.3g}")}


def _windows(seg: Segmenter) -> WindowBatch:
    """The padded windows of the segmenter's current image."""
    st = seg._current()
    crops = torch.stack([st.pixels[:, w.y1 : w.y2, w.x1 : w.x2] for w in st.windows])  # (L, 3, h, w)
    return WindowBatch(pad_windows(crops, st.padding), st.windows, st.padding, tuple(st.pixels.shape[-2:]))


def _both(seg: Segmenter, dtype: torch.dtype, fn: Any) -> tuple[Any, Any]:
    with torch.inference_mode():
        full = fn()
        with backbone_precision(seg.device, dtype):
            reduced = fn()
    return full, reduced


def class_logits(pred: Any, classes: list, scale: float) -> torch.Tensor:
    """(C, H, W) scaled logits per class: max over each class's names."""
    _, name_to_class = flatten_labels(normalize_labels(classes))
    logits = pred.logits * scale  # (Q, H, W)
    out = torch.full((len(classes), *logits.shape[1:]), -math.inf, device=logits.device)
    for q, c in enumerate(name_to_class):
        out[c] = torch.maximum(out[c], logits[q])
    return out


def cutoffs(
    keys: torch.Tensor, queries: torch.Tensor, L: int, cfg: Any, prior: torch.Tensor | None, dtype: torch.dtype
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """GLA's hard decisions for all M rows (spec §4.8.2-4.8.5, KVE, dynamic normalisation), unchunked.

    Mirrors ``ovss.gla.reference.dense_attention_map`` (tests/test_precision_budget.py checks it) but also
    returns the sets and the mask it decides.

    Args:
        keys: (M, D) raw keys of L windows; queries: (M, D) initial anchors; cfg: a ``GLAConfig``.
        prior: optional (M, M) additive logits; dtype: the arithmetic (float64, or float32 for the floor).

    Returns:
        The proxy sets P^(t) per step, each (M, M) bool; the kept entries ``A >= theta`` (M, M) bool; and
        alpha (M, M) in ``dtype``.
    """
    m = keys.shape[0]
    k = F.normalize(keys.to(dtype), dim=-1)  # (M, D)
    q = queries.to(dtype)  # (M, D)
    eye = torch.eye(m, dtype=torch.bool, device=keys.device)  # (M, M)
    sets: list[torch.Tensor] = []
    for _ in range(cfg.steps):
        p = F.normalize(q, dim=-1) @ k.T > cfg.rho  # (M, M)
        p |= eye & ~p.any(dim=1, keepdim=True)  # (M, M) an empty set falls back to the token itself
        sets.append(p)
        counts = p.sum(dim=1)  # (M,)
        q = p.to(dtype) @ k / counts[:, None]  # (M, D)
    s = F.normalize(q, dim=-1) @ k.T  # (M, M)
    mu = s.mean(dim=1)  # (M,)
    if cfg.clamp_mean:
        mu = mu.clamp(min=0.0)
    u = 1.0 + cfg.lam1 * math.log1p(L)
    a = (1.0 + cfg.lam2 / counts.to(dtype))[:, None] * (s - u * mu[:, None])  # (M, M)
    if prior is not None:
        a = a + prior.to(dtype)
    theta = a.amax(dim=1, keepdim=True).clamp(max=0.0)  # (M, 1)
    keep = a >= theta  # (M, M)
    alpha = torch.softmax(a.masked_fill(~keep, -math.inf), dim=1)  # (M, M)
    return sets, keep, alpha


def _flips(
    x: list[torch.Tensor], y: list[torch.Tensor], keep_x: torch.Tensor, keep_y: torch.Tensor, alpha_x: torch.Tensor
) -> dict[str, Any]:
    """Entries whose proxy-set membership (per step) or mask differ between two derivations; alpha_x (M, M)."""
    out: dict[str, Any] = {}
    for t, (p, r) in enumerate(zip(x, y, strict=True)):
        diff = p ^ r
        out[f"proxy_step{t}"] = {
            "flips": int(diff.sum()),
            "pct_of_selected": round(100 * int(diff.sum()) / max(int(p.sum()), 1), 4),
            "rows_pct": round(100 * float(diff.any(dim=1).double().mean()), 3),
            "median_set": int(p.sum(dim=1).median()),
        }
    diff = keep_x ^ keep_y
    out["mask"] = {
        "flips": int(diff.sum()),
        "pct_of_kept": round(100 * int(diff.sum()) / max(int(keep_x.sum()), 1), 4),
        "rows_pct": round(100 * float(diff.any(dim=1).double().mean()), 3),
        "max_row_mass": float(f"{float((alpha_x * diff).sum(dim=1).max()):.3g}"),
    }
    return out


def gla_flips(seg: Segmenter, batch: WindowBatch, dtype: torch.dtype) -> dict[str, Any]:
    """Flips of GLA's cut-offs between the fp32 and the reduced backbone passes (and the fp32/f64 floor)."""
    spec, opts = seg.method, seg.options
    cfg = opts.gla
    if not cfg.kve or cfg.norm != "dynamic" or not cfg.proxy:
        return {"skipped": "the diagnostic covers the default GLA (KVE, proxies, dynamic normalisation)"}
    backbones = Backbones(seg.clip.visual, seg.vfm)
    full, reduced = _both(seg, dtype, lambda: ADAPTERS[spec.name](backbones, batch, opts))
    L = len(batch.windows)
    result: dict[str, Any] = {}
    with torch.inference_mode(), full_precision():
        for s, (kx, ky) in enumerate(zip(full.key_sets, reduced.key_sets, strict=True)):
            keys_x, keys_y = kx.reshape(-1, kx.shape[-1]).float(), ky.reshape(-1, ky.shape[-1]).float()
            qx, _ = initial_queries([keys_x], full, batch, cfg)
            qy, _ = initial_queries([keys_y], reduced, batch, cfg)
            rows = torch.arange(keys_x.shape[0], device=keys_x.device)
            px = None if full.prior is None else full.prior(rows)
            py = None if reduced.prior is None else reduced.prior(rows)
            a = cutoffs(keys_x, qx[0], L, cfg, px, torch.float64)
            b = cutoffs(keys_y, qy[0], L, cfg, py, torch.float64)
            c = cutoffs(keys_x, qx[0], L, cfg, px, torch.float32)
            result[f"keys{s}"] = {
                "M": int(keys_x.shape[0]),
                "reduced": _flips(a[0], b[0], a[1], b[1], a[2]),
                "floor": _flips(a[0], c[0], a[1], c[1], a[2]),
            }
    return result


def budget(seg32: Segmenter, seg16: Segmenter, image: Any, classes: list, text: torch.Tensor | None) -> dict[str, Any]:
    """The error budget of one image (see the module docstring)."""
    dtype = seg16.dtype
    p32 = seg32.predict(image, classes, text_embeddings=text)
    p16 = seg16.predict(image, classes, text_embeddings=text)
    batch = _windows(seg32)
    clip, vfm = seg32.clip.visual, seg32.vfm
    out: dict[str, Any] = {}
    x, y = _both(seg32, dtype, lambda: tokens_before_last_block(clip, batch.pixels)[0][:, clip.num_prefix_tokens :])
    out["cos_clip_x11"] = _cos_stats(x, y)
    if vfm is not None and seg32.method.needs("vfm"):
        x, y = _both(seg32, dtype, lambda: vfm_features(vfm, batch.pixels, clip)[0])
        out["cos_vfm"] = _cos_stats(x, y)
    out["cos_dense"] = _cos_stats(seg32._current().features, seg16._current().features)
    scale = seg32.pipeline.logit_scale
    l32, l16 = class_logits(p32, classes, scale), class_logits(p16, classes, scale)
    drift = (l32 - l16).abs().amax(dim=0)  # (H, W)
    top2 = l32.topk(2, dim=0).values  # (2, H, W)
    margin = top2[0] - top2[1]  # (H, W)
    p99 = _q(drift, 0.99)
    out["drift"] = {"median": round(_q(drift, 0.5), 4), "p99": round(p99, 4), "max": round(float(drift.max()), 4)}
    out["margin"] = {f"p{int(100 * q)}": round(_q(margin, q), 4) for q in (0.01, 0.1, 0.5)}
    out["at_risk_pct"] = round(100 * float((margin < p99).double().mean()), 3)
    out["flippable_pct"] = round(100 * float((margin < 2 * drift).double().mean()), 3)
    same = torch.as_tensor(p32.labels == p16.labels)  # (H, W) bool
    out["agree_pct"] = round(100 * float(same.double().mean()), 3)
    if seg32.method.joint_windows:
        out["gla"] = gla_flips(seg32, batch, dtype)
    return out


def segmenters(method: str, args: argparse.Namespace, models: dict[str, Any]) -> tuple[Segmenter, Segmenter]:
    kw = {**weights_of(args), "tokenizer": args.tokenizer or vocab_path(), **models, "device": args.device}
    kw.update(**pipeline_of(args), **options_of(args, method, methods_of(args)))
    return ovss.load(method, **kw), ovss.load(method, dtype=args.dtype, **kw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--labels-file", help="class names (required with real weights)")
    add_methods_flag(parser, ["proxyclip+gla"])
    add_weight_flags(parser)
    add_device_flags(parser, dtype_default="bf16")  # the reduced precision compared with fp32
    add_setting_flags(parser)
    default_cache = Path(tempfile.gettempdir()) / "ovss-tamed-models.pt"
    parser.add_argument("--cache", default=str(default_cache), help="--tamed: where the tamed models are kept")
    parser.add_argument("--tamed", action="store_true", help="tamed random ViT-B/16 + DINO-B/8 (precision_tamed.py)")
    parser.add_argument("--classes", type=int, default=8, help="--tamed: number of classes")
    parser.add_argument("--margin", type=float, default=1.0, help="--tamed: median fp32 top-2 scaled-logit margin")
    parser.add_argument("--quick", action="store_true", help="--tamed: narrow towers (a smoke test)")
    args = parser.parse_args()
    if args.dtype == "fp32":
        parser.error("--dtype is the reduced precision compared with fp32: bf16 or fp16")
    methods = methods_of(args)
    images = collect_inputs(args.images)
    report: dict[str, Any] = {"dtype": args.dtype, "tamed": args.tamed}
    if args.tamed:
        from precision_tamed import tamed_models, tamed_text

        clip, dino, taming = tamed_models(images[0], Path(args.cache), quick=args.quick)
        report.update(taming)
        models: dict[str, Any] = {"clip": clip, "vfm": dino}
        classes: list = [f"class{c}" for c in range(args.classes)]
    else:
        if not args.labels_file:
            parser.error("--labels-file is required with real weights")
        models = {}
        classes = read_labels_file(args.labels_file, allow_duplicates=True)
    for method in methods:
        seg32, seg16 = segmenters(method, args, models)
        text = None
        if args.tamed:
            seg32.set_image(images[0])
            feats = seg32._current().features.reshape(-1, seg32._current().features.shape[-1])  # (L*N, E)
            text, share = tamed_text(feats, args.classes, seg32.pipeline.logit_scale, args.margin)
            report.setdefault("text_class_share", {})[method] = round(share, 4)
        per_image = {Path(str(p)).name: budget(seg32, seg16, p, classes, text) for p in images}
        agree = float(np.mean([r["agree_pct"] for r in per_image.values()]))
        report[method] = {"agree_pct_mean": round(agree, 3), "per_image": per_image}
        print(json.dumps({method: report[method]}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
