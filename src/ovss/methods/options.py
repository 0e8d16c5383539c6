"""Options of the built-in methods (frozen dataclasses, torch-free) and their keyword namespace.

Each field's annotation is the one declaration of what it accepts (``ovss.fields``): an instance is checked
when built, ``ovss.load`` keywords and ``--opt KEY=VALUE`` are checked and parsed by it, and ``ovss methods``
lists it. The method modules import their class from here, so the registry can be read without torch.

Composed options (``X+gla``, ``proxyclip+gla+mlf``: :class:`ComposedOptions`) hold a dataclass per part: the
base's keep their option names (``beta``), GLA's carry ``gla_`` (``gla_rho``) and a variant's own part its
class's ``keyword_prefix`` (``mlf_blocks``), so one keyword sets exactly one option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ovss.errors import OvssError
from ovss.fields import CheckedFields, check_value, field_types

BASE_PART = "base"  # the part of composed options whose names are not prefixed
GLA_PREFIX = "gla_"  # keyword prefix of the GLA part of composed options


@dataclass(frozen=True)
class VanillaOptions(CheckedFields):
    """Options of ``vanilla`` / ``vanilla-reduced``."""

    reduced: bool = False  # True: q-k attention without residual and FFN (NACLIP's "reduced", Table 4)


@dataclass(frozen=True)
class MaskCLIPOptions(CheckedFields):
    """Options of ``maskclip`` / ``maskclip-reimpl``."""

    residual_ffn: bool = True  # keep residual and FFN (MaskCLIP paper); False = later re-implementations


@dataclass(frozen=True)
class SCLIPOptions(CheckedFields):
    """Options of ``sclip``."""

    reduced: bool = False  # True: drop residual and FFN (how some later papers re-implement SCLIP)


@dataclass(frozen=True)
class ClearCLIPOptions(CheckedFields):
    """Options of ``clearclip``."""

    last_n_layers: int = 1  # sum the q-q attention outputs of the last n blocks (release option; 1 = paper)


@dataclass(frozen=True)
class NACLIPOptions(CheckedFields):
    """Options of ``naclip`` (release defaults)."""

    sigma: float = 5.0  # std of the Gaussian neighbourhood prior, in patches
    attn: Literal["naclip", "nonly", "kk", "vanilla"] = "naclip"  # kk + prior, prior only (Eq. 12), kk, qk
    arch: Literal["reduced", "vanilla"] = "reduced"  # reduced: no residual, no FFN; vanilla: both kept


@dataclass(frozen=True)
class GCLIPOptions(CheckedFields):
    """Options of ``gclip`` (spec §4.6, decision register rows 18-22). Blocks count from 0 by default."""

    fuse_layers: int = 1  # l: fuse the maps of blocks g .. g + l with the last q-q map (Table 2: 1 is best)
    amf: bool = True  # Attention Map Fusion (False: "ClearCLIP + CS")
    cs: bool = True  # Channel Suppression (False: "ClearCLIP + AMF")
    detector: Literal["geomean", "product_fp32", "product_fp16", "fixed"] = "geomean"  # global-token test G(i)
    sigma: float = 100.0  # sigma of Eq. 2: a patch key is global when its geomean attention exceeds 1 / sigma
    fixed_block: int = 6  # g for detector "fixed", and the fallback when no block qualifies
    block_index_base: Literal[0, 1] = 0  # 1: fixed_block and an integer cs_start count from 1 (6 -> block 5)
    cs_start: Literal["auto"] | int = "auto"  # first suppressed block: "auto" (largest entropy drop) or a block
    entropy: Literal["softmax", "proportional"] = "softmax"  # norms -> distribution: softmax or N / sum N
    cs_scope: Literal["values", "weights"] = "values"  # suppressed stream feeds only the values; or one edited pass
    fuse_heads: Literal["mixed", "averaged", "per_head"] = "mixed"  # mixed: early maps head-averaged, q-q per head
    fuse_cls: bool = False  # Table 4 ablation: fuse the [CLS] query's attention row, repeated for every query
    scale_blocks: bool = True  # other depths: fixed_block / cs_start scaled from 12 blocks (False: as given)


@dataclass(frozen=True)
class ProxyCLIPOptions(CheckedFields):
    """Options of ``proxyclip`` (release defaults, shared by all datasets)."""

    beta: float = 1.2  # shift: A = gamma * (S - beta * mean(S)); robust in [1.0, 1.6]
    gamma: float = 3.0  # sharpness of the proxy attention (> 0); robust in [2, 5]


SCCLIP_FUSION_BLOCKS = (3, 4, 5, 6, 7, 8, 9)  # SC-CLIP's multi_start_idx 3 .. multi_end_idx 10 (exclusive)


@dataclass(frozen=True)
class SCCLIPOptions(CheckedFields):
    """Options of ``scclip`` (spec §4.11.1-4.11.2, release ViT-B/16 values; blocks count from 0, of 12)."""

    anomaly: Literal["lof_release", "lof_sklearn", "topk_norm"] = "lof_release"  # anomaly detector (§10 #28)
    anomaly_grid: Literal["row_major", "release"] = "row_major"  # index -> (row, col): i // gc, or i // gr (§10 #29)
    neighbors: int = 30  # LOF k (nearest neighbours of a token, itself excluded)
    contamination: float = 0.05  # share of tokens above the LOF threshold (the (1 - c)-quantile)
    topk: int = 10  # anomaly = the topk largest-norm tokens (anomaly = "topk_norm", the first release)
    threshold: float = 0.4  # aggregator G: similarities below it are dropped (release `beta`)
    pre_block: int = 8  # pre-adjustment similarity: output of this block, repaired
    post_block: int = 3  # post-adjustment similarity: output of this block
    fusion_blocks: tuple[int, ...] = SCCLIP_FUSION_BLOCKS  # second pass on the sum of these blocks' outputs
    res_cls: float = 0.3  # weight of the [CLS] vector added to every token of both passes
    scale_blocks: bool = True  # other depths: block indices scaled from 12 blocks (False: used as given)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.neighbors < 1:
            raise OvssError(f"scclip option neighbors must be >= 1, got {self.neighbors}")
        if not 0.0 < self.contamination < 1.0:
            raise OvssError(f"scclip option contamination must be in (0, 1), got {self.contamination}")
        if self.topk < 1:
            raise OvssError(f"scclip option topk must be >= 1, got {self.topk}")
        if not self.fusion_blocks:
            raise OvssError("scclip option fusion_blocks is empty; give at least one block, e.g. 3,4,5,6,7,8,9")


@dataclass(frozen=True)
class MLFOptions(CheckedFields):
    """Multi-layer fusion on ``proxyclip+gla`` (``proxyclip+gla+mlf``, spec §4.11.4); keywords ``mlf_*``."""

    keyword_prefix: ClassVar[str] = "mlf_"  # as the extra part of ComposedOptions
    blocks: tuple[int, ...] = SCCLIP_FUSION_BLOCKS  # fused values from ln_1 of the sum of these blocks' outputs
    res_cls: float = 0.0  # 0.3 adds 0.3 (c11 + m_c) of the token's window, SC-CLIP's [CLS] residual
    scale_blocks: bool = True  # other depths: block indices scaled from 12 blocks (False: used as given)


@dataclass(frozen=True)
class SCCLIPGLAOptions(CheckedFields):
    """GLA-side option of ``scclip+gla`` (spec §4.11.5); keyword ``scclip_gla_kk``."""

    keyword_prefix: ClassVar[str] = "scclip_gla_"  # as the extra part of ComposedOptions
    kk: Literal["cross", "window"] = "cross"  # k-k halves: cross-window GLA maps, or SC-CLIP's own per head


@dataclass(frozen=True)
class TridentOptions(CheckedFields):
    """Options of ``trident`` / ``trident+gla`` (spec §4.12, release defaults; decision register 34-36)."""

    beta: float = 1.2  # sub-image attention shift: A = gamma * (S - beta * mean(S))
    gamma: float = 3.0  # sub-image attention sharpness (> 0)
    shift_mean: Literal["image", "window"] = "image"  # mean(S) over all sub-images (release) or per window
    cos_fac: float = 1.2  # phi: SAM value-similarity threshold t_i = phi * mean cosine of query i
    refine_neg_cos: bool = True  # False: a negative t_i becomes 0.6 (release, Cityscapes and ADE20K)
    split_halves: bool = False  # encode the left / right halves with SAM separately (release, Cityscapes)
    refine: bool = True  # SAM refinement with box, point and dense-mask prompts per connected region
    coarse_thresh: float = 0.2  # theta_c: class-probability floor of the refinement prompts
    min_area: int = 225  # smallest prompted region, in half-resolution pixels
    iou_thresh: float = 0.8  # keep SAM masks whose predicted IoU exceeds this
    mask_coef: float = 0.005  # dense mask prompt = mask_coef * probability above theta_c
    mask_prompt: Literal["release", "batched"] = "release"  # release: unbatched mask (LayerNorm2d over height)
    failed: Literal["release", "coarse"] = "release"  # failed-IoU regions: no-op (release) or coarse labels


@dataclass(frozen=True)
class CASSOptions(CheckedFields):
    """Options of ``cass`` (spec §4.10; defaults = the paper, and the release's VOC21 hyper-parameters).

    The per-dataset values (global_weight, text_shift, cluster_threshold, rescale_singular_values,
    global_embedding) come from the ``cass`` preset; ``cass-release`` also sets the four release switches:
    ``pairing``, ``rank`` and ``dino_input`` = ``release`` and ``match_tolerance`` = 0. With
    ``match_tolerance`` 0 (the release's raw Hungarian) the matching costs and weights are float32, as the
    release stores them, so exactly tied float32 costs break as in the release. Always, whatever the
    switches: ``cass`` never pads its windows (``cass+gla`` pads to 56, as ``proxyclip+gla``), and the
    low-rank step is an exact truncated SVD (the release's ``torch.svd_lowrank`` is randomised). See
    docs/decisions.md, CASS.
    """

    sigma: float = 5.0  # std of NACLIP's Gaussian neighbourhood prior, in patches
    global_weight: float = 0.1  # g_w: logits = (1 - g_w) patch-text + g_w global image-text similarity
    text_shift: float = 0.03  # m: adjusted text = normalise((1 - m) t + m * mean of its 2 best patches)
    cluster_threshold: float = 0.10  # h: Ward-linkage distance at which class clusters are cut
    rescale_singular_values: bool = True  # stretch the kept singular values (release: off for VOC20, Cityscapes)
    global_embedding: Literal["image", "window"] = "image"  # [CLS] of the whole image, or of each window
    eigenvalues: int = 20  # top eigenvalues per head compared by the Wasserstein cost
    energy: float = 0.95  # share of the singular-value sum the low-rank DINO graph keeps
    fusion_scale: float = 10.0  # fused graph = (scale * w * G_d + G_c) / (scale * w + 1)
    pairing: Literal["paper", "release"] = "paper"  # release: matched DINO/CLIP heads indexed the other way round
    match_tolerance: float = 1e-6  # cost ties within this go to head h <-> head h (0: raw Hungarian, release)
    rank: Literal["energy", "release"] = "energy"  # release: always the top 10 singular values (energy unused)
    dino_input: Literal["pixels", "release"] = "pixels"  # release: its 8-bit ImageNet un-normalisation of the window
    adjust_scope: Literal["window", "image"] = "window"  # top-2 patches per window, or over all windows
    cross_window_keys: Literal["dino", "naclip"] = "dino"  # cass+gla's GLA keys: DINO tokens, or CLIP k + prior

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("global_weight", "text_shift", "energy"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise OvssError(f"cass option {name} must be in [0, 1], got {value}")
        non_negative = (self.cluster_threshold, self.fusion_scale, self.match_tolerance)
        if not (self.sigma > 0 and min(non_negative) >= 0):
            raise OvssError(
                "cass options need sigma > 0 and cluster_threshold, fusion_scale, match_tolerance >= 0, got "
                f"{self.sigma}, {self.cluster_threshold}, {self.fusion_scale}, {self.match_tolerance}"
            )
        if self.eigenvalues < 1:
            raise OvssError(f"cass option eigenvalues must be >= 1, got {self.eigenvalues}")


@dataclass(frozen=True)
class ComposedOptions:
    """Options of a composed method (``X+gla`` and its variants): the base's, GLA's and an optional own part.

    As ``ovss.load`` keywords the base's options keep their names (``beta``), GLA's carry the prefix ``gla_``
    (``gla_rho``, ``gla_beta``) and the extra part's its class's ``keyword_prefix`` (``mlf_blocks``,
    ``scclip_gla_kk``): see :func:`option_fields`.
    """

    base: Any  # the base method's options dataclass (e.g. ProxyCLIPOptions)
    gla: Any  # ovss.gla.config.GLAConfig: rho, T, lambda1, lambda2, ablation switches, chunking
    extra: Any = None  # a variant's own part (MLFOptions, SCCLIPGLAOptions); None: plain X+gla

    def parts(self) -> list[tuple[str, str, Any]]:
        """(field name, keyword prefix, options dataclass) of every part present, base first."""
        found = [(BASE_PART, "", self.base), ("gla", GLA_PREFIX, self.gla)]
        if self.extra is not None:
            found.append(("extra", type(self.extra).keyword_prefix, self.extra))
        return found


def base_options(options: Any) -> Any:
    """The base method's options: the ``base`` part of composed options, else the options themselves."""
    return options.base if isinstance(options, ComposedOptions) else options


@dataclass(frozen=True)
class OptionField:
    """Where one option keyword lives in a (possibly composed) options dataclass."""

    keyword: str  # the ovss.load keyword / --opt name, e.g. "gla_rho"
    part: str | None  # field of the composed options holding it ("base", "gla", "extra"), None for plain options
    name: str  # field name inside its dataclass, e.g. "rho"
    type: Any  # resolved annotation
    default: Any  # value in the given options instance


def option_fields(options: Any) -> dict[str, OptionField]:
    """Every option keyword of an options instance, in declaration order (composed options: every part)."""
    out: dict[str, OptionField] = {}
    if isinstance(options, ComposedOptions):
        for part, prefix, value in options.parts():
            for inner in option_fields(value).values():
                keyword = prefix + inner.name
                out[keyword] = OptionField(keyword, part, inner.name, inner.type, inner.default)
        return out
    hints = field_types(type(options))
    for f in dataclasses.fields(options):
        out[f.name] = OptionField(f.name, None, f.name, hints[f.name], getattr(options, f.name))
    return out


def option_value(options: Any, keyword: str, default: Any = None) -> Any:
    """The value of option ``keyword`` (``"gla_rho"`` looks in the GLA part of composed options)."""
    found = option_fields(options).get(keyword)
    return default if found is None else found.default


def unknown_option_message(method: str, options: Any, keyword: str) -> str:
    """One line: the method has no such option, a hint (GLA prefix), and the options it has."""
    fields = option_fields(options)
    listing = ", ".join(fields) or "none"
    hint = ""
    prefixed = [k for k, f in fields.items() if f.part not in (None, BASE_PART) and f.name == keyword]
    if prefixed:
        hint = f"; options of an attached part carry its prefix: {prefixed[0]}"
    elif keyword.startswith(GLA_PREFIX):
        hint = f"; GLA options need GLA attached: use {method}+gla or gla=True"
    return f"method {method!r} has no option {keyword}{hint}; its options are: {listing}"


def resolve_options(method: str, options: Any, overrides: Mapping[str, Any], also: Sequence[str] = ()) -> Any:
    """``options`` with keyword overrides applied, each value checked against its declared type.

    Args:
        method: the method's name (for messages).
        options: the method's default options (a frozen dataclass; composed for ``X+gla``).
        overrides: keyword -> value; ``beta`` sets the base's beta, ``gla_beta`` GLA's.
        also: the pipeline settings the caller accepts too (named in the message about an unknown keyword).

    Raises:
        OvssError: unknown keyword (the message lists the method's options), wrong type, value not allowed,
            or out of range.
    """
    fields = option_fields(options)
    for keyword in overrides:
        if keyword not in fields:
            other = f"; pipeline settings: {', '.join(also)}" if also else ""
            raise OvssError(unknown_option_message(method, options, keyword) + other)
    changes: dict[str | None, dict[str, Any]] = {}
    for keyword, value in overrides.items():
        f = fields[keyword]
        changes.setdefault(f.part, {})[f.name] = check_value(f"{method} option {keyword}", value, f.type)
    try:
        parts = {part: dataclasses.replace(getattr(options, part), **vals) for part, vals in changes.items() if part}
        return dataclasses.replace(options, **changes.get(None, {}), **parts)
    except (TypeError, ValueError) as err:
        raise OvssError(f"invalid option for method {method!r}: {err}") from err
