"""Small layers shared by SAM's image encoder, prompt encoder and mask decoder (segment-anything ``common.py``)."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, eps 1e-6 (ConvNeXt / detectron2 / SAM).

    The statistics are taken over dim 1 literally, as the official code does: for a batched (B, C, H, W)
    input that is the channel axis; for an unbatched (C, H, W) input (which ``nn.Conv2d`` accepts) it is the
    height axis, and the per-channel weight and bias still broadcast over (C, 1, 1). SAM's mask prompt
    passed unbatched relies on exactly this (spec §4.12.4, Trident's release quirk).
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)  # (B, 1, H, W), or (C, 1, W) for an unbatched (C, H, W) input
        s = (x - u).pow(2).mean(1, keepdim=True)  # biased variance, same shape as u
        x = (x - u) / torch.sqrt(s + self.eps)  # same shape as the input
        return self.weight[:, None, None] * x + self.bias[:, None, None]  # (B, C, H, W) or (C, H, W)


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them: ``lin2(act(lin1(x)))``."""

    def __init__(self, width: int, hidden: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.lin1 = nn.Linear(width, hidden)
        self.lin2 = nn.Linear(hidden, width)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))  # (..., width)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the decoder's hypernetwork and IoU heads)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < last else layer(x)  # (..., hidden_dim) then (..., output_dim)
        return x
