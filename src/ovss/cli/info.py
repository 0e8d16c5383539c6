"""``ovss methods`` and ``ovss models``: what is available."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("methods", help="list the segmentation methods")
    p.set_defaults(func=list_methods)
    p = sub.add_parser(
        "models",
        help="list the named weights (CLIP, VFMs, tokenizer, SAM), the cache folder, and the Hugging Face Hub "
        "repositories in the Hugging Face cache that ovss can load (hf-hub:ORG/NAME)",
    )
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
    from ovss.storage.weights import HUB_IDS

    folder = hub.cache_dir()
    print(f"cache: {folder}")
    print(f"{'KIND':9s} {'NAME':36s} {'CACHED':6s} DESCRIPTION")
    for name in hub.available_models():
        entry = hub.REGISTRY[name]
        cached = "yes" if (folder / entry.filename).is_file() else "no"
        print(f"{entry.kind:9s} {name:36s} {cached:6s} {entry.description}")
    print(
        "\nRegistry names download the original release files above into that cache (SHA-256 checked, results as "
        "before); the same models on the Hugging Face Hub, fetched into the Hugging Face cache instead:"
    )
    for name, hub_id in HUB_IDS.items():
        print(f"  {name:36s} = {hub_id}")
    _list_hub_cache()
    return 0


def _list_hub_cache() -> None:
    """The revisions of the Hugging Face cache ovss can load: kind, the id that loads it, commit, size, file."""
    from ovss.storage.hf_cache import cached_weights
    from ovss.storage.hf_hub import hub_cache_dir

    found = cached_weights()
    print(f"\nHugging Face cache: {hub_cache_dir()} (Hub ids hf-hub:ORG/NAME[@REVISION]; shared with transformers)")
    if not found:
        print("  (no repository ovss can load; `ovss download hf-hub:ORG/NAME` fetches one)")
        return
    print(f"{'KIND':9s} {'NAME':60s} {'REVISION':12s} {'SIZE':>10s} FILE")
    for item in found:
        print(f"{item.kind:9s} {item.name:60s} {item.commit[:12]:12s} {item.size / 2**20:8.1f} MiB {item.file}")
