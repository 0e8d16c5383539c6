"""Presets against the tables of spec §5 (geometry, θ_bg, name sets, logit scales, method extras)."""

from __future__ import annotations

import dataclasses

import pytest

from ovss.config import PIPELINE_KEYS, PipelineConfig
from ovss.errors import OvssError
from ovss.eval.names import DATASETS
from ovss.eval.presets import (
    HOME_PRESETS,
    PRESETS,
    SETTING_PIPELINE_KEYS,
    ResolvedSetting,
    available_presets,
    default_preset,
    method_logit_scale,
    resolve,
)
from ovss.gla.config import GLA_RELEASE
from ovss.methods.options import resolve_options
from ovss.methods.registry import available_methods, get_method

EXPECTED_PRESETS = {
    "clip-dinoiser",
    "clearclip",
    "clearclip-release",
    "proxyclip",
    "proxyclip-release",
    "sclip",
    "sclip-release",
    "gla",
    "gla-release",
    "naclip",
    "naclip-pamr",
    "scclip",
    "trident",
    "cass",
    "cass-release",
}


def _geometry(preset: str, dataset: str) -> tuple[int | None, int, int]:
    setting = resolve(preset, dataset, "clearclip")
    return setting.short_side, setting.crop, setting.stride


def test_every_preset_of_the_spec_is_there() -> None:
    assert set(available_presets()) == EXPECTED_PRESETS


@pytest.mark.parametrize(
    ("preset", "dataset", "expected"),
    [
        # §5.2 table, S / c / s ("whole" = crop 0)
        ("clip-dinoiser", "voc21", (448, 448, 224)),
        ("clearclip", "cityscapes", (448, 448, 224)),
        ("clearclip", "ade20k", (448, 448, 224)),
        ("proxyclip", "voc21", (336, 336, 112)),
        ("proxyclip", "coco_stuff", (336, 336, 112)),
        ("proxyclip", "cityscapes", (448, 336, 112)),
        ("proxyclip", "ade20k", (448, 336, 112)),
        ("sclip", "pc60", (336, 224, 112)),
        ("sclip", "cityscapes", (560, 224, 112)),
        ("sclip", "ade20k", (336, 224, 112)),
        ("gla", "voc21", (336, 224, 112)),
        ("gla", "cityscapes", (560, 224, 112)),
        ("gla-release", "coco_object", (336, 224, 112)),
        ("naclip", "voc21", (336, 0, 0)),
        ("naclip", "voc20", (336, 0, 0)),
        ("naclip", "pc59", (336, 224, 112)),
        ("naclip", "cityscapes", (560, 224, 112)),
        ("naclip-pamr", "voc20", (336, 0, 0)),
        # release deviations
        ("clearclip-release", "cityscapes", (448, 224, 224)),
        ("clearclip-release", "voc21", (448, 448, 224)),
        ("proxyclip-release", "cityscapes", (448, 224, 112)),
        ("proxyclip-release", "ade20k", (448, 336, 112)),
        ("sclip-release", "coco_stuff", (448, 224, 112)),
        ("sclip-release", "coco_object", (336, 224, 112)),
    ],
)
def test_geometry_cells(preset: str, dataset: str, expected: tuple[int, int, int]) -> None:
    assert _geometry(preset, dataset) == expected


@pytest.mark.parametrize(
    ("preset", "thresholds", "name_set"),
    [
        ("clip-dinoiser", (0.5, 0.15, 0.4), "plain"),
        ("clearclip", (0.5, 0.15, 0.4), "plain"),
        ("proxyclip", (0.2, 0.15, 0.25), "bg-rename"),
        ("sclip", (0.1, 0.1, 0.1), "full-rename"),
        ("gla", (0.1, 0.1, 0.1), "full-rename"),
        ("naclip", (0.1, 0.1, 0.1), "full-rename"),
    ],
)
def test_background_thresholds_and_name_sets(
    preset: str, thresholds: tuple[float, float, float], name_set: str
) -> None:
    got = tuple(resolve(preset, d, "clearclip").bg_threshold for d in ("voc21", "pc60", "coco_object"))
    assert got == thresholds
    for dataset in ("voc20", "pc59", "coco_stuff", "cityscapes", "ade20k"):  # no background class
        assert resolve(preset, dataset, "clearclip").bg_threshold == 0.0
    assert {resolve(preset, d, "naclip").name_set for d in DATASETS} == {name_set}


def test_logit_scales_per_method_and_sclip_per_dataset() -> None:
    expected_sclip = {"voc21": 65.0, "pc60": 50.0, "coco_object": 50.0}
    for dataset in DATASETS:
        for method in ("sclip", "sclip+gla"):
            assert resolve("sclip", dataset, method).logit_scale == expected_sclip.get(dataset, 40.0)
        assert resolve("gla", dataset, "proxyclip+gla").logit_scale == 40.0
        assert resolve("clearclip", dataset, "clearclip+gla").logit_scale == 50.0
        assert resolve("clearclip", dataset, "gclip").logit_scale == 50.0
        assert resolve("naclip", dataset, "naclip").logit_scale == 40.0
    assert resolve("clearclip", "voc21", "sclip").logit_scale == 65.0  # a method property, any preset


def test_logit_scale_comes_from_the_registry() -> None:
    for method in (
        "vanilla",
        "vanilla-reduced",
        "maskclip",
        "maskclip-reimpl",
        "sclip",
        "clearclip",
        "naclip",
        "gclip",
        "proxyclip",
    ):
        assert method_logit_scale(method, "ade20k") == get_method(method).logit_scale
        if method + "+gla" in available_methods():
            assert method_logit_scale(method + "+gla", "ade20k") == get_method(method).logit_scale


def test_preset_data_names_only_registered_methods() -> None:
    # a preset's home method must exist
    assert set(HOME_PRESETS) <= set(available_methods())
    assert set(HOME_PRESETS.values()) <= set(PRESETS)


def test_area_filter_only_for_sclip_on_voc21_in_the_sclip_setting() -> None:
    for preset in ("sclip", "sclip-release", "gla", "gla-release"):
        for method in ("sclip", "sclip+gla"):
            assert resolve(preset, "voc21", method).area_threshold == 0.1
            assert all(resolve(preset, d, method).area_threshold is None for d in DATASETS if d != "voc21")
        assert resolve(preset, "voc21", "proxyclip+gla").area_threshold is None
        assert resolve(preset, "voc21", "naclip").area_threshold is None
    assert resolve("clearclip", "voc21", "sclip").area_threshold is None
    assert resolve("naclip", "voc21", "sclip").area_threshold is None


def test_pamr_only_in_naclip_pamr() -> None:
    for preset in PRESETS:
        steps = {resolve(preset, d, "naclip").pamr_steps for d in DATASETS}
        assert steps == ({10} if preset == "naclip-pamr" else {0})


def test_gla_release_options_are_gla_keywords_of_gla_methods() -> None:
    options = resolve("gla-release", "voc21", "proxyclip+gla").method_options
    assert options == {"gla_rho": 0.55, "gla_clamp_mean": True}
    spec = get_method("proxyclip+gla")
    built = resolve_options(spec.name, spec.options, options)
    assert built.gla == GLA_RELEASE and built.base == spec.options.base  # GLA's options only, not ProxyCLIP's
    assert resolve("gla-release", "voc21", "sclip+gla").method_options == options
    assert resolve("gla-release", "voc21", "proxyclip").method_options == {}
    assert resolve("gla", "voc21", "proxyclip+gla").method_options == {}
    assert _geometry("gla-release", "cityscapes") == _geometry("gla", "cityscapes")


def test_every_preset_gla_option_is_accepted_by_every_gla_method() -> None:
    for preset in PRESETS.values():
        for name in available_methods():
            spec = get_method(name)
            if spec.base is not None:
                resolve_options(spec.name, spec.options, preset.gla_options)  # raises on an unknown keyword


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
    assert resolve("sclip", "voc21", "sclip", area_threshold=None).area_threshold is None
    assert resolve("proxyclip", "voc21", "proxyclip", name_set="plain").name_set == "plain"


def test_gla_methods_take_their_base_from_the_registry_and_default_presets() -> None:
    assert get_method("clearclip+gla").base == "clearclip" and get_method("naclip").base is None
    assert default_preset("proxyclip+gla") == "gla"
    assert default_preset("sclip+gla") == "sclip"
    assert default_preset("gclip") == "clearclip"
    setting = resolve(None, "cityscapes", "naclip")
    assert (setting.preset, setting.short_side, setting.crop) == ("naclip", 560, 224)


def test_custom_dataset_uses_the_generic_row_without_background_threshold() -> None:
    setting = resolve("proxyclip", "custom", "proxyclip")
    assert (setting.short_side, setting.crop, setting.stride, setting.bg_threshold) == (336, 336, 112, 0.0)
    assert resolve("naclip", "custom", "naclip").crop == 224


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
