"""Command-line flags shared by ``segment`` and ``eval``: the method, the weights, and every pipeline setting.

The pipeline flags are derived from :class:`~ovss.config.PipelineConfig` (name, type, help), and ``--opt``
values are parsed by the option's declared type (``ovss.fields``), so the CLI cannot drift from the API.
Torch-free: building the parser imports no backbone code.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any, Literal

from ovss.config import PIPELINE_KEYS, PipelineConfig
from ovss.errors import OvssError
from ovss.fields import alternatives, field_types, parse_text
from ovss.methods.options import option_fields, unknown_option_message
from ovss.methods.registry import get_method, with_gla

__all__ = ["PIPELINE_KEYS", "add_model_flags", "load_kwargs", "method_of", "model_kwargs", "parse_method_options"]


def _flag_type(flag: str, hint: Any) -> Callable[[str], Any]:
    """argparse ``type=``: parse by the annotation; a bad value is argparse's one-line usage error."""

    def parse(text: str) -> Any:
        try:
            return parse_text(flag, text, hint)
        except OvssError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return parse


def _metavar(hint: Any) -> str:
    words = []
    for alt in alternatives(hint):
        if alt is type(None):
            words.append("none")
        elif typing.get_origin(alt) is Literal:
            words.append(",".join(str(choice) for choice in typing.get_args(alt)))
        elif typing.get_origin(alt) is tuple:
            words.append("N,N,...")
        else:
            words.append({bool: "true|false", int: "N", float: "X"}.get(alt, "TEXT"))
    literal = any(typing.get_origin(alt) is Literal for alt in alternatives(hint))
    return "{" + "|".join(words) + "}" if len(words) > 1 or literal else words[0]


def _default_text(value: Any) -> str:
    """A default as it is typed on the command line (``none``, ``8,16``)."""
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def add_model_flags(p: argparse.ArgumentParser, default_method: str = "clearclip") -> None:
    """Flags choosing the method and weights, and every pipeline setting (unset = the method's default)."""
    g = p.add_argument_group("method and weights")
    g.add_argument(
        "--method",
        default=default_method,
        help=f"segmentation method (default {default_method}); see `ovss methods`",
    )
    g.add_argument(
        "--clip",
        default="ViT-B/16",
        help="CLIP weights: a name from `ovss models` or a local file "
        "(OpenAI .pt, OpenCLIP .bin/.safetensors, Hugging Face folder); default ViT-B/16",
    )
    g.add_argument(
        "--vfm",
        help="vision foundation model of DINO-guided methods (default dino-vitb8; trident: dino-vitb16): a name from "
        "`ovss models` or a local DINO / DINOv2 / Hugging Face checkpoint",
    )
    g.add_argument(
        "--sam",
        help="SAM weights of SAM-based methods (trident; default sam-vitb): a name from `ovss models` or a local "
        "official checkpoint",
    )
    g.add_argument("--gla", action="store_true", help="attach GLA to the method (same as --method NAME+gla)")
    g.add_argument("--act", choices=["quick_gelu", "gelu"], help="MLP activation for checkpoints that do not say")
    g.add_argument("--tokenizer", help="CLIP BPE vocabulary (.txt.gz) or HF tokenizer folder (default: cached)")
    g.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, parsed by its declared type: --opt sigma=3 (naclip), --opt reduced=false (sclip), "
        "--opt gla_rho=0.55 (X+gla); repeatable; `ovss methods` lists every option",
    )
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="backbone precision")
    g.add_argument("--offline", action="store_true", help="never download; fail if weights are not cached")
    k = p.add_argument_group("pipeline (defaults: the method's own setting)")
    k.argument_default = argparse.SUPPRESS  # an omitted flag is absent: the method default applies
    hints = field_types(PipelineConfig)
    for f in fields(PipelineConfig):
        names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        default = "the method's" if f.default is MISSING else _default_text(f.default)
        k.add_argument(
            *names,
            dest=f.name,
            type=_flag_type(names[0], hints[f.name]),
            metavar=_metavar(hints[f.name]),
            help=f"{f.metadata['help']}; default: {default}",
        )


def method_of(args: argparse.Namespace) -> str:
    """The registry name of ``--method`` with ``--gla`` applied (``proxyclip --gla`` -> ``proxyclip+gla``)."""
    return with_gla(args.method, args.gla).name


def parse_method_options(pairs: list[str], method: str) -> dict[str, Any]:
    """``["sigma=3", "attn=kk"]`` -> ``{"sigma": 3.0, "attn": "kk"}``, each value parsed by its declared type.

    Raises:
        OvssError: not KEY=VALUE, unknown option of ``method``, or a value its type does not allow.
    """
    spec = get_method(method)
    known = option_fields(spec.options)
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise OvssError(f"--opt expects KEY=VALUE, got {pair!r}")
        if key not in known:
            raise OvssError(unknown_option_message(spec.name, spec.options, key) + "; pipeline settings are flags")
        options[key] = parse_text(f"--opt {key}", raw, known[key].type)
    return options


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keywords of ``ovss.load`` that choose the weights and where they run (shared by segment and eval)."""
    return {
        "clip": args.clip,
        "vfm": args.vfm,
        "sam": args.sam,
        "gla": args.gla,
        "act": args.act,
        "tokenizer": args.tokenizer,
        "device": args.device,
        "dtype": args.dtype,
        "download": not args.offline,
    }


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``ovss.load`` from parsed flags (only the flags the user set)."""
    kwargs: dict[str, Any] = {key: getattr(args, key) for key in PIPELINE_KEYS if hasattr(args, key)}
    kwargs.update(parse_method_options(args.opt, method_of(args)))
    kwargs.update(model_kwargs(args))
    return kwargs
