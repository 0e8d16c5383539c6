"""Build a :class:`~ovss.models.vit.VisionTransformer` from a state dict: the architecture read off the shapes."""

from __future__ import annotations

import math

import torch

from ovss.errors import OvssError
from ovss.models.vit import VisionTransformer, ViTConfig


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise ValueError(f"blocks under {prefix!r} are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def resolve_heads(width: int, heads: int | None, what: str) -> int:
    """Attention heads of a tower: the declared number, else width // 64 (every 64-wide-head model).

    Args:
        width: the tower's token width D.
        heads: heads declared by a config file or registry entry; None when nothing says.
        what: names the tower and checkpoint in the error, e.g. ``"CLIP checkpoint x.bin: the vision tower"``.

    Raises:
        OvssError: nothing declares the heads and the width is not a multiple of 64, or the declared
            heads do not divide the width.
    """
    if heads is None:
        if width % 64:
            raise OvssError(
                f"{what} has width {width}, not a multiple of 64, and nothing says how many attention heads "
                "it has; load it from a folder with its config.json (Hugging Face) or with its OpenCLIP "
                "model config json beside the weights"
            )
        return width // 64
    if heads < 1 or width % heads:
        raise OvssError(f"{what} has width {width}, which {heads} attention heads do not divide; check its config")
    return heads


def build_vit(
    state_dict: dict[str, torch.Tensor],
    *,
    heads: int | None = None,
    act: str = "quick_gelu",
    eps: float = 1e-5,
    pos_offset: float = 0.1,
    pos_antialias: bool = False,
) -> VisionTransformer:
    """Build a :class:`VisionTransformer` from a state dict in the OpenAI visual layout (no ``visual.`` prefix).

    Patch size, width, depth, grid, registers, projection, LayerScale and RoPE (a ``rope_periods`` buffer)
    are read off the weights; ``heads`` is what the checkpoint's config says (None: width // 64, see
    :func:`resolve_heads`). The weights are loaded strictly.
    """
    conv = state_dict["conv1.weight"]  # (D, 3, p, p)
    width, patch = conv.shape[0], conv.shape[-1]
    rope = "rope_periods" in state_dict  # DINOv3: rotary embeddings, no position table
    n_pos = 0 if rope else state_dict["positional_embedding"].shape[0] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"position table has {n_pos} patch entries, not a square grid")
    proj = state_dict.get("proj")
    cfg = ViTConfig(
        patch=patch,
        width=width,
        layers=_count_blocks(state_dict, "transformer.resblocks."),
        heads=resolve_heads(width, heads, "the ViT"),
        grid=grid,
        output_dim=None if proj is None else int(proj.shape[1]),
        act=act,
        eps=eps,
        pre_norm="ln_pre.weight" in state_dict,
        patch_bias="conv1.bias" in state_dict,
        registers=int(state_dict["register_tokens"].shape[0]) if "register_tokens" in state_dict else 0,
        layer_scale="transformer.resblocks.0.ls_1.gamma" in state_dict,
        pos_offset=pos_offset,
        pos_antialias=pos_antialias,
        rope=rope,
    )
    model = VisionTransformer(cfg)
    load_frozen(model, state_dict)
    return model


def load_frozen(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint into a freshly built module strictly, without copying it; eval mode, no gradients.

    The parameters become the checkpoint's own tensors (``assign=True``), made fp32 and contiguous first (a
    no-op for the fp32 tensors the loaders produce), so loading costs no second copy of the weights.
    """
    sd = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval().requires_grad_(False)
