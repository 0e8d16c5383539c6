"""DINOv3 ViT as the VFM (spec §4.7.1): the three checkpoint layouts against transformers' own DINOv3ViTModel,
RoPE against the spec's formula, the masked key bias, the periods check, padding to 16 and the methods end to end.

The reference is ``transformers.DINOv3ViTModel`` with a tiny random configuration (width 64, 2 heads of 32,
4 registers, every weight random, LayerScale not 1). Its ``save_pretrained`` folder is the Hugging Face
layout; :func:`to_original` writes the same weights in facebookresearch/dinov3's ``.pth`` layout with the
inverse of the spec's table (and a non-zero stored key bias that must be ignored).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers  # the independent reference (pyproject [test] extra); the library never imports it
from torch import Tensor

import ovss
from ovss.errors import OvssError
from ovss.methods import get_method
from ovss.methods.common import Backbones, WindowBatch
from ovss.methods.proxyclip import clip_values_on_grid, run_proxyclip, vfm_features, window_pad_multiple
from ovss.models.dino import build_vfm, convert_vfm_state_dict, load_vfm
from ovss.models.rope import apply_rope, rope_periods, rope_tables
from ovss.models.vit import VisionTransformer
from ovss.pipeline.image import imagenet_from_clip
from ovss.pipeline.windows import pad_windows, sliding_windows, symmetric_padding
from ovss.storage import hub

WIDTH, HEADS = 64, 2  # head width 32: 8 RoPE periods


def hf_dinov3(seed: int = 0) -> torch.nn.Module:
    """transformers' DINOv3ViTModel, tiny, every parameter random (norms near 1, LayerScale near 0.5)."""
    cfg = transformers.DINOv3ViTConfig(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,  # ovss reads MLP width 4 D (every DINOv3 ViT-S/B/L)
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_register_tokens=4,
        patch_size=16,
    )
    return trained_like(transformers.DINOv3ViTModel(cfg).eval(), seed, token_scale=0.5)


def trained_like(model: torch.nn.Module, seed: int, token_scale: float = 0.1) -> torch.nn.Module:
    """Every parameter of a transformers ViT random, at trained-model scales: LayerScale near 0.5, norm weights
    near 1, matrices at 1/sqrt(fan-in); [CLS]/register/mask tokens ``token_scale``, the rest 0.1 (seeded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("lambda1"):
                p.copy_(0.5 + 0.2 * noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim >= 2 and "token" not in name and "position" not in name:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_((token_scale if "token" in name else 0.1) * noise)
    return model


def to_original(model: torch.nn.Module, key_bias: float = 0.7, seed: int = 1) -> dict[str, Tensor]:
    """The model's weights in facebookresearch/dinov3's ``.pth`` layout (spec §4.7.1 table, read backwards).

    The key third of ``qkv.bias`` holds random values times ``key_bias`` (the release masks it to 0 with
    ``bias_mask``); ``rope_embed.periods`` are transformers' ``1 / inv_freq``.
    """
    sd = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    out = {
        "cls_token": sd["embeddings.cls_token"],  # (1, 1, D)
        "storage_tokens": sd["embeddings.register_tokens"],  # (1, 4, D)
        "mask_token": sd["embeddings.mask_token"][0],  # (1, D)
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
        "rope_embed.periods": 1.0 / model.rope_embeddings.inv_freq,  # (d/4,)
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    for i in range(len(model.model.layer)):
        hf, o = f"model.layer.{i}.", f"blocks.{i}."
        a = hf + "attention."
        out[o + "attn.qkv.weight"] = torch.cat([sd[a + f"{n}_proj.weight"] for n in "qkv"])  # (3D, D)
        k_bias = key_bias * torch.randn(WIDTH, generator=g)
        out[o + "attn.qkv.bias"] = torch.cat([sd[a + "q_proj.bias"], k_bias, sd[a + "v_proj.bias"]])  # (3D,)
        out[o + "attn.qkv.bias_mask"] = torch.cat([torch.ones(WIDTH), torch.zeros(WIDTH), torch.ones(WIDTH)])
        out[o + "attn.proj.weight"], out[o + "attn.proj.bias"] = sd[a + "o_proj.weight"], sd[a + "o_proj.bias"]
        pairs = (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.up_proj"), ("mlp.fc2", "mlp.down_proj"))
        for new, old in pairs:
            out[o + new + ".weight"], out[o + new + ".bias"] = sd[hf + old + ".weight"], sd[hf + old + ".bias"]
        out[o + "ls1.gamma"], out[o + "ls2.gamma"] = sd[hf + "layer_scale1.lambda1"], sd[hf + "layer_scale2.lambda1"]
    return {k: v.clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return hf_dinov3()


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dinov3")
    reference.save_pretrained(root / "hf")
    torch.save({"model": {"module." + k: v for k, v in to_original(reference).items()}}, root / "wrapped.pth")
    torch.save(to_original(reference), root / "dinov3.pth")
    return {"hf": root / "hf", "pth": root / "dinov3.pth", "wrapped": root / "wrapped.pth"}


def _pixels(n: int, h: int, w: int, seed: int = 0) -> Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _tokens(vit: VisionTransformer, x: Tensor) -> Tensor:
    """All final-normed tokens (B, 5 + N, D) through embed / forward_blocks / ln_post (what vfm_features runs)."""
    tokens, grid = vit.embed(x)
    return vit.ln_post(vit.forward_blocks(tokens, grid=grid))


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_every_layout_matches_transformers(reference, files, size):
    x = _pixels(2, *size)
    with torch.no_grad():
        want = reference(pixel_values=x).last_hidden_state  # (2, 5 + N, D)
    memory = build_vfm(*convert_vfm_state_dict(reference.state_dict(), "memory"), heads=HEADS)
    models = {"memory": memory}
    for name in ("hf", "pth", "wrapped"):
        vit, record = load_vfm(str(files[name]))
        assert record["format"] == ("hf-dinov3" if name == "hf" else "dinov3")
        models[name] = vit
    for name, vit in models.items():
        assert (vit.cfg.heads, vit.cfg.registers, vit.cfg.eps, vit.cfg.rope) == (HEADS, 4, 1e-5, True), name
        assert vit.cfg.patch_bias and vit.cfg.layer_scale and not vit.cfg.pre_norm
        got = _tokens(vit, x)
        assert got.shape == want.shape == (2, 5 + (size[0] // 16) * (size[1] // 16), WIDTH)
        assert (got - want).abs().max().item() <= 1e-5, name


def test_vfm_features_are_the_normed_patch_tokens(reference, files):
    vit, _ = load_vfm(str(files["hf"]))
    pixels = _pixels(2, 48, 80, seed=2)
    feats, grid = vfm_features(vit, pixels)
    with torch.no_grad():
        want = reference(pixel_values=imagenet_from_clip(pixels)).last_hidden_state[:, 5:]  # registers dropped
    assert grid == (3, 5)
    assert (feats - want).abs().max().item() <= 1e-5


def test_rope_equals_the_spec_formula_by_hand():
    d, rows, cols, prefix = 8, 2, 3, 5
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 3, prefix + rows * cols, d, generator=g).unbind(0)  # (1, 3, n, d) each
    periods = rope_periods(d)
    assert torch.allclose(periods, torch.tensor([100 ** (j / 2) for j in range(d // 4)]), rtol=1e-6)
    q2, k2 = apply_rope(q, k, *rope_tables(periods, rows, cols))
    for t, t2 in ((q, q2), (k, k2)):
        assert torch.equal(t2[..., :prefix, :], t[..., :prefix, :])  # [CLS] and registers are not rotated
        for r in range(rows):
            for c in range(cols):
                y, x = 2 * (r + 0.5) / rows - 1, 2 * (c + 0.5) / cols - 1
                theta = [2 * math.pi * y / float(p) for p in periods] + [2 * math.pi * x / float(p) for p in periods]
                big = torch.tensor(theta + theta, dtype=torch.float64)  # (d,)
                v = t[0, :, prefix + r * cols + c].double()  # (3, d)
                rot = torch.cat([-v[:, d // 2 :], v[:, : d // 2]], dim=-1)
                want = v * big.cos() + rot * big.sin()
                torch.testing.assert_close(t2[0, :, prefix + r * cols + c].double(), want, atol=1e-6, rtol=1e-6)


def test_rope_runs_in_fp32_and_returns_the_input_dtype():
    q = torch.randn(1, 1, 7, 8, dtype=torch.bfloat16)
    cos, sin = rope_tables(rope_periods(8), 2, 3)
    q2, _ = apply_rope(q, q, cos, sin)
    assert q2.dtype == torch.bfloat16
    want = apply_rope(q.float(), q.float(), cos, sin)[0].to(torch.bfloat16)  # rotate in fp32, round once
    assert torch.equal(q2, want)


def test_the_stored_key_bias_is_never_used(reference, tmp_path):
    x = _pixels(1, 48, 64, seed=3)
    outputs = []
    for scale in (0.0, 0.7, 5.0):
        torch.save(to_original(reference, key_bias=scale), tmp_path / f"k{scale}.pth")
        outputs.append(_tokens(load_vfm(str(tmp_path / f"k{scale}.pth"))[0], x))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    sd = to_original(reference)
    sd["blocks.0.attn.qkv.bias"][:WIDTH] += 0.5  # the query bias, by contrast, takes part
    torch.save(sd, tmp_path / "q.pth")
    assert (_tokens(load_vfm(str(tmp_path / "q.pth"))[0], x) - outputs[0]).abs().max() > 1e-3


def test_periods_are_checked_and_give_the_heads(reference, tmp_path):
    sd = to_original(reference)
    vit = build_vfm(*convert_vfm_state_dict(sd, "x"))  # no config: 8 periods -> head width 32 -> 2 heads
    assert vit.cfg.heads == HEADS and torch.equal(vit.rope_periods, rope_periods(WIDTH // HEADS))
    sd["rope_embed.periods"] = sd["rope_embed.periods"] * 1.01
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(OvssError, match=r"RoPE periods .* are not 100 \*\* \(4 j / d\)"):
        load_vfm(str(tmp_path / "bad.pth"))


def test_unsupported_dinov3_checkpoints_fail_in_one_line(reference, tmp_path):
    sd = dict(reference.state_dict())
    sd["model.layer.0.mlp.gate_proj.weight"] = sd["model.layer.0.mlp.up_proj.weight"]
    with pytest.raises(OvssError, match="SwiGLU MLP"):
        convert_vfm_state_dict(sd, "x")
    sd = to_original(reference)
    sd["local_cls_norm.weight"] = torch.ones(WIDTH)  # ViT-7B's untied norms
    with pytest.raises(OvssError, match=r"keys ovss cannot use: local_cls_norm\.weight"):
        convert_vfm_state_dict(sd, "x")
    del sd["local_cls_norm.weight"], sd["blocks.1.attn.qkv.weight"]
    with pytest.raises(OvssError, match="does not fit a ViT"):
        build_vfm(*convert_vfm_state_dict(sd, "x"))


def test_pad_multiple_follows_the_vfm_patch(files, tiny_dino):
    vit, _ = load_vfm(str(files["hf"]))
    assert window_pad_multiple(56, vit) == 16  # DINOv3 (patch 16 does not divide 56)
    assert window_pad_multiple(56, tiny_dino) == 56  # DINO-B/8 keeps the release's 56
    assert window_pad_multiple(56, None) == 56


def test_values_are_not_resampled_on_the_clip_grid(tiny_clip):
    clip = tiny_clip.visual
    pixels = _pixels(2, 96, 112, seed=4)
    v, x = clip_values_on_grid(clip, pixels, (6, 7))
    block = clip.blocks[-1]
    _, _, v_clip = block.attn.qkv(block.ln_1(x))  # (L, H, 1 + 42, d)
    assert torch.equal(v, v_clip[:, :, 1:])


def _window_batch(image: Tensor, crop: int, stride: int, multiple: int) -> WindowBatch:
    H, W = image.shape[-2:]
    windows = sliding_windows(H, W, crop, stride)
    pad = symmetric_padding(windows[0].height, windows[0].width, multiple)
    crops = torch.stack([image[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])  # (L, 3, h, w)
    return WindowBatch(pad_windows(crops, pad), windows, pad, (H, W))


def test_proxyclip_with_dinov3_equals_the_spec_steps_on_transformers_features(reference, files, tiny_clip):
    clip, vit = tiny_clip.visual, load_vfm(str(files["pth"]))[0]
    batch = _window_batch(_pixels(1, 96, 80, seed=5)[0], 96, 48, 16)  # one window, 6 x 5 grids
    got = run_proxyclip(Backbones(clip, vit), batch, get_method("proxyclip").options)
    assert got.grid == got.info["clip_grid"] == (6, 5)  # the DINOv3 grid is the CLIP grid
    window = batch.pixels  # (1, 3, 96, 80)
    with torch.no_grad():
        f = reference(pixel_values=imagenet_from_clip(window)).last_hidden_state[0, 5:].double()  # (30, D_v)
    unit = f / f.norm(dim=1, keepdim=True)
    s = unit @ unit.T  # (30, 30)
    a = 3.0 * (s - 1.2 * s.mean())
    attn = torch.where(a >= 0, a, torch.full_like(a, -math.inf)).softmax(dim=-1)  # the diagonal is always kept
    x, _ = clip.embed(window)
    x = clip.forward_blocks(x, 0, len(clip.blocks) - 1)
    last = clip.blocks[-1]
    D = x.shape[-1]
    y = F.layer_norm(x[0], (D,), last.ln_1.weight, last.ln_1.bias, last.ln_1.eps)
    v = F.linear(y, last.attn.in_proj_weight[2 * D :], last.attn.in_proj_bias[2 * D :])[1:].double()  # (30, D)
    z = F.linear((attn @ v).float(), last.attn.out_proj.weight, last.attn.out_proj.bias)  # same map for all heads
    torch.testing.assert_close(got.tokens[0], z, atol=1e-4, rtol=1e-4)


def test_gla_without_extension_reduces_to_proxyclip_with_dinov3(files, tiny_clip):
    backbones = Backbones(tiny_clip.visual, load_vfm(str(files["hf"]))[0])
    batch = _window_batch(_pixels(1, 112, 176, seed=6)[0], 112, 64, 16)  # two windows
    base = get_method("proxyclip").run(backbones, batch, get_method("proxyclip").options).tokens
    spec = get_method("proxyclip+gla")
    off = dataclasses.replace(spec.options.gla, kve=False, proxy=False, norm="global_mean", smoothing="off")
    reduced = spec.run(backbones, batch, dataclasses.replace(spec.options, gla=off)).tokens
    torch.testing.assert_close(reduced, base, atol=1e-5, rtol=1e-4)
    assert (spec.run(backbones, batch, spec.options).tokens - base).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["proxyclip", "proxyclip+gla"])
def test_load_end_to_end_from_every_source(files, tiny_clip, bpe_path, method):
    kw = dict(clip=tiny_clip, tokenizer=bpe_path, short_side=None, crop=96, stride=48)
    image = np.random.default_rng(0).integers(0, 256, size=(90, 130, 3), dtype=np.uint8)
    labels = ["a", "b", ["c", "d"]]
    seg = ovss.load(method, vfm=str(files["hf"]), **kw)
    pred = seg.predict(image, labels)
    assert seg.config["pad_multiple"] == 16 and seg.config["vfm_format"] == "hf-dinov3"
    assert "RoPE" in seg.config["vfm_positions"]
    assert pred.labels.shape == (90, 130) and pred.logits.shape == (4, 90, 130)  # one map per name
    assert bool(torch.isfinite(pred.logits).all())
    windows, _ = seg.current_windows()
    assert len(windows) == 2 and windows[0].height == 90  # 90 rows padded to 96 (56 would give 112)
    state = seg._current()
    assert state.padded_size == (96, 96) and state.grid == (6, 6)  # the DINOv3 grid, equal to CLIP's
    for other in (str(files["pth"]), load_vfm(str(files["pth"]))[0]):
        again = ovss.load(method, vfm=other, **kw).predict(image, labels)
        torch.testing.assert_close(again.logits, pred.logits, atol=1e-5, rtol=1e-5)
        assert np.array_equal(again.labels, pred.labels)


def test_registered_name_loads_the_cached_original_file(files, tiny_clip, bpe_path, tmp_path, monkeypatch):
    entry = hub.REGISTRY["dinov3_vitb16"]
    assert entry.filename == "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth" and entry.format == "dinov3"
    assert entry.heads == (12, 0) and "dinov3_vitb16" in hub.available_models("vfm")
    monkeypatch.setitem(hub.REGISTRY, "dinov3_vitb16", dataclasses.replace(entry, heads=(HEADS, 0)))  # tiny copy
    monkeypatch.setenv("OVSS_CACHE", str(tmp_path))
    shutil.copy(files["pth"], tmp_path / entry.filename)
    seg = ovss.load("proxyclip", clip=tiny_clip, vfm="dinov3_vitb16", tokenizer=bpe_path, download=False)
    assert (seg.config["vfm"], seg.config["vfm_format"], seg.config["vfm_heads"]) == ("dinov3_vitb16", "dinov3", HEADS)
    assert seg.pad_multiple == 16
