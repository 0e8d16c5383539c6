"""The ViT's faster MLP path equals the plain one bit for bit (fp32 and under bf16 autocast)."""

from __future__ import annotations

import pytest
import torch

from ovss.models.layers import QuickGELU
from ovss.models.vit import ResidualAttentionBlock
from ovss.precision import backbone_precision


def _block(act: str) -> ResidualAttentionBlock:
    gen = torch.Generator().manual_seed(0)
    block = ResidualAttentionBlock(64, 1, 256, act, 1e-5, False)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return block.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quick_gelu_inplace_equals_forward(dtype):
    x = (4 * torch.randn(3, 50, 256, generator=torch.Generator().manual_seed(1))).to(dtype)  # (B, n, 4D)
    x[0, 0, :4] = torch.tensor([0.0, -0.0, 60.0, -60.0])  # zero, saturated sigmoid both ways
    expected = QuickGELU()(x)
    got = QuickGELU.inplace(x.clone())
    assert got.dtype == dtype
    assert torch.equal(got, expected)
    # and both are the activation itself (fp64 formula, to the dtype's rounding)
    x64 = x.double()
    exact = x64 / (1 + torch.exp(-1.702 * x64))
    tol = 1e-6 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got.double(), exact, rtol=tol, atol=tol)


def test_quick_gelu_inplace_writes_into_its_input():
    x = torch.randn(8, 16)
    out = QuickGELU.inplace(x)
    assert out.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_forward_equals_sequential_mlp(act, dtype):
    block = _block(act)
    x = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(2))  # (B, n, D)
    with torch.inference_mode(), backbone_precision(torch.device("cpu"), dtype):
        expected = block.mlp(block.ln_2(x))  # the nn.Sequential: fc1, activation, fc2
        got = block.ffn(x)
        whole = block(x)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)
    assert torch.isfinite(whole).all()


def test_mlp_forward_keeps_autograd_working():
    block = _block("quick_gelu")
    for p in block.parameters():
        p.requires_grad_(True)
    x = torch.randn(2, 5, 64, requires_grad=True)
    out = block.ffn(x)
    assert torch.equal(out.detach(), block.mlp(block.ln_2(x)).detach())
    out.sum().backward()  # an in-place activation here would fail: a value the backward needs was overwritten
    assert x.grad is not None and torch.isfinite(x.grad).all()
