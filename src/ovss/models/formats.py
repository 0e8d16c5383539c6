"""Read CLIP checkpoints (OpenAI, open_clip, Hugging Face) into OpenAI's key layout.

Every format ends up as the state dict of openai/CLIP's ``clip/model.py`` (ViT variant), so the model
is built from one layout only: ``visual.conv1.weight`` (D, 3, p, p), ``visual.class_embedding`` (D,),
``visual.positional_embedding`` (1 + G², D), ``visual.ln_pre.*``, ``visual.transformer.resblocks.{i}.*``,
``visual.ln_post.*``, ``visual.proj`` (D, E); text: ``token_embedding.weight`` (V, W),
``positional_embedding`` (C, W), ``transformer.resblocks.{i}.*``, ``ln_final.*``, ``text_projection``
(W, E), ``logit_scale`` (). A block holds ``ln_1``, ``attn.in_proj_weight`` (3D, D), ``attn.in_proj_bias``,
``attn.out_proj``, ``ln_2``, ``mlp.c_fc`` (H, D) and ``mlp.c_proj`` (D, H).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ovss.errors import OvssError
from ovss.models.checkpoint import folder_weights, join_qkv, read_checkpoint, unwrap_state_dict
from ovss.models.configs import declared_architecture
from ovss.models.normalization import InputNorm

__all__ = ["FORMATS", "CheckpointInfo", "load_clip_state_dict", "require_text_tower"]

FORMATS = ("openai-jit", "openai", "open_clip", "hf")
# Entries that are not weights: OpenAI's scalar buffers, HF position ids, masks, SigLIP's bias.
_NON_WEIGHTS = {"input_resolution", "context_length", "vocab_size", "position_ids", "attn_mask", "logit_bias"}
_OPENAI_BUFFERS = {"input_resolution", "context_length", "vocab_size"}
# Weight files looked for, in order, when a folder is given.
_FOLDER_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
_BLOCK = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)
# The config of an OpenCLIP Hub repository (laion/CLIP-ViT-B-16-laion2B-s34B-b88K): its model_cfg is the
# whole model definition, so a missing "quick_gelu" means open_clip's default activation, nn.GELU.
_OPEN_CLIP_HUB_CONFIG = "open_clip_config.json"
_FIX = "supply a ViT CLIP checkpoint (OpenAI .pt, open_clip or Hugging Face) with --clip PATH"


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`load_clip_state_dict` learned about a checkpoint besides its tensors."""

    format: str  # where the weights came from: "openai-jit", "openai", "open_clip" or "hf"
    act: str | None  # MLP activation the file declares ("quick_gelu" / "gelu"); None when it does not say
    source: str  # the file or folder that was read
    has_text: bool = True  # False for a vision-only checkpoint (only "visual.*" keys)
    vision_heads: int | None = None  # attention heads of the image tower a config declares; None: unsaid
    text_heads: int | None = None  # attention heads of the text tower a config declares; None: unsaid
    input_norm: InputNorm | None = None  # RGB statistics a config declares; None: unsaid
    configs: tuple[str, ...] = ()  # the config files beside the weights that were read


def load_clip_state_dict(path: str | Path) -> tuple[dict[str, Tensor], CheckpointInfo]:
    """Load a ViT CLIP checkpoint of any supported format as fp32 tensors in OpenAI's layout.

    Supported: OpenAI TorchScript archives (``ViT-B-16.pt``) and their re-saved state dicts; open_clip
    ``.bin`` / ``.safetensors`` files and training checkpoints (``{"state_dict": {"module." + key}}``);
    Hugging Face ``CLIPModel`` weights (a file, or a folder with ``config.json`` and ``model.safetensors`` or
    ``pytorch_model.bin``). Vision-only dicts (only ``visual.*``) load with ``has_text=False``. A plain
    dict is reported as ``"openai"`` when it carries OpenAI's ``input_resolution`` / ``context_length`` /
    ``vocab_size`` buffers, else as ``"open_clip"`` (the two layouts are otherwise identical).

    Configs beside the weights are read for what the tensors cannot say: the Hugging Face ``config.json``
    (``hidden_act``, ``num_attention_heads`` of each tower) and ``preprocessor_config.json``
    (``image_mean`` / ``image_std``); an OpenCLIP ``open_clip_config.json`` or ``<weights stem>.json``
    (``vision_cfg.heads`` / ``width // head_width``, ``text_cfg.heads``, ``preprocess_cfg.mean/std``).

    Args:
        path: checkpoint file, or a folder holding one.

    Returns:
        ``(state_dict, info)``: contiguous fp32 tensors keyed as in openai/CLIP (buffers such as
        ``input_resolution`` and HF ``position_ids`` dropped; ``logit_scale`` has shape ()), and a
        :class:`CheckpointInfo`. ``info.act`` is ``"quick_gelu"`` for OpenAI files, ``hidden_act`` of the HF
        ``config.json`` for HF weights; for open_clip files the ``quick_gelu`` of a config beside them, ``"gelu"``
        when an ``open_clip_config.json`` leaves it out (open_clip's default), else None (not recorded).

    Raises:
        OvssError: the path is missing or unreadable, holds a ResNet CLIP, lacks keys, has keys ovss
            cannot use, a tensor has the wrong shape, or a config beside it is malformed or disagrees
            with the weights. The message names the file and the problem.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise OvssError(f"CLIP checkpoint {source} does not exist; check the path or {_FIX}")
    weights = folder_weights(source, _FOLDER_FILES, "CLIP", _FIX) if source.is_dir() else source
    raw, container = read_checkpoint(weights, "CLIP", _FIX)
    sd, wrapped = unwrap_state_dict(raw, str(weights), "CLIP", _FIX)
    had_buffers = bool(_OPENAI_BUFFERS & sd.keys())
    sd = {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in _NON_WEIGHTS}

    folder = source if source.is_dir() else source.parent
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        fmt, sd = "hf", _from_hf(sd)
    elif container == "jit":
        fmt = "openai-jit"
    elif had_buffers and not wrapped and container == "pickle":
        fmt = "openai"
    else:
        fmt = "open_clip"
        if any(k.startswith("text.") for k in sd):  # open_clip CustomTextCLIP keeps its text tower in .text
            sd = {k.removeprefix("text."): v for k, v in sd.items()}
    declared = declared_architecture(folder, weights, fmt)
    act = "quick_gelu" if fmt in ("openai-jit", "openai") else declared.get("act")
    if act is None and fmt == "open_clip" and any(Path(c).name == _OPEN_CLIP_HUB_CONFIG for c in declared["configs"]):
        act = "gelu"  # open_clip builds nn.GELU unless model_cfg.quick_gelu is true (LAION hub repositories)

    sd = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    has_text = _validate(sd, str(source))
    if "logit_scale" in sd:
        sd["logit_scale"] = sd["logit_scale"].reshape(())
    info = CheckpointInfo(
        format=fmt,
        act=act,
        source=str(source),
        has_text=has_text,
        vision_heads=declared.get("vision_heads"),
        text_heads=declared.get("text_heads") if has_text else None,
        input_norm=declared.get("input_norm"),
        configs=tuple(declared.get("configs", ())),
    )
    _check_declared_widths(sd, declared, info)
    return sd, info


def require_text_tower(info: CheckpointInfo) -> None:
    """Raise a clear OvssError when a checkpoint cannot embed text (it has no text tower)."""
    if not info.has_text:
        raise OvssError(
            f"CLIP checkpoint {info.source} holds only vision weights (no text tower), so class names cannot "
            "be embedded; supply a full CLIP checkpoint with --clip PATH"
        )


# Hugging Face names -> OpenAI names: whole keys, then prefixes (checked in order), then inside a block.
_HF_KEYS = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
}
_HF_PREFIXES = (
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),
    ("vision_model.pre_layernorm.", "visual.ln_pre."),
    ("vision_model.post_layernorm.", "visual.ln_post."),
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("text_model.final_layer_norm.", "ln_final."),
)
_HF_BLOCK = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("self_attn.out_proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)
_HF_QKV = re.compile(r"^(.*resblocks\.\d+\.)self_attn\.([qkv])_proj\.(weight|bias)$")


def _from_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename Hugging Face ``CLIPModel`` keys to OpenAI's, joining q/k/v and transposing projections."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key in ("visual_projection.weight", "text_projection.weight"):
            name = "visual.proj" if key.startswith("visual") else "text_projection"
            out[name] = value.t()  # (E, D) -> (D, E)
            continue
        new = _HF_KEYS.get(key, key)
        for old, rep in _HF_PREFIXES:
            if new.startswith(old):
                new = rep + new[len(old) :]
                break
        for old, rep in _HF_BLOCK:
            new = new.replace("." + old, "." + rep)
        match = _HF_QKV.match(new)
        if match:
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
        else:
            out[new] = value
    for (block, kind), parts in qkv.items():
        joined = join_qkv(parts, ("q", "k", "v"))  # (3D, D) or (3D,)
        if joined is not None:
            name = "attn.in_proj_weight" if kind == "weight" else "attn.in_proj_bias"
            out[block + name] = joined
        else:  # left under its HF name: reported as an unexpected key
            out.update({f"{block}self_attn.{p}_proj.{kind}": t for p, t in parts.items()})
    return out


def _check_declared_widths(sd: dict[str, Tensor], declared: dict[str, Any], info: CheckpointInfo) -> None:
    """A config's widths must be the weights' widths (else it describes another model)."""
    widths = {"vision": sd["visual.conv1.weight"].shape[0]}
    if info.has_text:
        widths["text"] = sd["ln_final.weight"].shape[0]
    for tower, width in widths.items():
        said = declared.get(f"{tower}_width")
        if said is not None and said != width:
            raise _error(
                info.source,
                f"{', '.join(info.configs)} gives the {tower} width as {said} but the weights have {width}",
            )
    for tower, heads in (("vision", info.vision_heads), ("text", info.text_heads)):
        if heads is not None and tower in widths and widths[tower] % heads:
            raise _error(
                info.source,
                f"{', '.join(info.configs)} gives {heads} {tower} heads, which do not divide the width "
                f"{widths[tower]}",
            )


def _error(source: str, problem: str) -> OvssError:
    """The one-line error for a checkpoint whose keys or shapes are wrong."""
    return OvssError(f"CLIP checkpoint {source}: {problem}; {_FIX}")


def _validate(sd: dict[str, Tensor], source: str) -> bool:
    """Check keys and shapes against the OpenAI ViT layout; return whether a text tower is present."""
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
        raise _error(
            source, "it is a ResNet CLIP (visual.layer1..., visual.attnpool...); ovss runs ViT CLIP only"
        )
    if not any(k.startswith("visual.") for k in sd):
        raise _error(source, f"no vision tower ('visual.*' keys); its keys start {sorted(sd)[:3]}")
    vision_layers = _count_blocks(sd, "visual.transformer.resblocks.", source)
    expected = {f"visual.{n}" for n in ("conv1.weight", "class_embedding", "positional_embedding", "proj")}
    expected |= {f"visual.{ln}.{p}" for ln in ("ln_pre", "ln_post") for p in ("weight", "bias")}
    expected |= {f"visual.transformer.resblocks.{i}.{b}" for i in range(vision_layers) for b in _BLOCK}
    has_text = any(not k.startswith("visual.") and k != "logit_scale" for k in sd)
    text_layers = _count_blocks(sd, "transformer.resblocks.", source) if has_text else 0
    if has_text:
        expected |= {"token_embedding.weight", "positional_embedding", "text_projection", "logit_scale"}
        expected |= {"ln_final.weight", "ln_final.bias"}
        expected |= {f"transformer.resblocks.{i}.{b}" for i in range(text_layers) for b in _BLOCK}
    elif "logit_scale" in sd:
        expected.add("logit_scale")
    missing = sorted(expected - sd.keys())
    if missing:
        what = (
            "the text tower is incomplete" if not any(k.startswith("visual.") for k in missing) else "missing"
        )
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise _error(source, f"{what}: {', '.join(missing[:5])}{more}")
    unexpected = sorted(sd.keys() - expected)
    if unexpected:
        raise _error(source, f"unexpected keys ovss cannot use: {', '.join(unexpected[:5])}")

    conv = _shape(sd, "visual.conv1.weight", 4, source)
    width, patch = conv[0], conv[-1]
    if conv[1:] != (3, patch, patch):
        raise _error(source, f"'visual.conv1.weight' has shape {conv}, expected (D, 3, p, p)")
    positions = _shape(sd, "visual.positional_embedding", 2, source)[0]
    if positions < 2 or round((positions - 1) ** 0.5) ** 2 != positions - 1:
        raise _error(source, f"'visual.positional_embedding' has {positions} rows, expected 1 + G*G")
    embed_dim = _shape(sd, "visual.proj", 2, source)[1]
    shapes = {
        "visual.class_embedding": (width,),
        "visual.positional_embedding": (positions, width),
        "visual.proj": (width, embed_dim),
        **{f"visual.{ln}.{p}": (width,) for ln in ("ln_pre", "ln_post") for p in ("weight", "bias")},
        **_block_shapes(sd, "visual.transformer.resblocks.", vision_layers, width, source),
    }
    if has_text:
        text_width = _shape(sd, "ln_final.weight", 1, source)[0]
        vocab = _shape(sd, "token_embedding.weight", 2, source)[0]
        context = _shape(sd, "positional_embedding", 2, source)[0]
        shapes["token_embedding.weight"] = (vocab, text_width)
        shapes["positional_embedding"] = (context, text_width)
        shapes["ln_final.bias"] = (text_width,)
        shapes["text_projection"] = (text_width, embed_dim)
        shapes.update(_block_shapes(sd, "transformer.resblocks.", text_layers, text_width, source))
    for key, shape in shapes.items():
        if tuple(sd[key].shape) != shape:
            raise _error(source, f"'{key}' has shape {tuple(sd[key].shape)}, expected {shape}")
    if "logit_scale" in sd and sd["logit_scale"].numel() != 1:
        raise _error(source, f"'logit_scale' has shape {tuple(sd['logit_scale'].shape)}, expected a scalar")
    return has_text


def _count_blocks(sd: dict[str, Tensor], prefix: str, source: str) -> int:
    """Number of blocks ``prefix{i}.*`` (a gap in the indices shows up later as missing keys)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m[1]) for k in sd if (m := pattern.match(k))}
    if not indices:
        raise _error(source, f"no transformer blocks ('{prefix}0.*' keys)")
    return max(indices) + 1


def _shape(sd: dict[str, Tensor], key: str, ndim: int, source: str) -> tuple[int, ...]:
    """Shape of ``sd[key]``, which must have ``ndim`` dimensions."""
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise _error(source, f"'{key}' has shape {shape}, expected {ndim} dimensions")
    return shape


def _block_shapes(
    sd: dict[str, Tensor], prefix: str, layers: int, width: int, source: str
) -> dict[str, tuple[int, ...]]:
    """Expected shape of every key of ``layers`` residual attention blocks of width D (MLP width H)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        p = f"{prefix}{i}."
        hidden = _shape(sd, p + "mlp.c_fc.weight", 2, source)[0]
        shapes.update({p + n: (width,) for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")})
        shapes[p + "attn.in_proj_weight"] = (3 * width, width)
        shapes[p + "attn.in_proj_bias"] = (3 * width,)
        shapes[p + "attn.out_proj.weight"] = (width, width)
        shapes[p + "attn.out_proj.bias"] = (width,)
        shapes[p + "mlp.c_fc.weight"] = (hidden, width)
        shapes[p + "mlp.c_fc.bias"] = (hidden,)
        shapes[p + "mlp.c_proj.weight"] = (width, hidden)
        shapes[p + "mlp.c_proj.bias"] = (width,)
    return shapes
