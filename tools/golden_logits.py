"""Record every method's logits on tiny random weights, or compare two records bit for bit.

The redesign of issue 19 must leave what users get unchanged: run ``record`` before a change and after it,
then ``compare`` the two files. Every registered method (X+gla and variants included), each method's home
preset on two datasets, fp32 and bf16, two images (one with sides that are not multiples of 8 or 16) and
two label sets (one with synonyms).

    python tools/golden_logits.py record before.pt
    python tools/golden_logits.py record after.pt
    python tools/golden_logits.py compare before.pt after.pt

Reads the tiny-model builders of ``tests/`` and the BPE vocabulary of ``../shared/assets``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

LABEL_SETS = {
    "plain": ["background", "cat", "dog", "sky"],
    "synonyms": [["grass", "lawn"], "tree", ["person", "man", "woman"]],
}


def _images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    odd = rng.integers(0, 256, size=(75, 101, 3), dtype=np.uint8)
    odd[:, 50:] = odd[:, 50:] // 4 + 160  # two halves with different statistics
    from PIL import Image

    voc = sorted((REPO.parent / "shared" / "assets" / "voc2012-val-samples" / "images").glob("*.*"))[0]
    small = np.asarray(Image.open(voc).convert("RGB").resize((120, 90), Image.BILINEAR))
    return {"odd75x101": odd, "voc120x90": small}


def _models() -> dict[str, object]:
    from ovss.models.clip import build_clip
    from ovss.models.dino import build_vfm, convert_vfm_state_dict
    from test_dino import dino_state_dict
    from test_trident_pipeline import tiny_sam
    from tiny import tiny_clip_state_dict, tiny_dino_vit

    return {
        "clip": build_clip(tiny_clip_state_dict(seed=0)),
        "dino8": tiny_dino_vit(),
        "dino16": build_vfm(*convert_vfm_state_dict(dino_state_dict(12, patch=16, grid=4))),
        "sam": tiny_sam(),
    }


def _cases() -> list[tuple[str, str, dict[str, object]]]:
    """(key, method, load keywords) for every case recorded."""
    import ovss
    from ovss.eval.presets import default_preset, resolve

    cases: list[tuple[str, str, dict[str, object]]] = []
    small = {"short_side": 112, "crop": 112, "stride": 56}
    for method in ovss.available_methods():
        cases.append((f"{method}/small", method, dict(small)))
        cases.append((f"{method}/whole", method, {"short_side": 96, "crop": 0, "stride": 0}))
        try:
            preset = default_preset(method)
        except Exception:
            preset = None
        if preset is not None:
            for dataset in ("voc21", "pc59"):
                s = resolve(preset, dataset, method)
                kw = {**s.pipeline_kwargs(), **s.method_options}
                if kw.get("short_side"):  # keep tiny models quick: halve the preset's geometry
                    kw["short_side"] = kw["short_side"] // 3
                    kw["crop"] = kw["crop"] // 3 // 16 * 16 if kw["crop"] else 0
                    kw["stride"] = kw["stride"] // 3 // 8 * 8 if kw["stride"] else 0
                cases.append((f"{method}/{preset}-{dataset}", method, kw))
    return cases


def record(path: Path, only: str | None) -> None:
    import ovss

    os.environ.setdefault("OVSS_CACHE", tempfile.mkdtemp(prefix="ovss-golden-"))
    bpe = REPO.parent / "shared" / "assets" / "clip-bpe-vocab" / "bpe_simple_vocab_16e6.txt.gz"
    models = _models()
    images = _images()
    out: dict[str, torch.Tensor] = {}
    errors: dict[str, str] = {}
    for key, method, kw in _cases():
        if only and only not in key:
            continue
        dtypes = ("fp32", "bf16") if key.endswith("/small") else ("fp32",)
        for dtype in dtypes:
            vfm = models["dino16"] if method.startswith("trident") else models["dino8"]
            t0 = time.perf_counter()
            try:
                seg = ovss.load(
                    method, clip=models["clip"], vfm=vfm, sam=models["sam"], tokenizer=bpe, dtype=dtype, **kw
                )
                for image_name, rgb in images.items():
                    seg.set_image(rgb)
                    for label_name, labels in LABEL_SETS.items():
                        p = seg.predict(labels=labels)
                        tag = f"{key}/{dtype}/{image_name}/{label_name}"
                        out[tag + "/logits"] = p.logits.clone()
                        out[tag + "/labels"] = torch.as_tensor(np.asarray(p.labels))
            except Exception as err:  # recorded: an error is an outcome too
                errors[f"{key}/{dtype}"] = f"{type(err).__name__}: {err}"
            print(f"{key}/{dtype}: {time.perf_counter() - t0:.1f}s", flush=True)
    torch.save({"tensors": out, "errors": errors}, path)
    print(f"{len(out)} tensors, {len(errors)} errors -> {path}")


def compare(a: Path, b: Path) -> int:
    A, B = torch.load(a), torch.load(b)
    bad = 0
    for key in sorted(set(A["tensors"]) | set(B["tensors"])):
        x, y = A["tensors"].get(key), B["tensors"].get(key)
        if x is None or y is None:
            print(f"MISSING {key}: {'before' if x is None else 'after'}")
            bad += 1
        elif x.shape != y.shape or x.dtype != y.dtype:
            print(f"SHAPE {key}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
            bad += 1
        elif not torch.equal(x, y):
            diff = (x.double() - y.double()).abs().max().item()
            print(f"DIFF {key}: max |diff| {diff:.3g}")
            bad += 1
    for key in sorted(set(A["errors"]) | set(B["errors"])):
        if A["errors"].get(key) != B["errors"].get(key):
            print(f"ERROR {key}: {A['errors'].get(key)!r} vs {B['errors'].get(key)!r}")
            bad += 1
    print(f"{len(A['tensors'])} tensors compared, {bad} differ")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("path", type=Path)
    r.add_argument("--only", help="record only the cases whose key contains this text")
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.cmd == "record":
        record(args.path, args.only)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    raise SystemExit(main())
