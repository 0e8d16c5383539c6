"""A "tamed" random CLIP ViT-B/16 + DINO ViT-B/8 for the bf16 error budget of ``precision_agreement.py``.

Random towers at their usual initialisation attend almost uniformly (attention logits of std ~1, normalised
entropy ~0.97) and, with random text embeddings, give logit margins far below any real model's, so label
agreement between fp32 and bf16 says little. The recipe below makes the three statistics that decide whether a
bf16 error can change a label resemble a trained model (targets assumed from how trained ViTs behave, not
measured here), and reports them so the same numbers can be read off real weights with the same script:

1. **Attention entropy.** Every block's query projection (weights and bias) is multiplied by one factor per
   tower, chosen from ``QK_SCALES`` so that the mean normalised attention entropy ``H / ln(n)`` on the
   calibration window is closest to ``ENTROPY_TARGET`` (0.70: trained ViTs mix near-uniform heads in early
   blocks with heads that concentrate on a few tokens in late blocks; a random tower sits at ~0.97).
2. **VFM feature similarity.** A random DINO's normed tokens share one dominant direction, so GLA's first
   proxy sets (keys with cosine > rho = 0.6) hold half the image and the sharpening ``w = 1 + 30 / |P|`` is ~1.
   A share ``d`` of every patch filter's response to the patch's mean colour is removed (trained ViTs' first
   filters are mostly zero-mean edge and texture detectors) and the tokens' mean on a 224-pixel calibration
   window is subtracted through the final norm's bias, ``d`` chosen by bisection so that those sets hold a
   median ``PROXY_SHARE_TARGET`` = 5 % of the window's patches (~40 of 784: the set size at which GLA's
   lambda_2 = 30 matters); the proxy-set sizes actually reached are reported by the GLA diagnostic.
3. **Residual-stream norms** are reported per block (mean token norm), not changed: ovss keeps the stream and
   the LayerNorms in fp32 under autocast, so only the normalised branch inputs reach bf16.
4. **Logit margins.** The text embeddings are built from the image's own fp32 dense features: k-means
   centroids (one per class, spatially coherent classes as in a real segmentation) mixed with the features'
   common direction, the mix chosen so that the median fp32 top-2 margin of the scaled logits
   (``logit_scale * cosine``) equals ``--margin`` (default 1.0: a trained CLIP's patch-to-text cosines differ
   between the best two classes by a few hundredths, i.e. ~1 logit at ProxyCLIP's scale 40).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ovss.models.clip import CLIP, build_clip
from ovss.models.normalization import IMAGENET_MEAN, IMAGENET_STD, InputNorm
from ovss.models.vit import VisionTransformer
from ovss.models.vit_build import build_vit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/tiny.py: random CLIP weights

ENTROPY_TARGET = 0.70  # mean normalised attention entropy H / ln(n) over blocks, heads and queries
PROXY_SHARE_TARGET = 0.05  # median share of a window's patches with cosine > 0.6 to a patch (DINO)
QK_SCALES = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)  # candidate query-projection factors


QUICK = {"width": 128, "layers": 3}  # the narrow towers of ``--quick`` (a smoke test of the recipe)


def random_clip(seed: int = 0, width: int = 768, layers: int = 12) -> CLIP:
    """A vision-only CLIP ViT-B/16 (width 768, 12 blocks, E = 512) with openai/CLIP's initialisation."""
    from tiny import tiny_clip_state_dict

    sd = tiny_clip_state_dict(seed=seed, width=width, layers=layers, embed_dim=512, text_width=64, text_layers=1)
    return build_clip({k: v for k, v in sd.items() if k.startswith("visual.")})


def random_dino(seed: int = 1, width: int = 768, layers: int = 12) -> VisionTransformer:
    """A DINO ViT-B/8 (width 768, 12 blocks, GELU, conv bias, eps 1e-6, ImageNet input statistics)."""
    from tiny import tiny_clip_state_dict

    sd = tiny_clip_state_dict(seed=seed, width=width, layers=layers, patch=8, grid=28, text_width=64, text_layers=1)
    vis = {
        k[7:]: v
        for k, v in sd.items()
        if k.startswith("visual.") and not k.startswith(("visual.proj", "visual.ln_pre"))
    }
    vis["conv1.bias"] = 0.02 * torch.randn(width, generator=torch.Generator().manual_seed(seed))
    vit = build_vit(vis, act="gelu", eps=1e-6)
    vit.input_norm = InputNorm(IMAGENET_MEAN, IMAGENET_STD, "ImageNet (DINO)")
    return vit


@torch.no_grad()
def block_statistics(vit: VisionTransformer, pixels: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per block: mean normalised attention entropy H / ln(n) and mean residual-stream token norm after it.

    Args:
        pixels: (B, 3, h, w) normalised windows.
    """
    x, grid = vit.embed(pixels)  # (B, n, D)
    rope = vit.rotary(grid)
    entropies, norms = [], []
    for block in vit.blocks:
        p = block.attn.attention_map(block.ln_1(x)).double()  # (B, H, n, n)
        h = -(p * p.clamp_min(1e-30).log()).sum(dim=-1)  # (B, H, n)
        entropies.append(float(h.mean() / math.log(p.shape[-1])))
        x = block(x, rope=rope)  # (B, n, D)
        norms.append(float(x.norm(dim=-1).mean()))
    return entropies, norms


def scale_queries(vit: VisionTransformer, factor: float) -> None:
    """Multiply every block's query projection (weight rows 0..D-1 and their bias) by ``factor``, in place."""
    with torch.no_grad():
        for block in vit.blocks:
            D = block.attn.in_proj_weight.shape[1]
            block.attn.in_proj_weight[:D] *= factor
            block.attn.in_proj_bias[:D] *= factor


def tame_attention(vit: VisionTransformer, pixels: torch.Tensor) -> dict[str, object]:
    """Scale the queries so the mean attention entropy is closest to ENTROPY_TARGET; returns what was done."""
    before, norms = block_statistics(vit, pixels)
    best, best_gap, applied = 1.0, math.inf, 1.0
    for factor in QK_SCALES:
        scale_queries(vit, factor / applied)
        applied = factor
        entropies, _ = block_statistics(vit, pixels)
        gap = abs(sum(entropies) / len(entropies) - ENTROPY_TARGET)
        if gap < best_gap:
            best, best_gap = factor, gap
    scale_queries(vit, best / applied)
    after, norms = block_statistics(vit, pixels)
    return {
        "query_scale": best,
        "entropy_before": round(sum(before) / len(before), 3),
        "entropy_after": round(sum(after) / len(after), 3),
        "entropy_per_block": [round(e, 3) for e in after],
        "stream_norm_per_block": [round(n, 1) for n in norms],
    }


@torch.no_grad()
def decorrelate_features(vit: VisionTransformer, pixels: torch.Tensor) -> dict[str, float]:
    """Shrink the patch filters' mean-colour response and centre the final tokens (median proxy share -> target).

    A share ``d`` of every patch filter's mean over its window (its response to the patch's mean colour) is
    removed, ``d`` by bisection; the final tokens' mean on the calibration window is then subtracted through
    ``ln_post.bias``.
    """
    w0 = vit.conv1.weight.clone()  # (D, 3, p, p)
    dc = w0.mean(dim=(2, 3), keepdim=True)  # (D, 3, 1, 1)

    def tokens(d: float) -> torch.Tensor:
        vit.conv1.weight.copy_(w0 - d * dc)
        x, grid = vit.embed(pixels)
        z = vit.ln_post(vit.forward_blocks(x, grid=grid))[:, vit.num_prefix_tokens :]  # (B, P, D)
        return z.reshape(-1, z.shape[-1])  # (B*P, D)

    def proxy_share(z: torch.Tensor, centre: bool = True) -> float:
        f = F.normalize(z - z.mean(dim=0) if centre else z, dim=-1)  # (P, D)
        return float(((f @ f.T) > 0.6).double().mean(dim=1).median())

    before = proxy_share(tokens(0.0), centre=False)  # as built
    lo, hi = 0.0, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if proxy_share(tokens(mid)) > PROXY_SHARE_TARGET else (lo, mid)
    z = tokens(hi)
    vit.ln_post.bias -= z.mean(dim=0)
    return {
        "dc_share_removed": round(hi, 4),
        "proxy_share_before": round(before, 3),
        "proxy_share_after": round(proxy_share(z), 3),
    }


def kmeans(features: torch.Tensor, k: int, seed: int = 0, steps: int = 20) -> torch.Tensor:
    """Spherical k-means of unit rows (P, E): (k, E) unit centroids."""
    g = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(features.shape[0], generator=g)[:k]].clone()  # (k, E)
    for _ in range(steps):
        assign = (features @ centroids.T).argmax(dim=1)  # (P,)
        for c in range(k):
            members = features[assign == c]
            if len(members):
                centroids[c] = F.normalize(members.mean(dim=0), dim=0)
    return centroids


def tamed_text(
    features: torch.Tensor, num_classes: int, logit_scale: float, margin: float
) -> tuple[torch.Tensor, float]:
    """Text embeddings whose median fp32 top-2 scaled-logit margin on ``features`` is ``margin``.

    ``t_c = normalise(a * common + b * centroid_c_perp)``: ``common`` is the features' mean direction (it shifts
    every class alike), ``centroid_c_perp`` the k-means centroid of class c without that direction; ``b`` (with
    ``a = sqrt(1 - b^2)``) is found by bisection.

    Args:
        features: (P, E) unit fp32 dense features (all tokens of the calibration image).

    Returns:
        (C, E) unit text embeddings and the class share ``b``.
    """
    common = F.normalize(features.mean(dim=0), dim=0)  # (E,)
    cent = kmeans(features, num_classes)  # (C, E)
    perp = F.normalize(cent - (cent @ common)[:, None] * common[None], dim=1)  # (C, E)

    def build(b: float) -> torch.Tensor:
        return F.normalize(math.sqrt(1 - b * b) * common[None] + b * perp, dim=1)  # (C, E)

    def median_margin(text: torch.Tensor) -> float:
        top2 = (logit_scale * features @ text.T).topk(2, dim=1).values  # (P, 2)
        return float((top2[:, 0] - top2[:, 1]).median())

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if median_margin(build(mid)) < margin else (lo, mid)
    return build(hi), hi


def tamed_models(image: object, cache: Path, quick: bool = False) -> tuple[CLIP, VisionTransformer, dict[str, object]]:
    """The tamed CLIP and DINO, calibrated on a 112 x 112 crop of ``image`` (kept in ``cache`` once built).

    ``quick``: narrow towers (:data:`QUICK`) for a smoke test; their numbers mean nothing.

    Returns:
        clip, dino and what the taming did (``clip_taming`` / ``dino_taming``: factor, entropies, norms).
    """
    from ovss.pipeline.image import clip_normalize, imagenet_from_clip, read_image, resize_short_side

    sizes = QUICK if quick else {}
    clip, dino = random_clip(**sizes), random_dino(**sizes)
    if cache.is_file():
        saved = torch.load(cache, weights_only=False)
        clip.visual.load_state_dict(saved["clip"])
        dino.load_state_dict(saved["dino"])
        return clip, dino, saved["report"]
    pixels = clip_normalize(resize_short_side(read_image(image), 224, 2048))  # (3, >= 224, >= 224)
    window = pixels[None, :, :112, :112]  # (1, 3, 112, 112) for the entropies (n = 197 CLIP / 197 DINO tokens)
    report = {
        "clip_taming": tame_attention(clip.visual, window),
        "dino_taming": tame_attention(dino, imagenet_from_clip(window)),
    }
    full = imagenet_from_clip(pixels[None, :, :224, :224])  # (1, 3, 224, 224): 784 DINO patches
    report["dino_taming"].update(decorrelate_features(dino, full))
    torch.save({"clip": clip.visual.state_dict(), "dino": dino.state_dict(), "report": report}, cache)
    return clip, dino, report
