"""Channel suppression (GCLIP's CS, spec §4.6): tame the dominant output channel of late FFNs.

In the later blocks of CLIP one row of the FFN's second linear layer (fc2, ``mlp.c_proj``, weight
(D, 4D)) has a far larger norm than the others, so one channel is large for every token. CS rescales that
row to the mean norm of the other rows, in every block from a start block s_cs on. s_cs is found where the
entropy of the row norms drops most.

The user's model is never changed: suppressed copies of the fc2 weights are cached per model and applied
by :func:`forward_streams`, which runs the blocks with a clean and a suppressed token stream.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ovss.errors import OvssError
from ovss.methods.common import attend, softmax_attention
from ovss.models.layers import QuickGELU
from ovss.models.vit import ResidualAttentionBlock, VisionTransformer

logger = logging.getLogger(__name__)

ENTROPIES = ("softmax", "proportional")
SCOPES = ("values", "weights")


@dataclass(frozen=True)
class FC2NormStats:
    """Row-norm statistics of one block's fc2 weight."""

    entropy: float  # H_b in nats of the distribution over output channels made from the row norms
    channel: int  # d_hat: the output channel whose fc2 row has the largest L2 norm
    ratio: float  # N_dhat / N_bar: the largest row norm over the mean norm of the other rows (>= 1)


def clip_blocks(vit: VisionTransformer) -> list[ResidualAttentionBlock]:
    """The blocks of a ViT, typed."""
    return [cast(ResidualAttentionBlock, block) for block in vit.blocks]


def fc2_linear(block: ResidualAttentionBlock) -> nn.Linear:
    """The FFN's second linear layer (fc2, ``mlp.c_proj``) of a block."""
    return cast(nn.Linear, block.mlp.c_proj)


def fc2_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """N_d = ||W_d||_2 of Eq. 6.

    Args:
        weight: (D_out, D_in) fc2 weight; row d produces output channel d.

    Returns:
        (D_out,) fp32 row norms, >= 0.
    """
    return weight.float().norm(dim=1)  # (D_out,)


def norm_entropy(norms: torch.Tensor, kind: str = "softmax") -> float:
    """Entropy H = -sum_d pi_d ln pi_d of the row norms turned into a distribution.

    Args:
        norms: (D_out,) row norms N_d >= 0.
        kind: "softmax" (pi = softmax(N), spec default) or "proportional" (pi = N / sum N).

    Returns:
        H in nats, in [0, ln D_out].
    """
    n = norms.detach().double().cpu()  # (D_out,)
    if kind == "softmax":
        p = n.softmax(dim=0)  # (D_out,)
    elif kind == "proportional":
        p = n / n.sum()  # (D_out,)
    else:
        raise OvssError(f"gclip entropy must be one of {', '.join(ENTROPIES)}, got {kind!r}")
    return float(-torch.special.xlogy(p, p).sum())


def dominant_channel(norms: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Eq. 7-8: d_hat = argmax_d N_d and N_bar, the mean of the other norms.

    Args:
        norms: (D_out,) row norms, D_out >= 2.

    Returns:
        d_hat and N_bar as a () tensor.
    """
    d_hat = int(norms.argmax())
    return d_hat, torch.cat([norms[:d_hat], norms[d_hat + 1 :]]).mean()  # N_bar, ()


def suppress_channel(weight: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """Eq. 6-9: rescale the row with the largest norm to the mean norm of the other rows.

    Args:
        weight: (D_out, D_in) fc2 weight, D_out >= 2. Not modified.

    Returns:
        A new (D_out, D_in) weight in the input's dtype in which only row d_hat differs (its norm is N_bar),
        d_hat, and N_dhat / N_bar.
    """
    norms = fc2_row_norms(weight)  # (D_out,)
    d_hat, mean_other = dominant_channel(norms)
    out = weight.detach().clone()  # (D_out, D_in)
    out[d_hat] = (weight[d_hat].float() * (mean_other / norms[d_hat])).to(weight.dtype)  # (D_in,) norm N_bar
    return out, d_hat, float(norms[d_hat] / mean_other)


def detect_cs_start(entropies: Sequence[float]) -> int:
    """s_cs = argmax_{1 <= b <= f-1} (H_{b-1} - H_b): the block with the largest entropy drop.

    Args:
        entropies: H_0 .. H_f for every block of the model (f = last block, not a candidate).

    Returns:
        The 0-based first suppressed block; ties go to the earliest.
    """
    f = len(entropies) - 1
    if f < 2:
        raise OvssError(f"gclip cs_start='auto' needs at least 3 blocks, got {f + 1}; set cs_start to a block")
    drops = [entropies[b - 1] - entropies[b] for b in range(1, f)]  # block b = index + 1
    return 1 + max(range(len(drops)), key=drops.__getitem__)


@dataclass
class _ModelCache:
    """Everything CS derives from one model's weights (runtime state, not configuration)."""

    signature: tuple[tuple[int, int, str, str], ...]  # (data_ptr, version, dtype, device) of each fc2 weight
    stats: dict[str, tuple[FC2NormStats, ...]] = field(default_factory=dict)  # by entropy kind, every block
    weights: dict[int, torch.Tensor] = field(default_factory=dict)  # suppressed fc2 weight by block index


_CACHE: weakref.WeakKeyDictionary[VisionTransformer, _ModelCache] = weakref.WeakKeyDictionary()


def _model_cache(vit: VisionTransformer) -> _ModelCache:
    """The cache entry of ``vit``, rebuilt when any fc2 weight was replaced, moved or edited in place."""
    weights = [fc2_linear(block).weight for block in clip_blocks(vit)]
    signature = tuple((w.data_ptr(), w._version, str(w.dtype), str(w.device)) for w in weights)
    cache = _CACHE.get(vit)
    if cache is None or cache.signature != signature:
        cache = _ModelCache(signature)
        _CACHE[vit] = cache
    return cache


def fc2_statistics(vit: VisionTransformer, entropy: str = "softmax") -> tuple[FC2NormStats, ...]:
    """H_b, d_hat_b and N_dhat / N_bar of every block's fc2 (cached per model; logged at DEBUG when computed).

    Args:
        vit: the CLIP image tower.
        entropy: how norms become a distribution, see :func:`norm_entropy`.

    Returns:
        One :class:`FC2NormStats` per block, block 0 first.
    """
    cache = _model_cache(vit)
    if entropy not in cache.stats:
        stats = []
        for b, block in enumerate(clip_blocks(vit)):
            norms = fc2_row_norms(fc2_linear(block).weight)  # (D,)
            d_hat, mean_other = dominant_channel(norms)
            stat = FC2NormStats(norm_entropy(norms, entropy), d_hat, float(norms[d_hat] / mean_other))
            logger.debug("gclip CS block %d: H=%.4f d_hat=%d N_dhat/N_bar=%.3f", b, *astuple(stat))
            stats.append(stat)
        cache.stats[entropy] = tuple(stats)
    return cache.stats[entropy]


def suppressed_fc2_weights(vit: VisionTransformer, start: int) -> dict[int, torch.Tensor]:
    """Suppressed copies of the fc2 weights of blocks ``start`` .. last (cached per model).

    Returns:
        {block index: (D, 4D) weight}; the model's own parameters are untouched.
    """
    cache = _model_cache(vit)
    blocks = clip_blocks(vit)
    for b in range(start, len(blocks)):
        if b not in cache.weights:
            cache.weights[b] = suppress_channel(fc2_linear(blocks[b]).weight)[0]
    return {b: cache.weights[b] for b in range(start, len(blocks))}


def ffn_with_fc2(block: ResidualAttentionBlock, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The block's FFN branch (ln_2, fc1, activation, fc2, layer scale) with fc2's weight replaced.

    Args:
        block: the block whose ln_2, fc1, activation, fc2 bias and layer scale are used.
        x: (L, n, D) tokens.
        weight: (D, 4D) fc2 weight to use instead of the block's own; None: the block's own FFN.

    Returns:
        (L, n, D) FFN output (without the residual).
    """
    if weight is None:
        return block.ffn(x)  # (L, n, D)
    fc1, act = cast(nn.Linear, block.mlp.c_fc), cast(nn.Module, block.mlp.gelu)
    h = fc1(block.ln_2(x))  # (L, n, 4D)
    h = QuickGELU.inplace(h) if isinstance(act, QuickGELU) and not h.requires_grad else act(h)  # (L, n, 4D)
    return block.ls_2(F.linear(h, weight.to(h.dtype), fc2_linear(block).bias))  # (L, n, D)


def forward_streams(
    vit: VisionTransformer,
    x: torch.Tensor,
    fc2: Mapping[int, torch.Tensor],
    scope: str = "values",
    visit: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run every block but the last with channel suppression (spec §4.6 "Where CS acts").

    ``scope="values"``: a clean stream x with the model's own blocks and a suppressed stream x' that uses the
    suppressed fc2 weights. x' = x up to block s_cs (the first block in ``fc2``), whose FFN is the first to
    differ; from block s_cs + 1 on x' uses the clean stream's attention weights and only its own values.
    ``scope="weights"``: a single stream with the suppressed fc2 weights (q, k and v all see them).

    Args:
        vit: the CLIP image tower (not modified).
        x: (L, n, D) embedded tokens, the input of block 0.
        fc2: suppressed fc2 weights by block index; empty: no suppression (the model's own forward).
        scope: "values" or "weights".
        visit: called as ``visit(b, attn)`` for every block b < f with the (L, H, n, n) fp32 q-k attention
            map of the clean (values) or single (weights) stream; None: maps are formed only where x' needs
            them.

    Returns:
        x^(f) (L, n, D), the input of the last block of the clean (or single) stream, and x'^(f) (L, n, D)
        of the suppressed stream (None unless ``scope="values"`` and a block before the last is suppressed).
    """
    if scope not in SCOPES:
        raise OvssError(f"gclip cs_scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    blocks = clip_blocks(vit)
    xs: torch.Tensor | None = None  # suppressed stream, None while it equals the clean one
    for b, block in enumerate(blocks[:-1]):
        weight = fc2.get(b)  # (D, 4D) or None
        y = block.ln_1(x)  # (L, n, D)
        attn: torch.Tensor | None = None
        if visit is not None or xs is not None:
            q, k, v = block.attn.qkv(y)  # (L, H, n, d) each
            attn = softmax_attention(q, k, block.attn.scale)  # (L, H, n, n) fp32
            a = attend(block, attn, v)  # (L, n, D)
            if visit is not None:
                visit(b, attn)
        else:
            a = block.attn(y)  # (L, n, D)
        u = x + block.ls_1(a)  # (L, n, D)
        if xs is not None and attn is not None:  # b > s_cs: clean attention weights, suppressed values
            _, _, vs = block.attn.qkv(block.ln_1(xs))  # (L, H, n, d)
            us = xs + block.ls_1(attend(block, attn, vs))  # (L, n, D)
            xs = us + ffn_with_fc2(block, us, weight)  # (L, n, D)
        elif weight is not None and scope == "values":  # b = s_cs: the streams part in this block's FFN
            xs = u + ffn_with_fc2(block, u, weight)  # (L, n, D)
        x = u + ffn_with_fc2(block, u, weight if scope == "weights" else None)  # (L, n, D)
    return x, xs
