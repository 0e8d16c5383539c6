"""Model files are read, not assumed: heads, input statistics and tokenizer come from the files beside the weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import ovss
from ovss.api import load_clip
from ovss.errors import OvssError
from ovss.models.clip import build_clip
from ovss.models.normalization import InputNorm
from ovss.pipeline.image import clip_normalize
from ovss.storage.hub import REGISTRY
from ovss.text.tokenizer import EOT_TOKEN, SOT_TOKEN, bytes_to_unicode
from tiny import save_open_clip, tiny_clip_state_dict

VOCAB = 514  # 2 x 256 byte symbols + <|startoftext|> + <|endoftext|>: the smallest CLIP-style vocabulary


def _write_hf_tokenizer(folder: Path) -> None:
    """A tiny Hugging Face CLIP tokenizer: byte symbols, no merges, the two special tokens last."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + [SOT_TOKEN, EOT_TOKEN]
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-head Hugging Face CLIP (width 128: width // 64 would say 2) saved by transformers itself."""
    text = {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 2}
    text |= {"vocab_size": VOCAB, "max_position_embeddings": 77, "bos_token_id": 512, "eos_token_id": 513}
    vision = {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 2}
    vision |= {"image_size": 64, "patch_size": 16}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms to 0 / 1: make every parameter matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("hf4")
    model.save_pretrained(folder)
    _write_hf_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return folder


def test_hf_heads_come_from_config_and_match_transformers(hf_folder: Path) -> None:
    ours, record = load_clip(hf_folder)
    assert ours.visual.cfg.heads == 4 and ours.text is not None and ours.text.cfg.heads == 4
    assert record["clip_heads"] == [4, 4]
    reference = transformers.CLIPModel.from_pretrained(hf_folder).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[0, :4] = torch.tensor([512, 70, 300, 513])
    tokens[1, :6] = torch.tensor([512, 5, 6, 7, 400, 513])
    with torch.no_grad():
        image_ref = reference.vision_model(pixel_values=pixels).pooler_output  # (2, 128) post-LN [CLS]
        image_ref = reference.visual_projection(image_ref)  # (2, 64)
        text_ref = reference.text_projection(reference.text_model(input_ids=tokens).pooler_output)  # (2, 64)
        image = ours.visual(pixels)[:, 0]  # (2, 64) [CLS] through ln_post and proj
        text = ours.encode_text(tokens)  # (2, 64)
    torch.testing.assert_close(image, image_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text, text_ref, atol=1e-5, rtol=1e-4)
    # the width // 64 guess (2 heads) gives a different model: the config is what makes this pass
    guessed = json.loads((hf_folder / "config.json").read_text())
    for tower in ("vision_config", "text_config"):
        guessed[tower]["num_attention_heads"] = 2
    wrong = hf_folder.parent / "hf2"
    wrong.mkdir(exist_ok=True)
    (wrong / "config.json").write_text(json.dumps(guessed))
    (wrong / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    with torch.no_grad():
        assert (load_clip(wrong)[0].visual(pixels)[:, 0] - image_ref).abs().max() > 1e-3


def test_hf_preprocessor_statistics_are_used(hf_folder: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("OVSS_BPE_PATH", raising=False)
    monkeypatch.setenv("OVSS_CACHE", str(tmp_path / "empty-cache"))  # clip-bpe is not cached ...
    monkeypatch.setenv("OVSS_OFFLINE", "1")  # ... and cannot be downloaded: the folder's own vocabulary is used
    seg = ovss.load("clearclip", clip=hf_folder, short_side=None, crop=0, stride=1)
    assert seg.tokenizer.vocab_size == VOCAB
    norm = seg.config["clip_input_norm"]
    assert norm["mean"] == [0.5] * 3 and norm["std"] == [0.5] * 3 and norm["rule"] == "model-x255"
    assert norm["source"] == str(hf_folder / "preprocessor_config.json")
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    seg.set_image(image)
    expected = (torch.tensor(image).permute(2, 0, 1).float() - 127.5) / 127.5  # (3, 64, 64)
    torch.testing.assert_close(seg._current().pixels, expected)
    labels = seg.predict(labels=["a", "b"]).labels  # the folder's tokenizer feeds the 514-token text tower
    assert labels.shape == (64, 64)


def test_openai_statistics_stay_mmseg_rounded(tiny_clip) -> None:
    image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mean, std, rule = tiny_clip.input_norm.pixel_statistics()
    assert (mean, std, rule) == ((122.771, 116.746, 104.094), (68.501, 66.632, 70.323), "mmseg-openai-0-255")
    by_hand = (torch.tensor(image).permute(2, 0, 1).float() - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
        :, None, None
    ]  # (3, H, W)
    torch.testing.assert_close(clip_normalize(image, mean=mean, std=std), by_hand, atol=1e-6, rtol=0)
    hf_openai = InputNorm((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "x")
    assert hf_openai.pixel_statistics()[2] == "mmseg-openai-0-255"


def test_registry_statistics_reach_the_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ViT-L-14/laion2b_s32b_b82k was trained with mean = std = 0.5, not OpenAI's statistics."""
    entry = REGISTRY["ViT-L-14/laion2b_s32b_b82k"]
    assert entry.mean == entry.std == (0.5, 0.5, 0.5) and entry.heads == (16, 12)
    sd = tiny_clip_state_dict(seed=5, vocab_size=300)
    monkeypatch.setenv("OVSS_CACHE", str(tmp_path))
    save_open_clip(sd, tmp_path / entry.filename, "bin")  # stands in for the cached download
    monkeypatch.setitem(REGISTRY, entry.name, entry.__class__(**{**entry.__dict__, "heads": (2, 2)}))
    model, record = load_clip(entry.name)
    assert model.input_norm.mean == (0.5, 0.5, 0.5) and record["clip_input_norm"]["rule"] == "model-x255"
    assert record["clip_input_norm"]["pixel_mean"] == [127.5] * 3
    assert record["clip_input_norm"]["source"] == f"registry entry '{entry.name}'"


def test_open_clip_config_beside_the_file(tmp_path: Path) -> None:
    """An OpenCLIP model config gives heads as width // head_width (ViT-H-14: 1280 / 80 = 16, not 20)."""
    sd = tiny_clip_state_dict(seed=6, width=192, vocab_size=300)
    path = save_open_clip(sd, tmp_path / "weights.bin", "bin")
    config = {
        "model_cfg": {"vision_cfg": {"width": 192, "head_width": 96}, "text_cfg": {"width": 128, "heads": 4}},
        "preprocess_cfg": {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.25, 0.3]},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    model, record = load_clip(path)
    assert record["clip_heads"] == [2, 4]  # width // 64 would say 3 and 2
    assert model.input_norm.std == (0.2, 0.25, 0.3) and record["clip_configs"] == [
        str(tmp_path / "open_clip_config.json")
    ]
    config["model_cfg"]["vision_cfg"]["width"] = 384
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(OvssError, match="gives the vision width as 384 but the weights have 192"):
        load_clip(path)


def test_vision_only_checkpoint_with_names_is_one_clear_error(bpe_path: Path) -> None:
    sd = {k: v for k, v in tiny_clip_state_dict(seed=8).items() if k.startswith("visual.")}
    seg = ovss.load("clearclip", clip=build_clip(sd), tokenizer=bpe_path, short_side=None, crop=0, stride=1)
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(OvssError, match=r"only vision weights \(no text tower\).*text_embeddings="):
        seg.predict(image, ["a", "b"])
    emb = torch.randn(2, 64)
    assert seg.predict(image, ["a", "b"], text_embeddings=emb).labels.shape == (32, 32)


def test_vfm_input_undoes_the_clip_statistics(tiny_clip, tiny_dino) -> None:
    """ProxyCLIP's DINO input is the same ImageNet-normalised window whatever the CLIP's statistics."""
    from ovss.methods.proxyclip import vfm_features
    from ovss.pipeline.image import IMAGENET_MEAN, IMAGENET_STD

    image = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    direct = (torch.tensor(image).permute(2, 0, 1).float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / (
        torch.tensor(IMAGENET_STD)[:, None, None]
    )
    half = build_clip(tiny_clip_state_dict(seed=0), input_norm=InputNorm((0.5,) * 3, (0.5,) * 3, "test")).visual
    seen: list[torch.Tensor] = []
    hook = tiny_dino.conv1.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        for clip in (tiny_clip.visual, half):
            mean, std, _ = clip.input_norm.pixel_statistics()
            vfm_features(tiny_dino, clip_normalize(image, mean=mean, std=std)[None], clip)
    finally:
        hook.remove()
    # The releases un-normalise with the unrounded 0-1 statistics while OpenAI inputs were normalised with
    # mmseg's rounded ones, so pixel / 255 is recovered only to ~1.6e-5 (spec §4.7 step 1); 0.5 is exact.
    assert len(seen) == 2
    for pixels, tol in zip(seen, (3e-5, 1e-6), strict=True):
        torch.testing.assert_close(pixels, direct[None], atol=tol, rtol=0)


def test_vision_only_checkpoint_in_the_cli_fails_once_before_any_image(
    bpe_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ovss.cli.main import main

    sd = {k: v for k, v in tiny_clip_state_dict(seed=8).items() if k.startswith("visual.")}
    weights = save_open_clip(sd, tmp_path / "vision-only.bin", "bin")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
    args = ["segment", str(images), "--labels", "a, b", "--clip", str(weights), "--tokenizer", str(bpe_path)]
    code = main([*args, "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "only vision weights (no text tower)" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
