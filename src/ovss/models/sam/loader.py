"""Loading SAM weights: the official ``sam_vit_*.pth`` state dict or a Hugging Face ``SamModel`` folder.

Both layouts are renamed to ovss's (the official names, with the encoder's ``attn.qkv`` as
``attn.in_proj_*``) and the model is built from the weight shapes (:func:`ovss.models.sam.model.build_sam`).
Hugging Face names map to official ones through one table, :data:`HF_TO_OFFICIAL`:

* ``vision_encoder.patch_embed.projection`` -> ``image_encoder.patch_embed.proj``; ``vision_encoder.layers.i``
  -> ``image_encoder.blocks.i`` (``layer_norm1/2`` -> ``norm1/2``); ``vision_encoder.neck.{conv1, layer_norm1,
  conv2, layer_norm2}`` -> ``image_encoder.neck.{0, 1, 2, 3}``
* ``shared_image_embedding.positional_embedding`` (or its tied copy ``prompt_encoder.shared_embedding.*``) ->
  ``prompt_encoder.pe_layer.positional_encoding_gaussian_matrix``; ``prompt_encoder.point_embed`` ->
  ``point_embeddings``; ``prompt_encoder.mask_embed.{conv1, layer_norm1, conv2, layer_norm2, conv3}`` ->
  ``mask_downscaling.{0, 1, 3, 4, 6}``
* ``mask_decoder.transformer.layers.i.layer_norm{1..4}`` -> ``norm{1..4}``; ``layer_norm_final_attn`` ->
  ``norm_final_attn``; ``mask_decoder.{upscale_conv1, upscale_layer_norm, upscale_conv2}`` ->
  ``output_upscaling.{0, 1, 3}``; MLP heads ``proj_in`` / ``layers.j`` / ``proj_out`` -> ``layers.0`` /
  ``layers.{j + 1}`` / ``layers.{last}``

The model always computes as the official code; a Hugging Face ``config.json`` is only checked for
settings ovss does not run (see docs/decisions.md, "SAM").
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from ovss.errors import OvssError
from ovss.models.checkpoint import folder_weights, read_checkpoint, read_json, unwrap_state_dict
from ovss.models.sam.model import SAM_DECODER_HEADS, SamModel, build_sam
from ovss.storage.hub import REGISTRY, resolve

__all__ = ["HF_TO_OFFICIAL", "convert_sam_state_dict", "load_sam", "load_sam_state_dict"]

_FIX = "supply the official sam_vit_b_01ec64.pth or a Hugging Face SAM folder with --sam PATH"
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")
_DROPPED = ("pixel_mean", "pixel_std", "prompt_encoder.shared_embedding.positional_embedding")

# Hugging Face SamModel names -> official segment-anything names (regex, replacement); first match wins.
HF_TO_OFFICIAL: tuple[tuple[str, str], ...] = (
    (r"vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"vision_encoder\.pos_embed$", "image_encoder.pos_embed"),
    (r"vision_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
    (r"vision_encoder\.layers\.(\d+)\.", r"image_encoder.blocks.\1."),
    (r"vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"shared_image_embedding\.positional_embedding$", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"prompt_encoder\.point_embed\.(\d+)\.", r"prompt_encoder.point_embeddings.\1."),
    (r"prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"prompt_encoder\.(no_mask_embed|not_a_point_embed)\.", r"prompt_encoder.\1."),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.", r"mask_decoder.transformer.layers.\1.norm\2."),
    (r"mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
    (r"mask_decoder\.transformer\.", "mask_decoder.transformer."),
    (r"mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
    (r"mask_decoder\.(iou_token|mask_tokens)\.", r"mask_decoder.\1."),
)
# Hugging Face MLP heads: proj_in, layers.j, proj_out -> official layers.0, layers.{j + 1}, layers.{last}.
_HF_MLP = re.compile(
    r"(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.(proj_in|layers\.(\d+)|proj_out)\."
)
_OFFICIAL_TO_OVSS = ((re.compile(r"(image_encoder\.blocks\.\d+\.attn)\.qkv\.(weight|bias)$"), r"\1.in_proj_\2"),)


def load_sam(name_or_path: str = "sam-vitb", *, download: bool = True) -> SamModel:
    """Load SAM by registered name (``sam-vitb``) or from a local checkpoint.

    Args:
        name_or_path: a name of ``ovss.storage.hub.available_models("sam")``, the official ``sam_vit_*.pth``
            (keys ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``), a Hugging Face ``SamModel``
            weights file, or a folder holding ``model.safetensors`` / ``pytorch_model.bin`` (and ``config.json``).
        download: allow downloading a registered checkpoint that is not cached.

    Returns:
        The model in eval mode, fp32 on the CPU. Decoder heads: the registry entry's, a Hugging Face
        config's ``mask_decoder_config.num_attention_heads``, else 8 (every released SAM).

    Raises:
        OvssError: unknown name, missing or unreadable file, or weights that do not form a SAM.
    """
    path = resolve(name_or_path, kind="sam", download=download)
    sd, config = load_sam_state_dict(path)
    entry = REGISTRY.get(name_or_path)
    heads = entry.heads[1] if entry is not None and entry.kind == "sam" and entry.heads else SAM_DECODER_HEADS
    decoder_config = config.get("mask_decoder_config")
    if isinstance(decoder_config, dict) and isinstance(decoder_config.get("num_attention_heads"), int):
        heads = decoder_config["num_attention_heads"]
    try:
        return build_sam(sd, heads)
    except (KeyError, ValueError) as e:
        reason = f"lacks {e}" if isinstance(e, KeyError) else str(e).splitlines()[0][:300]
        raise OvssError(f"SAM checkpoint {path} does not form a SAM ({reason}); {_FIX}") from e


def load_sam_state_dict(path: str | Path) -> tuple[dict[str, Tensor], dict[str, object]]:
    """Read a SAM checkpoint file or Hugging Face folder into ovss's layout.

    Returns:
        ``(state_dict, config)``: fp32-or-stored-dtype tensors keyed as :class:`SamModel` expects, and the
        Hugging Face ``config.json`` beside the weights ({} when there is none).
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise OvssError(f"SAM checkpoint {source} does not exist; check the path or {_FIX}")
    weights = folder_weights(source, _FOLDER_FILES, "SAM", _FIX) if source.is_dir() else source
    config_path = (source if source.is_dir() else source.parent) / "config.json"
    config: dict[str, object] = {}
    if config_path.is_file() and read_json(config_path).get("model_type") == "sam":
        config = read_json(config_path)
        _check_hf_config(config, config_path)
    return convert_sam_state_dict(read_checkpoint(weights, "SAM", _FIX)[0], str(source)), config


def convert_sam_state_dict(raw: object, source: str = "state dict") -> dict[str, Tensor]:
    """Unwrap an in-memory official or Hugging Face SAM state dict and rename it to ovss's layout.

    Raises:
        OvssError: not a dict of tensors, or keys of neither layout.
    """
    sd, _ = unwrap_state_dict(raw, source, "SAM", _FIX)
    if any(k.startswith("vision_encoder.") for k in sd):
        if "shared_image_embedding.positional_embedding" not in sd:  # the tied copy is the one saved
            tied = sd.get("prompt_encoder.shared_embedding.positional_embedding")
            if tied is not None:
                sd["shared_image_embedding.positional_embedding"] = tied
        sd = _from_hf(sd, source)
    sd = {k: v for k, v in sd.items() if not k.startswith(_DROPPED)}
    unknown = [k for k in sd if not k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder."))]
    if unknown or not any(k.startswith("image_encoder.") for k in sd):
        shown = ", ".join(sorted(unknown or sd)[:3])
        raise OvssError(f"SAM checkpoint {source} is not a SAM state dict (keys such as {shown}); {_FIX}")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        for pattern, replacement in _OFFICIAL_TO_OVSS:
            key = pattern.sub(replacement, key)
        out[key] = value.contiguous()
    return out


def _from_hf(sd: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Hugging Face names -> official names through :data:`HF_TO_OFFICIAL` and the MLP-head numbering."""
    hidden: dict[str, int] = {}  # hidden layers per MLP head: its last layer is layers.{hidden + 1}
    for key in sd:
        if (m := _HF_MLP.match(key)) and m[3] is not None:
            hidden[m[1]] = max(hidden.get(m[1], 0), int(m[3]) + 1)
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key.startswith(_DROPPED):
            continue
        if m := _HF_MLP.match(key):
            index = 0 if m[2] == "proj_in" else hidden.get(m[1], 0) + 1 if m[2] == "proj_out" else int(m[3]) + 1
            out[f"{m[1]}.layers.{index}.{key[m.end() :]}"] = value
            continue
        for pattern, replacement in HF_TO_OFFICIAL:
            if re.match(pattern, key):
                out[re.sub(pattern, replacement, key, count=1)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise OvssError(f"SAM checkpoint {source} has keys ovss cannot use: {', '.join(sorted(unknown)[:5])}; {_FIX}")
    return out


def _check_hf_config(config: dict[str, object], path: Path) -> None:
    """Reject Hugging Face settings the official architecture ovss runs does not have."""
    vision = config.get("vision_config")
    decoder = config.get("mask_decoder_config")
    prompt = config.get("prompt_encoder_config")
    checks = [
        (vision, "hidden_act", "gelu"),
        (vision, "use_abs_pos", True),
        (vision, "use_rel_pos", True),
        (decoder, "hidden_act", "relu"),
        (prompt, "hidden_act", "gelu"),
    ]
    for part, key, expected in checks:
        if isinstance(part, dict) and key in part and part[key] != expected:
            raise OvssError(
                f"{path}: {key} is {part[key]!r}, but ovss runs SAM as the official code ({key} = {expected!r}); {_FIX}"
            )
