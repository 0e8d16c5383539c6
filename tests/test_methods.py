"""Each method's last block against an independent, release-style reference (LND layout, bmm, F.linear)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovss.methods import available_methods, get_method
from ovss.methods.common import Backbones, WindowBatch
from ovss.methods.naclip import gaussian_prior
from ovss.pipeline.windows import Padding, Window


def _batch(pixels: torch.Tensor) -> WindowBatch:
    L, _, h, w = pixels.shape
    return WindowBatch(pixels, [Window(0, 0, h, w)] * L, Padding(0, 0, 0, 0), (h, w))


def _run(tiny_clip, name: str, pixels: torch.Tensor, **overrides) -> torch.Tensor:
    import dataclasses

    spec = get_method(name)
    opts = dataclasses.replace(spec.options, **overrides)
    return spec.run(Backbones(tiny_clip.visual), _batch(pixels), opts).tokens


def _release_last_block(vit, pixels: torch.Tensor, kind: str, **kw) -> torch.Tensor:
    """The releases' code path: LND tokens, in_proj via F.linear, per-head bmm, custom attention."""
    x, grid = vit.embed(pixels)
    for blk in vit.blocks[:-1]:
        x = blk(x)
    blk = vit.blocks[-1]
    x = x.permute(1, 0, 2)  # (n, B, D)
    n, B, D = x.shape
    H = D // 64
    d = D // H
    scale = d**-0.5
    y = F.layer_norm(x, (D,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
    q, k, v = F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.contiguous().view(n, B * H, d).transpose(0, 1) for t in (q, k, v))  # (B*H, n, d)
    if kind == "qk":
        attn = F.softmax(torch.bmm(q, k.transpose(1, 2)) * scale, dim=-1)
    elif kind == "qq":
        attn = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1)
    elif kind == "csa":
        attn = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1) + F.softmax(
            torch.bmm(k, k.transpose(1, 2)) * scale, dim=-1
        )
    elif kind == "naclip":
        # The release builds Omega by sliding a (2gr-1)x(2gc-1) Gaussian window over the grid.
        gr, gc = grid
        sigma = kw["sigma"]
        yy, xx = torch.meshgrid(torch.arange(2 * gr - 1.0), torch.arange(2 * gc - 1.0), indexing="ij")
        window = torch.exp(-((yy - (gr - 1)) ** 2 + (xx - (gc - 1)) ** 2) / (2 * sigma**2))
        omega = torch.zeros(n, n)
        for i in range(gr):
            for j in range(gc):
                patch = window[gr - 1 - i : 2 * gr - 1 - i, gc - 1 - j : 2 * gc - 1 - j]
                omega[1 + i * gc + j, 1:] = patch.reshape(-1)
        attn = F.softmax(torch.bmm(k, k.transpose(1, 2)) * scale + omega, dim=-1)
    elif kind == "identity":
        attn = torch.eye(n).expand(B * H, n, n)
    out = torch.bmm(attn, v).transpose(0, 1).contiguous().view(n, B, D)
    out = blk.attn.out_proj(out)
    if kw.get("residual_ffn"):
        out = x + out
        out = out + blk.mlp(F.layer_norm(out, (D,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps))
    return out.permute(1, 0, 2)[:, 1:]  # (B, N, D) patches


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 160, 192, generator=torch.Generator().manual_seed(3))


def test_all_baselines_registered():
    for name in ["vanilla", "vanilla-reduced", "maskclip", "maskclip-reimpl", "sclip", "clearclip", "naclip"]:
        assert name in available_methods()


def test_vanilla_with_residual_ffn_equals_backbone_forward(tiny_clip, pixels):
    z = _run(tiny_clip, "vanilla", pixels)
    dense = tiny_clip.visual.head(z)
    full = tiny_clip.visual(pixels)[:, 1:]
    torch.testing.assert_close(dense, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name, kind, kw",
    [
        ("vanilla-reduced", "qk", {}),
        ("maskclip", "identity", {"residual_ffn": True}),
        ("maskclip-reimpl", "identity", {}),
        ("sclip", "csa", {"residual_ffn": True}),
        ("clearclip", "qq", {}),
        ("naclip", "naclip", {"sigma": 5.0}),
    ],
)
def test_method_matches_release_reference(tiny_clip, pixels, name, kind, kw):
    ours = _run(tiny_clip, name, pixels)
    ref = _release_last_block(tiny_clip.visual, pixels, kind, **kw)
    assert ours.shape == ref.shape == (2, 10 * 12, 128)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_sclip_reduced_drops_residual_and_ffn(tiny_clip, pixels):
    ours = _run(tiny_clip, "sclip", pixels, reduced=True)
    torch.testing.assert_close(
        ours, _release_last_block(tiny_clip.visual, pixels, "csa"), atol=2e-5, rtol=1e-4
    )


def test_naclip_sigma_changes_result(tiny_clip, pixels):
    a = _run(tiny_clip, "naclip", pixels, sigma=5.0)
    b = _run(tiny_clip, "naclip", pixels, sigma=2.0)
    torch.testing.assert_close(
        b, _release_last_block(tiny_clip.visual, pixels, "naclip", sigma=2.0), atol=2e-5, rtol=1e-4
    )
    assert (a - b).abs().max() > 1e-4


def test_naclip_variants_kk_vanilla(tiny_clip, pixels):
    torch.testing.assert_close(
        _run(tiny_clip, "naclip", pixels, attn="vanilla"),
        _release_last_block(tiny_clip.visual, pixels, "qk"),
        atol=2e-5,
        rtol=1e-4,
    )
    vanilla_arch = _run(tiny_clip, "naclip", pixels, arch="vanilla", attn="vanilla")
    full = tiny_clip.visual.forward_blocks(tiny_clip.visual.embed(pixels)[0])[:, 1:]
    torch.testing.assert_close(vanilla_arch, full, atol=1e-5, rtol=1e-5)


def test_gaussian_prior_peak_and_cls():
    omega = gaussian_prior(3, 4, 5.0)
    assert omega.shape == (13, 13)
    assert torch.all(omega[0] == 0) and torch.all(omega[:, 0] == 0)
    assert torch.allclose(torch.diagonal(omega)[1:], torch.ones(12))
    # patches (0,0) and (2,3): squared distance 4 + 9 = 13
    assert omega[1, 12].item() == pytest.approx(torch.exp(torch.tensor(-13 / 50)).item(), rel=1e-6)


def test_clearclip_last_n_layers_sums_blocks(tiny_clip, pixels):
    one = _run(tiny_clip, "clearclip", pixels)
    two = _run(tiny_clip, "clearclip", pixels, last_n_layers=2)
    from ovss.methods.clearclip import qq_attention_output

    vit = tiny_clip.visual
    x = vit.forward_blocks(vit.embed(pixels)[0], 0, 1)
    extra = qq_attention_output(vit.blocks[1], x)[:, 1:]
    torch.testing.assert_close(two, one + extra, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["vanilla", "maskclip", "sclip", "clearclip", "naclip"])
def test_batched_windows_equal_one_by_one(tiny_clip, pixels, name):
    together = _run(tiny_clip, name, pixels)
    apart = torch.cat([_run(tiny_clip, name, pixels[i : i + 1]) for i in range(len(pixels))])
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-5)
