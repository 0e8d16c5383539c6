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

import json
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from ovss.errors import OvssError

__all__ = ["FORMATS", "CheckpointInfo", "load_clip_state_dict", "require_text_tower"]

FORMATS = ("openai-jit", "openai", "open_clip", "hf")
_ACTS = ("quick_gelu", "gelu")
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
_FIX = "supply a ViT CLIP checkpoint (OpenAI .pt, open_clip or Hugging Face) with --clip PATH"


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`load_clip_state_dict` learned about a checkpoint besides its tensors."""

    format: str  # where the weights came from: "openai-jit", "openai", "open_clip" or "hf"
    act: str | None  # MLP activation the file declares ("quick_gelu" / "gelu"); None when it does not say
    source: str  # the file or folder that was read
    has_text: bool = True  # False for a vision-only checkpoint (only "visual.*" keys)


def load_clip_state_dict(path: str | Path) -> tuple[dict[str, Tensor], CheckpointInfo]:
    """Load a ViT CLIP checkpoint of any supported format as fp32 tensors in OpenAI's layout.

    Supported: OpenAI TorchScript archives (``ViT-B-16.pt``) and their re-saved state dicts; open_clip
    ``.bin`` / ``.safetensors`` files and training checkpoints (``{"state_dict": {"module." + key}}``);
    Hugging Face ``CLIPModel`` weights (a file, or a folder with ``config.json`` and ``model.safetensors`` or
    ``pytorch_model.bin``). Vision-only dicts (only ``visual.*``) load with ``has_text=False``. A plain
    dict is reported as ``"openai"`` when it carries OpenAI's ``input_resolution`` / ``context_length`` /
    ``vocab_size`` buffers, else as ``"open_clip"`` (the two layouts are otherwise identical).

    Args:
        path: checkpoint file, or a folder holding one.

    Returns:
        ``(state_dict, info)``: contiguous fp32 tensors keyed as in openai/CLIP (buffers such as
        ``input_resolution`` and HF ``position_ids`` dropped; ``logit_scale`` has shape ()), and a
        :class:`CheckpointInfo`. ``info.act`` is ``"quick_gelu"`` for OpenAI files, ``hidden_act`` of the HF
        ``config.json`` for HF weights, and None for open_clip files (they do not record it).

    Raises:
        OvssError: the path is missing or unreadable, holds a ResNet CLIP, lacks keys, has keys ovss
            cannot use, or a tensor has the wrong shape. The message names the file and the problem.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise OvssError(f"CLIP checkpoint {source} does not exist; check the path or {_FIX}")
    weights = _folder_weights(source) if source.is_dir() else source
    raw, container = _read(weights)
    sd, wrapped = _unwrap(raw, weights)
    had_buffers = bool(_OPENAI_BUFFERS & sd.keys())
    sd = {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in _NON_WEIGHTS}

    act: str | None
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        fmt, sd = "hf", _from_hf(sd)
        config = (source if source.is_dir() else source.parent) / "config.json"
        act = _hf_act(config) if config.is_file() else None  # the weights alone do not say
    elif container == "jit":
        fmt, act = "openai-jit", "quick_gelu"
    elif had_buffers and not wrapped and container == "pickle":
        fmt, act = "openai", "quick_gelu"
    else:
        fmt, act = "open_clip", None
        if any(k.startswith("text.") for k in sd):  # open_clip CustomTextCLIP keeps its text tower in .text
            sd = {k.removeprefix("text."): v for k, v in sd.items()}

    sd = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    has_text = _validate(sd, str(source))
    if "logit_scale" in sd:
        sd["logit_scale"] = sd["logit_scale"].reshape(())
    return sd, CheckpointInfo(format=fmt, act=act, source=str(source), has_text=has_text)


def require_text_tower(info: CheckpointInfo) -> None:
    """Raise a clear OvssError when a checkpoint cannot embed text (it has no text tower)."""
    if not info.has_text:
        raise OvssError(
            f"CLIP checkpoint {info.source} holds only vision weights (no text tower), so class names cannot "
            "be embedded; supply a full CLIP checkpoint with --clip PATH"
        )


def _folder_weights(folder: Path) -> Path:
    """The weights file inside a Hugging Face / open_clip model folder."""
    for name in _FOLDER_FILES:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise OvssError(f"CLIP folder {folder} holds a sharded checkpoint, which ovss does not read; {_FIX}")
    raise OvssError(
        f"CLIP folder {folder} holds none of {', '.join(_FOLDER_FILES)}; point --clip at the weights file "
        "or at a Hugging Face model folder"
    )


def _read(path: Path) -> tuple[object, str]:
    """Load a file's object; the second value is the container: ``jit``, ``safetensors`` or ``pickle``."""
    try:
        with warnings.catch_warnings():  # torch.jit.load is deprecated; odd pickles warn before failing
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            if _is_torchscript(path):
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict()), "jit"
            if _is_safetensors(path):
                return load_file(str(path), device="cpu"), "safetensors"
            return torch.load(path, map_location="cpu", weights_only=True), "pickle"
    except Exception as e:  # torch.load on a broken file raises anything from EOFError to KeyError
        message = str(e)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if unsafe:
            raise OvssError(
                f"CLIP checkpoint {path} stores Python objects besides tensors ({unsafe[1]}), which ovss "
                "does not unpickle; re-save only its state dict with torch.save(state_dict, path)"
            ) from e
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        reason = "not a valid pickle" if "Weights only load failed" in message else (lines or [""])[0]
        raise OvssError(
            f"CLIP checkpoint {path} could not be read ({type(e).__name__}: {reason[:200]}); the file may be "
            f"truncated or not a checkpoint: download it again or {_FIX}"
        ) from e


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold ``code/`` and ``constants.pkl``; ``torch.save`` zips hold neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length followed by a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") < path.stat().st_size


def _unwrap(obj: object, path: Path) -> tuple[dict[str, Tensor], bool]:
    """Descend ``state_dict`` / ``model`` wrappers and strip ``module.`` prefixes; True if wrapped."""
    wrapped = False
    while isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj, wrapped = inner, True
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise OvssError(
            f"CLIP checkpoint {path} holds a {type(obj).__name__}, not a state dict of tensors; {_FIX}"
        )
    sd: dict[str, Tensor] = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, Tensor):
            for prefix in ("module.", "_orig_mod."):
                if key.startswith(prefix):
                    key, wrapped = key[len(prefix) :], True
            sd[key] = value
    return sd, wrapped


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
        if set(parts) == {"q", "k", "v"}:
            name = "attn.in_proj_weight" if kind == "weight" else "attn.in_proj_bias"
            out[block + name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3D, D) or (3D,)
        else:
            out.update({f"{block}self_attn.{p}_proj.{kind}": t for p, t in parts.items()})
    return out


def _hf_act(config_path: Path) -> str | None:
    """``hidden_act`` of a Hugging Face CLIP ``config.json`` (transformers' default is quick_gelu).

    None when the JSON is not a CLIP config (no tower configs and no ``clip*`` model_type).
    """
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise OvssError(f"{config_path} is not valid JSON ({e}); fix or delete the file") from e
    towers = {t: config[t] for t in ("vision_config", "text_config") if isinstance(config.get(t), dict)}
    if not towers and str(config.get("model_type", "")).startswith("clip"):
        towers = {"config": config}  # a standalone CLIPVisionConfig / CLIPTextConfig
    acts = {tower: cfg.get("hidden_act", "quick_gelu") for tower, cfg in towers.items()}
    act = next(iter(acts.values()), None)
    for tower, value in acts.items():
        if value not in _ACTS or value != act:
            raise OvssError(
                f"{config_path}: {tower}.hidden_act is {value!r}; ovss supports 'quick_gelu' or 'gelu', "
                "the same in both towers"
            )
    return act


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
    widths = {"vision": width}
    if has_text:
        text_width = _shape(sd, "ln_final.weight", 1, source)[0]
        vocab = _shape(sd, "token_embedding.weight", 2, source)[0]
        context = _shape(sd, "positional_embedding", 2, source)[0]
        widths["text"] = text_width
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
    for tower, w in widths.items():
        if w % 64:
            raise _error(
                source, f"the {tower} width {w} is not a multiple of 64 (CLIP uses width // 64 heads)"
            )
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
