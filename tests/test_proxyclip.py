"""ProxyCLIP (spec §4.7) against a dense per-window computation written straight from the formulas."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ovss.config import PipelineConfig
from ovss.errors import OvssError
from ovss.methods import get_method
from ovss.methods.common import Backbones, WindowBatch
from ovss.methods.proxyclip import (
    ProxyCLIPOptions,
    clip_values_on_grid,
    masked_softmax,
    proxy_attention,
    run_proxyclip,
    vfm_features,
)
from ovss.models.dino import build_vfm, convert_vfm_state_dict
from ovss.pipeline.windows import Padding, Window
from ovss.predictor import Segmenter
from test_dino import dino_state_dict

CLIP_MEAN = (122.771, 116.746, 104.094)  # spec §2.1, 0-255 scale (mmseg, rounded): the CLIP input
CLIP_STD = (68.501, 66.632, 70.323)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # spec §4.7 step 1, 0-1 scale, unrounded: the releases' un-norm
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IN_MEAN = (0.485, 0.456, 0.406)  # spec §4.7 step 1, 0-1 scale
IN_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def dino():
    """Tiny DINO v1 (patch 8, width 128, 2 blocks)."""
    return build_vfm(*convert_vfm_state_dict(dino_state_dict(10, patch=8, grid=4)))


@pytest.fixture(scope="module")
def dinov2_reg():
    """Tiny DINOv2 with 4 registers (patch 14)."""
    return build_vfm(*convert_vfm_state_dict(dino_state_dict(11, patch=14, grid=4, registers=4, dinov2=True)))


def _pixels(L: int, h: int, w: int, seed: int = 0) -> Tensor:
    return torch.randn(L, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _batch(pixels: Tensor) -> WindowBatch:
    L, _, h, w = pixels.shape
    return WindowBatch(pixels, [Window(0, 0, h, w)] * L, Padding(0, 0, 0, 0), (h, w))


def _run(clip, vfm, pixels: Tensor, **options) -> Tensor:
    return run_proxyclip(Backbones(clip, vfm), _batch(pixels), ProxyCLIPOptions(**options)).tokens


def imagenet_by_hand(window: Tensor) -> Tensor:
    """(3, h, w) CLIP-normalised -> ImageNet-normalised as the ProxyCLIP / GLA releases do (spec §4.7 step 1).

    The releases' ``UnNormalize`` (per channel ``t.mul_(s).add_(m)`` with OpenAI's unrounded 0-1 statistics)
    followed by torchvision's ``Normalize`` (``sub_(mean).div_(std)``), all in fp32.
    """
    y = window.float().clone()  # (3, h, w)
    for t, m, s in zip(y, OPENAI_MEAN, OPENAI_STD, strict=True):
        t.mul_(s).add_(m)  # (h, w) in place, multiply then add
    mean = torch.tensor(IN_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IN_STD, dtype=torch.float32).view(3, 1, 1)
    return y.sub_(mean).div_(std)  # (3, h, w)


def test_vfm_input_is_the_releases_arithmetic_bit_for_bit(assets_dir) -> None:
    from ovss.pipeline.image import clip_normalize, imagenet_from_clip, read_image

    image = read_image(assets_dir / "voc2012-val-samples" / "images" / "114_image.png")[:40, :56]  # (40, 56, 3) uint8
    windows = torch.stack([clip_normalize(image), _pixels(1, 40, 56, seed=4)[0]])  # (2, 3, 40, 56)
    ours = imagenet_from_clip(windows)
    for b in range(2):
        assert torch.equal(ours[b], imagenet_by_hand(windows[b]))
    # It is not pixel / 255: the CLIP input was made with mmseg's rounded 0-255 statistics.
    raw = windows[0] * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)  # 0..255
    via_pixels = (raw / 255 - torch.tensor(IN_MEAN).view(3, 1, 1)) / torch.tensor(IN_STD).view(3, 1, 1)
    gap = (ours[0] - via_pixels).abs().max().item()
    assert 1e-6 < gap < 1e-4
    # Another CLIP's statistics (OpenCLIP laion2b: 0.5 / 0.5) are taken as given.
    half = imagenet_from_clip(windows, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    expected = (windows * 0.5 + 0.5 - torch.tensor(IN_MEAN).view(3, 1, 1)) / torch.tensor(IN_STD).view(3, 1, 1)
    assert torch.equal(half, expected)


def reference_window(clip, vfm, window: Tensor, beta: float, gamma: float) -> tuple[Tensor, Tensor]:
    """ProxyCLIP for one (3, h, w) CLIP-normalised window, step by step from spec §4.7.

    Returns:
        z (N, D) on the VFM grid and the attention (N, N).
    """
    # 1. VFM input: the same pixels in ImageNet normalisation.
    vfm_in = imagenet_by_hand(window)  # (3, h, w)
    # 2. Last-block tokens after the final norm (the plain forward of a DINO tower), [CLS]/registers dropped.
    tokens = vfm(vfm_in[None])[0]  # (1 + R + N, D_v)
    feats = tokens[1 + vfm.cfg.registers :].double()  # (N, D_v)
    hr, hc = window.shape[1] // vfm.cfg.patch, window.shape[2] // vfm.cfg.patch
    # 3. Cosine similarity.
    unit = feats / feats.norm(dim=1, keepdim=True)
    S = unit @ unit.T  # (N, N)
    # 4. A = gamma (S - beta mean(S)), scalar mean; keep A >= 0 (or the row max if none), softmax.
    A = gamma * (S - beta * S.mean())
    attn = torch.zeros_like(A)
    for i in range(A.shape[0]):
        keep = A[i] >= 0 if bool((A[i] >= 0).any()) else A[i] == A[i].max()
        e = torch.exp(A[i][keep] - A[i][keep].max())
        attn[i][keep] = e / e.sum()
    # 5. CLIP values of the last block from LN_1(x11), [CLS] dropped, per head bilinear g -> h.
    x, (gr, gc) = clip.embed(window[None])
    for block in clip.blocks[:-1]:
        x = block(x)
    last = clip.blocks[-1]
    D = x.shape[-1]
    y = F.layer_norm(x[0], (D,), last.ln_1.weight, last.ln_1.bias, last.ln_1.eps)  # (1 + gr*gc, D)
    v = F.linear(y, last.attn.in_proj_weight[2 * D :], last.attn.in_proj_bias[2 * D :])[1:]  # (gr*gc, D)
    heads = last.attn.heads
    d = D // heads
    outs = []
    for h in range(heads):
        v_h = v[:, h * d : (h + 1) * d].T.reshape(1, d, gr, gc)  # (1, d, gr, gc)
        v_h = F.interpolate(v_h, size=(hr, hc), mode="bilinear", align_corners=False)[0]  # (d, hr, hc)
        outs.append(attn @ v_h.reshape(d, hr * hc).T.double())  # (N, d)
    # 6. OutProj of the concatenated heads; no residual, no FFN.
    z = F.linear(torch.cat(outs, dim=1).float(), last.attn.out_proj.weight, last.attn.out_proj.bias)
    return z, attn


def test_registered_spec():
    spec = get_method("proxyclip")
    assert spec.run.resolve() is run_proxyclip and spec.needs("vfm")  # imported on first use
    assert (spec.logit_scale, spec.pad_multiple) == (40.0, 56)
    assert (spec.geometry.short_side, spec.geometry.crop, spec.geometry.stride) == (336, 336, 112)
    assert spec.options == ProxyCLIPOptions(beta=1.2, gamma=3.0)


@pytest.mark.parametrize(("h", "w"), [(112, 112), (112, 168)])
def test_matches_dense_reference(tiny_clip, dino, h, w):
    clip = tiny_clip.visual
    pixels = _pixels(2, h, w)
    out = run_proxyclip(Backbones(clip, dino), _batch(pixels), ProxyCLIPOptions())
    hr, hc = h // 8, w // 8
    assert out.grid == (hr, hc)  # logits live on the DINO grid (stride 8)
    assert out.tokens.shape == (2, hr * hc, 128)
    masked = []
    for b in range(2):
        z_ref, attn = reference_window(clip, dino, pixels[b], beta=1.2, gamma=3.0)
        torch.testing.assert_close(out.tokens[b], z_ref, atol=1e-4, rtol=1e-4)
        masked.append(float((attn == 0).double().mean()))
    assert all(0.05 < m < 0.95 for m in masked), masked  # the mask really removes part of every map


def test_beta_and_gamma_change_the_result(tiny_clip, dino):
    clip = tiny_clip.visual
    pixels = _pixels(1, 112, 112, seed=1)
    base = _run(clip, dino, pixels)
    for options in ({"beta": 1.0}, {"gamma": 2.0}, {"beta": 1.4, "gamma": 5.0}):
        other = _run(clip, dino, pixels, **options)
        assert (other - base).abs().max() > 1e-3, options
        z_ref, _ = reference_window(clip, dino, pixels[0], **{"beta": 1.2, "gamma": 3.0, **options})
        torch.testing.assert_close(other[0], z_ref, atol=1e-4, rtol=1e-4)


def test_batched_windows_equal_one_by_one(tiny_clip, dino):
    clip = tiny_clip.visual
    pixels = _pixels(3, 112, 112, seed=2)
    # Very different windows: a per-batch (instead of per-window) mean would change every map.
    pixels[1] = pixels[1] * 0.1 + 1.0
    together = _run(clip, dino, pixels)
    for b in range(3):
        alone = _run(clip, dino, pixels[b : b + 1])
        torch.testing.assert_close(together[b : b + 1], alone, atol=1e-5, rtol=1e-5)


def test_cls_and_registers_are_excluded(tiny_clip, dinov2_reg):
    clip = tiny_clip.visual
    pixels = _pixels(2, 112, 168, seed=3)
    feats, grid = vfm_features(dinov2_reg, pixels)
    assert grid == (8, 12) and feats.shape == (2, 96, 128)
    full = dinov2_reg(torch.stack([imagenet_by_hand(p) for p in pixels]))  # (2, 1 + 4 + 96, D)
    torch.testing.assert_close(feats, full[:, 5:], atol=1e-5, rtol=1e-5)
    # CLIP values on CLIP's own grid (no resize): exactly the patch rows of v, [CLS] dropped.
    v, x11 = clip_values_on_grid(clip, pixels, (7, 10))
    last = clip.blocks[-1]
    _, _, v_all = last.attn.qkv(last.ln_1(x11))  # (2, H, 1 + 70, d)
    assert x11.shape == (2, 71, 128) and v.shape == (2, 2, 70, 64)
    torch.testing.assert_close(v, v_all[:, :, 1:], atol=1e-6, rtol=1e-6)
    # The whole method with a register VFM matches the reference, which drops 1 + R tokens.
    out = run_proxyclip(Backbones(clip, dinov2_reg), _batch(pixels), ProxyCLIPOptions())
    assert out.grid == (8, 12)
    z_ref, _ = reference_window(clip, dinov2_reg, pixels[1], 1.2, 3.0)
    torch.testing.assert_close(out.tokens[1], z_ref, atol=1e-4, rtol=1e-4)


def test_masked_softmax_by_hand():
    logits = torch.tensor(
        [
            [1.0, -0.5, 0.0, 2.0],  # mixed: the negative entry is masked
            [-3.0, -1.0, -1.0, -2.0],  # all negative: only the (tied) maximum survives
            [-1.0, -0.2, -5.0, -0.3],  # all negative: only the maximum survives
        ]
    )
    e = [math.exp(1.0), math.exp(0.0), math.exp(2.0)]
    expected = torch.tensor(
        [
            [e[0] / sum(e), 0.0, e[1] / sum(e), e[2] / sum(e)],
            [0.0, 0.5, 0.5, 0.0],
            [0.0, 1.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(masked_softmax(logits), expected)


def test_proxy_attention_by_hand():
    # Unit features e1, e2 and (e1 + e2) / sqrt(2): S = [[1, 0, c], [0, 1, c], [c, c, 1]], c = 1/sqrt(2).
    feats = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    c = 2**-0.5
    mean = (3 + 4 * c) / 9
    a_self, a_c = 3.0 * (1 - mean), 3.0 * (c - mean)  # gamma = 3, beta = 1; the zero entries are negative
    w = math.exp(a_self) / (math.exp(a_self) + math.exp(a_c))
    w2 = math.exp(a_self) / (math.exp(a_self) + 2 * math.exp(a_c))
    expected = torch.tensor([[[w, 0.0, 1 - w], [0.0, w, 1 - w], [(1 - w2) / 2, (1 - w2) / 2, w2]]])
    torch.testing.assert_close(proxy_attention(feats, beta=1.0, gamma=3.0), expected)
    # With beta = 1.2 the off-diagonal c - 1.2 * mean < 0: each row keeps only itself.
    torch.testing.assert_close(proxy_attention(feats, beta=1.2, gamma=3.0), torch.eye(3)[None])


def test_rows_without_non_negative_entries_keep_their_maximum():
    # Nearly identical features: S ~ 1 everywhere, so gamma (S - 1.2 mean(S)) < 0 in every entry.
    g = torch.Generator().manual_seed(0)
    feats = torch.ones(1, 50, 16) + 0.01 * torch.randn(1, 50, 16, generator=g)
    s = F.normalize(feats, dim=-1) @ F.normalize(feats, dim=-1).transpose(1, 2)
    assert bool((3.0 * (s - 1.2 * s.mean()) < 0).all())
    attn = proxy_attention(feats, beta=1.2, gamma=3.0)
    torch.testing.assert_close(attn, torch.eye(50)[None])  # the diagonal (S_ii = 1) is each row's maximum


def test_errors(tiny_clip, dino, dinov2_reg):
    clip = tiny_clip.visual
    with pytest.raises(OvssError, match="needs a vision foundation model"):
        _run(clip, None, _pixels(1, 112, 112))
    with pytest.raises(OvssError, match="not a multiple of the VFM patch 14"):
        _run(clip, dinov2_reg, _pixels(1, 112, 120))
    with pytest.raises(OvssError, match="gamma must be > 0"):
        _run(clip, dino, _pixels(1, 112, 112), gamma=0.0)


def test_segmenter_pads_small_images_and_scores_on_the_dino_grid(tiny_clip, dino):
    spec = get_method("proxyclip")
    config = PipelineConfig(short_side=None, crop=112, stride=56, logit_scale=spec.logit_scale)
    seg = Segmenter(tiny_clip, spec, dataclasses.replace(spec.options), config, vfm=dino)
    image = np.random.default_rng(0).integers(0, 256, size=(100, 150, 3), dtype=np.uint8)
    text = F.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(5)), dim=-1)
    pred = seg.predict(image, ["a", "b", "c"], text_embeddings=text)
    assert pred.logits.shape == (3, 100, 150)
    windows, _ = seg.current_windows()
    assert len(windows) == 2  # 100 rows < 112: one row of windows, padded to 112 x 112
    assert pred.config["method_info"]["clip_grid"] == (7, 7)
    assert bool(torch.isfinite(pred.logits).all())
