"""Named evaluation settings (spec §5) as data, and their resolution for one (preset, dataset, method).

A *preset* fixes, per benchmark, the resize short side S, window c and stride s, the background threshold
θ_bg and the name set (§5.2); the *method* brings its logit scale τ and extras (§5.1): SCLIP's per-dataset
τ, SCLIP's VOC21 area filter in the SCLIP setting, GLA's release options, CASS's per-dataset
hyper-parameters. :func:`resolve` combines both into one :class:`ResolvedSetting`; every value can be overridden.

A method with GLA attached (``MethodSpec.base``, e.g. ``proxyclip+gla``) takes the values of its base.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ovss.config import PIPELINE_KEYS
from ovss.errors import OvssError
from ovss.eval.names import DATASETS, NAME_SETS
from ovss.methods.registry import Geometry, MethodSpec, get_method

CUSTOM = "custom"  # dataset key of a user's own folder dataset (geometry of the preset's generic row)
_GENERIC_ROW = "pc59"  # the preset row used for custom datasets: the 59-class PASCAL Context setting
_BACKGROUND_DATASETS = ("voc21", "pc60", "coco_object")  # the only datasets with θ_bg (§5.2, §10 #27)
_WHOLE = 0  # crop 0 = whole-image mode (§2.2)

# §5.1: a method's τ is its MethodSpec.logit_scale; SCLIP's release uses other values on three datasets.
SCLIP_LOGIT_SCALES: dict[str, float] = {"voc21": 65.0, "pc60": 50.0, "coco_object": 50.0}
SCCLIP_LOGIT_SCALES: dict[str, float] = {"voc21": 50.0, "coco_object": 55.0}  # SC-CLIP release configs
DATASET_LOGIT_SCALES: dict[str, dict[str, float]] = {"sclip": SCLIP_LOGIT_SCALES, "scclip": SCCLIP_LOGIT_SCALES}
AREA_FILTER_METHODS = ("sclip", "scclip")  # methods (and their +gla) with the VOC21 area filter (§2.8, §4.11.3)
SCLIP_AREA_THRESHOLD = 0.1  # §2.8: area_thd of the SCLIP release, VOC21 only

# Which preset reproduces a method's own published setting (used when no preset is named).
HOME_PRESETS: dict[str, str] = {
    "vanilla": "naclip",  # NACLIP Table 1 "CLIP" row
    "vanilla-reduced": "naclip",  # NACLIP Table 4 "reduced" row
    "maskclip": "naclip",  # NACLIP Table 1 "MaskCLIP" row
    "maskclip-reimpl": "clearclip",  # the ClearCLIP release's re-implementation
    "clearclip": "clearclip",
    "gclip": "clearclip",
    "proxyclip": "proxyclip",
    "sclip": "sclip",
    "naclip": "naclip",
    "proxyclip+gla": "gla",
    "scclip": "scclip",
    "proxyclip+gla+mlf": "gla",  # GLA Table 7 runs in GLA's own setting (§4.11.4)
    "trident": "trident",
    "cass": "cass",  # cass+gla too (through its base): GLA App. I uses CASS's per-dataset hyper-parameters
}


@dataclass(frozen=True)
class Preset:
    """One named setting of spec §5.2."""

    name: str  # preset name, e.g. "gla"
    geometry: dict[str, Geometry]  # per dataset: short side S / window c / stride s (c = 0: whole image)
    bg_thresholds: dict[str, float]  # θ_bg for voc21, pc60, coco_object (0 for every other dataset)
    name_set: str  # plain | bg-rename | full-rename (§6.3)
    pamr_steps: int = 0  # PAMR iterations on the logits (naclip-pamr: 10; 0 = off)
    sclip_area_filter: bool = False  # SCLIP setting: VOC21 area filter 0.1 for sclip, scclip and their +gla (§2.8)
    gla_options: dict[str, Any] = field(default_factory=dict)  # GLA option keywords (gla_rho, ...) of X+gla
    trident_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per dataset, for trident(+gla)
    cass_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per dataset: options of cass, cass+gla
    description: str = ""  # one line for listings


def _rows(default: tuple[int, int, int], **exceptions: tuple[int, int, int]) -> dict[str, Geometry]:
    """Geometry of the eight datasets: ``default`` S/c/s everywhere except the named datasets."""
    return {dataset: Geometry(*exceptions.get(dataset, default)) for dataset in DATASETS}


def _thresholds(voc21: float, pc60: float, coco_object: float) -> dict[str, float]:
    return {"voc21": voc21, "pc60": pc60, "coco_object": coco_object}


_CLEARCLIP_ROWS = _rows((448, 448, 224))
_PROXYCLIP_ROWS = _rows((336, 336, 112), cityscapes=(448, 336, 112), ade20k=(448, 336, 112))
_SCLIP_ROWS = _rows((336, 224, 112), cityscapes=(560, 224, 112))
_NACLIP_ROWS = _rows((336, 224, 112), cityscapes=(560, 224, 112), voc21=(336, _WHOLE, 0), voc20=(336, _WHOLE, 0))
_TRIDENT_ROWS = _rows(
    (576, 336, 224), voc21=(448, 336, 224), coco_object=(448, 336, 224), voc20=(336, 336, 112),
    coco_stuff=(448, 336, 224), cityscapes=(688, 336, 224),
)  # fmt: skip
# §4.12.5: theta_c (coarse_thresh), phi (cos_fac), refine_neg_cos per dataset; Cityscapes: SAM on two halves.
_TRIDENT_OPTIONS: dict[str, dict[str, Any]] = {
    "voc21": {"coarse_thresh": 0.2, "cos_fac": 1.2},
    "pc60": {"coarse_thresh": 0.15, "cos_fac": 1.2},
    "coco_object": {"coarse_thresh": 0.25, "cos_fac": 1.2},
    "voc20": {"coarse_thresh": 0.2, "cos_fac": 0.0},
    "pc59": {"coarse_thresh": 0.15, "cos_fac": 1.2},
    "coco_stuff": {"coarse_thresh": 0.05, "cos_fac": 1.2},
    "cityscapes": {"coarse_thresh": 0.1, "cos_fac": 3.0, "refine_neg_cos": False, "split_halves": True},
    "ade20k": {"coarse_thresh": 0.05, "cos_fac": 1.2, "refine_neg_cos": False},
}
_CASS_ROWS = _rows((336, 224, 112), cityscapes=(560, 224, 112), voc21=(336, _WHOLE, 0))
_CLEARCLIP_BG = _thresholds(0.5, 0.15, 0.4)
_SCLIP_BG = _thresholds(0.1, 0.1, 0.1)


def _cass(g_w: float, m: float, h: float, rescale: bool = True, view: str = "image") -> dict[str, Any]:
    """CASS's per-dataset options (spec §4.10, release configs): global weight, text shift, cluster cut, ..."""
    return {
        "global_weight": g_w,
        "text_shift": m,
        "cluster_threshold": h,
        "rescale_singular_values": rescale,  # the release skips the rescale on VOC20 and Cityscapes
        "global_embedding": view,  # the release's Cityscapes global embedding is each window's own [CLS]
    }


_CASS_OPTIONS: dict[str, dict[str, Any]] = {
    "voc21": _cass(0.1, 0.03, 0.10),
    "voc20": _cass(0.4, 0.02, 0.10, rescale=False),
    "pc60": _cass(0.25, 0.04, 0.09),
    "pc59": _cass(0.25, 0.04, 0.09),
    "coco_object": _cass(0.25, 0.01, 0.10),
    "coco_stuff": _cass(0.2, 0.02, 0.02),
    "cityscapes": _cass(0.1, 0.03, 0.14, rescale=False, view="window"),
    "ade20k": _cass(0.3, 0.05, 0.06),
}
# cass-release: the release's head-pair indexing, rank-10 graphs, 8-bit DINO input and raw Hungarian ties
# (docs/decisions.md, CASS).
_CASS_RELEASE_SWITCHES = {"pairing": "release", "rank": "release", "dino_input": "release", "match_tolerance": 0.0}
_CASS_RELEASE_OPTIONS = {dataset: {**o, **_CASS_RELEASE_SWITCHES} for dataset, o in _CASS_OPTIONS.items()}


def _preset(name: str, rows: dict[str, Geometry], bg: dict[str, float], name_set: str, **extra: Any) -> Preset:
    return Preset(name=name, geometry=rows, bg_thresholds=bg, name_set=name_set, **extra)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        _preset("clip-dinoiser", _CLEARCLIP_ROWS, _CLEARCLIP_BG, "plain", description="GLA App. B.1 setting"),
        _preset("clearclip", _CLEARCLIP_ROWS, _CLEARCLIP_BG, "plain", description="ClearCLIP setting (App. B.2)"),
        _preset(
            "clearclip-release",
            {**_CLEARCLIP_ROWS, "cityscapes": Geometry(448, 224, 224)},
            _CLEARCLIP_BG,
            "plain",
            description="ClearCLIP release: Cityscapes window 224/224",
        ),
        _preset(
            "proxyclip",
            _PROXYCLIP_ROWS,
            _thresholds(0.2, 0.15, 0.25),
            "bg-rename",
            description="ProxyCLIP setting (App. B.3)",
        ),
        _preset(
            "proxyclip-release",
            {**_PROXYCLIP_ROWS, "cityscapes": Geometry(448, 224, 112)},
            _thresholds(0.2, 0.15, 0.25),
            "bg-rename",
            description="ProxyCLIP release: Cityscapes window 224/112",
        ),
        _preset(
            "sclip",
            _SCLIP_ROWS,
            _SCLIP_BG,
            "full-rename",
            sclip_area_filter=True,
            description="SCLIP setting (App. B.4)",
        ),
        _preset(
            "sclip-release",
            {**_SCLIP_ROWS, "coco_stuff": Geometry(448, 224, 112)},
            _SCLIP_BG,
            "full-rename",
            sclip_area_filter=True,
            description="SCLIP release: COCO-Stuff short side 448",
        ),
        _preset(
            "gla",
            _SCLIP_ROWS,
            _SCLIP_BG,
            "full-rename",
            sclip_area_filter=True,
            description="GLA-CLIP default = SCLIP setting (App. L)",
        ),
        _preset(
            "gla-release",
            _SCLIP_ROWS,
            _SCLIP_BG,
            "full-rename",
            sclip_area_filter=True,
            gla_options={"gla_rho": 0.55, "gla_clamp_mean": True},
            description="GLA-CLIP release: rho 0.55, row mean clamped at 0",
        ),
        _preset(
            "scclip",
            _SCLIP_ROWS,
            _thresholds(0.15, 0.15, 0.35),
            "full-rename",
            sclip_area_filter=True,
            description="SC-CLIP release configs (§4.11.3)",
        ),
        _preset("naclip", _NACLIP_ROWS, _SCLIP_BG, "full-rename", description="NACLIP release configuration"),
        _preset(
            "naclip-pamr",
            _NACLIP_ROWS,
            _SCLIP_BG,
            "full-rename",
            pamr_steps=10,
            description="NACLIP + PAMR (10 iterations, dilations 8, 16)",
        ),
        _preset(
            "trident",
            _TRIDENT_ROWS,
            _thresholds(0.2, 0.15, 0.25),
            "bg-rename",
            trident_options=_TRIDENT_OPTIONS,
            description="Trident release configs (§4.12.5): SAM thresholds per dataset",
        ),
        _preset(
            "cass",
            _CASS_ROWS,
            _SCLIP_BG,
            "full-rename",
            cass_options=_CASS_OPTIONS,
            description="CASS release configuration with its per-dataset hyper-parameters",
        ),
        _preset(
            "cass-release",
            _CASS_ROWS,
            _SCLIP_BG,
            "full-rename",
            cass_options=_CASS_RELEASE_OPTIONS,
            description="CASS release: head pairs indexed as in its code, rank-10 DINO graphs, 8-bit DINO input",
        ),
    )
}


@dataclass(frozen=True)
class ResolvedSetting:
    """Everything a benchmark run needs beyond the weights: the preset's values for one dataset and method."""

    preset: str  # preset name
    dataset: str  # one of the eight benchmarks, or "custom"
    method: str  # method name, e.g. "proxyclip+gla"
    short_side: int | None  # resize short side S in pixels (None: keep the image size)
    crop: int  # window side c in processing pixels (0: whole image)
    stride: int  # window stride s in processing pixels (0 in whole-image mode)
    logit_scale: float  # temperature τ of the name softmax
    bg_threshold: float  # θ_bg: pixels whose best class probability is below it get class 0 (0: off)
    area_threshold: float | None  # SCLIP area filter share (None: off)
    pamr_steps: int  # PAMR iterations (0: off)
    name_set: str  # plain | bg-rename | full-rename (§6.3)
    method_options: dict[str, Any]  # method option keywords of ovss.load (GLA's with the prefix gla_)
    overrides: tuple[str, ...] = ()  # fields the caller changed from the preset's values, sorted

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The pipeline keywords of ``ovss.load`` this setting fixes."""
        return {key: getattr(self, key) for key in SETTING_PIPELINE_KEYS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy of every field."""
        record = dataclasses.asdict(self)
        record["overrides"] = list(self.overrides)
        return record


# The ovss.load pipeline settings a setting fixes (the rest, e.g. templates, stay the caller's).
SETTING_PIPELINE_KEYS = tuple(f.name for f in dataclasses.fields(ResolvedSetting) if f.name in PIPELINE_KEYS)
OVERRIDABLE = (*SETTING_PIPELINE_KEYS, "name_set", "method_options")


def available_presets() -> list[str]:
    """Names of all presets, in the order of spec §5.2."""
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """Look a preset up; unknown names raise an OvssError listing the presets."""
    if name not in PRESETS:
        raise OvssError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def default_preset(method: str) -> str:
    """The preset that reproduces a method's own published setting (``X+gla``: that of ``X``).

    Raises:
        OvssError: unknown method, or the method has no home preset (the message lists the presets).
    """
    spec = get_method(method)
    home = HOME_PRESETS.get(spec.name) or HOME_PRESETS.get(spec.base or spec.name)
    if home is None:
        raise OvssError(f"method {method!r} has no default preset; pass one of {', '.join(PRESETS)}")
    return home


def method_logit_scale(method: str, dataset: str) -> float:
    """τ of a method on a dataset (§5.1): the registry value, SCLIP's and SC-CLIP's per-dataset exceptions included."""
    spec = get_method(method)
    return DATASET_LOGIT_SCALES.get(spec.base or spec.name, {}).get(dataset, spec.logit_scale)


def method_options(preset: Preset, spec: MethodSpec, dataset: str = _GENERIC_ROW) -> dict[str, Any]:
    """Method options a preset implies on a dataset: its GLA options for methods with GLA attached, and the
    per-dataset options of Trident (``trident``, ``trident+gla``) and CASS (``cass``, ``cass+gla``; the generic
    row for custom data)."""
    options = dict(preset.gla_options) if spec.base is not None else {}
    base = spec.base or spec.name
    if base == "trident":
        options.update(preset.trident_options.get(dataset, {}))
    if base == "cass":
        options.update(preset.cass_options.get(dataset, {}))
    return options


def resolve(preset: str | None, dataset: str, method: str, **overrides: Any) -> ResolvedSetting:
    """The complete setting of one (preset, dataset, method) triple.

    Args:
        preset: a name from :func:`available_presets`; None: the method's home preset (``default_preset``).
        dataset: one of the eight benchmarks (``ovss.eval.names.DATASETS``) or ``"custom"`` for a user's
            folder (the preset's PASCAL Context 59 row, θ_bg 0).
        method: method name; ``X+gla`` takes the logit scale and extras of ``X`` and the preset's GLA options.
        **overrides: replace any of short_side, crop, stride, logit_scale, bg_threshold, area_threshold,
            pamr_steps, name_set; ``method_options`` is merged onto the preset's method options.

    Returns:
        The resolved setting, with the names of the overridden fields in ``overrides``.

    Raises:
        OvssError: unknown preset, method, dataset, name set or override name.
    """
    spec = get_method(method)
    chosen = get_preset(preset if preset is not None else default_preset(method))
    if dataset != CUSTOM and dataset not in DATASETS:
        raise OvssError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)} or {CUSTOM}")
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise OvssError(f"cannot override {', '.join(unknown)}; overridable: {', '.join(OVERRIDABLE)}")
    row = dataset if dataset != CUSTOM else _GENERIC_ROW
    geometry = chosen.geometry[row]
    filtered = chosen.sclip_area_filter and (spec.base or spec.name) in AREA_FILTER_METHODS
    area = SCLIP_AREA_THRESHOLD if filtered else None
    values: dict[str, Any] = {
        "short_side": geometry.short_side,
        "crop": geometry.crop,
        "stride": geometry.stride,
        "logit_scale": method_logit_scale(method, row),
        "bg_threshold": chosen.bg_thresholds.get(dataset, 0.0),
        "area_threshold": area if dataset == "voc21" else None,
        "pamr_steps": chosen.pamr_steps,
        "name_set": chosen.name_set,
        "method_options": method_options(chosen, spec, row),
    }
    changed = sorted(key for key, value in overrides.items() if key != "method_options" and values[key] != value)
    extra_options = dict(overrides.pop("method_options", None) or {})
    if any(values["method_options"].get(key, object()) != value for key, value in extra_options.items()):
        changed.append("method_options")
    values.update(overrides)
    values["method_options"] = {**values["method_options"], **extra_options}
    if values["name_set"] not in NAME_SETS:
        raise OvssError(f"unknown name set {values['name_set']!r}; choose one of {', '.join(NAME_SETS)}")
    return ResolvedSetting(
        preset=chosen.name, dataset=dataset, method=method, overrides=tuple(sorted(changed)), **values
    )
