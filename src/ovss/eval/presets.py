"""Named evaluation settings (spec §5) as one table, and their resolution for one (preset, dataset, method).

A *preset* fixes, per benchmark, the resize short side S, window c and stride s, the background threshold
θ_bg and the name set (§5.2); methods bring their logit scale τ (``MethodSpec.logit_scale``) and extras
(§5.1): SCLIP's and SC-CLIP's per-dataset τ, their VOC21 area filter in the SCLIP settings, GLA's release
options, Trident's and CASS's per-dataset options. All of it is data in one table,
preset -> method key -> dataset key -> settings (:data:`PRESETS`, and :data:`ALL_PRESETS` for what holds in
every preset); :func:`resolve` merges the entries that apply, names no method, and every value can be
overridden.

A method with GLA attached (``MethodSpec.base``, e.g. ``proxyclip+gla``) takes the values of its base.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ovss.config import PIPELINE_KEYS
from ovss.errors import OvssError
from ovss.eval.names import DATASETS, NAME_SETS
from ovss.methods.registry import GLA_SUFFIX, MethodSpec, get_method

CUSTOM = "custom"  # dataset key of a user's own folder dataset (the preset's generic row)
_GENERIC_ROW = "pc59"  # the preset row used for custom datasets: the 59-class PASCAL Context setting (θ_bg 0)
_WHOLE = 0  # crop 0 = whole-image mode (§2.2)

ANY = "*"  # table key: every method, every dataset (or, as a preset, every preset)
ANY_COMPOSED = ANY + GLA_SUFFIX  # method key: every method with GLA attached (X+gla and its variants)

# ResolvedSetting field -> value; "method_options" (ovss.load option keywords) merges key by key.
Settings = dict[str, Any]
# method key (ANY, ANY_COMPOSED, a base, a method) -> dataset key (ANY, a dataset) -> settings
Table = dict[str, dict[str, Settings]]

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
    """One named setting of spec §5.2: its rows of the settings table."""

    name: str  # preset name, e.g. "gla"
    description: str  # one line for listings
    table: Table  # method key -> dataset key -> settings (table_settings gives the order of the merge)


def _merge(*tables: dict[str, Settings]) -> dict[str, Settings]:
    """Dataset -> settings tables combined dataset by dataset (later tables win)."""
    out: dict[str, Settings] = {}
    for table in tables:
        for dataset, settings in table.items():
            out[dataset] = {**out.get(dataset, {}), **settings}
    return out


def _rows(default: tuple[int, int, int], **exceptions: tuple[int, int, int]) -> dict[str, Settings]:
    """S / c / s of the eight datasets: ``default`` everywhere except the named datasets."""
    return {
        dataset: dict(zip(("short_side", "crop", "stride"), exceptions.get(dataset, default), strict=True))
        for dataset in DATASETS
    }


def _thresholds(voc21: float, pc60: float, coco_object: float) -> dict[str, Settings]:
    """θ_bg of the only datasets with a background class (§5.2, §10 #27); 0 elsewhere."""
    return {
        ANY: {"bg_threshold": 0.0},
        "voc21": {"bg_threshold": voc21},
        "pc60": {"bg_threshold": pc60},
        "coco_object": {"bg_threshold": coco_object},
    }


def _setting(
    rows: dict[str, Settings], bg: dict[str, Settings], name_set: str, pamr_steps: int = 0
) -> dict[str, Settings]:
    """The part of a preset every method gets: geometry and θ_bg per dataset, name set (§6.3) and PAMR."""
    return _merge({ANY: {"name_set": name_set, "pamr_steps": pamr_steps}}, rows, bg)


def _options(per_dataset: dict[str, dict[str, Any]]) -> dict[str, Settings]:
    """Per-dataset method options (``ovss.load`` keywords) as table rows."""
    return {dataset: {"method_options": options} for dataset, options in per_dataset.items()}


_CLEARCLIP_ROWS = _rows((448, 448, 224))
_PROXYCLIP_ROWS = _rows((336, 336, 112), cityscapes=(448, 336, 112), ade20k=(448, 336, 112))
_SCLIP_ROWS = _rows((336, 224, 112), cityscapes=(560, 224, 112))
_NACLIP_ROWS = _rows((336, 224, 112), cityscapes=(560, 224, 112), voc21=(336, _WHOLE, 0), voc20=(336, _WHOLE, 0))
_TRIDENT_ROWS = _rows(
    (576, 336, 224), voc21=(448, 336, 224), coco_object=(448, 336, 224), voc20=(336, 336, 112),
    coco_stuff=(448, 336, 224), cityscapes=(688, 336, 224),
)  # fmt: skip
_CASS_ROWS = _rows((336, 224, 112), cityscapes=(560, 224, 112), voc21=(336, _WHOLE, 0))
_CLEARCLIP_BG = _thresholds(0.5, 0.15, 0.4)
_PROXYCLIP_BG = _thresholds(0.2, 0.15, 0.25)
_SCLIP_BG = _thresholds(0.1, 0.1, 0.1)

# §2.8: the SCLIP release's VOC21 area filter (area_thd 0.1), in the SCLIP settings, for sclip and scclip (and
# through their base, sclip+gla and scclip+gla; §4.11.3).
_AREA_FILTER = {"voc21": {"area_threshold": 0.1}}
_SCLIP_EXTRAS: Table = {"sclip": _AREA_FILTER, "scclip": _AREA_FILTER}

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

# What holds in every preset: a method's τ is its MethodSpec.logit_scale (§5.1), except SCLIP's and SC-CLIP's
# release values on some datasets (and through their base, sclip+gla's and scclip+gla's).
ALL_PRESETS = Preset(
    ANY,
    "method properties that hold in every preset (spec §5.1)",
    {
        "sclip": {d: {"logit_scale": tau} for d, tau in {"voc21": 65.0, "pc60": 50.0, "coco_object": 50.0}.items()},
        "scclip": {d: {"logit_scale": tau} for d, tau in {"voc21": 50.0, "coco_object": 55.0}.items()},
    },
)

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("clip-dinoiser", "GLA App. B.1 setting", {ANY: _setting(_CLEARCLIP_ROWS, _CLEARCLIP_BG, "plain")}),
        Preset("clearclip", "ClearCLIP setting (App. B.2)", {ANY: _setting(_CLEARCLIP_ROWS, _CLEARCLIP_BG, "plain")}),
        Preset(
            "clearclip-release",
            "ClearCLIP release: Cityscapes window 224/224",
            {ANY: _setting(_rows((448, 448, 224), cityscapes=(448, 224, 224)), _CLEARCLIP_BG, "plain")},
        ),
        Preset(
            "proxyclip",
            "ProxyCLIP setting (App. B.3)",
            {ANY: _setting(_PROXYCLIP_ROWS, _PROXYCLIP_BG, "bg-rename")},
        ),
        Preset(
            "proxyclip-release",
            "ProxyCLIP release: Cityscapes window 224/112",
            {
                ANY: _setting(
                    _rows((336, 336, 112), cityscapes=(448, 224, 112), ade20k=(448, 336, 112)),
                    _PROXYCLIP_BG,
                    "bg-rename",
                )
            },
        ),
        Preset(
            "sclip",
            "SCLIP setting (App. B.4)",
            {ANY: _setting(_SCLIP_ROWS, _SCLIP_BG, "full-rename"), **_SCLIP_EXTRAS},
        ),
        Preset(
            "sclip-release",
            "SCLIP release: COCO-Stuff short side 448",
            {
                ANY: _setting(
                    _rows((336, 224, 112), cityscapes=(560, 224, 112), coco_stuff=(448, 224, 112)),
                    _SCLIP_BG,
                    "full-rename",
                ),
                **_SCLIP_EXTRAS,
            },
        ),
        Preset(
            "gla",
            "GLA-CLIP default = SCLIP setting (App. L)",
            {ANY: _setting(_SCLIP_ROWS, _SCLIP_BG, "full-rename"), **_SCLIP_EXTRAS},
        ),
        Preset(
            "gla-release",
            "GLA-CLIP release: rho 0.55, row mean clamped at 0",
            {
                ANY: _setting(_SCLIP_ROWS, _SCLIP_BG, "full-rename"),
                **_SCLIP_EXTRAS,
                ANY_COMPOSED: {ANY: {"method_options": {"gla_rho": 0.55, "gla_clamp_mean": True}}},
            },
        ),
        Preset(
            "scclip",
            "SC-CLIP release configs (§4.11.3)",
            {ANY: _setting(_SCLIP_ROWS, _thresholds(0.15, 0.15, 0.35), "full-rename"), **_SCLIP_EXTRAS},
        ),
        Preset("naclip", "NACLIP release configuration", {ANY: _setting(_NACLIP_ROWS, _SCLIP_BG, "full-rename")}),
        Preset(
            "naclip-pamr",
            "NACLIP + PAMR (10 iterations, dilations 8, 16)",
            {ANY: _setting(_NACLIP_ROWS, _SCLIP_BG, "full-rename", pamr_steps=10)},
        ),
        Preset(
            "trident",
            "Trident release configs (§4.12.5): SAM thresholds per dataset",
            {ANY: _setting(_TRIDENT_ROWS, _PROXYCLIP_BG, "bg-rename"), "trident": _options(_TRIDENT_OPTIONS)},
        ),
        Preset(
            "cass",
            "CASS release configuration with its per-dataset hyper-parameters",
            {ANY: _setting(_CASS_ROWS, _SCLIP_BG, "full-rename"), "cass": _options(_CASS_OPTIONS)},
        ),
        Preset(
            "cass-release",
            "CASS release: head pairs indexed as in its code, rank-10 DINO graphs, 8-bit DINO input, float32 "
            "Hungarian costs with raw ties",
            {ANY: _setting(_CASS_ROWS, _SCLIP_BG, "full-rename"), "cass": _options(_CASS_RELEASE_OPTIONS)},
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


def method_keys(spec: MethodSpec) -> tuple[str, ...]:
    """The method keys of the settings table that apply to a method, most general first: every method, every
    composed method and its base (``X+gla`` takes the values of ``X``), the method itself."""
    keys = [ANY]
    if spec.base is not None:
        keys += [ANY_COMPOSED, spec.base]
    return (*keys, spec.name)


def table_settings(preset: Preset, spec: MethodSpec, dataset: str) -> Settings:
    """What the table says for one (preset, method, dataset): every entry that applies, merged in order.

    The order: :data:`ALL_PRESETS` before the preset; within one, method keys from :func:`method_keys`
    (general to specific); within one method key, ``ANY`` before the dataset. A later value replaces an
    earlier one, except ``method_options``, which merge keyword by keyword.
    """
    merged: Settings = {"method_options": {}}
    for table in (ALL_PRESETS.table, preset.table):
        for method_key in method_keys(spec):
            rows = table.get(method_key, {})
            for dataset_key in (ANY, dataset):
                for key, value in rows.get(dataset_key, {}).items():
                    merged[key] = {**merged[key], **value} if key == "method_options" else value
    return merged


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
    # τ is the method's own and the area filter off unless the table says otherwise
    values: dict[str, Any] = {
        "logit_scale": spec.logit_scale,
        "area_threshold": None,
        **table_settings(chosen, spec, row),
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
