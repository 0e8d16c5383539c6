"""``ovss methods`` and ``ovss models``: what is available."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("methods", help="list the segmentation methods")
    p.set_defaults(func=list_methods)
    p = sub.add_parser("models", help="list the named weights (CLIP, VFMs, tokenizer) and the cache folder")
    p.set_defaults(func=list_models)


def _option_lines(options: Any, part: str | None = None) -> list[str]:
    """One line per option keyword (of one part of composed options), e.g. ``attn: 'naclip' | 'kk' = 'naclip'``."""
    from ovss.fields import type_name
    from ovss.methods.options import option_fields

    found = [f for f in option_fields(options).values() if part is None or f.part == part]
    return [f"    {f.keyword}: {type_name(f.type)} = {f.default!r}" for f in found]


def list_methods(args: argparse.Namespace) -> int:
    """Every method with its defaults and options (type, default, allowed values); GLA's options once, last."""
    from ovss.methods import METHODS, available_methods

    gla_options = None  # the composed options of one X+gla method: its GLA part is listed once, at the end
    for name in available_methods():
        spec = METHODS[name]
        geo = spec.geometry
        crop = "whole" if geo.crop == 0 else f"{geo.crop}/{geo.stride}"
        print(f"{name:18s} tau={spec.logit_scale:<5g} resize={geo.short_side} window={crop:8s} {spec.description}")
        if spec.base is None:
            print("\n".join(_option_lines(spec.options)) or "    (no options)")
        else:
            print(f"    the options of {spec.base}, and the GLA options gla_* below")
            if spec.options.extra is not None:  # a variant's own part (proxyclip+gla+mlf: mlf_*)
                print("\n".join(_option_lines(spec.options, "extra")))
            gla_options = spec.options
    if gla_options is not None:
        print("\nGLA options of every X+gla method (keyword prefix gla_, e.g. --opt gla_rho=0.55):")
        print("\n".join(_option_lines(gla_options, part="gla")))
    return 0


def list_models(args: argparse.Namespace) -> int:
    """Every registered file: kind, name, whether it is in the cache folder (yes / no), description."""
    from ovss.storage import hub

    folder = hub.cache_dir()
    print(f"cache: {folder}")
    print(f"{'KIND':9s} {'NAME':36s} {'CACHED':6s} DESCRIPTION")
    for name in hub.available_models():
        entry = hub.REGISTRY[name]
        cached = "yes" if (folder / entry.filename).is_file() else "no"
        print(f"{entry.kind:9s} {name:36s} {cached:6s} {entry.description}")
    return 0
