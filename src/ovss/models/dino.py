"""Self-supervised ViTs (DINO, DINOv2, DINOv3, Hugging Face ViT / Dinov2 / DINOv3) read into the one ViT.

Every checkpoint layout is renamed to the OpenAI layout of :mod:`ovss.models.vit` and the model is built
from the weight shapes by :func:`build_vit` (``nn.GELU``, LayerNorm eps 1e-6, no ``ln_pre``, no projection;
DINO's final ``norm`` becomes ``ln_post``). Names as ``dino / dinov2`` -> ``Hugging Face`` -> ``ovss``:

* ``cls_token`` (1, 1, D) -> ``embeddings.cls_token`` -> ``class_embedding`` (D,)
* ``pos_embed`` (1, 1 + G², D) -> ``embeddings.position_embeddings`` -> ``positional_embedding`` (1 + G², D)
* ``patch_embed.proj`` -> ``embeddings.patch_embeddings.projection`` -> ``conv1`` (weight and bias)
* ``register_tokens`` (1, R, D) -> ``embeddings.register_tokens`` -> ``register_tokens`` (R, D)
* ``blocks.i.norm1`` / ``norm2`` -> ``encoder.layer.i.layernorm_before`` / ``layernorm_after`` (ViT) or
  ``norm1`` / ``norm2`` (Dinov2) -> ``transformer.resblocks.i.ln_1`` / ``ln_2``
* ``attn.qkv`` (3D, D) -> ``attention.attention.{query,key,value}`` (D, D) each -> ``attn.in_proj_*``
* ``attn.proj`` -> ``attention.output.dense`` -> ``attn.out_proj``
* ``mlp.fc1`` / ``mlp.fc2`` -> ``intermediate.dense`` / ``output.dense`` (ViT) or ``mlp.fc1`` / ``mlp.fc2``
  (Dinov2) -> ``mlp.c_fc`` / ``mlp.c_proj``
* ``ls1.gamma`` / ``ls2.gamma`` -> ``layer_scale1.lambda1`` / ``layer_scale2.lambda1`` -> ``ls_1.gamma`` /
  ``ls_2.gamma``
* ``norm`` -> ``layernorm`` -> ``ln_post``

``mask_token``, DINO's projection ``head.*`` and HF's ``pooler`` / ``classifier`` are dropped. Position
tables are interpolated as the original releases do (spec §2.4): DINO and DINOv2 with scale factors
``(g + 0.1) / G``; DINOv2 with registers (``dinov2_*_reg`` hub models) with the output size and
anti-aliasing. Hugging Face weights are run like their original release. DINOv3 (spec §4.7.1) is first
renamed to the dinov2 layout by :mod:`ovss.models.dinov3`; it has RoPE instead of a position table and
LayerNorm eps 1e-5.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from torch import Tensor

from ovss.errors import OvssError
from ovss.models.checkpoint import folder_weights, join_qkv, read_checkpoint, read_json, unwrap_state_dict
from ovss.models.configs import hf_heads
from ovss.models.dinov3 import DINOV3_FORMATS, dinov3_format, dinov3_to_dino_layout
from ovss.models.normalization import IMAGENET_MEAN, IMAGENET_STD, InputNorm
from ovss.models.rope import ROPE_BASE, rope_periods
from ovss.models.vit import VisionTransformer
from ovss.models.vit_build import build_vit, resolve_heads
from ovss.storage.hub import REGISTRY, resolve

__all__ = ["VFM_FORMATS", "build_vfm", "convert_vfm_state_dict", "load_vfm", "load_vfm_state_dict"]

VFM_FORMATS = ("dino", "dinov2", "hf-vit", "hf-dinov2", *DINOV3_FORMATS)
_FIX = "supply a DINO / DINOv2 / DINOv3 ViT checkpoint (.pth, .safetensors or a Hugging Face folder) with --vfm PATH"
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")
_WRAPPERS = ("teacher", "state_dict", "model", "student")  # DINO eval code reads "teacher" first
_MODEL_PREFIXES = ("backbone.", "dinov2_with_registers.", "dinov2.", "vit.")  # DINO heads, HF task models
_DROPPED = ("mask_token", "embeddings.mask_token", "head.", "pooler.", "classifier.")

# Original (dino / dinov2) names inside a block -> OpenAI names.
_BLOCK = {
    "norm1": "ln_1",
    "attn.qkv.weight": "attn.in_proj_weight",
    "attn.qkv.bias": "attn.in_proj_bias",
    "attn.proj": "attn.out_proj",
    "norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "ls1.gamma": "ls_1.gamma",
    "ls2.gamma": "ls_2.gamma",
}
# Hugging Face names inside ``encoder.layer.i.`` -> OpenAI names (checked in order: ``attention.output``
# before the MLP's ``output``). ViT and Dinov2 differ only in the norm and MLP names.
_HF_BLOCK = (
    ("attention.output.dense", "attn.out_proj"),
    ("layernorm_before", "ln_1"),
    ("layernorm_after", "ln_2"),
    ("intermediate.dense", "mlp.c_fc"),
    ("output.dense", "mlp.c_proj"),
    ("norm1", "ln_1"),
    ("norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("layer_scale1.lambda1", "ls_1.gamma"),
    ("layer_scale2.lambda1", "ls_2.gamma"),
)
_HF_QKV = re.compile(r"^attention\.attention\.(query|key|value)\.(weight|bias)$")
_SWIGLU = re.compile(r"\.mlp\.(w12|w3|weights_in|weights_out)\.")


def load_vfm(name_or_path: str, *, download: bool = True) -> tuple[VisionTransformer, dict[str, str]]:
    """Load a DINO-family ViT by registered name (``dino-vitb8`` ...) or from a local file or folder.

    Args:
        name_or_path: a name of ``ovss.storage.hub.available_models("vfm")`` or a checkpoint path: a DINO / DINOv2
            ``*_pretrain.pth`` (also training checkpoints wrapped in ``teacher`` / ``state_dict`` with
            ``module.`` / ``backbone.`` prefixes), a Hugging Face ViT / Dinov2 weights file, or a folder
            holding ``model.safetensors`` or ``pytorch_model.bin`` (and ``config.json``).
        download: allow downloading a registered checkpoint that is not cached.

    Returns:
        ``(model, record)``: the frozen model in eval mode, fp32 on CPU; ``record`` has ``name`` (as given),
        ``path`` (the file or folder read) and ``format`` (one of :data:`VFM_FORMATS`). The attention heads
        come from the registry entry, a Hugging Face ``config.json`` beside the weights, else width // 64.

    Raises:
        OvssError: unknown name, missing file, unreadable file, or keys / shapes of no supported layout.
    """
    path = resolve(name_or_path, kind="vfm", download=download)
    state_dict, fmt = load_vfm_state_dict(path)
    entry = REGISTRY.get(name_or_path)
    heads = entry.heads[0] if entry is not None and entry.kind == "vfm" and entry.heads else None
    config = (path if path.is_dir() else path.parent) / "config.json"
    if heads is None and fmt.startswith("hf-") and config.is_file():
        heads = hf_heads(config)
    model = build_vfm(state_dict, fmt, source=str(path), heads=heads)
    return model, {"name": name_or_path, "path": str(path), "format": fmt}


def position_record(vit: VisionTransformer) -> str:
    """How a VFM's position table is resized to other grids, for the resolved config (spec §2.4)."""
    if vit.cfg.rope:
        return "RoPE on the patches' q/k from their normalised grid coordinates (no position table, any grid as is)"
    if vit.cfg.pos_offset == 0.0:
        how = f"bicubic to the output size, antialias={vit.cfg.pos_antialias}"
    else:
        how = f"bicubic with scale factors (g + {vit.cfg.pos_offset}) / {vit.cfg.grid}"
    return (
        f"original-release interpolation ({how}); differs from Hugging Face's own forward (up to ~0.03) "
        "at grids other than the pretrained one"
    )


def load_vfm_state_dict(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """Read a VFM checkpoint file or Hugging Face folder into the OpenAI layout.

    Returns:
        ``(state_dict, format)``: contiguous fp32 tensors keyed as :class:`VisionTransformer` expects, and
        the detected format (one of :data:`VFM_FORMATS`).
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise OvssError(f"VFM checkpoint {source} does not exist; check the path or {_FIX}")
    if source.is_dir():
        weights = folder_weights(source, _FOLDER_FILES, "VFM", _FIX)
        if (source / "config.json").is_file():
            _check_hf_config(source / "config.json")
    else:
        weights = source
    return convert_vfm_state_dict(read_checkpoint(weights, "VFM", _FIX)[0], source=str(source))


def convert_vfm_state_dict(raw: object, source: str = "state dict") -> tuple[dict[str, Tensor], str]:
    """Unwrap, rename and re-shape an in-memory DINO / DINOv2 / Hugging Face state dict.

    Args:
        raw: what ``torch.load`` returned: a state dict, or a dict wrapping one under ``teacher``,
            ``state_dict``, ``model`` or ``student``; keys may carry ``module.`` / ``backbone.`` prefixes.
        source: name of the checkpoint for error messages.

    Returns:
        ``(state_dict, format)`` as :func:`load_vfm_state_dict`.
    """
    sd = _unwrap(raw, source)
    if any(_SWIGLU.search("." + k) for k in sd):
        raise OvssError(f"VFM checkpoint {source} uses a SwiGLU MLP (ViT-g), which ovss does not run; {_FIX}")
    if fmt3 := dinov3_format(sd):
        out = _from_original(dinov3_to_dino_layout(sd, source)[0], source)
        fmt = fmt3
    elif "patch_embed.proj.weight" in sd:
        out = _from_original(sd, source)
        fmt = "dinov2" if _is_dinov2(out) else "dino"
    elif "embeddings.patch_embeddings.projection.weight" in sd:
        out = _from_hf(sd, source)
        fmt = "hf-dinov2" if _is_dinov2(out) else "hf-vit"
    elif any(k.startswith(("visual.", "vision_model.")) for k in sd):
        raise OvssError(f"{source} is a CLIP checkpoint, not a VFM; pass it with --clip and {_FIX}")
    else:
        raise OvssError(f"VFM checkpoint {source} has no known layout (its keys start {sorted(sd)[:3]}); {_FIX}")
    return {k: v.float().contiguous() for k, v in out.items()}, fmt


def build_vfm(
    state_dict: dict[str, Tensor], fmt: str, source: str = "state dict", heads: int | None = None
) -> VisionTransformer:
    """Build the frozen :class:`VisionTransformer` of a converted VFM state dict.

    Args:
        state_dict: OpenAI-layout tensors from :func:`convert_vfm_state_dict`.
        fmt: its format; DINOv2 with registers interpolates positions with offset 0 and anti-aliasing,
            DINOv3 has RoPE (periods computed from the heads when the checkpoint stores none) and
            LayerNorm eps 1e-5, every other format offset 0.1 and no anti-aliasing (the original releases).
        source: name of the checkpoint for error messages.
        heads: attention heads declared by a config or registry entry; None: DINOv3's stored RoPE periods
            (d / 4 of them), else width // 64.

    Returns:
        The model in eval mode with gradients disabled (GELU MLP, LayerNorm eps 1e-6; DINOv3 1e-5), with
        ImageNet ``input_norm``.
    """
    if fmt not in VFM_FORMATS:
        raise OvssError(f"unknown VFM format {fmt!r}; use one of {', '.join(VFM_FORMATS)}")
    dinov3 = fmt in DINOV3_FORMATS
    _validate(state_dict, source, rope=dinov3)
    width = state_dict["conv1.weight"].shape[0]
    if heads is None and "rope_periods" in state_dict:  # original DINOv3: d / 4 periods give the head width
        heads = max(width // (4 * state_dict["rope_periods"].numel()), 1)
    heads = resolve_heads(width, heads, f"VFM checkpoint {source}")
    if dinov3 and "rope_periods" not in state_dict:  # Hugging Face stores none: 100 ** (4 j / d)
        state_dict = {**state_dict, "rope_periods": rope_periods(width // heads, ROPE_BASE)}  # (d/4,)
    with_registers = fmt in ("dinov2", "hf-dinov2") and "register_tokens" in state_dict
    try:
        model = build_vit(
            state_dict,
            heads=heads,
            act="gelu",
            eps=1e-5 if dinov3 else 1e-6,
            pos_offset=0.0 if with_registers else 0.1,
            pos_antialias=with_registers,
        )
    except (RuntimeError, ValueError, KeyError) as e:
        reason = " ".join(str(e).split())[:300]
        raise OvssError(f"VFM checkpoint {source} does not fit a ViT ({reason}); {_FIX}") from e
    model.input_norm = InputNorm(IMAGENET_MEAN, IMAGENET_STD, "ImageNet (DINO / DINOv2)")
    return model


def _check_hf_config(config: Path) -> None:
    """A Hugging Face ``config.json`` beside the weights must declare the exact GELU MLP (and DINOv3's RoPE)."""
    values = read_json(config)
    act = values.get("hidden_act", "gelu")
    if act != "gelu":
        raise OvssError(f"{config}: hidden_act is {act!r}; ovss runs DINO-family ViTs with 'gelu' only; {_FIX}")
    theta = values.get("rope_theta", ROPE_BASE)
    if values.get("model_type") == "dinov3_vit" and theta != ROPE_BASE:
        raise OvssError(f"{config}: rope_theta is {theta}; ovss runs DINOv3's RoPE with base {ROPE_BASE} only; {_FIX}")


def _unwrap(obj: object, source: str) -> dict[str, Tensor]:
    """Descend wrapper dicts, strip ``module.`` / ``backbone.`` / HF model prefixes, drop unused entries."""
    sd, _ = unwrap_state_dict(obj, source, "VFM", _FIX, _WRAPPERS)
    if any(k.startswith("teacher.") for k in sd):  # DINOv2 training checkpoint: {"model": {teacher.*, student.*}}
        sd = {k[len("teacher.") :]: v for k, v in sd.items() if k.startswith("teacher.")}
    sd = {_strip(k, _MODEL_PREFIXES): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.startswith(_DROPPED)}


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    """Remove any number of leading ``prefixes`` from ``key``."""
    while key.startswith(prefixes):
        key = key[len(next(p for p in prefixes if key.startswith(p))) :]
    return key


def _tokens(t: Tensor, name: str, source: str) -> Tensor:
    """(1, n, D) or (n, D) -> (n, D)."""
    if t.ndim == 3 and t.shape[0] == 1:
        return t[0]
    if t.ndim == 2:
        return t
    raise OvssError(f"VFM checkpoint {source}: '{name}' has shape {tuple(t.shape)}, expected (1, n, D); {_FIX}")


def _from_original(sd: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """facebookresearch dino / dinov2 names -> OpenAI names."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    block = re.compile(r"^blocks\.(?:\d+\.)?(\d+)\.(.+)$")  # dinov2 chunked blocks: blocks.{chunk}.{i}.
    for key, value in sd.items():
        if key == "cls_token":
            out["class_embedding"] = _tokens(value, key, source).reshape(-1)  # (D,)
        elif key == "pos_embed":
            out["positional_embedding"] = _tokens(value, key, source)  # (1 + G², D)
        elif key == "register_tokens":
            out["register_tokens"] = _tokens(value, key, source)  # (R, D)
        elif key == "rope_periods":  # DINOv3, checked by ovss.models.dinov3
            out[key] = value  # (d/4,)
        elif key.startswith("patch_embed.proj."):
            out["conv1." + key.rsplit(".", 1)[1]] = value  # (D, 3, p, p) and (D,)
        elif key.startswith("norm."):
            out["ln_post." + key.rsplit(".", 1)[1]] = value  # (D,)
        elif (m := block.match(key)) and (new := _rename(m[2], _BLOCK.items())):
            out[f"transformer.resblocks.{m[1]}.{new}"] = value
        else:
            unknown.append(key)
    _reject(unknown, source)
    return out


def _from_hf(sd: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Hugging Face ``ViTModel`` (DINO) / ``Dinov2Model`` / ``Dinov2WithRegistersModel`` names -> OpenAI names."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown: list[str] = []
    layer = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
    for key, value in sd.items():
        if key == "embeddings.cls_token":
            out["class_embedding"] = _tokens(value, key, source).reshape(-1)  # (D,)
        elif key == "embeddings.position_embeddings":
            out["positional_embedding"] = _tokens(value, key, source)  # (1 + G², D)
        elif key == "embeddings.register_tokens":
            out["register_tokens"] = _tokens(value, key, source)  # (R, D)
        elif key.startswith("embeddings.patch_embeddings.projection."):
            out["conv1." + key.rsplit(".", 1)[1]] = value  # (D, 3, p, p) and (D,)
        elif key.startswith("layernorm."):
            out["ln_post." + key.rsplit(".", 1)[1]] = value  # (D,)
        elif (m := layer.match(key)) and (q := _HF_QKV.match(m[2])):
            qkv.setdefault((m[1], q[2]), {})[q[1]] = value
        elif (m := layer.match(key)) and (new := _rename(m[2], _HF_BLOCK)):
            out[f"transformer.resblocks.{m[1]}.{new}"] = value
        else:
            unknown.append(key)
    for (i, kind), parts in qkv.items():
        joined = join_qkv(parts, ("query", "key", "value"))  # (3D, D) or (3D,)
        if joined is None:
            unknown.extend(f"encoder.layer.{i}.attention.attention.{p}.{kind}" for p in parts)
            continue
        name = "attn.in_proj_weight" if kind == "weight" else "attn.in_proj_bias"
        out[f"transformer.resblocks.{i}.{name}"] = joined
    _reject(unknown, source)
    return out


def _rename(rest: str, table: Iterable[tuple[str, str]]) -> str | None:
    """Map ``{old}.{param}`` or an exact name through ``(old, new)`` pairs; None if nothing matches."""
    for old, new in table:
        if rest == old:
            return new
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return None


def _is_dinov2(sd: dict[str, Tensor]) -> bool:
    """DINOv2 has LayerScale in every block (and optionally registers); DINO v1 has neither."""
    return "register_tokens" in sd or any(k.endswith(".ls_1.gamma") for k in sd)


def _reject(unknown: list[str], source: str) -> None:
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise OvssError(
            f"VFM checkpoint {source} has keys ovss cannot use: {', '.join(sorted(unknown)[:5])}{more}; {_FIX}"
        )


def _validate(sd: dict[str, Tensor], source: str, rope: bool = False) -> None:
    """Check the keys and shapes :func:`build_vit` relies on, with one-line errors (``rope``: no position table)."""
    required = ["conv1.weight", "class_embedding", "ln_post.weight", "ln_post.bias"]
    required += [] if rope else ["positional_embedding"]
    missing = [k for k in required if k not in sd]
    if missing or not any(k.startswith("transformer.resblocks.0.") for k in sd):
        what = ", ".join(missing) or "transformer blocks"
        raise OvssError(f"VFM checkpoint {source} lacks {what}; {_FIX}")
    conv = tuple(sd["conv1.weight"].shape)
    if len(conv) != 4 or conv[1] != 3 or conv[2] != conv[3]:
        raise OvssError(f"VFM checkpoint {source}: patch embedding has shape {conv}, expected (D, 3, p, p); {_FIX}")
    width = conv[0]
    if not rope:
        pos = tuple(sd["positional_embedding"].shape)
        n = pos[0] - 1
        if len(pos) != 2 or pos[1] != width or n < 1 or round(n**0.5) ** 2 != n:
            raise OvssError(
                f"VFM checkpoint {source}: position table has shape {pos}, expected (1 + G*G, {width}); {_FIX}"
            )
    shapes: dict[str, tuple[int, ...]] = {
        "class_embedding": (width,),
        "ln_post.weight": (width,),
        "ln_post.bias": (width,),
    }
    if "register_tokens" in sd:
        shapes["register_tokens"] = (sd["register_tokens"].shape[0], width)
    for key, shape in shapes.items():
        if tuple(sd[key].shape) != shape:
            raise OvssError(
                f"VFM checkpoint {source}: '{key}' has shape {tuple(sd[key].shape)}, expected {shape}; {_FIX}"
            )
