"""CASS's text side (spec §4.10): object-guided text adjustment and the global image-text logit blend.

Runs at ``predict`` time, because it depends on both the image and the label set: ``set_image`` keeps the
dense features and one global image embedding per window (``MethodOutput.extras["global"]``), and
:func:`cass_scores` turns them and any text embeddings into per-window logits.

1. Ward clustering (SciPy) of the names' text embeddings on their cosine distances, cut at distance h.
2. Per window and cluster, the name most similar to the global image embedding has its embedding moved
   toward the mean of its two most similar patch features: ``t' = normalise((1 - m) t + m * mean)``.
3. Logits ``(1 - g_w) f t'^T + g_w * (global t^T)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from ovss.errors import OvssError
from ovss.methods.options import CASSOptions, base_options

TOP_PATCHES = 2  # patches averaged into the shift vector


def ward_clusters(text: torch.Tensor, threshold: float) -> np.ndarray:
    """Cluster ids (0-based, SciPy's numbering) of the names: Ward linkage of cosine distances, cut at ``threshold``.

    Args:
        text: (Q, E) L2-normalised text embeddings.
        threshold: the distance h at which the dendrogram is cut (``fcluster(criterion="distance")``).

    Returns:
        (Q,) int64 cluster id per name; a single name is its own cluster 0.
    """
    t = F.normalize(text.detach().double().cpu(), dim=-1).numpy()  # (Q, E) re-normalised in float64
    if t.shape[0] == 1:
        return np.zeros(1, dtype=np.int64)
    dist = np.clip(1.0 - t @ t.T, 0.0, 2.0)  # (Q, Q) cosine distances
    dist = (dist + dist.T) / 2.0
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), method="ward")
    return (fcluster(tree, t=threshold, criterion="distance") - 1).astype(np.int64)


def adjusted_text(
    text: torch.Tensor, clusters: np.ndarray, global_sim: torch.Tensor, patches: torch.Tensor, shift: float
) -> torch.Tensor:
    """Object-guided text embeddings of L windows (one set per window).

    Args:
        text: (Q, E) L2-normalised text embeddings.
        clusters: (Q,) cluster id per name.
        global_sim: (L, Q) similarity of each window's global image embedding to every name.
        patches: (L, N, E) L2-normalised patch features.
        shift: m, the weight of the patch mean.

    Returns:
        (L, Q, E): in every cluster the name with the highest ``global_sim`` (ties: lowest index) is
        replaced by ``normalise((1 - m) t + m * normalise(mean of its top-2 patches))``; the others unchanged.
    """
    L = patches.shape[0]
    out = text[None].expand(L, -1, -1).clone()  # (L, Q, E)
    rows = torch.arange(L, device=text.device)
    for cluster in np.unique(clusters):
        members = torch.as_tensor(np.flatnonzero(clusters == cluster), device=text.device)  # (K,) ascending
        best = members[global_sim[:, members].argmax(dim=1)]  # (L,) first maximum in index order
        t = text[best]  # (L, E)
        sim = (patches @ t[:, :, None])[..., 0]  # (L, N)
        top = sim.sort(dim=1, descending=True, stable=True).indices[:, :TOP_PATCHES]  # (L, <=2) ties: lowest
        mean = F.normalize(patches[rows[:, None], top].mean(dim=1), dim=-1)  # (L, E)
        out[rows, best] = F.normalize((1.0 - shift) * t + shift * mean, dim=-1)  # (L, E)
    return out


def cass_scores(
    extras: dict[str, torch.Tensor], features: torch.Tensor, text: torch.Tensor, options: Any
) -> torch.Tensor:
    """Per-window CASS logits of a label set (the ``MethodSpec.score`` hook of ``cass`` and ``cass+gla``).

    Args:
        extras: ``{"global": (L, E)}`` L2-normalised global image embedding of every window (the whole
            image's, repeated, or each window's own, per ``global_embedding``).
        features: (L, N, E) fp32 L2-normalised patch features.
        text: (Q, E) L2-normalised text embeddings.
        options: :class:`CASSOptions`, or composed options whose ``base`` is one (``cass+gla``).

    Returns:
        (L, N, Q) fp32 logits.
    """
    opts = base_options(options)
    if not isinstance(opts, CASSOptions):
        raise OvssError(f"the CASS score needs CASS options, got {type(opts).__name__}")
    if "global" not in extras:
        raise OvssError("the CASS score needs the global image embeddings of set_image; call set_image again")
    g = extras["global"].float()  # (L, E)
    f = features.float()  # (L, N, E)
    t = text.float()  # (Q, E)
    global_sim = g @ t.T  # (L, Q)
    clusters = ward_clusters(t, opts.cluster_threshold)
    if opts.adjust_scope == "image":
        # One adjusted set for the whole image: the best patches over all windows, the mean global similarity.
        L, N, E = f.shape
        shared = adjusted_text(t, clusters, global_sim.mean(0, keepdim=True), f.reshape(1, L * N, E), opts.text_shift)
        adjusted = shared.expand(L, -1, -1)  # (L, Q, E)
    else:
        adjusted = adjusted_text(t, clusters, global_sim, f, opts.text_shift)  # (L, Q, E)
    local = f @ adjusted.transpose(1, 2)  # (L, N, Q)
    gw = opts.global_weight
    return (1.0 - gw) * local + gw * global_sim[:, None, :]  # (L, N, Q)
