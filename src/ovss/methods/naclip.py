"""NACLIP (spec §4.5): key-key attention plus a Gaussian neighbourhood prior, reduced architecture."""

from __future__ import annotations

import functools

import torch

from ovss.errors import OvssError
from ovss.methods.common import (
    Backbones,
    MethodOutput,
    WindowBatch,
    attend,
    patch_tokens,
    residual_ffn,
    softmax_attention,
    tokens_before_last_block,
)
from ovss.methods.options import NACLIPOptions


@functools.lru_cache(maxsize=32)
def gaussian_prior(rows: int, cols: int, sigma: float, prefix: int = 1) -> torch.Tensor:
    """NACLIP's Omega: exp(-((i-m)^2 + (j-n)^2) / (2 sigma^2)) between patches, peak 1, 0 for [CLS].

    Returns:
        (prefix + rows * cols, prefix + rows * cols) fp32.
    """
    ii, jj = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pos = torch.stack([ii.flatten(), jj.flatten()], dim=1).double()  # (N, 2)
    d2 = (pos[:, None, :] - pos[None, :, :]).pow(2).sum(-1)  # (N, N)
    n = prefix + rows * cols
    omega = torch.zeros(n, n, dtype=torch.float64)
    omega[prefix:, prefix:] = torch.exp(-d2 / (2 * sigma**2))
    return omega.float()


def run_naclip(backbones: Backbones, batch: WindowBatch, opts: NACLIPOptions) -> MethodOutput:
    clip = backbones.clip
    x, grid = tokens_before_last_block(clip, batch.pixels, block_tokens=backbones.tuning.block_tokens)  # (L, n, D)
    block = clip.blocks[-1]
    q, k, v = block.attn.qkv(block.ln_1(x))  # (L, H, n, d) each
    scale = block.attn.scale
    omega = gaussian_prior(grid[0], grid[1], float(opts.sigma), clip.num_prefix_tokens).to(x.device)  # (n, n)
    if opts.attn == "naclip":
        attn = softmax_attention(k, k, scale, bias=omega)  # (L, H, n, n)
    elif opts.attn == "kk":
        attn = softmax_attention(k, k, scale)
    elif opts.attn == "vanilla":
        attn = softmax_attention(q, k, scale)
    elif opts.attn == "nonly":
        # kappa = mean over heads and token pairs of |q_i| |k_j| / sqrt(d), per window (release).
        kappa = scale * q.float().norm(dim=-1).mean(dim=-1) * k.float().norm(dim=-1).mean(dim=-1)  # (L, H)
        kappa = kappa.mean(dim=1)[:, None, None, None]  # (L, 1, 1, 1)
        attn = (omega * kappa).softmax(dim=-1)  # (L, 1, n, n) shared by all heads
    else:
        raise OvssError(f"naclip attn must be naclip, nonly, kk or vanilla, got {opts.attn!r}")
    a = attend(block, attn, v)  # (L, n, D)
    if opts.arch == "reduced":
        z = a
    elif opts.arch == "vanilla":
        z = residual_ffn(block, x, a)
    else:
        raise OvssError(f"naclip arch must be reduced or vanilla, got {opts.arch!r}")
    return MethodOutput(patch_tokens(z, clip), grid)
