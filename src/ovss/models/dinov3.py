"""DINOv3 ViT checkpoints (spec §4.7.1) renamed to the dino / dinov2 layout that :mod:`ovss.models.dino` reads.

Three layouts are accepted (a common ``module.`` prefix is stripped before): the original
facebookresearch/dinov3 ``.pth``, the Hugging Face folder ``facebook/dinov3-vitb16-pretrain-lvd1689m``
(``layer.{i}.*``) and transformers' in-memory names (``model.layer.{i}.*``). Names as
``original`` <- ``Hugging Face``:

* ``cls_token`` <- ``embeddings.cls_token``; ``storage_tokens`` (1, R, D) <- ``embeddings.register_tokens``
  (both become ``register_tokens``)
* ``patch_embed.proj`` <- ``embeddings.patch_embeddings`` (weight and bias)
* ``rope_embed.periods`` (d/4,) <- none (recomputed): checked against ``100 ** (4 j / d)``, kept as
  ``rope_periods``
* ``blocks.i.norm1`` / ``norm2`` <- ``layer.i.norm1`` / ``norm2``
* ``blocks.i.attn.qkv`` (3D, D) <- ``layer.i.attention.{q,k,v}_proj`` (no ``k_proj.bias``); the key third of
  the bias is set to 0 whatever is stored (DINOv3 masks it, ``bias_mask`` is dropped)
* ``blocks.i.attn.proj`` <- ``layer.i.attention.o_proj``
* ``blocks.i.ls1.gamma`` / ``ls2.gamma`` <- ``layer.i.layer_scale1.lambda1`` / ``layer_scale2.lambda1``
* ``blocks.i.mlp.fc1`` / ``fc2`` <- ``layer.i.mlp.up_proj`` / ``down_proj``
* ``norm`` <- ``norm``

``mask_token`` is unused at inference. SwiGLU models (``mlp.gate_proj``, ``mlp.w1``: ViT-H+ / 7B) are
refused with one line.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ovss.errors import OvssError
from ovss.models.checkpoint import join_qkv
from ovss.models.rope import rope_periods

__all__ = ["DINOV3_FORMATS", "check_periods", "dinov3_format", "dinov3_to_dino_layout"]

DINOV3_FORMATS = ("dinov3", "hf-dinov3")
_FIX = "supply a DINOv3 ViT checkpoint (.pth, .safetensors or a Hugging Face folder) with --vfm PATH"
_HF_LAYER = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^attention\.([qkv])_proj\.(weight|bias)$")
# Hugging Face names inside ``layer.i.`` -> original names inside ``blocks.i.``.
_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.o_proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.up_proj": "mlp.fc1",
    "mlp.down_proj": "mlp.fc2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
}


def dinov3_format(sd: dict[str, Tensor]) -> str | None:
    """``"dinov3"`` (original keys), ``"hf-dinov3"`` (Hugging Face / transformers keys) or None (not DINOv3)."""
    if "rope_embed.periods" in sd or "storage_tokens" in sd:
        return "dinov3"
    if "embeddings.patch_embeddings.weight" in sd:  # HF ViT / Dinov2 use ``patch_embeddings.projection``
        return "hf-dinov3"
    return None


def dinov3_to_dino_layout(sd: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], str]:
    """Rename a DINOv3 state dict to the dino / dinov2 original layout (plus ``rope_periods``).

    Args:
        sd: the checkpoint's tensors, wrappers and ``module.`` prefixes already removed.
        source: name of the checkpoint for error messages.

    Returns:
        ``(state_dict, format)``: ``cls_token``, ``register_tokens``, ``patch_embed.proj.*``, ``blocks.i.*``
        (qkv fused, key bias zero) and ``norm.*``; ``rope_periods`` (d/4,) for the original layout only (the
        Hugging Face layout stores none: :func:`ovss.models.dino.build_vfm` computes it from the heads).
        Unknown keys are passed through for the caller to refuse.

    Raises:
        OvssError: a SwiGLU MLP, a missing q/k/v projection, or periods that are not ``100 ** (4 j / d)``.
    """
    if any(re.search(r"\.mlp\.(gate_proj|w1|w2|w3)\.", "." + k) for k in sd):
        raise OvssError(
            f"VFM checkpoint {source} is a DINOv3 with a SwiGLU MLP (ViT-H+ / 7B), which ovss does not run; {_FIX}"
        )
    fmt = dinov3_format(sd)
    out = _from_hf(sd, source) if fmt == "hf-dinov3" else dict(sd)
    if "storage_tokens" in out:
        out["register_tokens"] = out.pop("storage_tokens")  # (1, R, D)
    if "rope_embed.periods" in out:
        out["rope_periods"] = check_periods(out.pop("rope_embed.periods"), source)  # (d/4,)
    for key in [k for k in out if k.endswith(".attn.qkv.bias_mask")]:
        del out[key]  # always (1, 0, 1) thirds: the key bias is masked below
    for key in [k for k in out if k.endswith(".attn.qkv.bias")]:
        out[key] = _mask_key_bias(out[key])  # (3D,)
    return out, fmt or "dinov3"


def check_periods(periods: Tensor, source: str) -> Tensor:
    """The stored RoPE periods, checked against ``100 ** (4 j / d)`` (d = 4 * their number).

    Returns:
        (d/4,) fp32 periods recomputed by :func:`ovss.models.rope.rope_periods`.

    Raises:
        OvssError: another shape or other values (a RoPE variant ovss does not implement).
    """
    if periods.ndim != 1 or periods.numel() == 0:
        raise OvssError(
            f"VFM checkpoint {source}: 'rope_embed.periods' has shape {tuple(periods.shape)}, "
            f"expected (head_dim / 4,); {_FIX}"
        )
    expected = rope_periods(4 * periods.numel())  # (d/4,)
    if not torch.allclose(periods.float(), expected, rtol=1e-5, atol=0.0):
        raise OvssError(
            f"VFM checkpoint {source}: RoPE periods {periods.float()[:3].tolist()}... are not "
            f"100 ** (4 j / d) as in DINOv3; ovss runs the released DINOv3 RoPE only; {_FIX}"
        )
    return expected


def _mask_key_bias(bias: Tensor) -> Tensor:
    """The fused q/k/v bias (3D,) with its key third set to 0 (DINOv3's ``bias_mask``)."""
    D = bias.shape[0] // 3
    masked = bias.clone()  # (3D,)
    masked[D : 2 * D] = 0.0
    return masked


def _from_hf(sd: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Hugging Face / transformers DINOv3 names -> original names (q/k/v fused, key bias 0)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        m = _HF_LAYER.match(key)
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif key.startswith("norm."):
            out[key] = value  # (D,)
        elif m and (q := _HF_QKV.match(m[2])):
            qkv.setdefault((m[1], q[2]), {})[q[1]] = value
        elif m and (new := _rename(m[2])):
            out[f"blocks.{m[1]}.{new}"] = value
        else:
            out[key] = value  # unknown: refused by the caller with the other unknown keys
    for (i, kind), parts in qkv.items():
        if kind == "bias":  # no k_proj.bias (masked), q / v biases 0 where a config turned them off
            ref = next(iter(parts.values()))  # (D,)
            parts = {n: parts.get(n, torch.zeros_like(ref)) for n in "qkv"}
        joined = join_qkv(parts, ("q", "k", "v"))  # (3D, D) or (3D,)
        if joined is None:
            raise OvssError(f"VFM checkpoint {source}: layer {i} lacks attention.{{q,k,v}}_proj.{kind}; {_FIX}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = joined
    return out


def _rename(rest: str) -> str | None:
    """``{old}.{param}`` inside a Hugging Face layer -> ``{new}.{param}``; None if nothing matches."""
    for old, new in _HF_BLOCK.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
        if rest == old:
            return new
    return None
