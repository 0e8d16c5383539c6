"""GLA attached to the bases: reductions to the base method, chunking, composition, API routing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import ovss
from ovss.gla.config import GLAConfig
from ovss.gla.method import GLAMethodOptions, gaussian_prior_rows, token_origins
from ovss.methods import get_method
from ovss.methods.common import Backbones, WindowBatch
from ovss.methods.naclip import gaussian_prior
from ovss.pipeline.windows import pad_windows, sliding_windows, symmetric_padding


def _batch(H: int, W: int, crop: int, stride: int, pad_multiple: int, seed: int = 0) -> WindowBatch:
    image = torch.randn(3, H, W, generator=torch.Generator().manual_seed(seed))
    windows = sliding_windows(H, W, crop, stride)
    pad = symmetric_padding(windows[0].height, windows[0].width, pad_multiple)
    crops = torch.stack([image[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])
    return WindowBatch(pad_windows(crops, pad), windows, pad, (H, W))


def _run(name: str, backbones: Backbones, batch: WindowBatch, **gla_kw) -> torch.Tensor:
    spec = get_method(name)
    opts = spec.options
    if gla_kw:
        opts = dataclasses.replace(opts, gla=dataclasses.replace(opts.gla, **gla_kw))
    return spec.run(backbones, batch, opts).tokens


def test_gla_without_extension_reduces_to_proxyclip(tiny_clip, tiny_dino):
    backbones = Backbones(tiny_clip.visual, tiny_dino)
    for batch in (_batch(112, 112, 112, 56, 56), _batch(112, 168, 112, 56, 56)):  # L = 1 and L = 2
        base = get_method("proxyclip").run(backbones, batch, get_method("proxyclip").options).tokens
        reduced = _run("proxyclip+gla", backbones, batch, kve=False, proxy=False, norm="global_mean", smoothing="off")
        torch.testing.assert_close(reduced, base, atol=1e-5, rtol=1e-4)
        full = _run("proxyclip+gla", backbones, batch)
        if len(batch.windows) > 1:
            assert (full - base).abs().max() > 1e-4  # the extension changes the result


@pytest.mark.parametrize("name", ["proxyclip+gla", "clearclip+gla", "sclip+gla", "naclip+gla"])
def test_chunked_equals_unchunked_through_the_method(tiny_clip, tiny_dino, name):
    backbones = Backbones(tiny_clip.visual, tiny_dino)
    batch = _batch(112, 176, 112, 32, get_method(name).pad_multiple)
    whole = _run(name, backbones, batch, chunk_rows=10**6)
    chunked = _run(name, backbones, batch, chunk_rows=37)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_sclip_gla_sums_two_independent_maps(tiny_clip):
    backbones = Backbones(tiny_clip.visual)
    batch = _batch(96, 160, 96, 64, 1)
    spec = get_method("sclip+gla")
    reduced = dataclasses.replace(spec.options, base=dataclasses.replace(spec.options.base, reduced=True))
    both = spec.run(backbones, batch, reduced).tokens
    from ovss.gla.bases import sclip_parts
    from ovss.gla.method import cross_window_tokens

    parts = sclip_parts(backbones, batch, reduced.base)
    outs = []
    for keys in parts.key_sets:
        single = dataclasses.replace(parts, key_sets=[keys])
        outs.append(cross_window_tokens(single, batch, reduced.gla)[0])
    # OutProj is affine: OutProj(A1 v + A2 v) = OutProj(A1 v) + OutProj(A2 v) - b_o
    bias = tiny_clip.visual.blocks[-1].attn.out_proj.bias
    torch.testing.assert_close(both, outs[0] + outs[1] - bias, atol=1e-5, rtol=1e-4)


def test_naclip_image_space_prior_matches_window_prior(tiny_clip):
    batch = _batch(96, 160, 96, 64, 1)
    origins = token_origins(batch, (6, 6), 16)
    prior = gaussian_prior_rows(origins, 5.0 * 16, 1.0)
    rows = torch.arange(36)  # window 0
    own = prior(rows)[:, :36]
    torch.testing.assert_close(own, gaussian_prior(6, 6, 5.0, prefix=0), atol=1e-6, rtol=1e-6)
    # window 1 starts at x = 64 = 4 patches right: token (0, 4) of window 0 is token (0, 0) of window 1
    assert prior(torch.tensor([4]))[0, 36].item() == pytest.approx(1.0)


def test_token_origins_follow_padding_and_border_shift():
    batch = _batch(40, 100, 48, 32, 16)  # windows smaller than crop in height: 40 -> padded to 48
    origins = token_origins(batch, (3, 3), 16)
    assert batch.padding.top == 4 and batch.windows[-1].x1 == 52  # shifted back to end at the border
    assert origins[0].tolist() == [-4.0, -0.0] or origins[0].tolist() == [-4.0, 0.0]
    assert origins[9].tolist()[1] == 32 - batch.padding.left


def test_load_routes_options_and_gla_flag(tiny_clip, tiny_dino, bpe_path):
    seg = ovss.load(
        "proxyclip",
        gla=True,
        clip=tiny_clip,
        vfm=tiny_dino,
        tokenizer=bpe_path,
        gla_rho=0.55,
        beta=1.3,
        gla_clamp_mean=True,
    )
    assert seg.method.name == "proxyclip+gla" and isinstance(seg.options, GLAMethodOptions)
    assert seg.options.gla == GLAConfig(rho=0.55, clamp_mean=True)  # beta is ProxyCLIP's, gla_beta GLA's
    assert seg.options.base.beta == 1.3
    assert seg.pipeline.logit_scale == 40.0 and (seg.pipeline.crop, seg.pipeline.stride) == (224, 112)
    with pytest.raises(ovss.OvssError, match="no option"):
        ovss.load("clearclip+gla", clip=tiny_clip, tokenizer=bpe_path, rhoo=0.5)


def test_end_to_end_joint_windows(tiny_clip, tiny_dino, bpe_path):
    image = np.random.default_rng(1).integers(0, 256, size=(120, 200, 3), dtype=np.uint8)
    kw = dict(clip=tiny_clip, vfm=tiny_dino, tokenizer=bpe_path, short_side=112, crop=112, stride=56)
    a = ovss.load("proxyclip+gla", window_batch=1, **kw).predict(image, ["a", "b", ["c", "d"]])
    b = ovss.load("proxyclip+gla", window_batch=16, **kw).predict(image, ["a", "b", ["c", "d"]])
    assert a.labels.shape == (120, 200)
    torch.testing.assert_close(a.logits, b.logits)
    assert a.config["method_info"]["gla"]["windows"] == 3  # 112 x 187 -> 1 x 3 windows
    assert a.config["options"]["gla"]["rho"] == 0.6


def test_gclip_gla_fuses_own_window_maps(tiny_state_dict, bpe_path):
    from ovss.gla.bases import gclip_parts
    from ovss.gla.method import cross_window_tokens
    from ovss.models.clip import build_clip
    from tiny import tiny_clip_state_dict

    clip = build_clip(tiny_clip_state_dict(seed=3, layers=12))
    backbones = Backbones(clip.visual)
    batch = _batch(96, 160, 96, 64, 16)
    spec = get_method("gclip+gla")
    out = spec.run(backbones, batch, spec.options)
    parts = gclip_parts(backbones, batch, spec.options.base)
    L, N = len(batch.windows), 36
    assert parts.local_maps.shape == (L, N, N) and parts.local_count == 2
    torch.testing.assert_close(parts.local_maps.sum(-1), torch.full((L, N), 2.0), atol=1e-5, rtol=0)
    # Without AMF maps the fusion is the plain cross-window map; with them, (AMF + alpha) / (l + 2).
    alpha_only = cross_window_tokens(
        dataclasses.replace(parts, local_maps=None, local_count=0), batch, spec.options.gla
    )[0]
    v = parts.values  # (L, H, N, d)
    own = torch.einsum("lij,lhjd->lhid", parts.local_maps, v)  # (L, H, N, d) AMF part, own window only
    bias = clip.visual.blocks[-1].attn.out_proj.bias
    expected = (parts.merge_heads(own) - bias + alpha_only - bias) / 3 + bias
    torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=1e-4)
    assert "gclip" in out.info and len(out.window_info["global_block"]) == L
