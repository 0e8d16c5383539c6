"""``ovss.load``: build a :class:`Segmenter` from a method name, CLIP weights and pipeline knobs."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from ovss.config import PipelineConfig
from ovss.errors import OvssError
from ovss.methods.registry import MethodSpec, get_method
from ovss.models.clip import CLIP, build_clip
from ovss.models.vit import VisionTransformer
from ovss.predictor import Segmenter
from ovss.text.tokenizer import Tokenizer


class _Unset:
    def __repr__(self) -> str:
        return "<method default>"


UNSET: Any = _Unset()  # "use the method's default" (None is a real value for short_side / area_threshold)

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch dtype from a dtype or one of fp32 / bf16 / fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise OvssError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    return DTYPES[dtype]


def check_device(device: torch.device | str) -> torch.device:
    """The torch device named by ``device``; OvssError when it is malformed or not usable here (e.g. no CUDA)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise OvssError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise OvssError(
                f"device {str(device)!r} needs CUDA, which this PyTorch {torch.__version__} does not see "
                "(no GPU, driver or CUDA build); use device 'cpu' (--device cpu)"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise OvssError(
                f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible; "
                "use cuda:0 .. cuda:N-1"
            )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise OvssError(f"device {str(device)!r} (Apple MPS) is not available here; use device 'cpu' (--device cpu)")
    return resolved


def method_name(method: str, gla: bool = False) -> str:
    """The registry name of ``method`` with GLA attached when ``gla`` (``proxyclip`` -> ``proxyclip+gla``)."""
    return f"{method}+gla" if gla and not method.endswith("+gla") else method


def load_clip(
    clip: str | os.PathLike[str] | CLIP = "ViT-B/16",
    *,
    act: str | None = None,
    download: bool = True,
) -> tuple[CLIP, dict[str, Any]]:
    """Load CLIP weights by registry name or local file/folder (OpenAI .pt, OpenCLIP, Hugging Face).

    Args:
        clip: a name from :func:`ovss.available_models`, a local weight file or HF folder, or a built model.
        act: MLP activation override ("quick_gelu" or "gelu"); default from the file or the registry entry.
        download: allow downloading registry weights that are not cached.

    Returns:
        The model (CPU, fp32, eval) and a record of where it came from (name, path, format, activation).
    """
    if isinstance(clip, CLIP):
        return clip, {"clip": "<in-memory model>"}
    from ovss import hub
    from ovss.models.formats import load_clip_state_dict

    name = str(clip)
    path = hub.resolve(name, kind="clip", download=download)
    state_dict, info = load_clip_state_dict(path)
    entry = hub.REGISTRY.get(name)
    chosen = act or info.act or (entry.act if entry is not None else None) or "quick_gelu"
    if chosen not in ("quick_gelu", "gelu"):
        raise OvssError(f"unknown activation {chosen!r}; use quick_gelu or gelu")
    model = build_clip(state_dict, act=chosen)
    record = {"clip": name, "clip_path": str(Path(path)), "clip_format": info.format, "clip_act": chosen}
    if entry is not None and entry.sha256:
        record["clip_sha256"] = entry.sha256
    return model, record


def option_names(options: Any) -> set[str]:
    """Every option name a method accepts (composed options: the names of their parts)."""
    names: set[str] = set()
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        names |= option_names(value) if dataclasses.is_dataclass(value) else {f.name}
    return names


def option_value(options: Any, name: str, default: Any = None) -> Any:
    """The value of option ``name``, looking inside composed options (``X+gla``: base, then GLA)."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if dataclasses.is_dataclass(value):
            if name in option_names(value):
                return option_value(value, name)
        elif f.name == name:
            return value
    return default


def _apply(options: Any, overrides: dict[str, Any]) -> Any:
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = _apply(value, overrides)
        elif f.name in overrides:
            changes[f.name] = overrides[f.name]
    return dataclasses.replace(options, **changes)


def resolve_options(spec: MethodSpec, overrides: dict[str, Any]) -> Any:
    """The method's option dataclass with user overrides applied; unknown names raise OvssError.

    Composed options (``X+gla``: base options and GLA options) receive each override in every part that
    has a field of that name (e.g. ``beta``/``gamma`` of ProxyCLIP and of GLA's fixed normalisation).
    """
    valid = option_names(spec.options)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        listing = ", ".join(sorted(valid)) or "none"
        raise OvssError(f"method {spec.name!r} has no option {', '.join(unknown)}; its options are: {listing}")
    try:
        return _apply(spec.options, overrides)
    except (TypeError, ValueError) as err:
        raise OvssError(f"invalid option for method {spec.name!r}: {err}") from err


def load_vfm(vfm: str | os.PathLike[str] | VisionTransformer | None, download: bool) -> tuple[Any, dict[str, Any]]:
    """Load the vision foundation model of a DINO-guided method (default ``dino-vitb8``)."""
    if isinstance(vfm, VisionTransformer):
        return vfm, {"vfm": "<in-memory model>"}
    from ovss import hub
    from ovss.models.dino import load_vfm as load_vfm_weights

    model, rec = load_vfm_weights(str(vfm or hub.DEFAULT_VFM), download=download)
    return model, {"vfm": rec.get("name"), "vfm_path": rec.get("path"), "vfm_format": rec.get("format")}


def load(
    method: str = "clearclip",
    clip: str | os.PathLike[str] | CLIP = "ViT-B/16",
    *,
    vfm: str | os.PathLike[str] | VisionTransformer | None = None,
    gla: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    short_side: int | None = UNSET,
    crop: int = UNSET,
    stride: int = UNSET,
    logit_scale: float = UNSET,
    bg_threshold: float = 0.0,
    area_threshold: float | None = None,
    pamr_steps: int = 0,
    templates: str = "imagenet80",
    window_batch: int = 16,
    tokenizer: str | os.PathLike[str] | Tokenizer | None = None,
    act: str | None = None,
    download: bool = True,
    **options: Any,
) -> Segmenter:
    """Build a segmenter.

    Args:
        method: a name from :func:`ovss.available_methods` (e.g. "clearclip", "naclip", "proxyclip+gla").
        clip: CLIP weights: a registry name (default "ViT-B/16", downloaded and checksummed on first use),
            a local file in any supported format, or an already built :class:`~ovss.models.clip.CLIP`.
        vfm: the vision foundation model of DINO-guided methods (default "dino-vitb8"): a registry name,
            a local DINO / DINOv2 / Hugging Face checkpoint, or a built ViT. Ignored by CLIP-only methods.
        gla: attach GLA to the method (``load("proxyclip", gla=True)`` equals ``load("proxyclip+gla")``).
        device: where to run (default CPU). Nothing is moved behind your back.
        dtype: backbone precision: torch.float32 (default), or torch.bfloat16 / torch.float16 ("bf16", "fp16")
            to autocast the backbones' matrix products; weights stay fp32, and similarities, proxies,
            normalisation, softmax and merging always run in fp32.
        short_side: resize so the short side has this many pixels; None keeps the image size.
        crop: sliding-window side in processing pixels; 0 processes the whole image in one pass.
        stride: sliding-window stride in processing pixels.
        logit_scale: temperature of the softmax over all names (method default, spec §5.1).
        bg_threshold: pixels whose best class probability is below this get class 0 (default 0: off).
        area_threshold: SCLIP's area filter (classes >= 1 covering <= this share are dropped); None: off.
        pamr_steps: PAMR refinement iterations (0: off; NACLIP's post-processing uses 10).
        templates: prompt templates: "imagenet80" (default, every reference number), "imagenet7", "maskclip5".
        window_batch: windows per backbone forward (memory only).
        tokenizer: BPE vocabulary file or HF tokenizer folder; default: downloaded once and cached.
        act: override the MLP activation ("quick_gelu" / "gelu") for checkpoints that do not say.
        download: allow downloading weights that are not cached.
        **options: method options, e.g. ``sigma=5.0`` for naclip or ``reduced=True`` for sclip.

    Returns:
        A :class:`Segmenter`.
    """
    check_device(device)
    spec = get_method(method_name(method, gla))
    opts = resolve_options(spec, options)
    geo = spec.geometry
    config = PipelineConfig(
        short_side=geo.short_side if short_side is UNSET else short_side,
        crop=geo.crop if crop is UNSET else int(crop),
        stride=geo.stride if stride is UNSET else int(stride),
        logit_scale=spec.logit_scale if logit_scale is UNSET else float(logit_scale),
        bg_threshold=float(bg_threshold),
        area_threshold=area_threshold,
        pamr_steps=int(pamr_steps),
        templates=templates,
        window_batch=int(window_batch),
    )
    torch_dtype = resolve_dtype(dtype)
    model, record = load_clip(clip, act=act, download=download)
    model = model.to(device=device)  # weights stay fp32; reduced precision is autocast (precision.py)
    vfm_model = None
    if spec.needs_vfm:
        vfm_model, vfm_record = load_vfm(vfm, download)
        vfm_model = vfm_model.to(device=device)
        record.update(vfm_record)
    return Segmenter(
        model,
        spec,
        opts,
        config,
        vfm=vfm_model,
        tokenizer=tokenizer,
        device=device,
        dtype=torch_dtype,
        record=record,
    )
