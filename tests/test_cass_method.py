"""``cass`` and ``cass+gla`` through the user path: equal to a float64 reference built from the spec, the
predict-time text side, CASS + GLA's reduction to GLA-CLIP, and ``ovss eval`` on the shared VOC samples."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ovss
from ovss.cli.main import main
from ovss.errors import OvssError
from ovss.methods import get_method
from ovss.methods.cass.method import check_vfm, dino_input, dino_keys_on_grid, run_cass
from ovss.methods.common import Backbones, WindowBatch
from ovss.models.normalization import IMAGENET_MEAN, IMAGENET_STD, InputNorm
from ovss.models.vit_build import build_vit
from ovss.pipeline.image import imagenet_from_clip
from ovss.pipeline.windows import Padding, Window
from test_cass import _ref_fusion

LABELS = ["sky", "road", ["person", "pedestrian"], "cat"]


def _batch(L: int = 2, side: int = 64, seed: int = 0) -> WindowBatch:
    image = torch.randn(3, side, side * L, generator=torch.Generator().manual_seed(seed))
    windows = [Window(0, b * side, side, (b + 1) * side) for b in range(L)]
    crops = torch.stack([image[:, :, w.x1 : w.x2] for w in windows])
    return WindowBatch(crops, windows, Padding(0, 0, 0, 0), (side, side * L), image)


def _ref_cass_tokens(clip, dino, batch: WindowBatch, opts) -> torch.Tensor:
    """Spec §4.10 by hand, float64: patch-only k-k graph fused with the matched low-rank DINO graph, + Omega."""
    vis = clip.visual.double()
    dino = dino.double()
    px = batch.pixels.double()
    x, (gr, gc) = vis.embed(px)
    x = vis.forward_blocks(x, 0, len(vis.blocks) - 1)
    blk = vis.blocks[-1]
    D, H = x.shape[-1], blk.attn.heads
    d = D // H
    qkv = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)[:, 1:]  # (L, N, 3D)
    k = qkv[..., D : 2 * D].unflatten(-1, (H, d)).transpose(1, 2)  # (L, H, N, d)
    v = qkv[..., 2 * D :].unflatten(-1, (H, d)).transpose(1, 2)
    # DINO: square windows, keys of the last block, 2x2 average = bilinear /2 resize to the CLIP grid
    t, _ = dino.embed(imagenet_from_clip(px.float(), InputNorm().mean, InputNorm().std).double())
    t = dino.forward_blocks(t, 0, len(dino.blocks) - 1)
    dblk = dino.blocks[-1]
    kd = F.linear(dblk.ln_1(t), dblk.attn.in_proj_weight, dblk.attn.in_proj_bias)[:, 1:, D : 2 * D]  # (L, n_d, D)
    L, n_d, _ = kd.shape
    h = math.isqrt(n_d)
    kd = kd.view(L, h, h, H, d).view(L, h // 2, 2, h // 2, 2, H, d).mean(dim=(2, 4))  # (L, gr, gc, H, d)
    kd = kd.reshape(L, gr * gc, H, d).transpose(1, 2)  # (L, H, N, d)
    ii, jj = np.meshgrid(np.arange(gr), np.arange(gc), indexing="ij")
    pos = np.stack([ii.ravel(), jj.ravel()], 1)
    omega = np.exp(-((pos[:, None] - pos[None]) ** 2).sum(-1) / (2 * opts.sigma**2))
    out = []
    for b in range(L):
        kb, kdb = k[b].detach().numpy(), kd[b].detach().numpy()
        kdb = (kdb - kdb.min()) / (kdb.max() - kdb.min()) * (kb.max() - kb.min()) + kb.min()
        fused = _ref_fusion(kb, kdb, d**-0.5, opts.pairing, opts.rescale_singular_values)
        logits = torch.as_tensor(fused + omega)
        y = logits.softmax(-1) @ v[b]  # (H, N, d)
        out.append(blk.attn.out_proj(y.transpose(0, 1).reshape(-1, D)))
    clip.visual.float()
    dino.float()
    return torch.stack(out)


def test_run_cass_equals_the_float64_reference(tiny_clip, tiny_dino) -> None:
    batch = _batch()
    opts = get_method("cass").options
    got = run_cass(Backbones(tiny_clip.visual, tiny_dino), batch, opts)
    expected = _ref_cass_tokens(tiny_clip, tiny_dino, batch, opts)
    assert got.grid == (4, 4) and got.tokens.shape == (2, 16, 128)
    torch.testing.assert_close(got.tokens.double(), expected, atol=2e-4, rtol=1e-3)
    assert len(got.window_info["cass_dino_head"]) == 2
    # global embedding: [CLS] of the unmodified tower on the whole processing image, for every window
    whole = F.normalize(tiny_clip.visual(batch.image[None])[:, 0], dim=-1)  # (1, E)
    torch.testing.assert_close(got.extras["global"], whole.expand(2, -1), atol=1e-5, rtol=1e-5)
    own = run_cass(Backbones(tiny_clip.visual, tiny_dino), batch, dataclasses.replace(opts, global_embedding="window"))
    torch.testing.assert_close(own.extras["global"], F.normalize(tiny_clip.visual(batch.pixels)[:, 0], dim=-1))


def test_dino_keys_on_a_non_square_window_use_the_square_resize(tiny_dino) -> None:
    pixels = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    x = dino_input(pixels, InputNorm(), "pixels")
    assert x.shape == (1, 3, 48, 48)
    keys = dino_keys_on_grid(tiny_dino, x, (3, 5))  # DINO grid 6x6 resized to the CLIP grid
    assert keys.shape == (1, 2, 15, 64)
    release = dino_input(pixels[..., :48], InputNorm(), "release")  # square: no resize, 8-bit values
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    u8 = (255 * (pixels[..., :48] * torch.tensor([0.229, 0.224, 0.255])[:, None, None] + mean)).clamp(0, 255).floor()
    torch.testing.assert_close(release, (u8 / 255 - mean) / std)


def test_the_release_switches_match_on_float32_costs(tiny_clip, tiny_dino, monkeypatch) -> None:
    import ovss.methods.cass.graph as cass_graph
    from ovss.eval.presets import _CASS_RELEASE_SWITCHES

    seen: list[bool] = []
    match_heads = cass_graph.match_heads
    monkeypatch.setattr(cass_graph, "match_heads", lambda c, p, t, r: seen.append(r) or match_heads(c, p, t, r))
    opts = get_method("cass").options
    backbones = Backbones(tiny_clip.visual, tiny_dino)
    run_cass(backbones, _batch(), opts)
    run_cass(backbones, _batch(), dataclasses.replace(opts, **_CASS_RELEASE_SWITCHES))
    run_cass(backbones, _batch(), dataclasses.replace(opts, match_tolerance=0.0))
    # one matching per window; float32 costs with the release's raw Hungarian (match_tolerance 0) only
    assert seen == [False, False, True, True, True, True]


def test_cass_never_pads_a_whole_image_whose_sides_are_not_multiples_of_8(
    tiny_clip, tiny_dino, bpe_path, monkeypatch
) -> None:
    # spec §2.3: CASS does not pad; CLIP's patch embedding floors and DINO sees the window resized to a square
    image = (np.random.default_rng(3).random((45, 67, 3)) * 255).astype(np.uint8)
    seg = _load(tiny_clip, tiny_dino, bpe_path, short_side=None, crop=0)
    assert seg.pad_multiple == 1 and seg.config["pad_multiple"] == 1
    fed: dict[str, list[tuple[int, ...]]] = {"clip": [], "dino": []}
    for role, vit in (("clip", tiny_clip.visual), ("dino", tiny_dino)):
        embed = vit.embed
        monkeypatch.setattr(vit, "embed", lambda x, _e=embed, _r=role: fed[_r].append(tuple(x.shape)) or _e(x))
    seg.set_image(image)
    state = seg.image_state()
    assert state.padding == Padding(0, 0, 0, 0) and state.padded_size == (45, 67)
    assert [w.height for w in state.windows] == [45] and [w.width for w in state.windows] == [67]
    # the window as is (and the whole image for the global embedding) to CLIP; a 45x45 square to DINO
    assert fed["clip"] == [(1, 3, 45, 67), (1, 3, 45, 67)] and fed["dino"] == [(1, 3, 45, 45)]
    assert state.grid == (2, 4)  # 45 // 16, 67 // 16: floored, not the (3, 4) of a 48x72 padded window
    # equal to CASS run by hand on the unpadded image
    batch = WindowBatch(state.pixels[None], state.windows, Padding(0, 0, 0, 0), (45, 67), state.pixels)
    out = run_cass(Backbones(tiny_clip.visual, tiny_dino), batch, seg.options)
    expected = F.normalize(tiny_clip.visual.head(out.tokens).float(), dim=-1)  # (1, N, E)
    torch.testing.assert_close(state.features, expected, rtol=0, atol=0)
    # cass+gla keeps ProxyCLIP's DINO-token keys and their padding to 56 (spec §2.3, decisions CASS + GLA)
    assert _load(tiny_clip, tiny_dino, bpe_path, "cass+gla", short_side=None, crop=0).pad_multiple == 56


def test_vfm_head_mismatch_and_missing_vfm_are_one_line_errors(tiny_clip, tiny_dino) -> None:
    with pytest.raises(OvssError, match="needs DINO ViT-B/8"):
        check_vfm(tiny_clip.visual, None, "cass")
    sd = {k: v for k, v in tiny_dino.state_dict().items()}
    four = build_vit(sd, heads=4, act="gelu", eps=1e-6)
    with pytest.raises(OvssError, match=r"CLIP has 2 heads of 64, the VFM 4 of 32"):
        run_cass(Backbones(tiny_clip.visual, four), _batch(), get_method("cass").options)


def _load(tiny_clip, tiny_dino, bpe_path, method: str = "cass", **kw):
    return ovss.load(method, clip=tiny_clip, vfm=tiny_dino, tokenizer=bpe_path, templates="imagenet7", **kw)


def test_window_batches_and_new_label_sets_reuse_set_image(tiny_clip, tiny_dino, bpe_path, monkeypatch) -> None:
    image = (np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8)
    geometry = {"short_side": 64, "crop": 32, "stride": 16}
    one = _load(tiny_clip, tiny_dino, bpe_path, window_batch=1, **geometry).predict(image, LABELS)
    seg = _load(tiny_clip, tiny_dino, bpe_path, window_batch=16, **geometry)
    torch.testing.assert_close(seg.predict(image, LABELS).logits, one.logits, atol=1e-5, rtol=1e-5)
    calls = []
    import ovss.methods.cass.method as cass_module

    monkeypatch.setattr(cass_module, "run_cass", lambda *a: calls.append(1) or run_cass(*a))
    seg.set_image(image)
    first = seg.predict(labels=["cat", "dog", "tree"])
    second = seg.predict(labels=LABELS)  # a new label set: only the text side is recomputed
    assert len(calls) == 1
    torch.testing.assert_close(second.logits, one.logits, atol=1e-5, rtol=1e-5)
    assert first.logits.shape[0] == 3
    # the text side changes the logits: without shift and blend CASS is its plain cosine similarity
    plain = _load(tiny_clip, tiny_dino, bpe_path, global_weight=0.0, text_shift=0.0, **geometry)
    assert (plain.predict(image, LABELS).logits - one.logits).abs().max() > 1e-4


def test_cass_gla_without_text_side_is_proxyclip_gla(tiny_clip, tiny_dino, bpe_path) -> None:
    image = (np.random.default_rng(1).random((80, 120, 3)) * 255).astype(np.uint8)
    geometry = {"short_side": 56, "crop": 56, "stride": 28}
    base = _load(tiny_clip, tiny_dino, bpe_path, "proxyclip+gla", **geometry).predict(image, LABELS)
    plain = _load(tiny_clip, tiny_dino, bpe_path, "cass+gla", global_weight=0.0, text_shift=0.0, **geometry)
    torch.testing.assert_close(plain.predict(image, LABELS).logits, base.logits, atol=1e-5, rtol=1e-5)
    full = _load(tiny_clip, tiny_dino, bpe_path, "cass+gla", global_weight=0.3, text_shift=0.05, **geometry)
    assert (full.predict(image, LABELS).logits - base.logits).abs().max() > 1e-4
    assert get_method("cass+gla").pad_multiple == 56 and get_method("cass+gla").score is get_method("cass").score
    # with CLIP keys instead: NACLIP + GLA's attention
    naclip = _load(tiny_clip, tiny_dino, bpe_path, "naclip+gla", **geometry).predict(image, LABELS)
    keys = {"cross_window_keys": "naclip", "global_embedding": "window", "global_weight": 0.0, "text_shift": 0.0}
    plain_k = _load(tiny_clip, tiny_dino, bpe_path, "cass+gla", **keys, **geometry)
    torch.testing.assert_close(plain_k.predict(image, LABELS).logits, naclip.logits, atol=1e-5, rtol=1e-5)


def test_cass_options_are_checked() -> None:
    spec = get_method("cass")
    with pytest.raises(OvssError, match="global_weight must be in"):
        dataclasses.replace(spec.options, global_weight=1.5)
    with pytest.raises(OvssError, match="pairing"):
        dataclasses.replace(spec.options, pairing="swapped")


# ----------------------------------------------------------------------------- ovss eval / report


def test_report_prints_the_cass_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folders = []
    for method in ("cass", "cass+gla"):
        folder = tmp_path / method
        folder.mkdir()
        result = {"method": method, "preset": "cass", "dataset": "voc21", "images": 1449, "complete": True,
                  "mIoU": 60.0, "mAcc": 1.0, "aAcc": 2.0, "BER": 3.0}  # fmt: skip
        (folder / "result.json").write_text(json.dumps(result))
        (folder / "config.json").write_text(json.dumps({"setting": {"overrides": []}}))
        folders.append(str(folder))
    assert main(["report", *folders]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| cass")}
    assert "60.00 (65.8)" in rows["cass / cass"] and "– (44.4)" in rows["cass / cass"]
    assert "60.00 (67.2)" in rows["cass+gla / cass"] and "– (44.7)" in rows["cass+gla / cass"]
    assert "GLA-CLIP Table 8" in out


# ----------------------------------------------------------------------------- presets


def test_cass_presets_follow_spec_section_5() -> None:
    from ovss.eval.presets import resolve

    geometry = {d: (s.short_side, s.crop, s.stride) for d in ("voc21", "voc20", "cityscapes", "ade20k")
                for s in [resolve("cass", d, "cass")]}  # fmt: skip
    assert geometry == {"voc21": (336, 0, 0), "voc20": (336, 224, 112), "cityscapes": (560, 224, 112),
                        "ade20k": (336, 224, 112)}  # fmt: skip
    values = {  # (g_w, m, h) per dataset, spec §4.10
        "voc21": (0.1, 0.03, 0.10), "voc20": (0.4, 0.02, 0.10), "pc60": (0.25, 0.04, 0.09),
        "pc59": (0.25, 0.04, 0.09), "coco_object": (0.25, 0.01, 0.10), "coco_stuff": (0.2, 0.02, 0.02),
        "cityscapes": (0.1, 0.03, 0.14), "ade20k": (0.3, 0.05, 0.06),
    }  # fmt: skip
    for dataset, (g_w, m, h) in values.items():
        for method in ("cass", "cass+gla"):
            setting = resolve("cass", dataset, method)
            o = setting.method_options
            assert (o["global_weight"], o["text_shift"], o["cluster_threshold"]) == (g_w, m, h)
            assert o["rescale_singular_values"] == (dataset not in ("voc20", "cityscapes"))
            assert o["global_embedding"] == ("window" if dataset == "cityscapes" else "image")
            assert setting.logit_scale == 40.0 and setting.name_set == "full-rename"
            release = resolve("cass-release", dataset, method)
            extra = {k: v for k, v in release.method_options.items() if o.get(k) != v}
            assert extra == {"pairing": "release", "rank": "release", "dino_input": "release", "match_tolerance": 0.0}
            assert release.pipeline_kwargs() == setting.pipeline_kwargs()
    assert resolve("cass", "voc21", "naclip").method_options == {}  # CASS's options go to CASS only
    assert resolve(None, "pc60", "cass+gla").preset == "cass"
    assert resolve("cass", "custom", "cass").method_options["cluster_threshold"] == 0.09
