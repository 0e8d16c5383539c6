"""``ovss methods`` and ``ovss models``: what is available."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("methods", help="list the segmentation methods")
    p.set_defaults(func=list_methods)
    p = sub.add_parser("models", help="list the named weights (CLIP, VFMs, tokenizer) and the cache folder")
    p.set_defaults(func=list_models)


def list_methods(args: argparse.Namespace) -> int:
    from ovss.methods import METHODS, available_methods

    for name in available_methods():
        spec = METHODS[name]
        geo = spec.geometry
        crop = "whole" if geo.crop == 0 else f"{geo.crop}/{geo.stride}"
        print(f"{name:18s} tau={spec.logit_scale:<5g} resize={geo.short_side} window={crop:8s} {spec.description}")
    return 0


def list_models(args: argparse.Namespace) -> int:
    from ovss import hub

    print(f"cache: {hub.cache_dir()}")
    for name in hub.available_models():
        entry = hub.REGISTRY[name]
        cached = "cached" if (hub.cache_dir() / entry.filename).exists() else ""
        print(f"{entry.kind:9s} {name:36s} {cached:6s} {entry.description}")
    return 0
