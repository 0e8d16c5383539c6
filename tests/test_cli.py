"""`ovss segment` end to end through the command line, with tiny random weights saved in real formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ovss
from ovss.cli.main import main
from test_dino import dino_state_dict
from tiny import save_open_clip, save_openai_jit, tiny_clip_state_dict


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    clip = save_openai_jit(tiny_clip_state_dict(seed=0), folder / "tiny-openai.pt")
    clip12 = save_open_clip(tiny_clip_state_dict(seed=1, layers=12), folder / "tiny12.bin", "bin")
    dino = folder / "tiny_dino_pretrain.pth"
    torch.save(dino_state_dict(seed=2, grid=28), dino)
    return {"clip": clip, "clip12": clip12, "dino": dino}


@pytest.fixture(scope="module")
def images(tmp_path_factory, assets_dir) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for name in ["1_image.png", "23_image.png"]:
        shutil.copy(assets_dir / "voc2012-val-samples" / "images" / name, folder / name)
    return folder


def _segment(weights, bpe_path, out: Path, *extra: str) -> int:
    args = ["segment", *extra, "--clip", str(weights["clip"]), "--tokenizer", str(bpe_path), "--out", str(out),
            "--short-side", "128", "--no-progress"]
    return main(args)


def test_segment_folder_writes_outputs_and_config(weights, bpe_path, images, tmp_path):
    out = tmp_path / "out"
    code = _segment(weights, bpe_path, out, str(images), "--labels", "sky, person|pedestrian, dog", "--method",
                    "naclip", "--crop", "96", "--stride", "64", "--save-logits")
    assert code == 0
    for stem in ["1_image", "23_image"]:
        labels = np.asarray(Image.open(out / f"{stem}.png"))
        assert labels.shape == (513, 513) and labels.max() <= 2
        assert Image.open(out / f"{stem}.png").mode == "P"
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        assert overlay.shape[0] == 513 and overlay.shape[1] > 513  # legend panel on the right
        logits = np.load(out / f"{stem}_logits.npy")
        assert logits.shape == (4, 513, 513) and logits.dtype == np.float32
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "naclip" and config["pipeline"]["crop"] == 96
    assert config["classes"] == [["sky"], ["person", "pedestrian"], ["dog"]]
    assert config["clip_format"] == "openai-jit"


@pytest.mark.parametrize(
    "method, extra",
    [("proxyclip", []), ("proxyclip", ["--gla", "--opt", "gla_rho=0.55"]), ("gclip+gla", []), ("gclip", [])],
)
def test_dino_and_global_methods_run_through_the_cli(weights, bpe_path, images, tmp_path, method, extra):
    out = tmp_path / "out"
    clip = weights["clip12"] if method.startswith("gclip") else weights["clip"]
    args = ["segment", str(images / "1_image.png"), "--labels", "sky, person", "--method", method, "--clip",
            str(clip), "--vfm", str(weights["dino"]), "--tokenizer", str(bpe_path), "--out", str(out),
            "--short-side", "112", "--crop", "112", "--stride", "56", "--no-progress", *extra]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method + ("+gla" if "--gla" in extra else "")
    options = {"gla_rho": 0.55} if "--gla" in extra else {}
    if options:
        assert config["options"]["gla"]["rho"] == 0.55
    # the written label map is the API's on the same files, image and settings (no class named background:
    # nothing falls below a threshold of 0, so every pixel has its best class)
    seg = ovss.load(config["method"], clip=str(clip), vfm=str(weights["dino"]), tokenizer=str(bpe_path),
                    short_side=112, crop=112, stride=56, **options)  # fmt: skip
    want = seg.predict(str(images / "1_image.png"), ["sky", "person"]).labels.numpy()  # (513, 513)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "1_image.png")), want)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--labels", "sky, sky"], "sky"),
        (["--labels", " , "], "empty"),
        (["--labels", "a, b", "--method", "nope"], "unknown method"),
        (["--labels", "a, b", "--opt", "sigma"], "KEY=VALUE"),
        (["--labels", "a, b", "--crop", "64", "--stride", "128"], "stride"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(weights, bpe_path, images, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = _segment(weights, bpe_path, out, str(images / "1_image.png"), *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and err.startswith("ovss: error:") and "Traceback" not in err
    assert not out.exists()  # nothing was segmented: the output folder is not even created


def test_corrupt_image_in_folder_is_reported_and_skipped(weights, bpe_path, images, tmp_path, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(images, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    code = _segment(weights, bpe_path, out, str(folder), "--labels", "a, b", "--crop", "96", "--stride", "64")
    err = capsys.readouterr().err
    assert code == 1 and "broken.jpg" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("broken")) == []
    assert (out / "1_image.png").exists() and (out / "23_image.png").exists()


def test_missing_weights_offline_names_the_fix(bpe_path, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OVSS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OVSS_OFFLINE", "1")
    code = main(["segment", str(images / "1_image.png"), "--labels", "a, b", "--out", str(tmp_path / "o"),
                 "--tokenizer", str(bpe_path)])
    err = capsys.readouterr().err
    assert code == 2 and "ViT-B-16.pt" in err and "--clip" in err and "OVSS_CACHE" in err
    assert not (tmp_path / "o").exists()


def test_methods_and_models_listings(capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    for name in ["clearclip", "naclip", "sclip", "proxyclip", "proxyclip+gla", "gclip", "maskclip"]:
        assert name in listing
    assert main(["models"]) == 0
    assert "ViT-B/16" in capsys.readouterr().out


def test_save_logits_in_fp16_is_the_fp32_file_rounded(weights, bpe_path, images, tmp_path):
    image = str(images / "1_image.png")
    flags = ["--labels", "sky, person|pedestrian", "--crop", "96", "--stride", "64", "--save-logits"]
    assert _segment(weights, bpe_path, tmp_path / "a", image, *flags) == 0
    assert _segment(weights, bpe_path, tmp_path / "b", image, *flags, "--logits-dtype", "fp16") == 0
    full = np.load(tmp_path / "a" / "1_image_logits.npy")
    half = np.load(tmp_path / "b" / "1_image_logits.npy")
    assert full.dtype == np.float32 and half.dtype == np.float16 and half.shape == full.shape == (3, 513, 513)
    assert np.array_equal(half, full.astype(np.float16))


@pytest.mark.parametrize("fast", ["1", "0"])
def test_the_command_in_its_own_process_exits_with_its_code(weights, bpe_path, images, tmp_path, fast):
    # `ovss segment` leaves with os._exit once its outputs are written (OVSS_FAST_EXIT=0: the normal exit):
    # the files must be complete, the summary line flushed and the exit code the command's own.
    import os
    import subprocess
    import sys

    env = {**os.environ, "OVSS_FAST_EXIT": fast}
    args = [sys.executable, "-m", "ovss", "segment", str(images), "--labels", "sky, person", "--clip",
            str(weights["clip"]), "--tokenizer", str(bpe_path), "--short-side", "96", "--out"]
    done = subprocess.run([*args, str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "segmented 2 of 2 image(s)" in done.stderr
    for stem in ("1_image", "23_image"):
        assert Image.open(tmp_path / "out" / f"{stem}.png").size == Image.open(images / f"{stem}.png").size
    assert json.loads((tmp_path / "out" / "config.json").read_text())["inputs"] == ["1_image", "23_image"]
    again = subprocess.run([*args, str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.startswith("ovss: error:") and "--overwrite" in again.stderr


# ------------------------------------------------------------------ one flag builder: segment, eval, demo, bench
COMMON = ["--clip", "clip.pt", "--vfm", "dino.pth", "--sam", "sam.pth", "--tokenizer", "bpe.txt.gz",
          "--short-side", "none", "--crop", "224", "--pamr-dilations", "4,8", "--opt", "sigma=3",
          "--set", "templates=imagenet7", "--opt", "stride=112"]  # fmt: skip
RESOLVED_PIPELINE = {"short_side": None, "crop": 224, "pamr_dilations": (4, 8), "templates": "imagenet7", "stride": 112}
WEIGHTS = {"clip": "clip.pt", "vfm": "dino.pth", "sam": "sam.pth", "tokenizer": "bpe.txt.gz"}


def _parse(*argv: str):
    from ovss.cli.main import build_parser

    return build_parser().parse_args(list(argv))


OWN = {  # each command's own flags
    "segment": ["segment", "--labels", "a, b", "--out", "o", "--method", "naclip"],
    "eval": ["eval", "--dataset", "folder", "--out", "o", "--method", "naclip"],
    "demo": ["demo", "--methods", "naclip,clearclip"],
    "bench": ["bench", "--methods", "naclip,clearclip"],
}


def _command_lines() -> dict[str, list[str]]:
    return {command: [*own, *COMMON] for command, own in OWN.items()}


def test_one_setting_resolves_alike_in_segment_eval_demo_and_bench():
    from ovss.cli.demo import pool_kwargs
    from ovss.cli.options import load_kwargs, options_of, pipeline_of, weights_of

    for command, argv in _command_lines().items():
        args = _parse(*argv)
        assert pipeline_of(args) == RESOLVED_PIPELINE, command
        assert options_of(args, "naclip", ["naclip", "clearclip"]) == {"sigma": 3.0}, command
        assert {key: weights_of(args)[key] for key in WEIGHTS} == WEIGHTS, command
    segment = load_kwargs(_parse(*_command_lines()["segment"]))
    assert segment == {**RESOLVED_PIPELINE, "sigma": 3.0, **WEIGHTS, "act": None, "download": True, "gla": False,
                       "device": "cpu", "dtype": "fp32"}  # fmt: skip
    assert load_kwargs(_parse(*_command_lines()["eval"])) == segment
    demo = pool_kwargs(_parse(*_command_lines()["demo"]))
    assert demo == {**RESOLVED_PIPELINE, **WEIGHTS, "act": None, "download": True, "device": "cpu", "dtype": "fp32"}


def test_a_pipeline_setting_has_one_value_whatever_its_spelling():
    from ovss.cli.options import pipeline_of
    from ovss.errors import OvssError

    later_wins = ["--set", "crop=3", "--opt", "crop=224"]
    spellings = [["--crop", "224"], ["--opt", "crop=224"], ["--set", "crop=224"], later_wins]
    for command, plain in OWN.items():
        for spelling in spellings:
            assert pipeline_of(_parse(*plain, *spelling)) == {"crop": 224}, (command, spelling)
        with pytest.raises(OvssError, match="crop is given twice, as --crop and as --opt crop"):
            pipeline_of(_parse(*plain, "--crop", "224", "--set", "crop=336"))


def test_several_methods_each_get_the_options_they_declare():
    from ovss.cli.options import methods_of, options_of
    from ovss.errors import OvssError

    args = _parse("bench", "--methods", "naclip", "--method", "proxyclip+gla", "--opt", "sigma=5", "--set", "gla_rho=1")
    methods = methods_of(args)
    assert methods == ["naclip", "proxyclip+gla"]
    assert options_of(args, "naclip", methods) == {"sigma": 5.0}
    assert options_of(args, "proxyclip+gla", methods) == {"gla_rho": 1.0}
    with pytest.raises(OvssError, match="has no option gla_rho"):
        options_of(args, "naclip")  # alone, naclip has no such option
    nobody = _parse("bench", "--methods", "clearclip,naclip", "--opt", "gla_rho=0.5")
    with pytest.raises(OvssError, match=r"gla_rho is not an option of clearclip, naclip.* GLA attached"):
        options_of(nobody, "clearclip", methods_of(nobody))


def test_bench_precisions_are_the_dtype_flag():
    from ovss.cli.options import dtypes_of

    assert dtypes_of(_parse("bench")) == ["fp32", "bf16"]
    assert dtypes_of(_parse("bench", "--precision", "bf16, fp16")) == ["bf16", "fp16"]
    assert dtypes_of(_parse("bench", "--dtype", "fp16,fp32,fp16")) == ["fp16", "fp32"]


def test_demo_passes_sam_and_its_options_to_loading():
    from ovss.cli.demo import model_pool

    class Loaded(Exception):
        """Raised by the recording loader: carries what the page would load a method with."""

    def record(method: str, **kwargs):
        raise Loaded(method, kwargs)

    args = _parse("demo", "--methods", "trident", *COMMON)
    pool = model_pool(args, loader=record)
    with pytest.raises(Loaded) as trident:
        pool.get("trident")
    method, kwargs = trident.value.args
    assert method == "trident" and kwargs["sam"] == "sam.pth" and kwargs["vfm"] == "dino.pth"
    assert {key: kwargs[key] for key in RESOLVED_PIPELINE} == RESOLVED_PIPELINE and "sigma" not in kwargs
    with pytest.raises(Loaded) as naclip:
        pool.get("naclip")
    assert naclip.value.args[1]["sigma"] == 3.0  # the option goes to the method that declares it


def test_demo_refuses_an_option_no_method_has(capsys):
    assert main(["demo", "--opt", "bogus=1", "--offline"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ovss: error: --opt bogus is not an option of any method, nor a pipeline setting")
    assert err.count("\n") == 1


def test_demo_fills_the_label_box_from_a_class_file(tmp_path):
    from ovss.cli.demo import initial_labels

    names = tmp_path / "classes.txt"
    names.write_text("\ufeffsky ; heaven\nperson|pedestrian\ncar, automobile\n", encoding="utf-8")
    text = initial_labels(_parse("demo", "--labels-file", str(names)))
    assert text == "sky|heaven, person|pedestrian, car|automobile"
    assert initial_labels(_parse("demo", "--labels", "sky, road")) == "sky, road"
    assert initial_labels(_parse("demo")) == ""
