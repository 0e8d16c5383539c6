"""The one flag builder of every command and script: methods, weights, device and precision, pipeline settings,
method options; and the resolvers that turn the parsed flags into ``ovss.load`` keywords.

``ovss segment``, ``eval``, ``demo``, ``bench``, ``tools/precision_agreement.py`` and the scripts in
``benchmarks/`` add their flags here, so one setting has one spelling everywhere:

* the method: ``--method NAME`` (``--gla`` attaches GLA) where one method runs, ``--methods A,B`` (also
  ``--method A --method B``) where several do;
* the weights: ``--clip``, ``--vfm``, ``--sam``, ``--act``, ``--tokenizer``, ``--offline``;
* where they run: ``--device``, ``--dtype`` (``--dtype fp32,bf16`` where several precisions are measured;
  ``--precision`` is the same flag);
* pipeline settings: one flag per field of :class:`~ovss.config.PipelineConfig` (``--crop 224``), generated
  from the dataclass (name, type, help);
* ``--opt KEY=VALUE`` (``--set`` is the same flag): a pipeline setting or a method option, parsed by its declared
  type (``ovss.fields``), as ``ovss.load(method, **settings)`` takes both.

Torch-free: building a parser imports no backbone code.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from typing import Any, Literal

from ovss.config import PIPELINE_KEYS, PipelineConfig
from ovss.errors import OvssError
from ovss.fields import alternatives, field_types, parse_text
from ovss.methods.options import option_fields, unknown_option_message
from ovss.methods.registry import get_method, with_gla

__all__ = [
    "DTYPES",
    "PIPELINE_KEYS",
    "add_device_flags",
    "add_method_flag",
    "add_methods_flag",
    "add_model_flags",
    "add_setting_flags",
    "add_weight_flags",
    "dtypes_of",
    "load_kwargs",
    "method_of",
    "methods_of",
    "model_kwargs",
    "options_of",
    "parse_method_options",
    "pipeline_of",
    "weights_of",
]

DTYPES = ("fp32", "bf16", "fp16")  # --dtype values: backbone precision
Parser = argparse.ArgumentParser | argparse._ArgumentGroup


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


def _comma_list(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (empty items dropped)."""
    return [item.strip() for item in text.split(",") if item.strip()]


class _Append(argparse.Action):
    """Append the list a flag's value parses to; the first use replaces the default list."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if current is self.default else current), *values])


# ------------------------------------------------------------------------------------------------ builders
def add_method_flag(p: Parser, default: str = "clearclip") -> None:
    """``--method NAME`` and ``--gla``, for commands that run one method (resolve with :func:`method_of`)."""
    p.add_argument("--method", default=default, help=f"segmentation method (default {default}); see `ovss methods`")
    p.add_argument("--gla", action="store_true", help="attach GLA to the method (same as --method NAME+gla)")


def add_methods_flag(p: Parser, default: Sequence[str] | None) -> None:
    """``--methods A,B`` (repeatable; ``--method A`` is the same flag), for commands that run several methods.

    Args:
        p: parser or group.
        default: the methods when the flag is not given; None: every registered method.
    """
    shown = ",".join(default) if default is not None else "every registered one"
    p.add_argument(
        "--methods",
        "--method",
        dest="methods",
        action=_Append,
        type=_comma_list,
        default=None if default is None else list(default),
        metavar="NAME[,NAME...]",
        help=f"methods, comma-separated or the flag repeated (default {shown}); see `ovss methods`",
    )


def role_defaults(role: str) -> str:
    """Which weights the methods load in ``role`` when no flag names one, from their specs ("dino-vitb8 for
    proxyclip, cass, ...; dino-vitb16 for trident, ...")."""
    from ovss.methods.registry import METHODS, available_methods

    by_default: dict[str, list[str]] = {}
    for name in available_methods():
        spec = METHODS[name]
        if spec.needs(role) and spec.base is None:  # composed methods take their base's
            by_default.setdefault(spec.default_weights(role), []).append(name)
    listed = "; ".join(f"{default} for {', '.join(names)}" for default, names in by_default.items())
    return f"{listed}; an X+gla method takes its base's"


def add_weight_flags(
    p: Parser, *, clip_default: str | None = "ViT-B/16", act: bool = True, offline: bool = True
) -> None:
    """``--clip``, ``--vfm``, ``--sam``, ``--tokenizer`` and (``act``, ``offline``) ``--act``, ``--offline``.

    Args:
        p: parser or group.
        clip_default: the CLIP weights when ``--clip`` is not given (None: the command decides, e.g. ``bench``).
        act: add ``--act``; offline: add ``--offline`` (commands that never download leave them out).
    """
    shown = f"default {clip_default}" if clip_default else "default: see the command's description"
    p.add_argument(
        "--clip",
        default=clip_default,
        help="CLIP weights: a name from `ovss models`, a Hugging Face Hub id hf-hub:ORG/NAME[@REVISION] (e.g. "
        "hf-hub:openai/clip-vit-base-patch16; gated or private: HF_TOKEN=... or `hf auth login`), or a local file "
        f"(OpenAI .pt, OpenCLIP .bin/.safetensors, Hugging Face folder); {shown}",
    )
    p.add_argument(
        "--vfm",
        help="vision foundation model of DINO-guided methods: a name from `ovss models`, a Hub id (e.g. "
        "hf-hub:facebook/dinov3-vitb16-pretrain-lvd1689m, licence-gated: HF_TOKEN=... or `hf auth login`) or a "
        f"local DINO / DINOv2 / DINOv3 / Hugging Face checkpoint (default: each method's own: {role_defaults('vfm')})",
    )
    p.add_argument(
        "--sam",
        help="SAM weights of SAM-based methods: a name from `ovss models`, a Hub id (e.g. "
        f"hf-hub:facebook/sam-vit-base) or a local official checkpoint (default: {role_defaults('sam')})",
    )
    if act:
        p.add_argument("--act", choices=["quick_gelu", "gelu"], help="MLP activation for checkpoints that do not say")
    p.add_argument(
        "--tokenizer",
        help="CLIP BPE vocabulary (.txt.gz) or HF tokenizer folder (default: $OVSS_BPE_PATH if set, else the "
        "cached clip-bpe file, downloaded on first use)",
    )
    if offline:
        p.add_argument(
            "--offline",
            action="store_true",
            help="never download; fail if weights are not cached (Hub ids: the Hugging Face cache; as "
            "OVSS_OFFLINE=1 or HF_HUB_OFFLINE=1)",
        )


def add_device_flags(p: Parser, *, device: bool = True, dtype_default: str = "fp32", several: bool = False) -> None:
    """``--device`` (``device``) and ``--dtype``: one precision, or (``several``) a comma-separated list of them.

    Args:
        p: parser or group.
        device: add ``--device`` (default cpu).
        dtype_default: the precision (or comma-separated precisions) when ``--dtype`` is not given.
        several: ``--dtype fp32,bf16`` lists several (``--precision`` is the same flag; read them with
            :func:`dtypes_of`); else one of :data:`DTYPES`.
    """
    if device:
        p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    if several:
        p.add_argument(
            "--dtype",
            "--precision",
            dest="dtype",
            default=dtype_default,
            metavar="DTYPE[,DTYPE...]",
            help=f"backbone precisions, comma-separated: {', '.join(DTYPES)} (default {dtype_default})",
        )
    else:
        p.add_argument(
            "--dtype", default=dtype_default, choices=DTYPES, help=f"backbone precision (default {dtype_default})"
        )


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per pipeline setting (unset = the method's default) and ``--opt KEY=VALUE`` (alias ``--set``)."""
    p.add_argument(
        "--opt",
        "--set",
        dest="opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option or pipeline setting, parsed by its declared type: --opt sigma=3 (naclip), "
        "--opt reduced=false (sclip), --opt gla_rho=0.55 (X+gla), --opt crop=224 (= --crop 224); repeatable; "
        "`ovss methods` lists every option",
    )
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


def add_model_flags(p: argparse.ArgumentParser, default_method: str = "clearclip") -> None:
    """Every flag of a command that runs one method (``segment``, ``eval``): method, weights, device, settings."""
    g = p.add_argument_group("method and weights")
    add_method_flag(g, default_method)
    add_weight_flags(g)
    add_device_flags(g)
    add_setting_flags(p)


# ------------------------------------------------------------------------------------------------ resolvers
def method_of(args: argparse.Namespace) -> str:
    """The registry name of ``--method`` with ``--gla`` applied (``proxyclip --gla`` -> ``proxyclip+gla``)."""
    return with_gla(args.method, args.gla).name


def methods_of(args: argparse.Namespace) -> list[str]:
    """The registry names of ``--methods`` (every registered method when None), each checked.

    Raises:
        OvssError: an unknown name (with the closest names), or the flag given with no name.
    """
    from ovss.methods import available_methods

    if args.methods is None:
        return available_methods()
    if not args.methods:
        raise OvssError("--methods lists no method; give names separated by commas (see `ovss methods`)")
    return [get_method(name).name for name in args.methods]


def dtypes_of(args: argparse.Namespace) -> list[str]:
    """The precisions of ``--dtype A,B`` (several), in order, each once.

    Raises:
        OvssError: none given, or one not in :data:`DTYPES`.
    """
    dtypes = list(dict.fromkeys(_comma_list(args.dtype)))
    if not dtypes or any(dtype not in DTYPES for dtype in dtypes):
        listing = ", ".join(DTYPES)
        raise OvssError(f"--dtype (--precision) takes a comma-separated list of {listing}; got {args.dtype!r}")
    return dtypes


def _pairs(args: argparse.Namespace) -> dict[str, str]:
    """``--opt`` / ``--set`` as key -> text (``-`` in a key read as ``_``; a later pair replaces an earlier one)."""
    pairs: dict[str, str] = {}
    for pair in args.opt:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise OvssError(f"--opt (--set) expects KEY=VALUE, got {pair!r}")
        pairs[key] = raw
    return pairs


def pipeline_of(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline settings the user set: the flags given and the pipeline keys of ``--opt``, parsed by type.

    Raises:
        OvssError: a setting given both as a flag and with ``--opt``, or a value its type does not allow.
    """
    settings: dict[str, Any] = {key: getattr(args, key) for key in PIPELINE_KEYS if hasattr(args, key)}
    hints = field_types(PipelineConfig)
    for key, raw in _pairs(args).items():
        if key not in PIPELINE_KEYS:
            continue
        if key in settings:
            flag = f"--{key.replace('_', '-')}"
            raise OvssError(f"{key} is given twice, as {flag} and as --opt {key}=...; give it once")
        settings[key] = parse_text(f"--opt {key}", raw, hints[key])
    return settings


def parse_method_options(pairs: list[str], method: str) -> dict[str, Any]:
    """``["sigma=3", "attn=kk"]`` -> ``{"sigma": 3.0, "attn": "kk"}``, each value parsed by its declared type.

    Raises:
        OvssError: not KEY=VALUE, unknown option of ``method``, or a value its type does not allow.
    """
    spec = get_method(method)
    known = option_fields(spec.options)
    options: dict[str, Any] = {}
    for key, raw in _pairs(argparse.Namespace(opt=pairs)).items():
        if key not in known:
            raise OvssError(unknown_option_message(spec.name, spec.options, key) + "; or a pipeline setting")
        options[key] = parse_text(f"--opt {key}", raw, known[key].type)
    return options


def options_of(args: argparse.Namespace, method: str, methods: Sequence[str] | None = None) -> dict[str, Any]:
    """The method options of ``--opt`` that ``method`` declares, parsed by its declared types.

    Args:
        args: parsed flags.
        method: the method to load.
        methods: every method the command may run (``--methods``, or all a page offers); None: only ``method``.
            A key that none of them declares (and that is not a pipeline setting) is an error; each method
            gets the options it declares.

    Raises:
        OvssError: an option no method declares (naming the methods, or listing ``method``'s options when it
            runs alone), or a value its type does not allow.
    """
    pairs = {key: raw for key, raw in _pairs(args).items() if key not in PIPELINE_KEYS}
    spec = get_method(method)
    known = option_fields(spec.options)
    runs = sorted({spec.name, *(get_method(other).name for other in methods or ())})
    declared = set(known).union(*(option_fields(get_method(other).options) for other in runs))
    for key in pairs:
        if key in declared:
            continue
        if runs == [spec.name]:
            raise OvssError(unknown_option_message(spec.name, spec.options, key) + "; or a pipeline setting")
        who = ", ".join(runs) if len(runs) <= 4 else "any method"
        hint = "; GLA options need GLA attached (NAME+gla)" if key.startswith("gla_") else ""
        raise OvssError(f"--opt {key} is not an option of {who}, nor a pipeline setting{hint}; see `ovss methods`")
    return {key: parse_text(f"--opt {key}", raw, known[key].type) for key, raw in pairs.items() if key in known}


def weights_of(args: argparse.Namespace) -> dict[str, Any]:
    """``ovss.load`` keywords of the weight flags this parser has (clip, vfm, sam, act, tokenizer, download)."""
    roles = ("clip", "vfm", "sam", "act", "tokenizer")
    kwargs: dict[str, Any] = {key: getattr(args, key) for key in roles if hasattr(args, key)}
    if hasattr(args, "offline"):
        kwargs["download"] = not args.offline
    return kwargs


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keywords of ``ovss.load`` that choose the weights and where they run (shared by segment and eval)."""
    return {**weights_of(args), "gla": args.gla, "device": args.device, "dtype": args.dtype}


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``ovss.load(method_of(args), ...)``: the settings and options the user set, the weights."""
    return {**pipeline_of(args), **options_of(args, method_of(args)), **model_kwargs(args)}
