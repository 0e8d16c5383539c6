"""DINO / DINOv2 / Hugging Face checkpoints load into the one ViT and match DINO's own forward.

The checkpoints are tiny random models written by :func:`dino_state_dict` and :func:`save_hf` in the
exact key layouts of facebookresearch/dino, facebookresearch/dinov2 and transformers' ViT / Dinov2; the
reference forward below follows DINO's ``vision_transformer.py`` block by block (qkv linear, softmax,
proj, GELU MLP, LayerScale, final norm).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from ovss.errors import OvssError
from ovss.models.dino import build_vfm, convert_vfm_state_dict, load_vfm


def dino_state_dict(
    seed: int = 0,
    *,
    width: int = 128,
    layers: int = 2,
    patch: int = 8,
    grid: int = 4,
    registers: int = 0,
    dinov2: bool = False,
) -> dict[str, Tensor]:
    """Random weights in the facebookresearch dino (``dinov2=False``) or dinov2 key layout.

    DINOv2 adds LayerScale (``ls1.gamma``, ``ls2.gamma``, random, not 1), ``mask_token`` (1, D) and, with
    ``registers > 0``, ``register_tokens`` (1, R, D). Values are large enough that every part matters.
    """
    g = torch.Generator().manual_seed(seed)
    D = width

    def randn(*shape: int, std: float = 1.0) -> Tensor:
        return std * torch.randn(*shape, generator=g)

    sd = {
        "cls_token": randn(1, 1, D, std=0.5),
        "pos_embed": randn(1, 1 + grid * grid, D, std=0.5),
        "patch_embed.proj.weight": randn(D, 3, patch, patch, std=(3 * patch * patch) ** -0.5),
        "patch_embed.proj.bias": randn(D, std=0.1),
    }
    if registers:
        sd["register_tokens"] = randn(1, registers, D, std=0.5)
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = 1 + randn(D, std=0.1), randn(D, std=0.1)
        sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = randn(3 * D, D, std=D**-0.5), randn(3 * D, std=0.1)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = randn(D, D, std=D**-0.5), randn(D, std=0.1)
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = 1 + randn(D, std=0.1), randn(D, std=0.1)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = randn(4 * D, D, std=D**-0.5), randn(4 * D, std=0.1)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = randn(D, 4 * D, std=(4 * D) ** -0.5), randn(D, std=0.1)
        if dinov2:
            sd[p + "ls1.gamma"] = 0.5 + torch.rand(D, generator=g)
            sd[p + "ls2.gamma"] = 0.5 + torch.rand(D, generator=g)
    sd["norm.weight"], sd["norm.bias"] = 1 + randn(D, std=0.1), randn(D, std=0.1)
    if dinov2:
        sd["mask_token"] = torch.zeros(1, D)
    return sd


def to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers' names for a dino (``ViTModel``) or dinov2 (``Dinov2Model`` / ``...WithRegisters``) dict."""
    dinov2 = "blocks.0.ls1.gamma" in sd
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    if "register_tokens" in sd:
        out["embeddings.register_tokens"] = sd["register_tokens"]
    if dinov2:
        out["embeddings.mask_token"] = sd["mask_token"]
    else:  # ViTModel's pooler, present in many exported DINO checkpoints
        D = sd["norm.weight"].shape[0]
        out["pooler.dense.weight"], out["pooler.dense.bias"] = torch.ones(D, D), torch.zeros(D)
    layers = sum(k.endswith("attn.qkv.weight") for k in sd)
    names = (
        {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        if dinov2
        else {
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense",
        }
    )
    for i in range(layers):
        a, b = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for old, new in names.items():
                out[b + f"{new}.{kind}"] = sd[a + f"{old}.{kind}"]
            q, k, v = sd[a + f"attn.qkv.{kind}"].chunk(3, dim=0)
            out[b + f"attention.attention.query.{kind}"] = q
            out[b + f"attention.attention.key.{kind}"] = k
            out[b + f"attention.attention.value.{kind}"] = v
            out[b + f"attention.output.dense.{kind}"] = sd[a + f"attn.proj.{kind}"]
        if dinov2:
            out[b + "layer_scale1.lambda1"] = sd[a + "ls1.gamma"]
            out[b + "layer_scale2.lambda1"] = sd[a + "ls2.gamma"]
    return {k: t.contiguous().clone() for k, t in out.items()}


def save_hf(sd: dict[str, Tensor], folder: Path, kind: str) -> Path:
    """A Hugging Face model folder: ``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``."""
    folder.mkdir(parents=True, exist_ok=True)
    dinov2 = "blocks.0.ls1.gamma" in sd
    D = sd["norm.weight"].shape[0]
    config = {
        "model_type": ("dinov2_with_registers" if "register_tokens" in sd else "dinov2") if dinov2 else "vit",
        "hidden_act": "gelu",
        "hidden_size": D,
        "num_attention_heads": D // 64,
        "patch_size": sd["patch_embed.proj.weight"].shape[-1],
        "layer_norm_eps": 1e-6,
    }
    (folder / "config.json").write_text(json.dumps(config))
    hf = to_hf(sd)
    if kind == "safetensors":
        save_file(hf, str(folder / "model.safetensors"))
    else:
        torch.save(hf, folder / "pytorch_model.bin")
    return folder


def dino_reference(sd: dict[str, Tensor], pixels: Tensor, *, offset: float, antialias: bool) -> Tensor:
    """DINO / DINOv2's forward, written out: normed patch tokens (B, gh * gw, D), [CLS] and registers dropped."""
    w = sd["patch_embed.proj.weight"]
    D, p = w.shape[0], w.shape[-1]
    heads, eps = D // 64, 1e-6
    x = F.conv2d(pixels, w, sd["patch_embed.proj.bias"], stride=p)  # (B, D, gh, gw)
    B, _, gh, gw = x.shape
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + n, D)
    pos = sd["pos_embed"]
    N = pos.shape[1] - 1
    M = math.isqrt(N)
    if not (gh * gw == N and gh == gw):
        patch_pos = pos[:, 1:].reshape(1, M, M, D).permute(0, 3, 1, 2)
        if offset:
            kwargs: dict = {"scale_factor": ((gh + offset) / M, (gw + offset) / M)}
        else:
            kwargs = {"size": (gh, gw)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=antialias, **kwargs)
        assert patch_pos.shape[-2:] == (gh, gw)
        pos = torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, D)], dim=1)
    x = x + pos
    R = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    if R:
        x = torch.cat([x[:, :1], sd["register_tokens"].expand(B, -1, -1), x[:, 1:]], dim=1)
    n = x.shape[1]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b = f"blocks.{i}."
        ls1 = sd.get(b + "ls1.gamma", torch.ones(D))
        ls2 = sd.get(b + "ls2.gamma", torch.ones(D))
        y = F.layer_norm(x, (D,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        qkv = F.linear(y, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        qkv = qkv.reshape(B, n, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, n, D)
        x = x + ls1 * F.linear(y, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        y = F.layer_norm(x, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        y = F.linear(
            F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
            sd[b + "mlp.fc2.weight"],
            sd[b + "mlp.fc2.bias"],
        )
        x = x + ls2 * y
        i += 1
    x = F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], eps)
    return x[:, 1 + R :]


def _patch_tokens(model, pixels: Tensor) -> Tensor:
    return model(pixels)[:, model.num_prefix_tokens :]  # all blocks + ln_post (DINO has no projection)


def _assert_same_weights(model, sd: dict[str, Tensor]) -> None:
    """Every parameter of the built model equals the checkpoint tensor it came from."""
    ours = model.state_dict()
    assert torch.equal(ours["class_embedding"], sd["cls_token"].reshape(-1))
    assert torch.equal(ours["positional_embedding"], sd["pos_embed"][0])
    assert torch.equal(ours["conv1.weight"], sd["patch_embed.proj.weight"])
    assert torch.equal(ours["conv1.bias"], sd["patch_embed.proj.bias"])
    assert torch.equal(ours["ln_post.weight"], sd["norm.weight"])
    if "register_tokens" in sd:
        assert torch.equal(ours["register_tokens"], sd["register_tokens"][0])
    layers = sum(k.endswith("attn.qkv.weight") for k in sd)
    assert len(model.blocks) == layers
    for i in range(layers):
        a, b = f"blocks.{i}.", f"transformer.resblocks.{i}."
        assert torch.equal(ours[b + "attn.in_proj_weight"], sd[a + "attn.qkv.weight"])
        assert torch.equal(ours[b + "attn.in_proj_bias"], sd[a + "attn.qkv.bias"])
        assert torch.equal(ours[b + "attn.out_proj.weight"], sd[a + "attn.proj.weight"])
        assert torch.equal(ours[b + "ln_1.bias"], sd[a + "norm1.bias"])
        assert torch.equal(ours[b + "ln_2.weight"], sd[a + "norm2.weight"])
        assert torch.equal(ours[b + "mlp.c_fc.weight"], sd[a + "mlp.fc1.weight"])
        assert torch.equal(ours[b + "mlp.c_proj.bias"], sd[a + "mlp.fc2.bias"])
        if "blocks.0.ls1.gamma" in sd:
            assert torch.equal(ours[b + "ls_1.gamma"], sd[a + "ls1.gamma"])
            assert torch.equal(ours[b + "ls_2.gamma"], sd[a + "ls2.gamma"])
    # Nothing else: no ln_pre, no projection, exactly the checkpoint's parameters.
    expected = 4 + ("register_tokens" in sd) + layers * (12 + 2 * ("blocks.0.ls1.gamma" in sd)) + 2
    assert len(ours) == expected


def _pixels(h: int, w: int, seed: int = 1) -> Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [(32, 32), (48, 40), (24, 32)])
def test_dino_v1_file_matches_reference(tmp_path, size):
    sd = dino_state_dict(0)  # patch 8, native grid 4x4 (32 px)
    path = tmp_path / "dino_tiny_pretrain.pth"
    torch.save(sd, path)
    model, record = load_vfm(str(path), download=False)
    assert record == {"name": str(path), "path": str(path), "format": "dino"}
    assert (model.cfg.act, model.cfg.eps, model.cfg.pos_offset, model.cfg.pos_antialias) == ("gelu", 1e-6, 0.1, False)
    assert model.cfg.registers == 0 and not model.cfg.pre_norm and model.cfg.output_dim is None
    _assert_same_weights(model, sd)
    pixels = _pixels(*size)
    ours = _patch_tokens(model, pixels)
    ref = dino_reference(sd, pixels, offset=0.1, antialias=False)
    assert ours.shape == (2, (size[0] // 8) * (size[1] // 8), 128)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(56, 56), (42, 70)])
def test_dinov2_registers_match_reference(tmp_path, size):
    sd = dino_state_dict(1, patch=14, grid=4, registers=4, dinov2=True)  # native 56 px
    path = tmp_path / "dinov2_tiny_reg4_pretrain.pth"
    torch.save(sd, path)
    model, record = load_vfm(str(path), download=False)
    assert record["format"] == "dinov2"
    assert (model.cfg.registers, model.cfg.layer_scale) == (4, True)
    assert (model.cfg.pos_offset, model.cfg.pos_antialias) == (0.0, True)  # dinov2_*_reg hub models
    _assert_same_weights(model, sd)
    pixels = _pixels(*size)
    ours = _patch_tokens(model, pixels)
    gh, gw = size[0] // 14, size[1] // 14
    assert ours.shape == (2, gh * gw, 128)  # [CLS] and the 4 registers are not patch tokens
    torch.testing.assert_close(ours, dino_reference(sd, pixels, offset=0.0, antialias=True), atol=2e-5, rtol=1e-5)
    if (gh, gw) != (4, 4):  # 3x5 from 4x4: the interpolation convention matters
        other = dino_reference(sd, pixels, offset=0.1, antialias=False)
        assert (ours - other).abs().max() > 1e-3


def test_dinov2_layer_scale_and_registers_take_part(tmp_path):
    sd = dino_state_dict(2, patch=14, grid=4, registers=2, dinov2=True)
    model = build_vfm(*convert_vfm_state_dict(sd))
    pixels = _pixels(56, 56)
    ours = _patch_tokens(model, pixels)
    no_scale = {k: (torch.ones_like(v) if ".ls" in k else v) for k, v in sd.items()}
    assert (ours - dino_reference(no_scale, pixels, offset=0.0, antialias=True)).abs().max() > 1e-3
    shifted = dict(sd, register_tokens=-sd["register_tokens"])  # (a constant shift would vanish in ln_1)
    moved = _patch_tokens(build_vfm(*convert_vfm_state_dict(shifted)), pixels)
    assert moved.shape == ours.shape and (moved - ours).abs().max() > 1e-3


def test_dinov2_without_registers_uses_dino_interpolation():
    sd = dino_state_dict(3, patch=14, grid=4, dinov2=True)
    state, fmt = convert_vfm_state_dict(sd)
    model = build_vfm(state, fmt)
    assert fmt == "dinov2" and model.cfg.registers == 0 and model.cfg.layer_scale
    assert (model.cfg.pos_offset, model.cfg.pos_antialias) == (0.1, False)
    pixels = _pixels(42, 70)
    torch.testing.assert_close(
        _patch_tokens(model, pixels), dino_reference(sd, pixels, offset=0.1, antialias=False), atol=2e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("dinov2", "kind", "fmt"),
    [(False, "safetensors", "hf-vit"), (True, "bin", "hf-dinov2"), (True, "safetensors", "hf-dinov2")],
)
def test_hugging_face_folders_load_identically(tmp_path, dinov2, kind, fmt):
    sd = dino_state_dict(4, patch=14 if dinov2 else 8, registers=4 if dinov2 else 0, dinov2=dinov2)
    torch.save(sd, tmp_path / "original.pth")
    original, _ = load_vfm(str(tmp_path / "original.pth"), download=False)
    folder = save_hf(sd, tmp_path / "hf", kind)
    model, record = load_vfm(str(folder), download=False)
    assert record["format"] == fmt
    assert model.cfg == original.cfg
    theirs, ours = original.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys()
    for key in theirs:
        assert torch.equal(theirs[key], ours[key]), key
    pixels = _pixels(42, 56) if dinov2 else _pixels(40, 48)
    torch.testing.assert_close(_patch_tokens(model, pixels), _patch_tokens(original, pixels), atol=0, rtol=0)
    # The weights file alone (no config.json) and an HF task model ("dinov2." prefix) load the same.
    single = tmp_path / "weights.safetensors"
    save_file({("dinov2." if dinov2 else "vit.") + k: v for k, v in to_hf(sd).items()}, str(single))
    again, rec = load_vfm(str(single), download=False)
    assert rec["format"] == fmt and torch.equal(
        again.blocks[1].attn.in_proj_weight, model.blocks[1].attn.in_proj_weight
    )


def test_wrapped_training_checkpoints_use_the_teacher(tmp_path):
    sd = dino_state_dict(5)
    student = dino_state_dict(6)
    D = 128
    dino_ckpt = {
        "teacher": {"backbone." + k: v for k, v in sd.items()} | {"head.mlp.0.weight": torch.ones(8, D)},
        "student": {"module.backbone." + k: v for k, v in student.items()},
        "epoch": 100,
    }
    torch.save(dino_ckpt, tmp_path / "checkpoint.pth")
    model, _ = load_vfm(str(tmp_path / "checkpoint.pth"), download=False)
    _assert_same_weights(model, sd)
    v2 = dino_state_dict(7, dinov2=True, registers=1)
    v2_ckpt = {
        "model": {f"{who}.backbone.{k}": v for who, d in (("teacher", v2), ("student", student)) for k, v in d.items()}
    }
    torch.save(v2_ckpt, tmp_path / "model_final.pth")
    model2, record = load_vfm(str(tmp_path / "model_final.pth"), download=False)
    assert record["format"] == "dinov2"
    _assert_same_weights(model2, v2)
    # dinov2 with block_chunks: chunk c holds block i under blocks.{c}.{i}.* (one block per chunk here).
    chunked = {re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.\1.", k): v for k, v in sd.items()}
    assert "blocks.1.1.attn.qkv.weight" in chunked
    _assert_same_weights(build_vfm(*convert_vfm_state_dict(chunked)), sd)


def test_errors_are_one_line_ovss_errors(tmp_path, monkeypatch):
    sd = dino_state_dict(8)
    cases: dict[str, tuple[object, str]] = {
        "clip": ({"visual.conv1.weight": torch.zeros(128, 3, 16, 16)}, "CLIP checkpoint"),
        "unknown": ({"foo.weight": torch.zeros(3)}, "no known layout"),
        "extra": (dict(sd, **{"blocks.0.attn.rel_pos": torch.zeros(3)}), "cannot use: blocks.0.attn.rel_pos"),
        "missing": ({k: v for k, v in sd.items() if not k.startswith("norm.")}, "lacks ln_post.weight"),
        "pos": (dict(sd, pos_embed=torch.zeros(1, 1 + 15, 128)), "position table"),
        "width": (dino_state_dict(8, width=96), "multiple of 64"),
        "swiglu": (dict(sd, **{"blocks.0.mlp.w12.weight": torch.zeros(4, 128)}), "SwiGLU"),
        "block": (dict(sd, **{"blocks.0.mlp.fc1.weight": torch.zeros(7, 128)}), "does not fit a ViT"),
        "not a dict": ([torch.zeros(3)], "not a state dict"),
    }
    for name, (raw, message) in cases.items():
        with pytest.raises(OvssError, match=message) as info:
            build_vfm(*convert_vfm_state_dict(raw, source=name), source=name)
        assert "\n" not in str(info.value), name

    with pytest.raises(OvssError, match="neither an existing path nor a registered name"):
        load_vfm("dino-vitb9", download=False)
    monkeypatch.setenv("OVSS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OvssError, match="not cached"):
        load_vfm("dino-vitb8", download=False)
    torch.save({"teacher": sd, "args": argparse.Namespace(arch="vit_base")}, tmp_path / "full.pth")
    with pytest.raises(OvssError, match="stores Python objects"):
        load_vfm(str(tmp_path / "full.pth"), download=False)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(OvssError, match="could not be read"):
        load_vfm(str(tmp_path / "garbage.pth"), download=False)
    folder = save_hf(sd, tmp_path / "hf", "safetensors")
    (folder / "config.json").write_text(json.dumps({"hidden_act": "relu"}))
    with pytest.raises(OvssError, match="hidden_act"):
        load_vfm(str(folder), download=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OvssError, match="holds none of"):
        load_vfm(str(tmp_path / "empty"), download=False)


def test_hugging_face_dinov2_heads_come_from_its_config(tmp_path):
    """A 4-head Dinov2 (width 128: width // 64 says 2) saved by transformers runs as transformers runs it."""
    import transformers  # the independent reference (test extra)

    from ovss.api import load_vfm as api_load_vfm

    config = transformers.Dinov2Config(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, patch_size=14, image_size=56
    )
    torch.manual_seed(0)
    reference = transformers.Dinov2Model(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.save_pretrained(tmp_path / "dinov2")
    model, record = api_load_vfm(str(tmp_path / "dinov2"), download=False)
    assert model.cfg.heads == 4 and record["vfm_heads"] == 4 and record["vfm_format"] == "hf-dinov2"
    assert record["vfm_positions"].startswith("original-release interpolation")
    pixels = _pixels(56, 56)  # the pretrained 4 x 4 grid: no position interpolation on either side
    with torch.no_grad():
        theirs = reference(pixel_values=pixels).last_hidden_state  # (B, 1 + 16, D) after the final norm
    torch.testing.assert_close(model(pixels), theirs, atol=1e-5, rtol=1e-4)


def test_vfm_reader_is_the_shared_checkpoint_reader(tmp_path):
    """DINO weights in a TorchScript archive (as CLIP ships) load through the one reader."""
    import warnings

    from ovss.models.checkpoint import read_checkpoint

    sd = dino_state_dict(9)
    root = torch.nn.Module()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        module = root
        for name in path:
            if not hasattr(module, name):
                module.add_module(name, torch.nn.Module())
            module = getattr(module, name)
        module.register_buffer(leaf, value.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(root).save(str(tmp_path / "dino.pt"))
    assert read_checkpoint(tmp_path / "dino.pt", "VFM", "fix")[1] == "jit"
    model, record = load_vfm(str(tmp_path / "dino.pt"), download=False)
    assert record["format"] == "dino"
    _assert_same_weights(model, sd)
