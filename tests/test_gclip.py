"""GCLIP (spec §4.6): global-token detector, attention map fusion and channel suppression."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ovss.errors import OvssError
from ovss.methods import get_method
from ovss.methods.common import Backbones, MethodOutput, WindowBatch
from ovss.methods.gclip.channel_suppression import (
    detect_cs_start,
    fc2_statistics,
    ffn_with_fc2,
    forward_streams,
    norm_entropy,
    suppress_channel,
    suppressed_fc2_weights,
)
from ovss.methods.gclip.method import AttentionFusion, GCLIPOptions, has_global_tokens, resolve_blocks
from ovss.models.clip import build_clip
from ovss.models.vit import VisionTransformer
from ovss.pipeline.windows import Padding, Window
from tiny import tiny_clip_state_dict

DEPTH = 12  # blocks of the test CLIP; f = 11 is the last
PLANTED = 4  # block whose attention gets a planted global token in window 0
FC2 = "visual.transformer.resblocks.{}.mlp.c_proj.weight"


def _vit(sd: dict[str, torch.Tensor]) -> VisionTransformer:
    return build_clip(sd).visual


def _run(vit: VisionTransformer, pixels: torch.Tensor, name: str = "gclip", **overrides) -> MethodOutput:
    spec = get_method(name)
    L, _, h, w = pixels.shape
    batch = WindowBatch(pixels, [Window(0, 0, h, w)] * L, Padding(0, 0, 0, 0), (h, w))
    return spec.run(Backbones(vit), batch, dataclasses.replace(spec.options, **overrides))


def _suppressed_state_dict(sd: dict[str, torch.Tensor], start: int) -> dict[str, torch.Tensor]:
    """Copy of ``sd`` with the largest fc2 row of blocks >= start scaled to the mean norm of the others."""
    out = dict(sd)
    for b in range(start, DEPTH):
        w = sd[FC2.format(b)].clone()  # (D, 4D)
        norms = w.norm(dim=1)  # (D,)
        d = int(norms.argmax())
        w[d] = w[d] * ((norms.sum() - norms[d]) / (len(norms) - 1) / norms[d])
        out[FC2.format(b)] = w
    return out


def _plant_global_token(sd: dict[str, torch.Tensor], pixels: torch.Tensor, gain: float) -> dict[str, torch.Tensor]:
    """Copy of ``sd`` in which every query of block PLANTED attends to one patch of window 0.

    Every head gets a constant query and a key that reads one direction u of ln_1(x): u separates patch 37 of
    window 0 from the tokens of window 1 (a ridge LDA direction), so window 0 gets a global token and
    window 1 does not.
    """
    vit = _vit(sd)
    x = vit.forward_blocks(vit.embed(pixels)[0], 0, PLANTED)  # (2, n, D)
    y = vit.blocks[PLANTED].ln_1(x).double()  # (2, n, D)
    D = y.shape[-1]
    cov = torch.cov(y[1].T) + 1e-3 * torch.eye(D, dtype=torch.double)  # (D, D)
    u = torch.linalg.solve(cov, y[0, 1 + 37] - y[1].mean(0))  # (D,)
    u = (u / u.norm()).float()
    prefix = f"visual.transformer.resblocks.{PLANTED}.attn."
    weight, bias = sd[prefix + "in_proj_weight"].clone(), sd[prefix + "in_proj_bias"].clone()  # (3D, D), (3D,)
    weight[: 2 * D] = 0
    bias[: 2 * D] = 0
    scale = 64**-0.5
    for h in range(D // 64):
        bias[h * 64] = 1.0  # q_h = e_0 for every token
        weight[D + h * 64] = gain / scale * u  # k_h[0] = gain / scale * (u . y): logits gain * (u . y)
    return {**sd, prefix + "in_proj_weight": weight, prefix + "in_proj_bias": bias}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The matrices here are tiny: one intra-op thread avoids spin-waiting on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return tiny_clip_state_dict(seed=1, layers=DEPTH)


@pytest.fixture(scope="module")
def vit(sd) -> VisionTransformer:
    return _vit(sd)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    """Two 256x256 windows: a 16x16 grid, so uniform attention 1/257 is far below 1/sigma."""
    return torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def small() -> torch.Tensor:
    """Two 112x144 windows (a 7x9 grid) for the tests that do not detect global tokens."""
    return torch.randn(2, 3, 112, 144, generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def planted(sd, pixels) -> VisionTransformer:
    return _vit(_plant_global_token(sd, pixels, gain=0.2))


def _hand_fusion(vit, pixels, g, l, fuse_heads="mixed", fuse_cls=False, values_vit=None, cs_start=None):
    """Independent GCLIP: maps from ``attention_map`` of the clean forward, optional two-stream values."""
    x, _ = vit.embed(pixels)  # (L, n, D)
    xs = None  # suppressed stream of ``values_vit``
    maps = []
    for b in range(DEPTH - 1):
        attn = vit.blocks[b].attn.attention_map(vit.blocks[b].ln_1(x))  # (L, H, n, n)
        if g <= b <= g + l:
            maps.append(attn)
        if values_vit is not None and b == cs_start:
            xs = values_vit.blocks[b](x)
        elif values_vit is not None and cs_start is not None and b > cs_start:
            blk = values_vit.blocks[b]
            _, _, vs = blk.attn.qkv(blk.ln_1(xs))
            xs = xs + blk.attn.merge_heads(attn @ vs)
            xs = xs + blk.ffn(xs)
        x = vit.blocks[b](x)
    last = vit.blocks[-1]
    q, _, v = last.attn.qkv(last.ln_1(x))  # (L, H, n, d)
    if xs is not None:
        _, _, v = last.attn.qkv(last.ln_1(xs))
    qq = (q @ q.transpose(-2, -1) * last.attn.scale).softmax(dim=-1)  # (L, H, n, n)
    if fuse_heads != "per_head":
        maps = [m.mean(dim=1, keepdim=True) for m in maps]  # (L, 1, n, n)
    if fuse_cls:
        maps = [m[:, :, :1].expand_as(m) for m in maps]
    if fuse_heads == "averaged":
        qq = qq.mean(dim=1, keepdim=True)
    fused = (sum(maps) + qq) / (l + 2)  # (L, H or 1, n, n)
    return last.attn.merge_heads(fused @ v)[:, 1:]  # (L, N, D)


def test_registered_with_clearclip_setting():
    spec = get_method("gclip")
    assert spec.options == GCLIPOptions()
    assert (spec.logit_scale, spec.pad_multiple) == (50.0, 16)
    assert (spec.geometry.short_side, spec.geometry.crop, spec.geometry.stride) == (448, 448, 224)


def test_without_amf_and_cs_equals_clearclip_exactly(vit, small):
    ours = _run(vit, small, amf=False, cs=False).tokens
    clear = _run(vit, small, "clearclip").tokens
    assert ours.shape == (2, 7 * 9, 128)
    assert torch.equal(ours, clear)


def test_detector_on_hand_made_maps():
    n = 1 + 256
    uniform = torch.full((1, n, n), 1.0 / n)  # (1, n, n)
    column = uniform.clone()
    column[0, :, 5] = 0.5  # patch key 4 gets half of every row
    column[0, :, 6:] = 0.5 / (n - 6)
    cls_only = torch.full((1, n, n), 0.1 / (n - 1))
    cls_only[0, :, 0] = 0.9  # all queries attend to [CLS], which is no global token
    weak = torch.full((1, n, n), 1.0 / n)
    weak[0, :, 1] = 0.005  # geomean 0.005 < 1 / 100 but > 1 / 1000
    for detector in ("geomean", "product_fp32", "product_fp16"):
        assert not has_global_tokens(uniform, 1, detector).item()
        assert has_global_tokens(column, 1, detector).item()
        assert not has_global_tokens(cls_only, 1, detector).item()
    assert not has_global_tokens(weak, 1, "geomean", sigma=100.0).item()
    assert has_global_tokens(weak, 1, "geomean", sigma=1000.0).item()
    # The literal product is no exact underflow test: once it reaches the smallest subnormal, factors above
    # 0.5 round it back to that value, so a column of 0.6s survives where geomean says no.
    sticky = torch.full((1, n, n), 0.006)
    assert not has_global_tokens(sticky, 1, "geomean").item()
    assert has_global_tokens(sticky, 1, "product_fp32").item()
    assert has_global_tokens(sticky, 1, "product_fp16").item()


def test_fusion_detects_per_window_and_falls_back():
    gen = torch.Generator().manual_seed(5)
    L, H, n, f = 2, 2, 1 + 256, DEPTH - 1
    maps = [(torch.randn(L, H, n, n, generator=gen) * 0.1).softmax(dim=-1) for _ in range(f)]  # diffuse
    spike = torch.zeros(n, n)
    spike[:, 9] = 1.0  # every query on patch key 8
    maps[3][0] = 0.5 * maps[3][0] + 0.5 * spike  # window 0: global token in block 3
    maps[10][0] = 0.5 * maps[10][0] + 0.5 * spike  # block 10 = f - l may not be chosen
    maps[10][1] = 0.5 * maps[10][1] + 0.5 * spike  # so window 1 falls back
    fusion = AttentionFusion(GCLIPOptions(), last=f, fixed=6, prefix=1)
    for b, attn in enumerate(maps):
        fusion(b, attn)
    early, g, fallback = fusion.result()
    assert g.tolist() == [3, 6] and fallback.tolist() == [False, True]
    torch.testing.assert_close(early[0, 0], maps[3][0].mean(0) + maps[4][0].mean(0))
    torch.testing.assert_close(early[1, 0], maps[6][1].mean(0) + maps[7][1].mean(0))


@pytest.mark.parametrize("detector", ["geomean", "product_fp32"])
def test_detector_finds_planted_block(planted, pixels, detector):
    info = _run(planted, pixels, detector=detector, cs=False).window_info
    assert info["global_block"] == [PLANTED, 6]
    assert info["detector_fallback"] == [False, True]
    assert info["fused_blocks"] == [[PLANTED, PLANTED + 1], [6, 7]]


def test_geomean_and_product_fp32_agree(planted, vit, pixels):
    for model in (planted, vit):
        a = _run(model, pixels, detector="geomean")
        b = _run(model, pixels, detector="product_fp32")
        assert a.info == b.info and a.window_info == b.window_info
        assert torch.equal(a.tokens, b.tokens)


def test_unmodified_model_falls_back_to_fixed_block(vit, pixels):
    info = _run(vit, pixels, cs=False).window_info
    assert info["global_block"] == [6, 6] and info["detector_fallback"] == [True, True]
    info = _run(vit, pixels, cs=False, block_index_base=1).window_info
    assert info["fused_blocks"] == [[5, 6], [5, 6]]
    info = _run(vit, pixels[:1, :, :64, :64], cs=False, detector="fixed", fuse_layers=2).window_info
    assert info["fused_blocks"] == [[6, 7, 8]] and info["detector_fallback"] == [False]


def test_planted_fusion_equals_hand_fusion_per_window(planted, pixels):
    ours = _run(planted, pixels, cs=False).tokens
    torch.testing.assert_close(ours[:1], _hand_fusion(planted, pixels[:1], PLANTED, 1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[1:], _hand_fusion(planted, pixels[1:], 6, 1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fuse_heads, fuse_layers", [("mixed", 1), ("mixed", 0), ("averaged", 2), ("per_head", 1)])
def test_amf_equals_hand_written_fusion(vit, small, fuse_heads, fuse_layers):
    opts = dict(cs=False, detector="fixed", fuse_heads=fuse_heads, fuse_layers=fuse_layers)
    ours = _run(vit, small, **opts).tokens
    ref = _hand_fusion(vit, small, 6, fuse_layers, fuse_heads)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_fuse_cls_duplicates_the_cls_row(vit, small):
    ours = _run(vit, small, cs=False, detector="fixed", fuse_cls=True).tokens
    torch.testing.assert_close(ours, _hand_fusion(vit, small, 6, 1, fuse_cls=True), atol=1e-5, rtol=1e-4)
    assert (ours - _run(vit, small, cs=False, detector="fixed").tokens).abs().max() > 1e-4


def test_suppress_channel_rescales_only_the_largest_row(sd):
    weight = sd[FC2.format(3)].clone()  # (D, 4D)
    weight[17] *= 5.0
    out, d_hat, ratio = suppress_channel(weight)
    norms = weight.norm(dim=1)
    others = torch.cat([norms[:17], norms[18:]])
    assert d_hat == 17
    assert ratio == pytest.approx((norms[17] / others.mean()).item(), rel=1e-5)
    assert torch.equal(torch.cat([out[:17], out[18:]]), torch.cat([weight[:17], weight[18:]]))
    assert out[17].norm().item() == pytest.approx(others.mean().item(), rel=1e-5)
    torch.testing.assert_close(out[17] / out[17].norm(), weight[17] / weight[17].norm())
    assert weight[17].norm().item() == pytest.approx(norms[17].item())  # input not modified


def test_suppressed_ffn_keeps_bias_and_other_channels(vit, small):
    blk = vit.blocks[8]
    weights = suppressed_fc2_weights(vit, 7)
    assert sorted(weights) == list(range(7, DEPTH))
    d_hat = int(blk.mlp.c_proj.weight.norm(dim=1).argmax())
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(2))
    ours = ffn_with_fc2(blk, x, weights[8])  # (2, 5, D)
    h = blk.mlp.gelu(blk.mlp.c_fc(blk.ln_2(x)))
    ref = h @ weights[8].T + blk.mlp.c_proj.bias  # the block's own bias
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    changed = (ours - blk.ffn(x)).abs().amax(dim=(0, 1)) > 0  # (D,)
    assert changed.nonzero().flatten().tolist() == [d_hat]


def test_model_parameters_bit_identical_after_gclip(sd, small):
    model = _vit(sd)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for scope in ("values", "weights"):
        _run(model, small, cs_scope=scope, cs_start=7)
        _run(model, small, cs_scope=scope)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_entropy_and_start_on_hand_values():
    norms = torch.tensor([1.0, 1.0, 2.0])
    p = [1 / (2 + math.e), 1 / (2 + math.e), math.e / (2 + math.e)]  # softmax of the norms
    assert norm_entropy(norms, "softmax") == pytest.approx(-sum(pi * math.log(pi) for pi in p), rel=1e-9)
    assert norm_entropy(norms, "proportional") == pytest.approx(1.5 * math.log(2), rel=1e-9)
    # Table 3 gives H_5..H_10; the largest drop 0.93 -> 0.53 is block 7. H_11 (block f) is no candidate.
    entropies = [0.97, 0.97, 0.97, 0.97, 0.97, 0.96, 0.93, 0.53, 0.28, 0.09, 0.12, 0.0]
    assert detect_cs_start(entropies) == 7


@pytest.mark.parametrize("entropy", ["softmax", "proportional"])
def test_cs_start_detected_at_planted_norm(sd, small, entropy):
    planted = dict(sd)
    weight = sd[FC2.format(5)].clone()
    weight[3] *= 40.0  # one huge output channel from block 5 on
    planted[FC2.format(5)] = weight
    model = _vit(planted)
    stats = fc2_statistics(model, entropy)
    assert len(stats) == DEPTH and stats[5].channel == 3 and stats[5].ratio > 30
    assert max(range(1, DEPTH - 1), key=lambda b: stats[b - 1].entropy - stats[b].entropy) == 5
    info = _run(model, small, amf=False, entropy=entropy).info["gclip"]
    assert info["cs_start"] == 5 and info["cs_channel"][5] == 3
    assert info["cs_entropy"] == [s.entropy for s in stats]


def test_weights_scope_equals_model_with_edited_weights(sd, vit, small):
    ours = _run(vit, small, cs_scope="weights", cs_start=7, detector="fixed").tokens
    ref = _hand_fusion(_vit(_suppressed_state_dict(sd, 7)), small, 6, 1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    one_based = _run(vit, small, cs_scope="weights", cs_start=8, block_index_base=1, fixed_block=7, detector="fixed")
    assert one_based.info["gclip"]["cs_start"] == 7
    torch.testing.assert_close(one_based.tokens, ours, atol=0, rtol=0)


def test_values_scope_matches_two_stream_reference(sd, vit, small):
    ours = _run(vit, small, cs_start=7, detector="fixed").tokens
    suppressed = _vit(_suppressed_state_dict(sd, 7))
    ref = _hand_fusion(vit, small, 6, 1, values_vit=suppressed, cs_start=7)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_scopes_differ_but_share_maps_up_to_cs_start(vit, small):
    fc2 = suppressed_fc2_weights(vit, 7)
    maps: dict[str, dict[int, torch.Tensor]] = {"values": {}, "weights": {}}
    for scope, seen in maps.items():
        x, _ = vit.embed(small)
        forward_streams(vit, x, fc2, scope, lambda b, attn, seen=seen: seen.__setitem__(b, attn))
    for b in range(8):
        assert torch.equal(maps["values"][b], maps["weights"][b])
    assert not torch.equal(maps["values"][8], maps["weights"][8])
    a = _run(vit, small, cs_start=7, cs_scope="values").tokens
    b = _run(vit, small, cs_start=7, cs_scope="weights").tokens
    assert (a - b).abs().max() > 1e-4


def test_cs_changes_the_output(vit, small):
    on = _run(vit, small, cs_start=7, detector="fixed").tokens
    off = _run(vit, small, cs=False, detector="fixed").tokens
    assert (on - off).abs().max() > 1e-4


def test_cache_follows_in_place_weight_edits(sd):
    model = _vit(sd)
    first = suppressed_fc2_weights(model, 10)[10]
    with torch.no_grad():
        model.blocks[10].mlp.c_proj.weight[0] *= 50.0
    second = suppressed_fc2_weights(model, 10)[10]
    assert not torch.equal(first, second)
    assert fc2_statistics(model)[10].channel == 0


def test_batched_windows_equal_one_by_one(planted, pixels):
    together = _run(planted, pixels)
    apart = [_run(planted, pixels[i : i + 1]) for i in range(2)]
    torch.testing.assert_close(together.tokens, torch.cat([o.tokens for o in apart]), atol=1e-5, rtol=1e-5)
    assert together.window_info["global_block"] == [PLANTED, 6]
    assert [o.window_info["global_block"][0] for o in apart] == [PLANTED, 6]


@pytest.mark.parametrize(
    "overrides",
    [
        {"detector": "max"},
        {"fuse_heads": "sum"},
        {"entropy": "shannon"},
        {"cs_scope": "all"},
        {"cs_start": "first"},
        {"cs_start": 12},
        {"cs_start": True},
        {"fuse_layers": -1},
        {"fuse_layers": 11},
        {"fixed_block": 10},
        {"block_index_base": 2},
        {"sigma": 0.0},
    ],
)
def test_bad_options_raise(vit, small, overrides):
    with pytest.raises(OvssError, match="gclip"):
        _run(vit, small[:1, :, :32, :32], **overrides)


@pytest.mark.parametrize(("depth", "fixed", "cs_start"), [(3, 0, 2), (6, 3, 4), (24, 12, 14)])
def test_fixed_blocks_scale_to_the_depth(depth, fixed, cs_start, small):
    """ViT-B/16's blocks 6 (AMF) and 7 (CS) move to the same relative depth of shallower / deeper CLIPs."""
    shallow = _vit(tiny_clip_state_dict(seed=2, layers=depth, width=64, text_layers=1))
    window = small[:1, :, :64, :64]
    out = _run(shallow, window, detector="fixed", cs_start=7)
    assert out.window_info["fused_blocks"] == [[fixed, fixed + 1]]
    assert out.info["gclip"]["fixed_block"] == fixed and out.info["gclip"]["cs_start"] == cs_start
    assert resolve_blocks(GCLIPOptions(cs_start=7), depth) == (fixed, cs_start)
    # the fallback of the default detector uses the scaled block too, and the output is finite
    auto = _run(shallow, window)
    if auto.window_info["detector_fallback"][0]:
        assert auto.window_info["global_block"] == [fixed]
    assert torch.isfinite(auto.tokens).all()


def test_unscaled_fixed_blocks_are_checked_against_the_depth():
    assert resolve_blocks(GCLIPOptions(scale_blocks=False, fixed_block=2, cs_start=3), 6) == (2, 3)
    with pytest.raises(OvssError, match=r"fixed_block 6 .* outside 0..4 of a 6-block CLIP"):
        resolve_blocks(GCLIPOptions(scale_blocks=False), 6)
    with pytest.raises(OvssError, match=r"fixed_block 11 .* of a 12-block CLIP"):
        resolve_blocks(GCLIPOptions(fixed_block=11), 6)  # scaled indices must be valid for 12 blocks
