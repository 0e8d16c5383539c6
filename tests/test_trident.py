"""Trident (spec §4.12) without SAM weights: canvas, sub-image stage, splice, SAM aggregation math."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ovss.errors import OvssError
from ovss.gla.reference import dense_cross_window_attention
from ovss.methods import get_method
from ovss.methods.common import Backbones, WindowBatch
from ovss.methods.composed.bases import ADAPTERS
from ovss.methods.options import TridentOptions
from ovss.methods.trident.method import image_level_attention, run_trident, splice
from ovss.methods.trident.sam import (
    aggregate,
    aggregation_weights,
    sam_geometry,
    valid_attention,
    value_thresholds,
)
from ovss.models.dino import build_vfm, convert_vfm_state_dict
from ovss.pipeline.image import resize_short_side
from ovss.pipeline.windows import Padding, Window, canvas_size, resize_canvas, sliding_windows
from ovss.precision import full_precision
from test_dino import dino_state_dict


@pytest.fixture(scope="module")
def dino16():
    """Tiny DINO v1 with patch 16 (Trident's ViT-B/16 geometry)."""
    return build_vfm(*convert_vfm_state_dict(dino_state_dict(12, patch=16, grid=4)))


# ----------------------------------------------------------------------------------------------- geometry
def test_canvas_and_windows_of_the_worked_examples():
    # VOC 500 x 375 at S = 448 -> 597 x 448 -> canvas 608 x 464 -> 2 x 3 windows of 336, G 29 x 38.
    H, W = resize_short_side(np.zeros((375, 500, 3), np.uint8), 448).shape[:2]
    assert (H, W) == (448, 597)
    canvas = canvas_size(H, W, 336)
    assert canvas == (464, 608)
    windows = sliding_windows(*canvas, 336, 224)
    assert len(windows) == 6 and (canvas[0] // 16, canvas[1] // 16) == (29, 38)
    assert all(w.height == w.width == 336 and w.y1 % 16 == 0 and w.x1 % 16 == 0 for w in windows)
    # Cityscapes 2048 x 1024 at S = 688 -> 1376 x 688, multiples of 16: kept; 3 x 6 windows, G 43 x 86.
    H, W = resize_short_side(np.zeros((1024, 2048, 3), np.uint8), 688).shape[:2]
    assert canvas_size(H, W, 336) == (688, 1376)
    assert len(sliding_windows(688, 1376, 336, 224)) == 18
    # A small image: each side at least the window.
    assert canvas_size(100, 150, 336) == (336, 336)
    assert canvas_size(200, 401, 0) == (208, 416)  # 401 -> 416: 200 * 416 // 401 = 207 -> 208


def test_sam_geometry_of_the_worked_examples():
    voc = sam_geometry(375, 500)
    assert voc.rounded == (384, 512) and voc.input == (768, 1024) and voc.grid == (48, 64)
    assert sam_geometry(1024, 1024).grid == (64, 64)  # a Cityscapes half
    assert sam_geometry(1024, 2048).input == (512, 1024)  # the whole Cityscapes image for refinement
    rows = voc.valid_rows
    assert rows.shape == (48 * 64,) and int(rows[64]) == 64 and int(rows[-1]) == 47 * 64 + 63
    tall = sam_geometry(500, 100)
    assert tall.rounded == (512, 112) and tall.input == (1024, 224) and tall.grid == (64, 14)
    assert int(tall.valid_rows[14]) == 64  # row-major in the 64 x 64 grid


def test_canvas_resize_is_half_pixel_bilinear():
    x = torch.randn(3, 20, 30, generator=torch.Generator().manual_seed(0))
    assert resize_canvas(x, (20, 30)) is x
    want = F.interpolate(x[None].double(), size=(32, 48), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(resize_canvas(x, (32, 48)).double(), want, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- splice
def _splice_by_hand(tokens: Tensor, windows: list[Window], grid: tuple[int, int], canvas: tuple[int, int]) -> Tensor:
    D = tokens.shape[-1]
    Gr, Gc = canvas[0] // 16, canvas[1] // 16
    out = torch.zeros(D, Gr, Gc, dtype=torch.float64)
    for i in range(Gr):
        for j in range(Gc):
            hits = []
            for b, w in enumerate(windows):
                r, c = i - w.y1 // 16, j - w.x1 // 16
                if 0 <= r < grid[0] and 0 <= c < grid[1]:
                    hits.append(tokens[b, r * grid[1] + c].double())
            assert hits, "every canvas position is covered"
            out[:, i, j] = torch.stack(hits).mean(0)
    return out


def test_splice_averages_overlaps_at_patch_offsets():
    canvas = (160, 224)
    windows = sliding_windows(*canvas, 96, 48)  # border-shifted last row / column included
    grid = (6, 6)
    tokens = torch.randn(len(windows), 36, 5, generator=torch.Generator().manual_seed(1))
    got = splice(tokens, windows, grid, canvas)
    torch.testing.assert_close(got.double(), _splice_by_hand(tokens, windows, grid, canvas), atol=1e-6, rtol=0)


def test_one_sub_image_covering_the_canvas_is_the_map_itself():
    canvas = canvas_size(90, 130, 0)  # whole-image mode: crop 0
    windows = sliding_windows(*canvas, 0, 0)
    grid = (canvas[0] // 16, canvas[1] // 16)
    tokens = torch.randn(1, grid[0] * grid[1], 4, generator=torch.Generator().manual_seed(2))
    got = splice(tokens, windows, grid, canvas)
    torch.testing.assert_close(got, tokens[0].T.reshape(4, *grid))


# ----------------------------------------------------------------------------------------------- sub-image stage
def test_image_level_shift_uses_one_mean_over_all_windows():
    f = torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(3)).double()
    fn = f / f.norm(dim=-1, keepdim=True)
    s = fn @ fn.transpose(1, 2)
    a = 3.0 * (s - 1.2 * s.mean())  # one scalar over the 3 x 10 x 10 entries (§4.12.2 step 5)
    want = a.masked_fill(a < 0, -math.inf).softmax(-1)
    got = image_level_attention(f.float(), 1.2, 3.0)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    per_window = 3.0 * (s - 1.2 * s.mean(dim=(1, 2), keepdim=True))
    assert not torch.allclose(want, per_window.masked_fill(per_window < 0, -math.inf).softmax(-1), atol=1e-3)


def _batch(H: int, W: int, crop: int, stride: int, seed: int = 0) -> WindowBatch:
    image = torch.randn(3, H, W, generator=torch.Generator().manual_seed(seed))
    windows = sliding_windows(H, W, crop, stride)
    crops = torch.stack([image[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])
    return WindowBatch(crops, windows, Padding(0, 0, 0, 0), (H, W))


def test_window_mean_option_is_proxyclip_on_the_16_pixel_grid(tiny_clip, dino16):
    backbones = Backbones(tiny_clip.visual, dino16)
    batch = _batch(112, 176, 112, 32)
    proxy = get_method("proxyclip")
    want = proxy.run(backbones, batch, proxy.options).tokens  # ProxyCLIP with a /16 VFM: same grid as CLIP
    got = run_trident(backbones, batch, TridentOptions(shift_mean="window")).tokens
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    image = run_trident(backbones, batch, TridentOptions()).tokens
    assert (image - want).abs().max() > 1e-4  # the release's image-level mean differs from per-window means


def test_trident_needs_a_patch_16_vfm(tiny_clip, tiny_dino):
    with pytest.raises(OvssError, match="dino-vitb16"):
        run_trident(Backbones(tiny_clip.visual, tiny_dino), _batch(112, 112, 112, 56), TridentOptions())
    with pytest.raises(OvssError, match="vfm='dino-vitb16'"):
        run_trident(Backbones(tiny_clip.visual, None), _batch(112, 112, 112, 56), TridentOptions())


def test_trident_gla_replaces_only_the_sub_image_attention(tiny_clip, dino16):
    """trident+gla's sub-image outputs = the one GLA operator (float64 reference) on DINO keys, CLIP values."""
    backbones = Backbones(tiny_clip.visual, dino16)
    batch = _batch(112, 176, 112, 32)
    spec = get_method("trident+gla")
    trident = get_method("trident")
    assert (spec.windowing, spec.finish, spec.post, spec.check) == (
        trident.windowing, trident.finish, trident.post, trident.check
    ) and spec.needs("sam")
    got = spec.run(backbones, batch, spec.options).tokens  # (L, N, D)
    parts = ADAPTERS["trident+gla"](backbones, batch, spec.options)
    L, N, C = parts.values.shape
    keys = [parts.key_sets[0].reshape(L * N, -1)]
    y = dense_cross_window_attention(keys, keys, parts.values.reshape(L * N, C), L, spec.options.gla)
    want = parts.out_proj(y.float().view(L, N, C))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # The values are CLIP's own (not resampled): the grid of the keys is the CLIP grid.
    assert parts.grid == tiny_clip.visual.grid_size(112, 112)
    no_kve = dataclasses.replace(spec.options, gla=dataclasses.replace(spec.options.gla, kve=False))
    assert (spec.run(backbones, batch, no_kve).tokens - got).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------- SAM aggregation
def _aggregation_by_hand(probs: Tensor, values: Tensor, phi: float, neg: bool) -> Tensor:
    """W of §4.12.3 steps 3-4 in float64, with the full C_h matrices."""
    v = values.double()
    v = v / v.norm(dim=-1, keepdim=True)
    Cm = v @ v.transpose(1, 2)  # (H, n, n)
    H, n, _ = Cm.shape
    t = phi * Cm.sum(dim=(0, 2)) / (H * n)  # (n,)
    if not neg:
        t = torch.where(t < 0, torch.full_like(t, 0.6), t)
    t = t.clamp(max=0.9)
    B = (probs.double() * (Cm > t[None, :, None])).mean(0)  # (n, n)
    return B / B.sum(-1, keepdim=True)


@pytest.mark.parametrize(("phi", "neg"), [(1.2, True), (3.0, False), (0.0, True), (-2.0, False), (-2.0, True)])
def test_aggregation_weights_equal_the_formula(phi, neg):
    g = torch.Generator().manual_seed(4)
    H, n, d, N = 3, 12, 5, 16
    values = torch.randn(H, n, d, generator=g) + 0.3
    logits = torch.randn(H, n, N, generator=g) * 2  # valid query rows against all N keys
    valid = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14])  # 4 padded keys dropped: rows sum to < 1
    probs = logits.double().softmax(-1)[:, :, valid]  # (H, n, n)
    got = aggregation_weights(logits, values, valid, phi, neg, rows_per_slab=5)
    torch.testing.assert_close(got.double(), _aggregation_by_hand(probs, values, phi, neg), atol=1e-6, rtol=0)
    assert (got.diagonal() > 0).all()  # the diagonal always survives
    t = value_thresholds(values, phi, neg)
    assert float(t.max()) <= 0.9
    raw = value_thresholds(values, phi, True)
    if not neg:
        assert (raw < 0).any()  # the case is exercised
        torch.testing.assert_close(t, torch.where(raw < 0, torch.full_like(raw, 0.6), raw))


def full_map_weights(attn, q, k, grid, rows, values, phi: float, neg: bool) -> Tensor:
    """The previous path, kept here as the reference: the (H, n_s, n_s) probabilities built whole per head
    (in the caller's precision), then masked and accumulated head by head in fp32."""
    H, n = q.shape[1], rows.shape[0]
    probs = torch.empty(H, n, n, dtype=torch.float32)  # (H, n_s, n_s)
    for h in range(H):
        logits = attn.logits(q[:, h : h + 1], k[:, h : h + 1], grid, rows)  # (1, 1, n_s, N)
        probs[h] = valid_attention(logits[0], rows)[0]  # (n_s, n_s)
    with full_precision():
        t = value_thresholds(values, phi, neg)  # (n_s,)
        v = F.normalize(values.float(), dim=-1)  # (H, n_s, d)
        b = torch.zeros(n, n, dtype=torch.float32)
        for h in range(H):
            keep = (v[h] @ v[h].T) > t[:, None]  # (n_s, n_s)
            b += probs[h].float() * keep
        b /= H
        return b / b.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slabbed_aggregation_is_bit_identical_to_the_full_probability_map(dtype):
    """SAM's global-block geometry (64 x 64 keys, VOC's 48 x 64 valid rows): any slab size, torch.equal."""
    from ovss.methods.trident.sam import BlockLogits
    from ovss.models.sam.image_encoder import SamAttention
    from ovss.tuning import Tuning

    g = torch.Generator().manual_seed(6)
    attn = SamAttention(128, 2, 64)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(1, 64, 64, 128, generator=g)
    rows = sam_geometry(375, 500).valid_rows  # 48 x 64 = 3072 rows; slabs of 7 leave a last one of 6
    reduced = dtype != torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=reduced):
        q, k, v = attn.qkv(x)  # (1, 2, 4096, 64) each, bf16 under autocast
        values = v[0, :, rows]  # (2, n_s, 64)
        want = full_map_weights(attn, q, k, (64, 64), rows, values, 1.2, False)
        logits = BlockLogits(attn, q, k, (64, 64), rows, torch.bfloat16 if reduced else None)
    assert values.dtype == dtype and want.dtype == torch.float32
    default = Tuning().aggregation_rows
    assert 7 < default < 3072  # the default slab splits the map too
    with torch.no_grad():  # outside autocast, as in sam_aggregate: the logits keep the encoder's precision
        for slab in (1, 7, default, 0, 5000):  # one row, a ragged last slab, the default, the whole map
            got = aggregation_weights(logits, values, rows, 1.2, False, rows_per_slab=slab)
            assert torch.equal(got, want), slab
    assert torch.allclose(got.sum(-1), torch.ones(3072))


def test_valid_rows_softmax_over_all_keys_then_dropped():
    geometry = sam_geometry(100, 160)  # input 640 x 1024 -> grid 40 x 64
    rows = geometry.valid_rows
    g = torch.Generator().manual_seed(5)
    full = torch.randn(1, 4096, 4096, generator=g) * 3  # every query against every key
    got = valid_attention(full[:, rows], rows)  # only the valid query rows were computed
    dense = full.double().softmax(-1)[:, rows][:, :, rows]
    torch.testing.assert_close(got.double(), dense, atol=1e-6, rtol=1e-5)
    assert float(got.sum(-1).max()) < 1.0  # padded keys took some of the mass


def test_aggregate_is_w_times_the_resized_spliced_map():
    g = torch.Generator().manual_seed(6)
    Y = torch.randn(7, 29, 38, generator=g)
    grid = (48, 64)
    n = grid[0] * grid[1]
    Wm = torch.rand(n, n, generator=g)
    Wm = Wm / Wm.sum(-1, keepdim=True)
    X = F.interpolate(Y[None].double(), size=grid, mode="bilinear", align_corners=False)[0].flatten(1).T
    torch.testing.assert_close(aggregate(Wm, Y, grid).double(), Wm.double() @ X, atol=1e-5, rtol=1e-5)


def test_registry_and_options():
    spec = get_method("trident")
    assert spec.weights == (("vfm", "dino-vitb16"), ("sam", "sam-vitb")) and spec.logit_scale == 40.0
    opts = spec.options
    assert (opts.refine, opts.mask_prompt, opts.failed, opts.shift_mean) == (True, "release", "release", "image")
    assert (opts.iou_thresh, opts.min_area, opts.mask_coef) == (0.8, 225, 0.005)
    assert get_method("trident+gla").base == "trident"


def test_trident_preset_per_dataset():
    from ovss.eval.presets import default_preset, resolve
    from ovss.eval.reference import reference_for

    assert default_preset("trident") == default_preset("trident+gla") == "trident"
    voc = resolve("trident", "voc21", "trident")
    assert (voc.short_side, voc.crop, voc.stride, voc.bg_threshold, voc.logit_scale) == (448, 336, 224, 0.2, 40.0)
    assert voc.name_set == "bg-rename" and voc.method_options == {"coarse_thresh": 0.2, "cos_fac": 1.2}
    city = resolve("trident", "cityscapes", "trident+gla")
    assert (city.short_side, city.crop, city.stride) == (688, 336, 224)
    assert city.method_options == {
        "coarse_thresh": 0.1, "cos_fac": 3.0, "refine_neg_cos": False, "split_halves": True
    }  # fmt: skip
    assert resolve("trident", "voc20", "trident").method_options["cos_fac"] == 0.0
    assert resolve("trident", "ade20k", "trident").method_options["refine_neg_cos"] is False
    assert resolve("trident", "pc60", "proxyclip").method_options == {}  # other methods get no Trident options
    table6 = reference_for("trident+gla", "trident")
    assert table6 is not None and table6.miou["cityscapes"] == 43.6 and table6.average == 46.1
    own = reference_for("trident", "trident")
    assert own is not None and own.miou["voc21"] == 67.1 and own.average == 45.8
