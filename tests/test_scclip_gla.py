"""SC-CLIP as a GLA base (spec §4.11.5) and multi-layer fusion on ProxyCLIP + GLA (§4.11.4): the user path
against hand-built float64 references over the one GLA operator's dense reference; reductions; routing,
CLI, eval and report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ovss
from ovss.cli.main import main
from ovss.errors import OvssError
from ovss.gla.config import GLAConfig
from ovss.gla.reference import dense_attention_map
from ovss.gla.smoothing import smooth_queries, smoothing_index
from ovss.methods import get_method
from ovss.methods.common import Backbones, WindowBatch
from ovss.methods.options import ComposedOptions, MLFOptions, SCCLIPGLAOptions, resolve_options
from ovss.methods.registry import with_gla
from ovss.methods.scclip.method import scclip_streams
from ovss.models.clip import build_clip
from ovss.pipeline.windows import pad_windows, sliding_windows, symmetric_padding
from tiny import save_open_clip, tiny_clip_state_dict


@pytest.fixture(scope="module")
def deep_clip():
    return build_clip(tiny_clip_state_dict(seed=5, layers=12)).visual


def _batch(H: int, W: int, crop: int, stride: int, pad_multiple: int, seed: int = 0) -> WindowBatch:
    image = torch.randn(3, H, W, generator=torch.Generator().manual_seed(seed))
    windows = sliding_windows(H, W, crop, stride)
    pad = symmetric_padding(windows[0].height, windows[0].width, pad_multiple)
    crops = torch.stack([image[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])
    return WindowBatch(pad_windows(crops, pad), windows, pad, (H, W))


def _run(name: str, backbones: Backbones, batch: WindowBatch, **overrides) -> torch.Tensor:
    spec = get_method(name)
    return spec.run(backbones, batch, resolve_options(name, spec.options, overrides)).tokens


def _cat_heads(t: torch.Tensor) -> torch.Tensor:
    """(L, H, N, d) -> (L * N, H * d) float64, window-major."""
    L, H, N, d = t.shape
    return t.transpose(1, 2).reshape(L * N, H * d).double()


def _out_proj(block, y: torch.Tensor) -> torch.Tensor:
    return F.linear(y, block.attn.out_proj.weight.double(), block.attn.out_proj.bias.double())


# ------------------------------------------------------------------ scclip+gla


def _scclip_gla_by_hand(clip, batch: WindowBatch, kk: str) -> torch.Tensor:
    """§4.11.5 from its ingredients: SC-CLIP steps 1-5 (checked in test_scclip), three dense float64 GLA maps
    with Eq. 17 smoothed queries, y1 / y2 with one OutProj each, G(S3) per window."""
    spec = get_method("scclip+gla")
    cfg = spec.options.gla
    st = scclip_streams(clip, batch.pixels, spec.options.base)
    block = clip.blocks[-1]
    _, k1, v1 = block.attn.qkv(block.ln_1(st.pre_adjusted))  # (L, H, N, d)
    _, k2, v2 = block.attn.qkv(block.ln_1(st.fused))
    L, N = st.f8.shape[:2]
    boxes = [(w.y1, w.x1, w.y2, w.x2) for w in batch.windows]  # no padding for SC-CLIP
    index = smoothing_index(boxes, st.grid, clip.cfg.patch)

    def gla_map(keys: torch.Tensor) -> torch.Tensor:
        return dense_attention_map(keys, smooth_queries(keys, index, "eq17"), L, cfg)[0]  # (M, M)

    a8 = gla_map(st.f8.reshape(L * N, -1))
    V, V2 = _cat_heads(v1), _cat_heads(v2)  # (M, C)
    if kk == "cross":
        yk, yk2 = gla_map(_cat_heads(k1)) @ V, gla_map(_cat_heads(k2)) @ V2
    else:  # SC-CLIP's own per-head k-k softmax inside each window
        scale = block.attn.scale

        def own(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k, v = k.double(), v.double()
            return _cat_heads(torch.softmax(k @ k.transpose(-2, -1) * scale, dim=-1) @ v)

        yk, yk2 = own(k1, v1), own(k2, v2)
    cls = st.cls.double().expand(L, N, -1).reshape(L * N, -1)  # the token's own window
    fused_cls = st.fused_cls.double().expand(L, N, -1).reshape(L * N, -1)
    y1 = _out_proj(block, 0.5 * (a8 @ V + yk)) + 0.3 * cls
    y2 = _out_proj(block, 0.5 * (a8 @ V2 + yk2)) + 0.3 * fused_cls
    return st.post.double() @ (y1 + y2).view(L, N, -1)  # (L, N, D)


@pytest.mark.parametrize("kk", ["cross", "window"])
@pytest.mark.parametrize("size", [(112, 112), (112, 200)])  # one window, and 1 x 3 overlapping windows
def test_scclip_gla_equals_the_hand_reference(deep_clip, kk, size):
    batch = _batch(*size, 112, 48, 1, seed=1)
    got = _run("scclip+gla", Backbones(deep_clip), batch, scclip_gla_kk=kk)
    want = _scclip_gla_by_hand(deep_clip, batch, kk)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_scclip_gla_kk_switch_changes_only_the_kk_halves(deep_clip):
    """kk = window vs cross: different k-k halves, same alpha8 stream (half of each pass in both)."""
    batch = _batch(112, 200, 112, 48, 1, seed=2)
    cross = _run("scclip+gla", Backbones(deep_clip), batch)
    window = _run("scclip+gla", Backbones(deep_clip), batch, scclip_gla_kk="window")
    assert (cross - window).abs().max() > 1e-3
    # the same switch on a one-window image still differs: GLA's k-k map is not SC-CLIP's softmax
    one = _batch(112, 112, 112, 48, 1, seed=2)
    assert (
        _run("scclip+gla", Backbones(deep_clip), one)
        - _run("scclip+gla", Backbones(deep_clip), one, scclip_gla_kk="window")
    ).abs().max() > 1e-3


def test_scclip_gla_chunked_equals_unchunked(deep_clip):
    batch = _batch(112, 176, 112, 32, 1, seed=3)
    whole = _run("scclip+gla", Backbones(deep_clip), batch, gla_chunk_rows=10**6)
    chunked = _run("scclip+gla", Backbones(deep_clip), batch, gla_chunk_rows=13)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ proxyclip+gla+mlf


def test_mlf_without_fused_blocks_is_proxyclip_gla_exactly(deep_clip, tiny_dino):
    backbones = Backbones(deep_clip, tiny_dino)
    batch = _batch(112, 168, 112, 56, 56)
    plain = _run("proxyclip+gla", backbones, batch)
    assert torch.equal(_run("proxyclip+gla+mlf", backbones, batch, mlf_blocks=()), plain)
    assert (_run("proxyclip+gla+mlf", backbones, batch) - plain).abs().max() > 1e-3


def test_mlf_equals_two_outproj_of_one_gla_map(deep_clip, tiny_dino):
    backbones = Backbones(deep_clip, tiny_dino)
    batch = _batch(112, 168, 112, 56, 56, seed=4)
    got = _run("proxyclip+gla+mlf", backbones, batch)
    # by hand: DINO keys -> one dense GLA map; V from x11 and V' from the sum of blocks 3..9, both resized
    from ovss.methods.proxyclip import vfm_features

    feats, grid = vfm_features(tiny_dino, batch.pixels, deep_clip)
    L, N = feats.shape[:2]
    alpha = dense_attention_map(feats.reshape(L * N, -1), feats.reshape(L * N, -1), L, GLA_DEFAULT)[0]
    x, (gr, gc) = deep_clip.embed(batch.pixels)
    fused = torch.zeros_like(x)
    for b, blk in enumerate(deep_clip.blocks[:-1]):
        x = blk(x)
        if 3 <= b <= 9:
            fused = fused + x
    last = deep_clip.blocks[-1]

    def values(t: torch.Tensor) -> torch.Tensor:
        _, _, v = last.attn.qkv(last.ln_1(t))  # (L, H, 1 + n, d)
        v = v[:, :, 1:]
        H, d = v.shape[1], v.shape[-1]
        grid_v = v.permute(0, 1, 3, 2).reshape(L, H * d, gr, gc)
        up = F.interpolate(grid_v, size=grid, mode="bilinear", align_corners=False)  # (L, H*d, hr, hc)
        return up.reshape(L, H, d, N).permute(0, 3, 1, 2).reshape(L * N, H * d).double()

    want = _out_proj(last, alpha @ values(x)) + _out_proj(last, alpha @ values(fused))  # (M, D)
    torch.testing.assert_close(got.double(), want.view(L, N, -1), atol=1e-4, rtol=1e-4)
    with_cls = _run("proxyclip+gla+mlf", backbones, batch, mlf_res_cls=0.3)
    shift = 0.3 * (x[:, :1] + fused[:, :1])  # (L, 1, D): c11 + m_c of the token's window
    torch.testing.assert_close(with_cls - got, shift.expand_as(got), atol=1e-5, rtol=1e-5)


GLA_DEFAULT = get_method("proxyclip+gla").options.gla


def test_mlf_blocks_are_checked_in_one_line(deep_clip, tiny_dino):
    with pytest.raises(OvssError, match=r"mlf_blocks entry 11 is not a block .* choose blocks in 0\.\.10"):
        _run("proxyclip+gla+mlf", Backbones(deep_clip, tiny_dino), _batch(56, 56, 56, 56, 56), mlf_blocks=(3, 11))
    with pytest.raises(OvssError, match="scclip_gla_kk='both' is invalid: expected one of 'cross', 'window'"):
        resolve_options("scclip+gla", get_method("scclip+gla").options, {"scclip_gla_kk": "both"})


# ------------------------------------------------------------------ registry, load, CLI, eval, report


def test_names_route_through_with_gla_and_load(tiny_clip, bpe_path):
    assert with_gla("scclip").name == "scclip+gla" and with_gla("scclip", False).name == "scclip"
    assert with_gla("proxyclip").name == "proxyclip+gla"  # the variant does not take over --gla
    assert with_gla("proxyclip+gla+mlf").name == "proxyclip+gla+mlf"
    mlf = get_method("proxyclip+gla+mlf")
    assert mlf.base == "proxyclip" and mlf.needs("vfm") and mlf.joint_windows and mlf.pad_multiple == 56
    assert get_method("scclip+gla").base == "scclip" and get_method("scclip+gla").pad_multiple == 1
    seg = ovss.load("scclip", gla=True, clip=tiny_clip, tokenizer=bpe_path, scclip_gla_kk="window", gla_rho=0.5)
    assert seg.method.name == "scclip+gla"
    assert seg.options.extra == SCCLIPGLAOptions(kk="window") and seg.options.gla.rho == 0.5
    seg = ovss.load("scclip", clip=tiny_clip, tokenizer=bpe_path, anomaly="topk_norm")
    out = seg.predict(np.zeros((40, 56, 3), np.uint8), ["a", "b"])
    assert out.labels.shape == (40, 56)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    from test_dino import dino_state_dict

    folder = tmp_path_factory.mktemp("weights")
    clip12 = save_open_clip(tiny_clip_state_dict(seed=1, layers=12), folder / "tiny12.bin", "bin")
    dino = folder / "tiny_dino_pretrain.pth"
    torch.save(dino_state_dict(seed=2, grid=28), dino)
    return {"clip": clip12, "dino": dino}


@pytest.mark.parametrize(
    ("method", "extra", "recorded"),
    [
        ("scclip", [], "scclip"),
        ("scclip", ["--gla"], "scclip+gla"),
        ("proxyclip+gla+mlf", ["--opt", "mlf_res_cls=0.3"], "proxyclip+gla+mlf"),
    ],
)
def test_segment_the_example_photo(weights, bpe_path, tmp_path, method, extra, recorded):
    out = tmp_path / "out"
    args = ["segment", "--example", "astronaut", "--labels", "sky, person, rocket", "--method", method,
            "--clip", str(weights["clip"]), "--vfm", str(weights["dino"]), "--tokenizer", str(bpe_path),
            "--out", str(out), "--short-side", "112", "--crop", "112", "--stride", "56", "--no-progress",
            *extra]  # fmt: skip
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == recorded
    labels = np.asarray(Image.open(out / "astronaut.png"))
    if method == "proxyclip+gla+mlf":
        assert config["options"]["extra"]["res_cls"] == 0.3
    # the command's label map is the API's on the same files, image and settings
    from skimage.data import astronaut

    options = {"mlf_res_cls": 0.3} if method == "proxyclip+gla+mlf" else {}
    seg = ovss.load(recorded, clip=str(weights["clip"]), vfm=str(weights["dino"]), tokenizer=str(bpe_path),
                    short_side=112, crop=112, stride=56, **options)  # fmt: skip
    want = seg.predict(astronaut(), [["sky"], ["person"], ["rocket"]]).labels.numpy()  # (512, 512)
    np.testing.assert_array_equal(labels, want)


def test_report_prints_full_split_runs_beside_the_papers(tmp_path, capsys):
    """Full-split runs are printed beside GLA Table 7 and SC-CLIP Fig. 1 (the eval runs: test_eval_methods.py)."""
    for method, preset, miou in (("proxyclip+gla+mlf", "gla", 60.0), ("scclip", "scclip", 55.0)):
        folder = tmp_path / "full" / method
        folder.mkdir(parents=True)
        result = {"method": method, "preset": preset, "dataset": "voc21", "images": 1449, "complete": True,
                  "mIoU": miou, "mAcc": 1.0, "aAcc": 2.0, "BER": 3.0}  # fmt: skip
        (folder / "result.json").write_text(json.dumps(result))
        (folder / "config.json").write_text(json.dumps({"setting": {"overrides": []}}))
    capsys.readouterr()
    assert main(["report", str(tmp_path / "full" / "proxyclip+gla+mlf"), str(tmp_path / "full" / "scclip")]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and "/" in line.split("|")[1]}  # fmt: skip
    assert rows["proxyclip+gla+mlf / gla"][1] == "60.00 (67.9)" and rows["proxyclip+gla+mlf / gla"][7] == "– (43.2)"
    assert rows["proxyclip+gla+mlf / gla"][9] == "– (44.9)"
    assert rows["scclip / scclip"][1] == "55.00 (64.6)" and rows["scclip / scclip"][9] == "– (43.9)"
    assert "GLA-CLIP Table 7" in out and "SC-CLIP Fig. 1" in out


def test_gla_variant_options_keep_their_base_defaults():
    for name, extra in (("scclip+gla", SCCLIPGLAOptions()), ("proxyclip+gla+mlf", MLFOptions())):
        spec = get_method(name)
        base = get_method(spec.base)
        assert spec.options == ComposedOptions(base.options, GLAConfig(), extra)  # one composed type, one part more
        assert spec.logit_scale == base.logit_scale
