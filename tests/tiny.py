"""Tiny random CLIP models in OpenAI's key layout, and writers for every checkpoint format ovss reads.

Every test in the project builds its CLIP from :func:`tiny_clip_state_dict`; the ``save_*`` helpers write
the same weights the way OpenAI, open_clip and Hugging Face ship them, so loaders can be checked by
round trip. Widths are multiples of 64 because CLIP uses ``heads = width // 64``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn


def _layer_norm(gen: torch.Generator, width: int) -> tuple[Tensor, Tensor]:
    """LayerNorm (weight, bias) near identity but not equal to it, as after training."""
    weight = 1.0 + 0.05 * torch.randn(width, generator=gen)  # (W,)
    bias = 0.02 * torch.randn(width, generator=gen)  # (W,)
    return weight, bias


def _blocks(gen: torch.Generator, prefix: str, width: int, layers: int) -> dict[str, Tensor]:
    """Residual attention blocks initialised like openai/CLIP ``initialize_parameters``."""
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    sd: dict[str, Tensor] = {}
    for i in range(layers):
        p = f"{prefix}resblocks.{i}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = _layer_norm(gen, width)
        sd[p + "attn.in_proj_weight"] = attn_std * torch.randn(3 * width, width, generator=gen)  # (3W, W)
        sd[p + "attn.in_proj_bias"] = 0.02 * torch.randn(3 * width, generator=gen)  # (3W,)
        sd[p + "attn.out_proj.weight"] = proj_std * torch.randn(width, width, generator=gen)  # (W, W)
        sd[p + "attn.out_proj.bias"] = 0.02 * torch.randn(width, generator=gen)  # (W,)
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = _layer_norm(gen, width)
        sd[p + "mlp.c_fc.weight"] = fc_std * torch.randn(4 * width, width, generator=gen)  # (4W, W)
        sd[p + "mlp.c_fc.bias"] = 0.02 * torch.randn(4 * width, generator=gen)  # (4W,)
        sd[p + "mlp.c_proj.weight"] = proj_std * torch.randn(width, 4 * width, generator=gen)  # (W, 4W)
        sd[p + "mlp.c_proj.bias"] = 0.02 * torch.randn(width, generator=gen)  # (W,)
    return sd


def tiny_clip_state_dict(
    seed: int = 0,
    width: int = 128,
    layers: int = 3,
    patch: int = 16,
    grid: int = 14,
    embed_dim: int = 64,
    text_width: int = 128,
    text_layers: int = 2,
    vocab_size: int = 49408,
    context_length: int = 77,
) -> dict[str, Tensor]:
    """Random fp32 ViT CLIP weights in openai/CLIP's exact key layout, deterministic for a seed.

    Args:
        seed: seed of the private generator; equal seeds give bit-identical tensors.
        width: vision width D (multiple of 64; heads = D // 64).
        layers: number of vision blocks.
        patch: patch size p in pixels.
        grid: patches per side G; the input resolution is p * G.
        embed_dim: joint embedding size E.
        text_width: text width W (multiple of 64).
        text_layers: number of text blocks.
        vocab_size: token vocabulary size V.
        context_length: text positions (77 for CLIP).

    Returns:
        Dict of fp32 tensors: ``visual.*`` (conv1 (D, 3, p, p), positional_embedding (1 + G², D), ...,
        proj (D, E)), the text tower (token_embedding.weight (V, W), ..., text_projection (W, E)) and
        ``logit_scale`` = ln(100), shape ().
    """
    if width % 64 or text_width % 64:
        raise ValueError(f"widths must be multiples of 64 (heads = width // 64), got {width}, {text_width}")
    gen = torch.Generator().manual_seed(seed)
    scale = width**-0.5
    sd: dict[str, Tensor] = {}
    fan_in = 3 * patch * patch
    sd["visual.conv1.weight"] = (torch.rand(width, 3, patch, patch, generator=gen) * 2 - 1) * fan_in**-0.5
    sd["visual.class_embedding"] = scale * torch.randn(width, generator=gen)  # (D,)
    n_pos = grid * grid + 1
    sd["visual.positional_embedding"] = scale * torch.randn(n_pos, width, generator=gen)  # (1+G², D)
    sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = _layer_norm(gen, width)
    sd.update(_blocks(gen, "visual.transformer.", width, layers))
    sd["visual.ln_post.weight"], sd["visual.ln_post.bias"] = _layer_norm(gen, width)
    sd["visual.proj"] = scale * torch.randn(width, embed_dim, generator=gen)  # (D, E)

    sd["token_embedding.weight"] = 0.02 * torch.randn(vocab_size, text_width, generator=gen)  # (V, W)
    sd["positional_embedding"] = 0.01 * torch.randn(context_length, text_width, generator=gen)  # (77, W)
    sd.update(_blocks(gen, "transformer.", text_width, text_layers))
    sd["ln_final.weight"], sd["ln_final.bias"] = _layer_norm(gen, text_width)
    sd["text_projection"] = text_width**-0.5 * torch.randn(text_width, embed_dim, generator=gen)  # (W, E)
    sd["logit_scale"] = torch.tensor(math.log(100.0))
    return sd


class _ScriptedCLIP(nn.Module):
    """Holds the weights under their dotted names; the forward only exists so TorchScript can compile."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def _module_tree(sd: dict[str, Tensor]) -> nn.Module:
    """An nn.Module whose ``state_dict()`` keys are exactly the keys of ``sd``."""
    root = _ScriptedCLIP()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        module: nn.Module = root
        for name in path:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            module.register_buffer(leaf, value.clone())
    return root


def _openai_buffers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The int64 scalar buffers that OpenAI's archives carry beside the weights."""
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    buffers = {"input_resolution": torch.tensor(patch * grid)}
    if "token_embedding.weight" in sd:
        buffers["context_length"] = torch.tensor(sd["positional_embedding"].shape[0])
        buffers["vocab_size"] = torch.tensor(sd["token_embedding.weight"].shape[0])
    return buffers


def save_openai_jit(sd: dict[str, Tensor], path: str | Path) -> Path:
    """Write ``sd`` as a TorchScript archive like OpenAI's ``ViT-B-16.pt`` (dtype kept as given).

    The archive's ``state_dict()`` holds exactly the keys of ``sd`` plus the buffers
    ``input_resolution``, ``context_length`` and ``vocab_size``.
    """
    path = Path(path)
    module = _module_tree({**sd, **_openai_buffers(sd)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(path))
    return path


def save_openai_plain(sd: dict[str, Tensor], path: str | Path) -> Path:
    """Write ``torch.save(torch.jit.load(p).state_dict())`` of an OpenAI archive: weights plus buffers."""
    path = Path(path)
    torch.save({**sd, **_openai_buffers(sd)}, path)
    return path


def save_open_clip(sd: dict[str, Tensor], path: str | Path, kind: str) -> Path:
    """Write ``sd`` as open_clip ships it.

    Args:
        sd: OpenAI-layout state dict.
        path: file to write.
        kind: ``"bin"`` (open_clip_pytorch_model.bin: a plain dict), ``"safetensors"``
            (open_clip_model.safetensors) or ``"train"`` (a training checkpoint
            ``{"epoch", "name", "state_dict": {"module." + key: value}}``).

    Returns:
        The written path.
    """
    path = Path(path)
    if kind == "bin":
        torch.save(dict(sd), path)
    elif kind == "safetensors":
        save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(path))
    elif kind == "train":
        checkpoint = {"epoch": 1, "name": "tiny-run", "state_dict": {"module." + k: v for k, v in sd.items()}}
        torch.save(checkpoint, path)
    else:
        raise ValueError(f"unknown open_clip kind {kind!r}; use 'bin', 'safetensors' or 'train'")
    return path


_HF_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def _to_hf_blocks(sd: dict[str, Tensor], src: str, dst: str, out: dict[str, Tensor]) -> None:
    """Map ``{src}resblocks.i.*`` (OpenAI) to ``{dst}layers.i.*`` (HF), splitting in_proj into q/k/v."""
    layers = sum(k.startswith(src + "resblocks.") and k.endswith(".attn.in_proj_weight") for k in sd)
    for i in range(layers):
        a, b = f"{src}resblocks.{i}.", f"{dst}layers.{i}."
        for old, new in _HF_BLOCK.items():
            out[b + new + ".weight"] = sd[a + old + ".weight"]
            out[b + new + ".bias"] = sd[a + old + ".bias"]
        q, k, v = sd[a + "attn.in_proj_weight"].chunk(3, dim=0)  # 3 x (D, D)
        qb, kb, vb = sd[a + "attn.in_proj_bias"].chunk(3, dim=0)  # 3 x (D,)
        for name, w, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[b + f"self_attn.{name}.weight"] = w
            out[b + f"self_attn.{name}.bias"] = bias


def openai_to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``CLIPModel`` keys for an OpenAI-layout state dict (inverse of HF's converter)."""
    out: dict[str, Tensor] = {}
    v = "vision_model."
    out[v + "embeddings.class_embedding"] = sd["visual.class_embedding"]
    out[v + "embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out[v + "embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    n_pos = sd["visual.positional_embedding"].shape[0]
    out[v + "embeddings.position_ids"] = torch.arange(n_pos).unsqueeze(0)  # (1, 1+G²)
    out[v + "pre_layrnorm.weight"] = sd["visual.ln_pre.weight"]  # sic: HF's attribute name
    out[v + "pre_layrnorm.bias"] = sd["visual.ln_pre.bias"]
    _to_hf_blocks(sd, "visual.transformer.", v + "encoder.", out)
    out[v + "post_layernorm.weight"] = sd["visual.ln_post.weight"]
    out[v + "post_layernorm.bias"] = sd["visual.ln_post.bias"]
    out["visual_projection.weight"] = sd["visual.proj"].t()  # (E, D)
    if "token_embedding.weight" in sd:
        t = "text_model."
        out[t + "embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
        out[t + "embeddings.position_embedding.weight"] = sd["positional_embedding"]
        out[t + "embeddings.position_ids"] = torch.arange(sd["positional_embedding"].shape[0]).unsqueeze(0)
        _to_hf_blocks(sd, "transformer.", t + "encoder.", out)
        out[t + "final_layer_norm.weight"] = sd["ln_final.weight"]
        out[t + "final_layer_norm.bias"] = sd["ln_final.bias"]
        out["text_projection.weight"] = sd["text_projection"].t()  # (E, W)
        out["logit_scale"] = sd["logit_scale"]
    return {k: t.contiguous().clone() for k, t in out.items()}


def _hf_config(sd: dict[str, Tensor], act: str) -> dict[str, object]:
    """A ``config.json`` like those of openai/clip-vit-base-patch16 on the Hugging Face hub."""
    width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    embed_dim = sd["visual.proj"].shape[1]
    vision_layers = sum(k.startswith("visual.") and k.endswith("attn.in_proj_weight") for k in sd)
    text_layers = sum(k.startswith("transformer.") and k.endswith("attn.in_proj_weight") for k in sd)
    config: dict[str, object] = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "projection_dim": embed_dim,
        "torch_dtype": "float32",
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_act": act,
            "hidden_size": width,
            "intermediate_size": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": vision_layers,
            "num_attention_heads": width // 64,
            "patch_size": patch,
            "image_size": patch * grid,
            "num_channels": 3,
            "layer_norm_eps": 1e-5,
            "projection_dim": embed_dim,
        },
    }
    if "token_embedding.weight" in sd:
        text_width = sd["ln_final.weight"].shape[0]
        config["text_config"] = {
            "model_type": "clip_text_model",
            "hidden_act": act,
            "hidden_size": text_width,
            "intermediate_size": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": text_layers,
            "num_attention_heads": text_width // 64,
            "max_position_embeddings": sd["positional_embedding"].shape[0],
            "vocab_size": sd["token_embedding.weight"].shape[0],
            "layer_norm_eps": 1e-5,
            "projection_dim": embed_dim,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 1,
        }
    return config


def save_hf(sd: dict[str, Tensor], directory: str | Path, kind: str, *, act: str = "quick_gelu") -> Path:
    """Write ``sd`` as a Hugging Face ``CLIPModel`` folder: ``config.json`` plus the weights file.

    Args:
        sd: OpenAI-layout state dict (a vision-only dict gives a vision-only folder).
        directory: folder to create (parents included).
        kind: ``"safetensors"`` (model.safetensors) or ``"bin"`` (pytorch_model.bin).
        act: ``hidden_act`` written to both tower configs (``"quick_gelu"`` or ``"gelu"``).

    Returns:
        Path of the weights file inside ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = openai_to_hf(sd)
    (directory / "config.json").write_text(json.dumps(_hf_config(sd, act), indent=2))
    if kind == "safetensors":
        path = directory / "model.safetensors"
        save_file(hf, str(path), metadata={"format": "pt"})
    elif kind == "bin":
        path = directory / "pytorch_model.bin"
        torch.save(hf, path)
    else:
        raise ValueError(f"unknown HF kind {kind!r}; use 'safetensors' or 'bin'")
    return path


def tiny_dino_vit():
    """A tiny random DINO-like ViT (patch 8, width 128 = 2 heads, GELU, no ln_pre, conv bias, no projection)."""
    from ovss.models.vit_build import build_vit

    sd = tiny_clip_state_dict(seed=7, patch=8, grid=28, layers=2)
    vis = {
        k[7:]: v
        for k, v in sd.items()
        if k.startswith("visual.") and not k.startswith(("visual.proj", "visual.ln_pre"))
    }
    vis["conv1.bias"] = torch.randn(128, generator=torch.Generator().manual_seed(1)) * 0.02
    return build_vit(vis, act="gelu", eps=1e-6)
