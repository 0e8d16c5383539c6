"""Random stand-ins for registry weights, in their real file layouts, for ``ovss bench`` and ``benchmarks/``.

Time and memory do not depend on the values, so a machine without the real files measures the same products:
CLIP ViT-B/16 (OpenAI state dict), DINO ViT-B/8 and ViT-B/16 (``*_pretrain.pth``) and SAM ViT-B (official
layout); ``quick``: narrow models for smoke tests. Each method asks for its own weights
(:func:`ovss.methods.registry.needed_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ovss.errors import OvssError


def random_clip_state_dict(
    width: int, layers: int, text_width: int, text_layers: int, embed_dim: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random CLIP ViT-*/16 weights (224 px, 77 tokens) in openai/CLIP's key layout, openai/CLIP's init."""
    g = torch.Generator().manual_seed(seed)

    def randn(std: float, *shape: int) -> torch.Tensor:
        return std * torch.randn(*shape, generator=g)

    def blocks(prefix: str, w: int, n: int) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for i in range(n):
            p = f"{prefix}resblocks.{i}."
            for norm in ("ln_1", "ln_2"):
                sd[p + norm + ".weight"], sd[p + norm + ".bias"] = torch.ones(w), torch.zeros(w)
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = randn(w**-0.5, 3 * w, w), torch.zeros(3 * w)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = randn(w**-0.5 / n, w, w), torch.zeros(w)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = randn((2 * w) ** -0.5, 4 * w, w), torch.zeros(4 * w)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = randn(w**-0.5 / n, w, 4 * w), torch.zeros(w)
        return sd

    patch, grid = 16, 14
    sd = {
        "visual.conv1.weight": randn((3 * patch * patch) ** -0.5, width, 3, patch, patch),
        "visual.class_embedding": randn(width**-0.5, width),
        "visual.positional_embedding": randn(width**-0.5, 1 + grid * grid, width),
        "visual.ln_pre.weight": torch.ones(width),
        "visual.ln_pre.bias": torch.zeros(width),
        **blocks("visual.transformer.", width, layers),
        "visual.ln_post.weight": torch.ones(width),
        "visual.ln_post.bias": torch.zeros(width),
        "visual.proj": randn(width**-0.5, width, embed_dim),
        "token_embedding.weight": randn(0.02, 49408, text_width),
        "positional_embedding": randn(0.01, 77, text_width),
        **blocks("transformer.", text_width, text_layers),
        "ln_final.weight": torch.ones(text_width),
        "ln_final.bias": torch.zeros(text_width),
        "text_projection": randn(text_width**-0.5, text_width, embed_dim),
        "logit_scale": torch.tensor(math.log(100.0)),
        "input_resolution": torch.tensor(patch * grid),  # the buffers of OpenAI's archives
        "context_length": torch.tensor(77),
        "vocab_size": torch.tensor(49408),
    }
    return sd


def random_dino_state_dict(width: int, layers: int, patch: int, grid: int, seed: int) -> dict[str, torch.Tensor]:
    """Random DINO ViT weights in the facebookresearch/dino key layout (ViT-style init: N(0, 0.02), LN = 1)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return 0.02 * torch.randn(*shape, generator=g)

    sd = {
        "cls_token": randn(1, 1, width),
        "pos_embed": randn(1, 1 + grid * grid, width),
        "patch_embed.proj.weight": randn(width, 3, patch, patch),
        "patch_embed.proj.bias": torch.zeros(width),
    }
    for i in range(layers):
        p = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd[p + norm + ".weight"], sd[p + norm + ".bias"] = torch.ones(width), torch.zeros(width)
        sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = randn(3 * width, width), torch.zeros(3 * width)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = randn(width, width), torch.zeros(width)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = randn(4 * width, width), torch.zeros(4 * width)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = randn(width, 4 * width), torch.zeros(width)
    sd["norm.weight"], sd["norm.bias"] = torch.ones(width), torch.zeros(width)
    return sd


def write_random_weights(folder: Path, quick: bool = False, names: Iterable[str] = ()) -> dict[str, str]:
    """Random stand-ins for registry weights, in their real file layouts, written into ``folder`` unless present.

    ``ViT-B/16`` (OpenAI state dict), ``dino-vitb8`` / ``dino-vitb16`` (``*_pretrain.pth``) and ``sam-vitb``
    (official ``sam_vit_b_01ec64.pth`` layout). ``quick``: narrow models (12 CLIP blocks, as GCLIP's block search
    needs; 1 text block, 2 DINO blocks; a 3-block SAM at 128 pixels) for smoke tests.

    Args:
        names: the registry names to stand in for (``ovss.methods.registry.needed_weights``); ``ViT-B/16`` is
            always written.

    Returns:
        registry name -> path of its stand-in.

    Raises:
        OvssError: a name without a random stand-in (e.g. DINOv3): pass that model's file with its flag.
    """
    tag = "tiny" if quick else "base"
    width, layers = (128, 2) if quick else (768, 12)
    paths: dict[str, str] = {}
    for name in dict.fromkeys(["ViT-B/16", *names]):
        if name == "ViT-B/16":
            path = folder / f"clip-vitb16-{tag}.pt"
            if not path.exists():
                sizes = (128, 12, 128, 1, 64) if quick else (768, 12, 512, 12, 512)
                torch.save(random_clip_state_dict(*sizes, seed=0), path)
        elif name in ("dino-vitb8", "dino-vitb16"):
            patch = 8 if name == "dino-vitb8" else 16
            path = folder / f"{name}-{tag}.pth"
            if not path.exists():
                grid, seed = (28, 1) if patch == 8 else (14, 2)
                torch.save(random_dino_state_dict(width, layers, patch=patch, grid=grid, seed=seed), path)
        elif name == "sam-vitb":
            path = folder / f"sam-vitb-{tag}.pth"
            if not path.exists():
                _write_random_sam(path, quick)
        else:
            raise OvssError(f"ovss bench has no random stand-in for {name!r}; pass that model's file (--vfm / --sam)")
        paths[name] = str(path)
    return paths


def _write_random_sam(path: Path, quick: bool) -> None:
    """A random SAM ViT-B (or a 3-block, 128-pixel one when ``quick``) in the official key layout."""
    from ovss.models.sam import SamConfig, SamEncoderConfig, SamModel

    if quick:  # 128-pixel input, 3 blocks, the last one global
        cfg = SamConfig(SamEncoderConfig(16, 32, 3, 2, 8, 4, (2,), 64, 32), 32, 16, 1, 8, 64, 2, 3, 2, 32)
    else:  # SAM ViT-B: 12 blocks of 768, global blocks 2, 5, 8, 11, 64 x 64 tokens; 256-d decoder
        enc = SamEncoderConfig(16, 768, 12, 12, 64, 14, (2, 5, 8, 11), 3072, 256)
        cfg = SamConfig(enc, 256, 16, 2, 8, 2048, 2, 3, 3, 256)
    model = SamModel(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the module's own init leaves zeros (positions, q/k/v): Trident's affinities would be 0/0
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        for name, buf in model.named_buffers():
            if "gaussian" in name:
                buf.copy_(torch.randn(buf.shape, generator=g))
    sd = model.state_dict()
    torch.save({k.replace(".attn.in_proj_", ".attn.qkv."): v for k, v in sd.items()}, path)  # official names


def write_weights_for(
    folder: Path, quick: bool, methods: Iterable[str], given: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """:func:`write_random_weights` for what ``methods`` load by default (roles in ``given`` excluded)."""
    from ovss.methods.registry import needed_weights

    return write_random_weights(folder, quick, needed_weights(methods, given))
