"""Presets against the tables of spec §5 (geometry, θ_bg, name sets, logit scales, method extras), written out
here as literals and compared with ``resolve`` for every (preset, dataset, method); the table's shape."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

from ovss.config import PIPELINE_KEYS, PipelineConfig
from ovss.errors import OvssError
from ovss.eval import presets
from ovss.eval.names import DATASETS
from ovss.eval.presets import (
    ALL_PRESETS,
    ANY,
    ANY_COMPOSED,
    HOME_PRESETS,
    PRESETS,
    SETTING_PIPELINE_KEYS,
    Preset,
    ResolvedSetting,
    available_presets,
    default_preset,
    resolve,
)
from ovss.gla.config import GLA_RELEASE
from ovss.methods.options import ComposedOptions, resolve_options
from ovss.methods.registry import available_methods, get_method

EXPECTED_PRESETS = [
    "clip-dinoiser",
    "clearclip",
    "clearclip-release",
    "proxyclip",
    "proxyclip-release",
    "sclip",
    "sclip-release",
    "gla",
    "gla-release",
    "scclip",
    "naclip",
    "naclip-pamr",
    "trident",
    "cass",
    "cass-release",
]

# ------------------------------------------------------------------ spec §5 as literals

# §5.2, S / c / s per dataset; columns: clip-dinoiser + clearclip | proxyclip | sclip, gla, gla-release | naclip | cass
TABLE_5_2 = {
    "voc21": ("448/448/224", "336/336/112", "336/224/112", "336/whole", "336/whole"),
    "pc60": ("448/448/224", "336/336/112", "336/224/112", "336/224/112", "336/224/112"),
    "coco_object": ("448/448/224", "336/336/112", "336/224/112", "336/224/112", "336/224/112"),
    "voc20": ("448/448/224", "336/336/112", "336/224/112", "336/whole", "336/224/112"),
    "pc59": ("448/448/224", "336/336/112", "336/224/112", "336/224/112", "336/224/112"),
    "coco_stuff": ("448/448/224", "336/336/112", "336/224/112", "336/224/112", "336/224/112"),
    "cityscapes": ("448/448/224", "448/336/112", "560/224/112", "560/224/112", "560/224/112"),
    "ade20k": ("448/448/224", "448/336/112", "336/224/112", "336/224/112", "336/224/112"),
}
# The column of each preset: release presets share their base preset's column (deviations below); scclip has the
# SCLIP geometry (§4.11.3), naclip-pamr is naclip + PAMR, cass-release has CASS's geometry; trident: §4.12.5.
COLUMN = {
    "clip-dinoiser": 0, "clearclip": 0, "clearclip-release": 0, "proxyclip": 1, "proxyclip-release": 1,
    "sclip": 2, "sclip-release": 2, "gla": 2, "gla-release": 2, "scclip": 2,
    "naclip": 3, "naclip-pamr": 3, "cass": 4, "cass-release": 4,
}  # fmt: skip
DEVIATIONS = {  # §5.2 release deviations
    ("clearclip-release", "cityscapes"): "448/224/224",
    ("proxyclip-release", "cityscapes"): "448/224/112",
    ("sclip-release", "coco_stuff"): "448/224/112",
}
# §4.12.5 preset trident (c = 336): S, s, θ_bg, θ_c, φ (cos_fac), refine_neg_cos
TABLE_4_12_5 = {
    "voc21": (448, 224, 0.2, 0.2, 1.2, True),
    "pc60": (576, 224, 0.15, 0.15, 1.2, True),
    "coco_object": (448, 224, 0.25, 0.25, 1.2, True),
    "voc20": (336, 112, 0.0, 0.2, 0.0, True),
    "pc59": (576, 224, 0.0, 0.15, 1.2, True),
    "coco_stuff": (448, 224, 0.0, 0.05, 1.2, True),
    "cityscapes": (688, 224, 0.0, 0.10, 3.0, False),
    "ade20k": (576, 224, 0.0, 0.05, 1.2, False),
}
# §5.2 θ_bg of VOC21, PC60, COCO-Object (0 elsewhere); §4.11.3 for scclip
THRESHOLDS = {
    "clip-dinoiser": (0.5, 0.15, 0.4), "clearclip": (0.5, 0.15, 0.4), "clearclip-release": (0.5, 0.15, 0.4),
    "proxyclip": (0.2, 0.15, 0.25), "proxyclip-release": (0.2, 0.15, 0.25),
    "sclip": (0.1, 0.1, 0.1), "sclip-release": (0.1, 0.1, 0.1), "gla": (0.1, 0.1, 0.1), "gla-release": (0.1, 0.1, 0.1),
    "scclip": (0.15, 0.15, 0.35), "naclip": (0.1, 0.1, 0.1), "naclip-pamr": (0.1, 0.1, 0.1),
    "cass": (0.1, 0.1, 0.1), "cass-release": (0.1, 0.1, 0.1),
}  # fmt: skip
NAME_SET = {"plain": ("clip-dinoiser", "clearclip", "clearclip-release"),
            "bg-rename": ("proxyclip", "proxyclip-release", "trident")}  # fmt: skip
# §5.1: τ per base method, and the per-dataset release values of SCLIP and SC-CLIP (any preset)
TAU = {
    "vanilla": 40.0, "vanilla-reduced": 40.0, "maskclip": 40.0, "maskclip-reimpl": 40.0, "sclip": 40.0,
    "clearclip": 50.0, "gclip": 50.0, "naclip": 40.0, "proxyclip": 40.0, "cass": 40.0, "scclip": 40.0,
    "trident": 40.0,
}  # fmt: skip
TAU_PER_DATASET = {
    "sclip": {"voc21": 65.0, "pc60": 50.0, "coco_object": 50.0},
    "scclip": {"voc21": 50.0, "coco_object": 55.0},
}
# §2.8 / §4.11.3: the VOC21 area filter 0.1 of sclip and scclip (and their +gla) in these presets
AREA_PRESETS = ("sclip", "sclip-release", "gla", "gla-release", "scclip")
# §4.10: CASS's (g_w, m, h) per dataset; the release skips the singular-value rescale on VOC20 and Cityscapes and
# takes the global embedding of each window on Cityscapes (docs/decisions.md, CASS)
TABLE_4_10 = {
    "voc21": (0.1, 0.03, 0.10), "voc20": (0.4, 0.02, 0.10), "pc60": (0.25, 0.04, 0.09), "pc59": (0.25, 0.04, 0.09),
    "coco_object": (0.25, 0.01, 0.10), "coco_stuff": (0.2, 0.02, 0.02), "cityscapes": (0.1, 0.03, 0.14),
    "ade20k": (0.3, 0.05, 0.06),
}  # fmt: skip
CASS_RELEASE = {"pairing": "release", "rank": "release", "dino_input": "release", "match_tolerance": 0.0}


def _cells(text: str) -> tuple[int, int, int]:
    short, _, rest = text.partition("/")
    if rest == "whole":
        return int(short), 0, 0
    crop, stride = rest.split("/")
    return int(short), int(crop), int(stride)


def _expected_base(preset: str, dataset: str, base: str) -> Any:
    """The base method's options the spec's per-dataset tables give (its defaults where they say nothing)."""
    defaults = get_method(base).options
    if preset == "trident" and base == "trident":
        _, _, _, coarse, cos_fac, neg = TABLE_4_12_5[dataset]
        split = dataset == "cityscapes"  # the release encodes Cityscapes' halves separately (§4.12.5)
        return dataclasses.replace(
            defaults, coarse_thresh=coarse, cos_fac=cos_fac, refine_neg_cos=neg, split_halves=split
        )
    if preset in ("cass", "cass-release") and base == "cass":
        g_w, m, h = TABLE_4_10[dataset]
        release = CASS_RELEASE if preset == "cass-release" else {}
        return dataclasses.replace(
            defaults,
            global_weight=g_w,
            text_shift=m,
            cluster_threshold=h,
            rescale_singular_values=dataset not in ("voc20", "cityscapes"),
            global_embedding="window" if dataset == "cityscapes" else "image",
            **release,
        )
    return defaults


def _expected(preset: str, dataset: str, method: str) -> dict[str, Any]:
    """Every field of the resolved setting, from the literal tables above; options as the built dataclasses."""
    spec = get_method(method)
    base = spec.base or method
    if preset == "trident":
        short, stride, bg, *_ = TABLE_4_12_5[dataset]
        geometry = (short, 336, stride)
    else:
        geometry = _cells(DEVIATIONS.get((preset, dataset)) or TABLE_5_2[dataset][COLUMN[preset]])
        bg = dict(zip(("voc21", "pc60", "coco_object"), THRESHOLDS[preset], strict=True)).get(dataset, 0.0)
    name_set = next((n for n, members in NAME_SET.items() if preset in members), "full-rename")
    area = 0.1 if (preset in AREA_PRESETS and base in ("sclip", "scclip") and dataset == "voc21") else None
    options = _expected_base(preset, dataset, base)
    if spec.base is not None:
        gla = GLA_RELEASE if preset == "gla-release" else spec.options.gla
        options = ComposedOptions(options, gla, spec.options.extra)
    return {
        "short_side": geometry[0],
        "crop": geometry[1],
        "stride": geometry[2],
        "logit_scale": TAU_PER_DATASET.get(base, {}).get(dataset, TAU[base]),
        "bg_threshold": bg,
        "area_threshold": area,
        "pamr_steps": 10 if preset == "naclip-pamr" else 0,
        "name_set": name_set,
        "options": options,
    }


def _resolved(preset: str, dataset: str, method: str) -> dict[str, Any]:
    setting = resolve(preset, dataset, method)
    assert (setting.preset, setting.dataset, setting.method, setting.overrides) == (preset, dataset, method, ())
    spec = get_method(method)
    got = {key: getattr(setting, key) for key in ("short_side", "crop", "stride", "logit_scale", "bg_threshold")}
    got.update(area_threshold=setting.area_threshold, pamr_steps=setting.pamr_steps, name_set=setting.name_set)
    got["options"] = resolve_options(method, spec.options, setting.method_options)  # raises on an unknown keyword
    return got


def test_every_preset_of_the_spec_is_there_in_order() -> None:
    assert available_presets() == EXPECTED_PRESETS


def test_every_combination_is_what_the_spec_tables_say() -> None:
    wrong = []
    for preset in PRESETS:
        for dataset in DATASETS:
            for method in available_methods():
                want, got = _expected(preset, dataset, method), _resolved(preset, dataset, method)
                wrong += [(preset, dataset, method, key, got[key], want[key]) for key in want if got[key] != want[key]]
    assert not wrong, wrong[:5]


def test_method_options_are_the_smallest_keyword_dicts() -> None:
    # frozen literal values of what resolve returns (ovss.load keywords; config.json records them)
    release = {"gla_rho": 0.55, "gla_clamp_mean": True}
    assert resolve("gla-release", "voc21", "proxyclip+gla").method_options == release
    assert resolve("gla-release", "ade20k", "proxyclip+gla+mlf").method_options == release
    assert resolve("trident", "cityscapes", "trident+gla").method_options == {
        "coarse_thresh": 0.1, "cos_fac": 3.0, "refine_neg_cos": False, "split_halves": True,
    }  # fmt: skip
    assert resolve("trident", "voc21", "trident").method_options == {"coarse_thresh": 0.2, "cos_fac": 1.2}
    assert resolve("cass-release", "voc20", "cass+gla").method_options == {
        "global_weight": 0.4, "text_shift": 0.02, "cluster_threshold": 0.10, "rescale_singular_values": False,
        "global_embedding": "image", "pairing": "release", "rank": "release", "dino_input": "release",
        "match_tolerance": 0.0,
    }  # fmt: skip
    for preset in PRESETS:
        for dataset in DATASETS:
            for method in ("vanilla", "clearclip", "naclip", "sclip", "scclip", "proxyclip", "gclip"):
                assert resolve(preset, dataset, method).method_options == {}
    assert resolve("trident", "voc21", "proxyclip+gla").method_options == {}
    assert resolve("gla", "voc21", "trident+gla").method_options == {}


def test_custom_dataset_is_the_generic_row_without_background_threshold() -> None:
    for preset in PRESETS:
        for method in available_methods():
            custom, pc59 = resolve(preset, "custom", method), resolve(preset, "pc59", method)
            assert custom == dataclasses.replace(pc59, dataset="custom") and custom.bg_threshold == 0.0
    setting = resolve("proxyclip", "custom", "proxyclip")
    assert (setting.short_side, setting.crop, setting.stride, setting.bg_threshold) == (336, 336, 112, 0.0)


# ------------------------------------------------------------------ the table: data only, no method in the code


def test_table_keys_name_registered_methods_known_datasets_and_setting_fields() -> None:
    settable = {f.name for f in dataclasses.fields(ResolvedSetting)} - {"preset", "dataset", "method", "overrides"}
    methods = set(available_methods())
    for preset in (ALL_PRESETS, *PRESETS.values()):
        for method_key, rows in preset.table.items():
            assert method_key in {ANY, ANY_COMPOSED} | methods, (preset.name, method_key)
            for dataset_key, settings in rows.items():
                assert dataset_key in {ANY, *DATASETS}, (preset.name, method_key, dataset_key)
                assert set(settings) <= settable, (preset.name, method_key, set(settings) - settable)
    for preset in PRESETS.values():  # every preset gives the geometry of every dataset to every method
        rows = preset.table[ANY]
        for dataset in DATASETS:
            assert {"short_side", "crop", "stride"} <= set(rows[dataset]), (preset.name, dataset)
        assert {"name_set", "pamr_steps", "bg_threshold"} <= set(rows[ANY])


def test_resolution_code_names_no_method() -> None:
    code = "".join(inspect.getsource(f) for f in (resolve, presets.table_settings, presets.method_keys))
    named = [m for m in available_methods() if f'"{m}"' in code or f"'{m}'" in code]
    assert not named


def test_a_new_per_dataset_setting_is_one_table_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    gla = PRESETS["gla"]
    entry = {"naclip": {"voc20": {"method_options": {"sigma": 3.0}, "logit_scale": 55.0}}}
    monkeypatch.setitem(PRESETS, "gla", Preset(gla.name, gla.description, {**gla.table, **entry}))
    for method in ("naclip", "naclip+gla"):  # the base's entry applies to its +gla
        setting = resolve("gla", "voc20", method)
        assert (setting.method_options, setting.logit_scale) == ({"sigma": 3.0}, 55.0)
        assert resolve("gla", "voc21", method).method_options == {}
    assert resolve("gla", "voc20", "clearclip").method_options == {}
    assert resolve("naclip", "voc20", "naclip").method_options == {}


def test_specific_entries_win_and_method_options_merge() -> None:
    table = {
        ANY: {ANY: {"crop": 1, "stride": 1, "short_side": 1, "name_set": "plain", "pamr_steps": 0, "bg_threshold": 0}},
        ANY_COMPOSED: {ANY: {"crop": 2, "method_options": {"gla_rho": 0.5, "gla_steps": 3}}},
        "naclip": {ANY: {"crop": 3}, "voc20": {"crop": 4, "method_options": {"gla_rho": 0.4, "sigma": 2.0}}},
        "naclip+gla": {"voc21": {"crop": 5}},
    }
    preset = Preset("t", "", table)
    spec = get_method("naclip+gla")
    assert presets.table_settings(preset, spec, "voc20")["crop"] == 4
    assert presets.table_settings(preset, spec, "voc21")["crop"] == 5
    assert presets.table_settings(preset, spec, "pc59")["crop"] == 3
    assert presets.table_settings(preset, get_method("clearclip+gla"), "voc20")["crop"] == 2
    assert presets.table_settings(preset, get_method("clearclip"), "voc20")["crop"] == 1
    merged = presets.table_settings(preset, spec, "voc20")["method_options"]
    assert merged == {"gla_rho": 0.4, "gla_steps": 3, "sigma": 2.0}


# ------------------------------------------------------------------ defaults, overrides, errors


def test_preset_data_names_only_registered_methods() -> None:
    assert set(HOME_PRESETS) <= set(available_methods())
    assert set(HOME_PRESETS.values()) <= set(PRESETS)


def test_setting_pipeline_keys_are_the_pipeline_fields_of_a_setting() -> None:
    setting_fields = {f.name for f in dataclasses.fields(ResolvedSetting)}
    assert set(SETTING_PIPELINE_KEYS) == setting_fields & set(PIPELINE_KEYS)
    assert {"short_side", "crop", "stride", "logit_scale", "bg_threshold", "area_threshold", "pamr_steps"} == set(
        SETTING_PIPELINE_KEYS
    )


def test_overrides_replace_values_and_are_recorded() -> None:
    setting = resolve("gla", "voc21", "proxyclip+gla", crop=280, stride=112, bg_threshold=0.2)
    assert (setting.crop, setting.stride, setting.bg_threshold) == (280, 112, 0.2)
    assert setting.overrides == ("bg_threshold", "crop")  # stride equals the preset's value
    merged = resolve("gla-release", "pc59", "proxyclip+gla", method_options={"gla_rho": 0.5, "gla_steps": 3})
    assert merged.method_options == {"gla_rho": 0.5, "gla_clamp_mean": True, "gla_steps": 3}
    assert merged.overrides == ("method_options",)
    same = resolve("gla-release", "pc59", "proxyclip+gla", method_options={"gla_rho": 0.55})
    assert same.overrides == ()
    assert resolve("sclip", "voc21", "sclip", area_threshold=None).area_threshold is None
    assert resolve("proxyclip", "voc21", "proxyclip", name_set="plain").name_set == "plain"


def test_gla_methods_take_their_base_from_the_registry_and_default_presets() -> None:
    assert get_method("clearclip+gla").base == "clearclip" and get_method("naclip").base is None
    assert default_preset("proxyclip+gla") == "gla"
    assert default_preset("sclip+gla") == "sclip"
    assert default_preset("gclip") == "clearclip"
    assert default_preset("cass+gla") == "cass"
    setting = resolve(None, "cityscapes", "naclip")
    assert (setting.preset, setting.short_side, setting.crop) == ("naclip", 560, 224)


def test_every_setting_is_a_valid_pipeline_config() -> None:
    for preset in PRESETS:
        for dataset in DATASETS:
            for method in ("sclip", "clearclip", "naclip"):
                PipelineConfig(**resolve(preset, dataset, method).pipeline_kwargs())


def test_errors_name_the_choices() -> None:
    with pytest.raises(OvssError, match=r"unknown preset 'glaa'.*gla-release"):
        resolve("glaa", "voc21", "clearclip")
    with pytest.raises(OvssError, match=r"unknown dataset 'voc'.*voc21.*custom"):
        resolve("gla", "voc", "clearclip")
    with pytest.raises(OvssError, match="cannot override templates"):
        resolve("gla", "voc21", "clearclip", templates="imagenet7")
    with pytest.raises(OvssError, match="unknown name set"):
        resolve("gla", "voc21", "clearclip", name_set="fancy")
    with pytest.raises(OvssError, match="unknown method 'mystery'"):
        resolve(None, "voc21", "mystery")
    with pytest.raises(OvssError, match="unknown method 'cas'"):
        resolve("sclip", "voc21", "cas")
