"""Architecture facts the weights cannot tell, read from the config files that ship beside them.

Hugging Face folders carry ``config.json`` (``hidden_act``, ``num_attention_heads``, ``hidden_size`` per
tower) and ``preprocessor_config.json`` (``image_mean`` / ``image_std``); OpenCLIP ships a model config
(``ViT-H-14.json``: ``vision_cfg.width / heads / head_width``, ``text_cfg.heads``) or, on the hub, an
``open_clip_config.json`` nesting it under ``model_cfg`` beside ``preprocess_cfg.mean / std``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ovss.errors import OvssError
from ovss.models.checkpoint import read_json
from ovss.models.normalization import InputNorm, input_norm_from_config

__all__ = ["ACTIVATIONS", "declared_architecture", "hf_heads"]

ACTIVATIONS = ("quick_gelu", "gelu")


def declared_architecture(folder: Path, weights: Path, fmt: str) -> dict[str, Any]:
    """What the configs beside a CLIP checkpoint say.

    Args:
        folder: the model folder, or the folder holding the weights file.
        weights: the weights file that was read.
        fmt: its detected format; the HF ``config.json`` is read for ``"hf"`` only, OpenCLIP configs for
            ``"open_clip"`` / ``"openai"``.

    Returns:
        Any of ``act``, ``vision_heads``, ``text_heads``, ``vision_width``, ``text_width``, ``input_norm``
        (:class:`InputNorm`), and ``configs`` (the files read).

    Raises:
        OvssError: a config is not valid JSON or holds a malformed value.
    """
    out: dict[str, Any] = {"configs": []}
    hf_config = folder / "config.json"
    if fmt == "hf" and hf_config.is_file():
        out["configs"].append(str(hf_config))
        out.update(_hf_config(hf_config))
    open_clip = [folder / "open_clip_config.json"]
    if weights.suffix != ".json":
        open_clip.append(weights.with_suffix(".json"))
    for path in open_clip:
        if fmt in ("open_clip", "openai") and path.is_file() and path != hf_config:
            out["configs"].append(str(path))
            out.update(_open_clip_config(path))
            break
    preprocessor = folder / "preprocessor_config.json"
    if "input_norm" not in out and preprocessor.is_file():
        out["configs"].append(str(preprocessor))
        norm = _norm(read_json(preprocessor), preprocessor)
        if norm is not None:
            out["input_norm"] = norm
    return out


def _norm(config: dict[str, Any], path: Path) -> InputNorm | None:
    try:
        return input_norm_from_config(config, str(path))
    except ValueError as e:
        raise OvssError(f"{e}; fix or delete the file") from e


def _positive_int(value: object, where: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OvssError(f"{path}: {where} must be a positive integer, got {value!r}; fix or delete the file")
    return value


def _hf_config(path: Path) -> dict[str, Any]:
    """``hidden_act`` (transformers' default quick_gelu) and ``num_attention_heads`` of a HF CLIP config.

    A config with neither tower config nor a ``clip*`` model_type (not a CLIP config) declares nothing.
    """
    config = read_json(path)
    towers = {t: config[t] for t in ("vision_config", "text_config") if isinstance(config.get(t), dict)}
    if not towers and str(config.get("model_type", "")).startswith("clip"):
        tower = "text_config" if "text" in str(config["model_type"]) else "vision_config"
        towers = {tower: config}  # a standalone CLIPVisionConfig / CLIPTextConfig
    out: dict[str, Any] = {}
    acts = {tower: cfg.get("hidden_act", "quick_gelu") for tower, cfg in towers.items()}
    act = next(iter(acts.values()), None)
    for tower, value in acts.items():
        if value not in ACTIVATIONS or value != act:
            raise OvssError(
                f"{path}: {tower}.hidden_act is {value!r}; ovss supports 'quick_gelu' or 'gelu', "
                "the same in both towers"
            )
    out["act"] = act
    for tower, key in (("vision_config", "vision"), ("text_config", "text")):
        cfg = towers.get(tower)
        if cfg is not None and "num_attention_heads" in cfg:
            out[f"{key}_heads"] = _positive_int(cfg["num_attention_heads"], f"{tower}.num_attention_heads", path)
        if cfg is not None and "hidden_size" in cfg:
            out[f"{key}_width"] = _positive_int(cfg["hidden_size"], f"{tower}.hidden_size", path)
    return out


def _open_clip_config(path: Path) -> dict[str, Any]:
    """Heads and input statistics of an OpenCLIP model config (``ViT-H-14.json``) or hub config.

    ``vision_cfg.heads``, else ``vision_cfg.width // vision_cfg.head_width`` (open_clip's default head
    width is 64); ``text_cfg.heads`` (open_clip's default is 8). A hub ``open_clip_config.json`` nests
    both under ``model_cfg``.
    """
    config = read_json(path)
    model_cfg = config["model_cfg"] if isinstance(config.get("model_cfg"), dict) else config
    out: dict[str, Any] = {}
    vision = model_cfg.get("vision_cfg")
    if isinstance(vision, dict):
        if "width" in vision:
            out["vision_width"] = _positive_int(vision["width"], "vision_cfg.width", path)
        if "heads" in vision:
            out["vision_heads"] = _positive_int(vision["heads"], "vision_cfg.heads", path)
        elif "width" in vision:
            head_width = _positive_int(vision.get("head_width", 64), "vision_cfg.head_width", path)
            if out["vision_width"] % head_width:
                raise OvssError(
                    f"{path}: vision_cfg.width {out['vision_width']} is not a multiple of head_width "
                    f"{head_width}; fix or delete the file"
                )
            out["vision_heads"] = out["vision_width"] // head_width
    text = model_cfg.get("text_cfg")
    if isinstance(text, dict):
        if "width" in text:
            out["text_width"] = _positive_int(text["width"], "text_cfg.width", path)
        out["text_heads"] = _positive_int(text.get("heads", 8), "text_cfg.heads", path)
    if isinstance(config.get("model_cfg"), dict) and "quick_gelu" in config["model_cfg"]:
        out["act"] = "quick_gelu" if config["model_cfg"]["quick_gelu"] else "gelu"
    elif "quick_gelu" in config:
        out["act"] = "quick_gelu" if config["quick_gelu"] else "gelu"
    norm = _norm(config, path)
    if norm is not None:
        out["input_norm"] = norm
    return out


def hf_heads(path: Path) -> int | None:
    """``num_attention_heads`` of a single-tower Hugging Face config (ViT / Dinov2); None when absent."""
    config = read_json(path)
    if "num_attention_heads" not in config:
        return None
    return _positive_int(config["num_attention_heads"], "num_attention_heads", path)
