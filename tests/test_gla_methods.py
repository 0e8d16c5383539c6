"""GLA attached to the bases: the user path equals adapter + float64 dense reference, reductions, routing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import ovss
from ovss.gla.config import GLAConfig
from ovss.gla.reference import dense_cross_window_attention
from ovss.gla.smoothing import resolve_smoothing, smooth_queries, smoothing_index
from ovss.methods import get_method
from ovss.methods.common import Backbones, MethodOutput, WindowBatch
from ovss.methods.composed.bases import ADAPTERS, gaussian_prior_rows, token_origins
from ovss.methods.naclip import gaussian_prior
from ovss.methods.options import ComposedOptions
from ovss.models.clip import build_clip
from ovss.pipeline.windows import pad_windows, sliding_windows, symmetric_padding
from ovss.predictor import Segmenter
from tiny import tiny_clip_state_dict


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
    from ovss.methods.composed.bases import sclip_parts
    from ovss.methods.composed.method import cross_window_tokens

    parts = sclip_parts(backbones, batch, reduced)
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
    assert seg.method.name == "proxyclip+gla" and isinstance(seg.options, ComposedOptions)
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


def test_gclip_gla_fuses_own_window_maps(bpe_path):
    from ovss.methods.composed.bases import gclip_parts
    from ovss.methods.composed.method import cross_window_tokens

    clip = build_clip(tiny_clip_state_dict(seed=3, layers=12))
    backbones = Backbones(clip.visual)
    batch = _batch(96, 160, 96, 64, 16)
    spec = get_method("gclip+gla")
    out = spec.run(backbones, batch, spec.options)
    parts = gclip_parts(backbones, batch, spec.options)
    L, N = len(batch.windows), 36
    assert parts.local_maps is not None
    assert parts.local_maps.shape == (L, N, N) and parts.local_count == 2
    torch.testing.assert_close(parts.local_maps.sum(-1), torch.full((L, N), 2.0), atol=1e-5, rtol=0)
    # Without AMF maps the fusion is the plain cross-window map; with them, (AMF + alpha) / (l + 2).
    alpha_only = cross_window_tokens(
        dataclasses.replace(parts, local_maps=None, local_count=0), batch, spec.options.gla
    )[0]
    own = parts.local_maps @ parts.values  # (L, N, C) AMF part, own window only
    bias = clip.visual.blocks[-1].attn.out_proj.bias
    expected = (parts.out_proj(own) - bias + alpha_only - bias) / 3 + bias
    torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=1e-4)
    assert "gclip" in out.info and len(out.window_info["global_block"]) == L


def _prior_by_hand(batch: WindowBatch, grid: tuple[int, int], patch: int, sigma: float) -> torch.Tensor:
    """NACLIP + GLA's prior (spec §4.9) from the window boxes: exp(-|c_i - c_j|^2 / (2 (sigma p)^2)), (M, M)."""
    centres = []
    for w in batch.windows:
        for r in range(grid[0]):
            for c in range(grid[1]):
                y = w.y1 - batch.padding.top + (r + 0.5) * patch
                centres.append((y, w.x1 - batch.padding.left + (c + 0.5) * patch))
    pts = torch.tensor(centres, dtype=torch.float64)  # (M, 2)
    d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)  # (M, M)
    return torch.exp(-d2 / (2 * (sigma * patch) ** 2))  # (M, M)


def _adapter_and_dense_reference(base: str):
    """A method run: the base's adapter, Eq. 17 smoothing and the float64 dense reference, written out here."""

    def run(backbones: Backbones, batch: WindowBatch, opts: ComposedOptions) -> MethodOutput:
        parts = ADAPTERS[base + "+gla"](backbones, batch, opts)
        L, N, C = parts.values.shape
        keys = [k.reshape(L * N, -1) for k in parts.key_sets]  # S x (M, D)
        mode = resolve_smoothing(opts.gla.smoothing, parts.clip_internal)
        queries = keys
        if mode != "off":
            pad = batch.padding
            boxes = [(w.y1 - pad.top, w.x1 - pad.left, w.y2, w.x2) for w in batch.windows]
            index = smoothing_index(boxes, parts.grid, parts.patch)
            queries = [smooth_queries(k, index, mode) for k in keys]
        prior = None
        if base == "naclip":
            prior = _prior_by_hand(batch, parts.grid, parts.patch, opts.base.sigma)  # (M, M)
            assert parts.prior is not None
            torch.testing.assert_close(parts.prior(torch.arange(L * N)).double(), prior, atol=1e-6, rtol=0)
        else:
            assert parts.prior is None
        y = dense_cross_window_attention(
            keys,
            queries,
            parts.values.reshape(L * N, C),
            L,
            opts.gla,
            prior=prior,
            local_maps=parts.local_maps,
            local_count=parts.local_count,
        )  # (M, C) float64
        return MethodOutput(parts.finish(parts.out_proj(y.float().view(L, N, C))), parts.grid)

    return run


@pytest.mark.parametrize(
    ("base", "size"),
    [
        ("proxyclip", (112, 176)),
        ("proxyclip", (150, 150)),
        ("clearclip", (112, 208)),
        ("sclip", (120, 180)),
        ("naclip", (112, 176)),
        ("gclip", (112, 176)),
    ],
)
def test_user_path_equals_adapter_plus_dense_reference(tiny_clip, tiny_dino, bpe_path, base, size):
    clip = build_clip(tiny_clip_state_dict(seed=3, layers=12)) if base == "gclip" else tiny_clip
    kw = dict(clip=clip, tokenizer=bpe_path, short_side=None, crop=112, stride=48)
    seg = ovss.load(f"{base}+gla", vfm=tiny_dino if base == "proxyclip" else None, **kw)
    image = np.random.default_rng(3).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    labels = ["a", "b", ["c", "d"]]
    got = seg.predict(image, labels)
    assert got.config["method_info"]["gla"]["windows"] > 1
    spec = dataclasses.replace(seg.method, run=_adapter_and_dense_reference(base))
    by_hand = Segmenter(seg.clip, spec, seg.options, seg.pipeline, vfm=seg.vfm, tokenizer=bpe_path)
    want = by_hand.predict(image, labels)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
    assert np.array_equal(got.labels, want.labels)
