"""Method, GLA and pipeline options: declared once (typed dataclass fields), checked at load, parsed by type."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ovss
from ovss.cli.main import main
from ovss.cli.options import add_model_flags, load_kwargs, parse_method_options
from ovss.config import PIPELINE_KEYS, PipelineConfig
from ovss.errors import OvssError
from ovss.fields import parse_text
from ovss.gla.config import GLAConfig
from ovss.methods.options import (
    ComposedOptions,
    MLFOptions,
    NACLIPOptions,
    base_options,
    option_fields,
    option_value,
    resolve_options,
)
from ovss.methods.registry import LazyRun, MethodSpec, available_methods, get_method, with_gla

MISSING_CLIP = "/nonexistent/clip.pt"  # loading these weights would fail: errors must come before


def _resolve(method: str, **overrides: object) -> typing.Any:
    spec = get_method(method)
    return resolve_options(spec.name, spec.options, overrides)


# ------------------------------------------------------------------ item 1: checked at load, from annotations


@pytest.mark.parametrize(
    ("method", "option", "value", "message"),
    [
        ("naclip", "attn", "bogus", "naclip option attn='bogus' is invalid: expected one of 'naclip', 'nonly'"),
        ("naclip", "sigma", "abc", "sigma='abc' is invalid: expected a number"),
        ("sclip", "reduced", "yes", "reduced='yes' is invalid: expected true or false"),
        ("clearclip", "last_n_layers", 1.5, "last_n_layers=1.5 is invalid: expected a whole number"),
        ("gclip", "cs_start", "late", "cs_start='late' is invalid: expected one of 'auto' or a whole number"),
        ("gclip", "block_index_base", 2, "block_index_base=2 is invalid: expected one of 0, 1"),
        ("proxyclip+gla", "gla_norm", "bogus", "gla_norm='bogus' is invalid: expected one of 'none', 'fixed'"),
        ("proxyclip+gla", "gla_steps", 2.5, "gla_steps=2.5 is invalid: expected a whole number"),
        ("proxyclip+gla", "gla_chunk_rows", "many", "expected a whole number or None"),
        ("proxyclip+gla", "gla_rho", 2.0, "gla_rho is a cosine threshold in [-1, 1]"),  # range check kept
    ],
)
def test_load_rejects_a_bad_option_before_reading_weights(method: str, option: str, value: object, message: str):
    with pytest.raises(OvssError) as err:
        ovss.load(method, clip=MISSING_CLIP, download=False, **{option: value})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_option_of_every_method_rejects_a_value_of_no_declared_type():
    for name in available_methods():
        spec = get_method(name)
        for keyword in option_fields(spec.options):
            with pytest.raises(OvssError, match=keyword):
                resolve_options(name, spec.options, {keyword: object()})


def test_option_dataclasses_check_themselves_when_built_directly():
    with pytest.raises(OvssError, match="attn='kq'"):
        NACLIPOptions(attn="kq")  # type: ignore[arg-type]
    with pytest.raises(OvssError, match="gla_smoothing='eq18'"):
        GLAConfig(smoothing="eq18")  # type: ignore[arg-type]
    with pytest.raises(OvssError, match="templates='imagenet81'"):
        PipelineConfig(None, 0, 0, 40.0, templates="imagenet81")  # type: ignore[arg-type]


def test_ints_are_accepted_and_stored_as_floats_bools_are_not_numbers():
    opts = _resolve("naclip", sigma=3)
    assert opts.sigma == 3.0 and isinstance(opts.sigma, float)
    with pytest.raises(OvssError, match="sigma=True"):
        _resolve("naclip", sigma=True)
    assert PipelineConfig(None, 0, 0, 40, pamr_dilations=[4, 8]).pamr_dilations == (4, 8)  # type: ignore[arg-type]


# ------------------------------------------------------------------ item 2: one keyword, one option


def test_beta_sets_proxyclip_beta_and_gla_beta_sets_gla_beta():
    opts = _resolve("proxyclip+gla", beta=1.5)
    assert opts.base.beta == 1.5 and opts.gla.beta == GLAConfig().beta
    opts = _resolve("proxyclip+gla", gla_beta=1.5, gla_rho=0.55)
    assert opts.base.beta == get_method("proxyclip").options.beta and (opts.gla.beta, opts.gla.rho) == (1.5, 0.55)
    assert option_value(opts, "gla_rho") == 0.55 and option_value(opts, "beta") == 1.2
    assert option_value(opts, "rho", "<absent>") == "<absent>"


def test_unprefixed_gla_names_and_gla_names_without_gla_get_a_hint():
    with pytest.raises(OvssError, match="no option rho; options of an attached part carry its prefix: gla_rho"):
        _resolve("proxyclip+gla", rho=0.55)
    with pytest.raises(OvssError, match="use proxyclip\\+gla or gla=True"):
        ovss.load("proxyclip", clip=MISSING_CLIP, download=False, gla_rho=0.55)
    with pytest.raises(OvssError, match="pipeline settings: short_side"):
        ovss.load("naclip", clip=MISSING_CLIP, download=False, crop_size=224)


def test_gla_dict_and_flag_attach_gla(tiny_clip, tiny_dino, bpe_path):
    kw = dict(clip=tiny_clip, vfm=tiny_dino, tokenizer=bpe_path)
    by_dict = ovss.load("proxyclip", gla={"rho": 0.55, "clamp_mean": True}, beta=1.3, **kw)
    by_keywords = ovss.load("proxyclip+gla", gla_rho=0.55, gla_clamp_mean=True, beta=1.3, **kw)
    assert by_dict.method.name == by_keywords.method.name == "proxyclip+gla"
    assert by_dict.options == by_keywords.options
    assert isinstance(by_dict.options, ComposedOptions)
    record = by_dict.config["options"]  # base and GLA recorded separately
    assert record["base"] == {"beta": 1.3, "gamma": 3.0}
    assert record["gla"] == dataclasses.asdict(GLAConfig(rho=0.55, clamp_mean=True))
    assert record["extra"] is None  # plain X+gla: no part of its own
    assert ovss.load("proxyclip", gla=True, **kw).method.name == "proxyclip+gla"
    with pytest.raises(OvssError, match="gla_rho given both"):
        ovss.load("proxyclip", gla={"rho": 0.5}, gla_rho=0.55, **kw)
    with pytest.raises(OvssError, match="GLA is not available for 'vanilla'"):
        ovss.load("vanilla", gla=True, **kw)


# ------------------------------------------------------------------ item 3: pipeline settings from PipelineConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_model_flags(parser)
    return parser


def test_every_pipeline_field_is_a_cli_flag_in_both_spellings_with_its_help():
    parser = _parser()
    by_dest = {action.dest: action for action in parser._actions}
    for f in dataclasses.fields(PipelineConfig):
        action = by_dest[f.name]
        assert f"--{f.name.replace('_', '-')}" in action.option_strings and f"--{f.name}" in action.option_strings
        assert action.help is not None and action.help.startswith(f.metadata["help"])


def test_cli_pipeline_flags_parse_by_type_into_load_keywords():
    args = _parser().parse_args(
        [
            "--method", "naclip", "--short-side", "none", "--crop", "0", "--pamr-dilations", "4,8",
            "--max_long_side", "1000", "--templates", "imagenet7", "--area-threshold", "0.2",
            "--opt", "sigma=3", "--opt", "arch=vanilla",
        ]
    )  # fmt: skip
    kwargs = load_kwargs(args)
    expected = dict(short_side=None, crop=0, pamr_dilations=(4, 8), max_long_side=1000, templates="imagenet7")
    assert {key: kwargs[key] for key in expected} == expected
    assert kwargs["area_threshold"] == 0.2 and (kwargs["sigma"], kwargs["arch"]) == (3.0, "vanilla")
    assert "bg_threshold" not in kwargs  # unset flags leave the method's default
    with pytest.raises(SystemExit):
        _parser().parse_args(["--templates", "imagenet81"])


def test_load_accepts_max_long_side_and_pamr_dilations(tiny_clip, bpe_path):
    seg = ovss.load("clearclip", clip=tiny_clip, tokenizer=bpe_path, max_long_side=500, pamr_dilations=[4])
    assert (seg.pipeline.max_long_side, seg.pipeline.pamr_dilations) == (500, (4,))
    assert seg.pipeline.crop == 448 and seg.pipeline.logit_scale == 50.0  # the method's defaults
    assert seg.config["pipeline"]["max_long_side"] == 500


def test_load_docstring_names_every_pipeline_setting():
    assert ovss.load.__doc__ is not None
    for key in PIPELINE_KEYS:
        assert key in ovss.load.__doc__


# ------------------------------------------------------------------ item 4: a method knows its base


def test_gla_methods_know_their_base_and_cover_every_adapter():
    from ovss.methods.composed.bases import ADAPTERS

    composed = {name for name in available_methods() if get_method(name).base is not None}
    assert composed == set(ADAPTERS)  # one adapter per composed method, and every adapter registered
    for name in available_methods():
        spec = get_method(name)
        if spec.base is not None:
            base = get_method(spec.base)
            # X+gla, or a variant of it with an option part of its own (proxyclip+gla+mlf)
            assert spec.name.startswith(f"{base.name}+gla") and spec.options.base == base.options
            pad = 56 if base.name == "cass" else base.pad_multiple  # cass+gla's DINO keys: padded like proxyclip
            assert (spec.logit_scale, spec.pad_multiple, spec.weights) == (base.logit_scale, pad, base.weights)
    assert with_gla("naclip").name == "naclip+gla" and with_gla("naclip+gla").name == "naclip+gla"
    assert with_gla("naclip", False).name == "naclip"


# Fields a composed method sets itself; it takes every other MethodSpec field from its base.
_COMPOSED_OWN = {"name", "run", "options", "pad_multiple", "geometry", "joint_windows", "description", "base"}


def test_every_composed_method_has_one_options_type_one_run_and_the_rest_of_its_base():
    for name in available_methods():
        spec = get_method(name)
        if spec.base is None:
            assert not isinstance(spec.options, ComposedOptions) and base_options(spec.options) is spec.options
            continue
        base = get_method(spec.base)
        assert type(spec.options) is ComposedOptions and base_options(spec.options) is base.options
        assert spec.options.gla == GLAConfig() and spec.joint_windows
        assert spec.run == LazyRun("ovss.methods.composed.method:run_composed", (name,))
        for f in dataclasses.fields(MethodSpec):
            if f.name not in _COMPOSED_OWN:
                assert getattr(spec, f.name) == getattr(base, f.name), (name, f.name)


def test_composed_keywords_are_the_parts_with_their_prefixes():
    options = ComposedOptions(NACLIPOptions(sigma=3.0), GLAConfig(rho=0.5), MLFOptions(res_cls=0.3))
    fields = option_fields(options)
    assert [k for k in fields if k in ("sigma", "attn", "arch")] == ["sigma", "attn", "arch"]  # base: plain names
    assert (fields["sigma"].part, fields["sigma"].default) == ("base", 3.0)
    assert (fields["gla_rho"].part, fields["gla_rho"].name, fields["gla_rho"].default) == ("gla", "rho", 0.5)
    assert (fields["mlf_res_cls"].part, fields["mlf_res_cls"].name) == ("extra", "res_cls")
    assert len(fields) == 3 + len(dataclasses.fields(GLAConfig)) + 3  # one keyword per option of every part
    changed = resolve_options("x", options, {"sigma": 4, "gla_steps": 3, "mlf_blocks": [3, 4]})
    assert changed == ComposedOptions(NACLIPOptions(sigma=4.0), GLAConfig(rho=0.5, steps=3), MLFOptions((3, 4), 0.3))
    assert option_fields(ComposedOptions(NACLIPOptions(), GLAConfig())).keys().isdisjoint({"mlf_blocks", "extra"})


# ------------------------------------------------------------------ item 5: --opt parsed by the declared type


@pytest.mark.parametrize(
    ("method", "pair", "expected"),
    [
        ("sclip", "reduced=false", False),
        ("sclip", "reduced=False", False),
        ("sclip", "reduced=0", False),
        ("sclip", "reduced=no", False),
        ("sclip", "reduced=true", True),
        ("sclip", "reduced=1", True),
        ("sclip", "reduced=yes", True),
        ("naclip", "sigma=3", 3.0),
        ("naclip", "attn=kk", "kk"),
        ("gclip", "cs_start=7", 7),
        ("gclip", "cs_start=auto", "auto"),
        ("gclip", "block_index_base=1", 1),
        ("proxyclip+gla", "gla_chunk_rows=none", None),
        ("proxyclip+gla", "gla_chunk_rows=64", 64),
        ("proxyclip+gla", "gla-clamp-mean=true", True),
    ],
)
def test_opt_values_are_parsed_by_the_declared_type(method: str, pair: str, expected: object):
    ((key, value),) = parse_method_options([pair], method).items()
    assert value == expected and type(value) is type(expected)
    assert key == pair.partition("=")[0].replace("-", "_")


@pytest.mark.parametrize(
    ("method", "pair", "message"),
    [
        ("sclip", "reduced=maybe", "--opt reduced='maybe' is invalid: expected true or false"),
        ("naclip", "sigma=abc", "--opt sigma='abc' is invalid: expected a number"),
        ("naclip", "attn=bogus", "expected one of 'naclip', 'nonly', 'kk', 'vanilla'"),
        ("proxyclip+gla", "rho=0.5", "carry its prefix: gla_rho"),
    ],
)
def test_bad_opt_values_are_one_line_errors(method: str, pair: str, message: str):
    with pytest.raises(OvssError) as err:
        parse_method_options([pair], method)
    assert message in str(err.value)


def test_cli_bad_opt_ends_in_one_line_not_a_traceback(tmp_path: Path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    out = tmp_path / "out"
    args = ["segment", str(image), "--labels", "a, b", "--method", "naclip", "--clip", MISSING_CLIP, "--out", str(out)]
    assert main([*args, "--opt", "sigma=abc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ovss: error: --opt sigma='abc' is invalid")
    assert not out.exists()


def test_parse_text_and_check_value_agree_on_every_default():
    for name in available_methods():
        for keyword, field in option_fields(get_method(name).options).items():
            text = "none" if field.default is None else str(field.default)
            assert parse_text(keyword, text, field.type) == field.default


# ------------------------------------------------------------------ item 6: ovss methods lists the options


def test_methods_lists_options_with_type_default_and_choices(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "    attn: 'naclip' | 'nonly' | 'kk' | 'vanilla' = 'naclip'" in out
    assert "    sigma: float = 5.0" in out
    assert "    cs_start: 'auto' | int = 'auto'" in out
    assert "    gla_rho: float = 0.6" in out and "    gla_chunk_rows: int | None = None" in out
    assert out.count("gla_rho") == 2  # once in the header example, once in the single GLA listing


# ------------------------------------------------------------------ item 7: start-up without torch


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["methods"], ["data", "check", "voc21", "--root", "{tmp}"], ["eval", "--help"], ["segment", "--help"]],
)
def test_cli_start_up_does_not_import_torch(argv: list[str], tmp_path: Path):
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    code = (
        "import contextlib, io, sys, time\n"
        "start = time.perf_counter()\n"
        "import ovss.cli.main as m\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        m.main({argv!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'seconds': time.perf_counter() - start}))\n"
    )
    src = str(Path(ovss.__file__).parents[1])
    run = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["torch"] is False
    assert result["seconds"] < 1.0  # loose; the 0.3 s target is measured in the README


def test_template_choices_are_the_template_sets():
    from ovss.text.templates import TEMPLATE_SETS

    hint = typing.get_type_hints(PipelineConfig)["templates"]
    assert set(typing.get_args(hint)) == set(TEMPLATE_SETS)
