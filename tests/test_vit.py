"""The ViT backbone: built from shapes, position-table interpolation, attention vs PyTorch's MHA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ovss.models.clip import build_clip
from ovss.models.vit_build import build_vit


def _cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _bicubic_1d_matrix(src: int, dst: int, offset: float = 0.1) -> torch.Tensor:
    """Interpolation matrix (dst, src) with x_src = (x_dst + 0.5) * src / (dst + offset) - 0.5, clamped borders."""
    m = torch.zeros(dst, src, dtype=torch.float64)
    for x in range(dst):
        s = (x + 0.5) * src / (dst + offset) - 0.5
        i0 = math.floor(s)
        for k in range(-1, 3):
            m[x, min(max(i0 + k, 0), src - 1)] += _cubic(s - (i0 + k))
    return m


def test_built_from_shapes(tiny_state_dict):
    model = build_clip(tiny_state_dict)
    cfg = model.visual.cfg
    assert (cfg.patch, cfg.width, cfg.layers, cfg.heads, cfg.grid, cfg.output_dim) == (16, 128, 3, 2, 14, 64)
    assert model.text is not None and model.text.cfg.layers == 2 and model.text.cfg.output_dim == 64
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("rows, cols", [(21, 21), (14, 28), (9, 17), (28, 28)])
def test_position_table_matches_hand_bicubic(tiny_clip, rows, cols):
    vit = tiny_clip.visual
    table = vit.positional_embedding.detach().double()
    G, D = 14, table.shape[1]
    grid = table[1:].reshape(G, G, D)
    ref = torch.einsum("rg,cG,gGd->rcd", _bicubic_1d_matrix(G, rows), _bicubic_1d_matrix(G, cols), grid)
    out = vit.position_table(rows, cols)
    assert out.shape == (1 + rows * cols, D)
    torch.testing.assert_close(out[0].double(), table[0])
    torch.testing.assert_close(out[1:].double(), ref.reshape(rows * cols, D), atol=1e-5, rtol=1e-5)


def test_position_table_native_grid_untouched(tiny_clip):
    vit = tiny_clip.visual
    assert vit.position_table(14, 14) is vit.positional_embedding


def test_patch_embedding_floors_odd_sizes(tiny_clip):
    x, grid = tiny_clip.visual.embed(torch.randn(1, 3, 230, 250))
    assert grid == (14, 15) and x.shape == (1, 1 + 14 * 15, 128)


def test_attention_equals_torch_multihead_attention(tiny_clip):
    block = tiny_clip.visual.blocks[1]
    mha = nn.MultiheadAttention(128, 2, batch_first=True)
    mha.load_state_dict(block.attn.state_dict())
    x = torch.randn(3, 50, 128)
    ref, _ = mha(x, x, x, need_weights=False)
    torch.testing.assert_close(block.attn(x), ref, atol=1e-5, rtol=1e-5)
    _, weights = mha(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(block.attn.attention_map(x), weights, atol=1e-6, rtol=1e-5)


def test_text_tower_reads_eot_position(tiny_clip):
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[0, :4] = torch.tensor([49406, 320, 2368, 49407])
    tokens[1, :3] = torch.tensor([49406, 2368, 49407])
    out = tiny_clip.encode_text(tokens)
    assert out.shape == (2, 64)
    # Changing a token after [EOT] (padding) must not change the features: the mask is causal.
    tokens2 = tokens.clone()
    tokens2[0, 10] = 555
    torch.testing.assert_close(tiny_clip.encode_text(tokens2), out)


def test_build_rejects_non_square_table(tiny_state_dict):
    sd = {k[7:]: v for k, v in tiny_state_dict.items() if k.startswith("visual.")}
    sd["positional_embedding"] = sd["positional_embedding"][:-3]
    with pytest.raises(ValueError, match="square"):
        build_vit(sd)
