"""SAM's encoder attention (slabs of query rows, position terms folded or added) against the official formula.

The reference below is segment-anything's ``Attention.forward`` with ``add_decomposed_rel_pos`` written out
independently of ovss: per-query tables of relative embeddings, einsums, the whole (B, h, N, N) map at once.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ovss.models.sam.image_encoder import SamAttention

WIDTH, HEADS = 32, 2  # head width d = 16


def _attention(size: int, seed: int = 0) -> SamAttention:
    attn = SamAttention(WIDTH, HEADS, size)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[-1] ** -0.5 if p.dim() == 2 else 0.1))
        attn.rel_pos_h.mul_(4.0)  # position terms as large as the q.k term, so a wrong offset shows
        attn.rel_pos_w.mul_(4.0)
    return attn.eval()


def official(attn: SamAttention, x: Tensor) -> Tensor:
    """segment-anything's attention on (B, H, W, D) tokens, the whole logit map at once."""
    B, H, W, D = x.shape
    q, k, v = attn.qkv(x)  # (B, h, N, d) each
    h, d = q.shape[1], q.shape[-1]
    coords = torch.arange(H)
    table_h = attn.rel_pos_h[coords[:, None] - coords[None, :] + H - 1].to(q.dtype)  # (H, H, d)
    table_w = attn.rel_pos_w[coords[:, None] - coords[None, :] + W - 1].to(q.dtype)  # (W, W, d)
    r_q = q.reshape(B, h, H, W, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, table_h)  # (B, h, H, W, H)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, table_w)  # (B, h, H, W, W)
    logits = ((q * attn.scale) @ k.transpose(-2, -1)).view(B, h, H, W, H, W)
    logits = logits + rel_h[..., :, None] + rel_w[..., None, :]  # (B, h, H, W, H, W)
    y = logits.view(B, h, H * W, H * W).softmax(dim=-1) @ v  # (B, h, N, d)
    return attn.proj(y.transpose(1, 2).reshape(B, H, W, D))


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("rows", [0, 7, 1])  # query rows per pass: the whole map, 7 (a partial last slab), 1
@pytest.mark.parametrize("size", [3, 9])  # a window (6 position columns <= d: folded) and a grid (18 > d: added)
def test_attention_equals_the_official_formula(size: int, rows: int, fold: bool) -> None:
    switches = {"attention_chunk": rows * 2 * size * size, "fold_positions": fold}  # batch 2
    attn = _attention(size).double()
    x = torch.randn(2, size, size, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = attn(x, **switches), official(attn, x)
    assert got.shape == (2, size, size, WIDTH)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    attn.float()
    with torch.no_grad():
        got32, want32 = attn(x.float(), **switches), official(attn, x.float())
    assert (got32 - want32).abs().max() <= 1e-5 * want32.abs().max()


@pytest.mark.parametrize("size", [3, 9])
def test_logits_fold_and_add_agree(size: int) -> None:
    """Both ways to apply the position terms give the same logits, and the terms are really there."""
    attn = _attention(size).double()
    q, k, _ = attn.qkv(torch.randn(2, size, size, WIDTH, dtype=torch.float64))
    rows = torch.tensor([0, size * size - 1, size + 1])
    with torch.no_grad():
        folded = attn.logits(q, k, (size, size), rows, fold_positions=True)  # (2, h, 3, N)
        added = attn.logits(q, k, (size, size), rows, fold_positions=False)
    assert (folded - added).abs().max() <= 1e-12 * added.abs().max()
    plain = (q[:, :, rows] * attn.scale) @ k.transpose(-2, -1)
    assert (added - plain).abs().max() > 0.1


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("size", [3, 9])
def test_bf16_autocast_is_as_close_to_fp64_as_the_official_formula(size: int, fold: bool) -> None:
    """Under bf16 autocast the slabs and the folded product err no more than the official code does."""
    switches = {"attention_chunk": 2 * size * size, "fold_positions": fold}  # several rows, not the whole map
    attn = _attention(size)
    x = torch.randn(2, size, size, WIDTH, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = official(attn.double(), x.double())
        attn.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = attn(x, **switches).double()
            baseline = official(attn, x).double()
    err, baseline_err = (got - exact).abs().max(), (baseline - exact).abs().max()
    assert 0 < err <= 1.5 * baseline_err
