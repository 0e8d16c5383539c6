"""Command-line flags for every pipeline knob (same names as the keywords of ``ovss.load``)."""

from __future__ import annotations

import argparse
import ast
from typing import Any

from ovss.errors import OvssError


def _optional_int(text: str) -> int | None:
    if text.lower() in ("none", "null", "0", "off"):
        return None
    try:
        return int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels or 'none', got {text!r}") from err


def _optional_float(text: str) -> float | None:
    if text.lower() in ("none", "null", "off"):
        return None
    try:
        return float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from err


def add_model_flags(p: argparse.ArgumentParser, default_method: str = "clearclip") -> None:
    """Flags choosing the method and weights, and every pipeline knob (unset = the method's default)."""
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
        help="vision foundation model of DINO-guided methods (default dino-vitb8): a name from `ovss models` "
        "or a local DINO / DINOv2 / Hugging Face checkpoint",
    )
    g.add_argument("--gla", action="store_true", help="attach GLA to the method (same as --method NAME+gla)")
    g.add_argument("--act", choices=["quick_gelu", "gelu"], help="MLP activation for checkpoints that do not say")
    g.add_argument("--tokenizer", help="CLIP BPE vocabulary (.txt.gz) or HF tokenizer folder (default: cached)")
    g.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. --opt sigma=3 (naclip) or --opt reduced=True (sclip); repeatable",
    )
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="backbone precision")
    g.add_argument("--offline", action="store_true", help="never download; fail if weights are not cached")
    k = p.add_argument_group("pipeline (defaults: the method's own setting)")
    k.argument_default = argparse.SUPPRESS  # an omitted flag is absent: the method default applies
    k.add_argument(
        "--short-side",
        "--short_side",
        dest="short_side",
        type=_optional_int,
        help="resize the short side to N pixels ('none' keeps the image size)",
    )
    k.add_argument("--crop", type=int, help="sliding-window side in pixels (0 = whole image in one pass)")
    k.add_argument("--stride", type=int, help="sliding-window stride in pixels")
    k.add_argument(
        "--logit-scale",
        "--logit_scale",
        dest="logit_scale",
        type=float,
        help="temperature of the softmax over all names",
    )
    k.add_argument(
        "--bg-threshold",
        "--bg_threshold",
        dest="bg_threshold",
        type=float,
        help="probability below which a pixel gets class 0 (default 0: off)",
    )
    k.add_argument(
        "--area-threshold",
        "--area_threshold",
        dest="area_threshold",
        type=_optional_float,
        help="SCLIP area filter share (default none)",
    )
    k.add_argument(
        "--pamr-steps",
        "--pamr_steps",
        dest="pamr_steps",
        type=int,
        help="PAMR refinement iterations (default 0: off)",
    )
    k.add_argument("--templates", choices=["imagenet80", "imagenet7", "maskclip5"], help="prompt templates")
    k.add_argument(
        "--window-batch",
        "--window_batch",
        dest="window_batch",
        type=int,
        help="windows per backbone forward (memory only)",
    )


PIPELINE_KEYS = (
    "short_side",
    "crop",
    "stride",
    "logit_scale",
    "bg_threshold",
    "area_threshold",
    "pamr_steps",
    "templates",
    "window_batch",
)


def parse_method_options(pairs: list[str]) -> dict[str, Any]:
    """``["sigma=3", "attn=kk"]`` -> ``{"sigma": 3, "attn": "kk"}`` (Python literals, else strings)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise OvssError(f"--opt expects KEY=VALUE, got {pair!r}")
        try:
            value: Any = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        options[key.strip().replace("-", "_")] = value
    return options


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keywords of ``ovss.load`` that choose the weights and where they run (shared by segment and eval)."""
    return {
        "clip": args.clip,
        "vfm": args.vfm,
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
    kwargs.update(parse_method_options(args.opt))
    kwargs.update(model_kwargs(args))
    return kwargs
