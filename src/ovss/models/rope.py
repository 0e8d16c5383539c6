"""2-D rotary position embedding (RoPE) of DINOv3's patch tokens (spec §4.7.1), always in fp32.

Patch ``(r, c)`` of an ``hr x hc`` grid sits at ``y = 2 (r + 1/2) / hr - 1``, ``x = 2 (c + 1/2) / hc - 1``
(each axis normalised on its own, so any grid is processed as is). With periods ``P_j`` (``j < d/4``) its
angles are ``theta = [2 pi y / P_j ..., 2 pi x / P_j ...]`` (d/2 values), repeated twice to the head width d;
q and k of the patch tokens (not [CLS], not the registers) are rotated as
``q' = q cos(Theta) + rot(q) sin(Theta)`` with ``rot([a; b]) = [-b; a]``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["apply_rope", "rope_periods", "rope_tables"]

ROPE_BASE = 100.0  # DINOv3's period base: P_j = 100 ** (4 j / d)


def rope_periods(head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """The periods ``P_j = base ** (4 j / d)``, ``j = 0 .. d/4 - 1``, as the original release computes them.

    Args:
        head_dim: per-head width d (a multiple of 4).
        base: the largest period's base (100 for DINOv3).

    Returns:
        (d // 4,) fp32.
    """
    if head_dim % 4:
        raise ValueError(f"RoPE needs a head width that is a multiple of 4, got {head_dim}")
    j = torch.arange(head_dim // 4, dtype=torch.float32)  # (d/4,)
    return base ** (2 * j / (head_dim // 2))  # (d/4,)


def rope_tables(periods: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles of a ``rows x cols`` patch grid, in fp32.

    Args:
        periods: (d/4,) periods ``P_j``.
        rows: grid rows hr.
        cols: grid columns hc.

    Returns:
        cos, sin, each (rows * cols, d) fp32, patches in row-major order.
    """
    dev = periods.device
    y = torch.arange(0.5, rows, dtype=torch.float32, device=dev) / rows  # (hr,) patch centres in (0, 1)
    x = torch.arange(0.5, cols, dtype=torch.float32, device=dev) / cols  # (hc,)
    coords = torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1).flatten(0, 1)  # (hr*hc, 2)
    coords = 2.0 * coords - 1.0  # (hr*hc, 2) in (-1, 1)
    angles = 2 * math.pi * coords[:, :, None] / periods.float()[None, None, :]  # (hr*hc, 2, d/4)
    angles = angles.flatten(1, 2).tile(2)  # (hr*hc, d): [theta_y, theta_x, theta_y, theta_x]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the last ``P`` tokens (the patches) of q and k; the leading [CLS] / register tokens stay.

    The rotation runs in fp32 (spec §10 row 40) and the result is returned in the inputs' dtype.

    Args:
        q, k: (B, H, n, d) queries and keys, the patches last.
        cos, sin: (P, d) fp32 tables of :func:`rope_tables`, P <= n.

    Returns:
        q, k rotated, each (B, H, n, d) in its input dtype.
    """
    prefix = q.shape[-2] - cos.shape[0]
    return _rotate(q, cos, sin, prefix), _rotate(k, cos, sin, prefix)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, prefix: int) -> torch.Tensor:
    head, patches = t[..., :prefix, :], t[..., prefix:, :].float()  # (B, H, p, d), (B, H, P, d)
    a, b = patches.chunk(2, dim=-1)  # (B, H, P, d/2) each
    rotated = patches * cos + torch.cat([-b, a], dim=-1) * sin  # (B, H, P, d)
    return torch.cat([head, rotated.to(t.dtype)], dim=-2)  # (B, H, n, d)
