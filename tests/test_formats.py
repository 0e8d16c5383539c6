"""Checkpoint formats: every writer in tests/tiny.py round-trips to the original OpenAI-layout tensors."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from ovss.api import load_clip
from ovss.errors import OvssError
from ovss.models.formats import load_clip_state_dict, require_text_tower
from tiny import (
    openai_to_hf,
    save_hf,
    save_open_clip,
    save_openai_jit,
    save_openai_plain,
    tiny_clip_state_dict,
)

VOCAB = 300  # small vocabulary keeps files tiny; the layout does not depend on it

Writer = Callable[[dict[str, Tensor], Path], Path]
WRITERS: dict[str, tuple[Writer, str, str | None]] = {
    "openai-jit": (lambda sd, d: save_openai_jit(sd, d / "ViT-B-16.pt"), "openai-jit", "quick_gelu"),
    "openai-plain": (lambda sd, d: save_openai_plain(sd, d / "plain.pt"), "openai", "quick_gelu"),
    "open_clip-bin": (
        lambda sd, d: save_open_clip(sd, d / "open_clip_pytorch_model.bin", "bin"),
        "open_clip",
        None,
    ),
    "open_clip-safetensors": (
        lambda sd, d: save_open_clip(sd, d / "open_clip_model.safetensors", "safetensors"),
        "open_clip",
        None,
    ),
    "open_clip-train": (lambda sd, d: save_open_clip(sd, d / "epoch_1.pt", "train"), "open_clip", None),
    "hf-safetensors": (lambda sd, d: save_hf(sd, d / "hf", "safetensors"), "hf", "quick_gelu"),
    "hf-bin": (lambda sd, d: save_hf(sd, d / "hf", "bin"), "hf", "quick_gelu"),
    "hf-folder": (lambda sd, d: save_hf(sd, d / "hf", "safetensors").parent, "hf", "quick_gelu"),
}


@pytest.fixture(scope="module")
def sd() -> dict[str, Tensor]:
    return tiny_clip_state_dict(seed=3, vocab_size=VOCAB)


def assert_same(loaded: dict[str, Tensor], original: dict[str, Tensor]) -> None:
    assert sorted(loaded) == sorted(original)
    for key, value in original.items():
        assert loaded[key].dtype == torch.float32, key
        assert loaded[key].is_contiguous(), key
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_round_trip_every_format(writer: str, sd: dict[str, Tensor], tmp_path: Path) -> None:
    write, fmt, act = WRITERS[writer]
    path = write(sd, tmp_path)
    loaded, info = load_clip_state_dict(path)
    assert_same(loaded, sd)
    assert (info.format, info.act, info.source, info.has_text) == (fmt, act, str(path), True)
    hf = fmt == "hf"  # only Hugging Face folders carry a config.json that declares the heads
    assert (info.vision_heads, info.text_heads) == ((2, 2) if hf else (None, None))
    folder = path if path.is_dir() else path.parent
    assert info.configs == ((str(folder / "config.json"),) if hf else ())
    assert info.input_norm is None


def test_tiny_state_dict_is_deterministic_and_realistic() -> None:
    a = tiny_clip_state_dict(seed=0)
    b = tiny_clip_state_dict(seed=0)
    c = tiny_clip_state_dict(seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.proj"], c["visual.proj"])
    # default shapes: D = 128, 3 blocks, p = 16, G = 14, E = 64, W = 128, 2 text blocks, V = 49408
    assert a["visual.conv1.weight"].shape == (128, 3, 16, 16)
    assert a["visual.positional_embedding"].shape == (197, 128)
    assert a["visual.transformer.resblocks.2.attn.in_proj_weight"].shape == (384, 128)
    assert "visual.transformer.resblocks.3.ln_1.weight" not in a
    assert a["token_embedding.weight"].shape == (49408, 128)
    assert a["positional_embedding"].shape == (77, 128)
    assert "transformer.resblocks.1.mlp.c_proj.weight" in a and "transformer.resblocks.2.ln_1.bias" not in a
    assert a["text_projection"].shape == (128, 64) and a["visual.proj"].shape == (128, 64)
    assert a["logit_scale"].shape == () and a["logit_scale"].item() == pytest.approx(math.log(100.0))
    assert all(v.dtype == torch.float32 for v in a.values())
    # LayerNorms near identity but not equal to it; biases non-zero
    ln = a["visual.ln_post.weight"]
    assert (ln - 1).abs().max() < 0.5 and not torch.equal(ln, torch.ones_like(ln))
    assert a["visual.transformer.resblocks.0.attn.in_proj_bias"].abs().sum() > 0
    # attention weights scaled like openai/CLIP: std ≈ width ** -0.5
    std = a["visual.transformer.resblocks.0.attn.in_proj_weight"].std().item()
    assert std == pytest.approx(128**-0.5, rel=0.1)


def test_jit_archive_is_real_torchscript_with_openai_buffers(sd: dict[str, Tensor], tmp_path: Path) -> None:
    path = save_openai_jit(sd, tmp_path / "m.pt")
    with pytest.warns(DeprecationWarning):
        module = torch.jit.load(str(path), map_location="cpu")
    assert isinstance(module, torch.jit.ScriptModule)
    state = module.state_dict()
    assert set(state) == set(sd) | {"input_resolution", "context_length", "vocab_size"}
    assert state["input_resolution"].item() == 224  # p * G = 16 * 14
    assert state["context_length"].item() == 77 and state["vocab_size"].item() == VOCAB


def test_fp16_jit_archive_loads_as_fp32(sd: dict[str, Tensor], tmp_path: Path) -> None:
    half = {k: v.half() for k, v in sd.items()}  # OpenAI ships fp16 archives
    loaded, info = load_clip_state_dict(save_openai_jit(half, tmp_path / "half.pt"))
    assert_same(loaded, {k: v.float() for k, v in half.items()})
    assert info.format == "openai-jit"


def test_hf_files_use_hugging_face_names(sd: dict[str, Tensor], tmp_path: Path) -> None:
    path = save_hf(sd, tmp_path / "hf", "safetensors", act="gelu")
    hf = load_file(str(path))
    block = "vision_model.encoder.layers.1.self_attn."
    in_proj = sd["visual.transformer.resblocks.1.attn.in_proj_weight"]  # (3D, D), rows ordered q, k, v
    assert torch.equal(hf[block + "q_proj.weight"], in_proj[:128])
    assert torch.equal(hf[block + "v_proj.weight"], in_proj[256:])
    assert torch.equal(hf["visual_projection.weight"], sd["visual.proj"].t())
    assert torch.equal(hf["text_projection.weight"], sd["text_projection"].t())
    assert torch.equal(hf["vision_model.pre_layrnorm.weight"], sd["visual.ln_pre.weight"])
    assert hf["text_model.embeddings.position_ids"].tolist() == [list(range(77))]
    assert hf["vision_model.embeddings.position_ids"].shape == (1, 197)
    config = json.loads((path.parent / "config.json").read_text())
    assert (
        config["vision_config"]["num_attention_heads"] == 2 and config["text_config"]["vocab_size"] == VOCAB
    )
    assert (
        config["vision_config"]["image_size"] == 224 and config["vision_config"]["intermediate_size"] == 512
    )
    loaded, info = load_clip_state_dict(path.parent)
    assert_same(loaded, sd)
    assert (info.format, info.act) == ("hf", "gelu")


def test_hf_file_without_config_has_unknown_act(sd: dict[str, Tensor], tmp_path: Path) -> None:
    path = save_hf(sd, tmp_path / "hf", "bin")
    (path.parent / "config.json").unlink()
    loaded, info = load_clip_state_dict(path)
    assert_same(loaded, sd)
    assert (info.format, info.act) == ("hf", None)
    (path.parent / "config.json").write_text('{"model_type": "bert", "hidden_act": "gelu"}')  # not CLIP's
    assert load_clip_state_dict(path)[1].act is None


def test_hf_config_without_hidden_act_means_quick_gelu(sd: dict[str, Tensor], tmp_path: Path) -> None:
    folder = save_hf(sd, tmp_path / "hf", "safetensors").parent
    config = json.loads((folder / "config.json").read_text())
    del config["vision_config"]["hidden_act"], config["text_config"]["hidden_act"]
    (folder / "config.json").write_text(json.dumps(config))
    assert load_clip_state_dict(folder)[1].act == "quick_gelu"  # transformers' CLIP default


def test_hf_config_with_unsupported_act_is_rejected(sd: dict[str, Tensor], tmp_path: Path) -> None:
    folder = save_hf(sd, tmp_path / "hf", "safetensors", act="gelu_new").parent
    with pytest.raises(OvssError, match="hidden_act is 'gelu_new'"):
        load_clip_state_dict(folder)


def test_wrappers_and_prefixes_are_unwrapped(sd: dict[str, Tensor], tmp_path: Path) -> None:
    torch.save({"model": {"_orig_mod." + k: v for k, v in sd.items()}, "step": 3}, tmp_path / "a.pt")
    loaded, info = load_clip_state_dict(tmp_path / "a.pt")
    assert_same(loaded, sd)
    assert info.format == "open_clip" and info.act is None
    # open_clip's CustomTextCLIP keeps the text tower under "text."
    custom = {("text." + k if not k.startswith(("visual.", "logit_scale")) else k): v for k, v in sd.items()}
    torch.save(custom, tmp_path / "custom.bin")
    assert_same(load_clip_state_dict(tmp_path / "custom.bin")[0], sd)


def test_non_weight_entries_are_dropped(sd: dict[str, Tensor], tmp_path: Path) -> None:
    extra = {
        **sd,
        "attn_mask": torch.full((77, 77), float("-inf")).triu(1),
        "transformer.resblocks.0.attn_mask": torch.zeros(77, 77),
        "logit_bias": torch.tensor(-10.0),
    }
    torch.save(extra, tmp_path / "x.bin")
    assert_same(load_clip_state_dict(tmp_path / "x.bin")[0], sd)


def test_open_clip_logit_scale_of_shape_one_becomes_scalar(sd: dict[str, Tensor], tmp_path: Path) -> None:
    torch.save({**sd, "logit_scale": sd["logit_scale"].reshape(1)}, tmp_path / "x.bin")
    loaded = load_clip_state_dict(tmp_path / "x.bin")[0]
    assert loaded["logit_scale"].shape == () and torch.equal(loaded["logit_scale"], sd["logit_scale"])


def test_vision_only_checkpoint(sd: dict[str, Tensor], tmp_path: Path) -> None:
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    for path in (save_open_clip(visual, tmp_path / "v.bin", "bin"), save_hf(visual, tmp_path / "hf", "bin")):
        loaded, info = load_clip_state_dict(path)
        assert_same(loaded, visual)
        assert not info.has_text
        with pytest.raises(OvssError, match=r"only vision weights \(no text tower\).*--clip PATH"):
            require_text_tower(info)
    require_text_tower(load_clip_state_dict(save_open_clip(sd, tmp_path / "full.bin", "bin"))[1])


def test_incomplete_text_tower_is_named(sd: dict[str, Tensor], tmp_path: Path) -> None:
    broken = {k: v for k, v in sd.items() if k != "ln_final.weight"}
    torch.save(broken, tmp_path / "x.bin")
    with pytest.raises(OvssError, match=r"x\.bin: the text tower is incomplete: ln_final\.weight"):
        load_clip_state_dict(tmp_path / "x.bin")


def _broken(sd: dict[str, Tensor], key: str, value: Tensor | None) -> dict[str, Tensor]:
    out = {k: v for k, v in sd.items() if k != key}
    if value is not None:
        out[key] = value
    return out


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("visual.ln_post.weight", None, r"missing: visual\.ln_post\.weight"),
        (
            "visual.transformer.resblocks.1.attn.in_proj_weight",
            torch.zeros(256, 128),
            r"'visual\.transformer\.resblocks\.1\.attn\.in_proj_weight' has shape \(256, 128\), "
            r"expected \(384, 128\)",
        ),
        (
            "visual.positional_embedding",
            torch.zeros(190, 128),
            r"'visual\.positional_embedding' has 190 rows, expected 1 \+ G\*G",
        ),
        (
            "text_projection",
            torch.zeros(128, 32),
            r"'text_projection' has shape \(128, 32\), expected \(128, 64\)",
        ),
        (
            "visual.conv1.weight",
            torch.zeros(128, 3, 16),
            r"'visual\.conv1\.weight' has shape \(128, 3, 16\), expected 4 dimensions",
        ),
        ("visual.extra_head.weight", torch.zeros(3), r"unexpected keys ovss cannot use: visual\.extra_head"),
        ("logit_scale", torch.zeros(2), r"'logit_scale' has shape \(2,\), expected a scalar"),
    ],
)
def test_wrong_keys_and_shapes_are_reported(
    key: str, value: Tensor | None, message: str, sd: dict[str, Tensor], tmp_path: Path
) -> None:
    path = save_open_clip(_broken(sd, key, value), tmp_path / "bad.safetensors", "safetensors")
    with pytest.raises(OvssError, match=f"CLIP checkpoint {re.escape(str(path))}: {message}"):
        load_clip_state_dict(path)


def test_width_not_multiple_of_64_is_rejected(sd: dict[str, Tensor], tmp_path: Path) -> None:
    # shrink the vision tower consistently to D = 96: D -> 96, 3D -> 288, 4D -> 384
    sizes = {128: 96, 384: 288, 512: 384}
    narrow = {}
    for key, value in sd.items():
        if key.startswith("visual."):
            for dim, size in enumerate(value.shape):
                value = value.narrow(dim, 0, sizes.get(size, size))
        narrow[key] = value
    torch.save(narrow, tmp_path / "x.bin")
    _, info = load_clip_state_dict(tmp_path / "x.bin")  # the tensors are fine; the heads are unknown
    assert info.vision_heads is None
    message = r"x.bin: the vision tower has width 96, not a multiple of 64, and nothing says how many attention"
    with pytest.raises(OvssError, match=message):
        load_clip(tmp_path / "x.bin")
    config = {"vision_cfg": {"width": 96, "head_width": 32}, "text_cfg": {"width": 128, "heads": 2}}
    (tmp_path / "x.json").write_text(json.dumps(config))  # an OpenCLIP model config beside it says
    model, record = load_clip(tmp_path / "x.bin")
    assert model.visual.transformer.resblocks[0].attn.heads == 3
    assert record["clip_configs"] == [str(tmp_path / "x.json")]


def test_resnet_clip_is_rejected(tmp_path: Path) -> None:
    resnet = {
        "visual.conv1.weight": torch.zeros(32, 3, 3, 3),
        "visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
        "visual.attnpool.positional_embedding": torch.zeros(50, 2048),
        "logit_scale": torch.tensor(4.6),
    }
    torch.save(resnet, tmp_path / "RN50.pt")
    with pytest.raises(OvssError, match=r"RN50\.pt: it is a ResNet CLIP.*ViT CLIP only"):
        load_clip_state_dict(tmp_path / "RN50.pt")


def test_unreadable_files(sd: dict[str, Tensor], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04not a checkpoint" * 10)
    with pytest.raises(
        OvssError, match=r"garbage\.pt could not be read \(UnpicklingError: not a valid pickle\)"
    ):
        load_clip_state_dict(garbage)
    whole = save_open_clip(sd, tmp_path / "whole.bin", "bin").read_bytes()
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(OvssError, match=r"truncated\.bin could not be read.*download it again"):
        load_clip_state_dict(truncated)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(OvssError, match=r"tensor\.pt holds a Tensor, not a state dict"):
        load_clip_state_dict(tmp_path / "tensor.pt")
    torch.save({"text": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(OvssError, match=r"no vision tower"):
        load_clip_state_dict(tmp_path / "other.pt")


def test_pickled_objects_are_refused(sd: dict[str, Tensor], tmp_path: Path) -> None:
    torch.save({"state_dict": sd, "args": Path("x")}, tmp_path / "objects.pt")
    with pytest.raises(
        OvssError, match=r"objects\.pt stores Python objects besides tensors \(pathlib\.\w*Path\)"
    ):
        load_clip_state_dict(tmp_path / "objects.pt")


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(OvssError, match=r"nope\.pt does not exist"):
        load_clip_state_dict(tmp_path / "nope.pt")
    with pytest.raises(OvssError, match=r"holds none of model\.safetensors, pytorch_model\.bin"):
        load_clip_state_dict(tmp_path)


def test_hf_with_missing_q_proj_is_reported(sd: dict[str, Tensor], tmp_path: Path) -> None:
    hf = openai_to_hf(sd)
    del hf["vision_model.encoder.layers.0.self_attn.k_proj.bias"]
    torch.save(hf, tmp_path / "pytorch_model.bin")
    with pytest.raises(OvssError, match=r"missing: visual\.transformer\.resblocks\.0\.attn\.in_proj_bias"):
        load_clip_state_dict(tmp_path / "pytorch_model.bin")
