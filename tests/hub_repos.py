"""Tiny random models in the real layouts of the Hub repositories ovss reads, served by :mod:`hub_server`.

Each builder returns the repository's files by name, written by transformers' own ``save_pretrained`` where
transformers has the class (CLIP, DINOv2 with registers, DINOv3, SAM) and by hand for the OpenCLIP repository
(``open_clip_config.json`` + ``open_clip_model.safetensors`` + ``open_clip_pytorch_model.bin``, OpenAI key
names). Files the loaders must not fetch (a second weights format, TF / Flax weights, the README) are served
too, so tests can check that they were left alone.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import torch
import transformers  # the independent reference (pyproject [test] extra); the library never imports it
from safetensors.torch import save

from hub_server import FakeHub, Repo, folder_files
from test_dinov3 import hf_dinov3, trained_like
from test_sam import _tiny_hf_sam
from tiny import tiny_clip_state_dict

CLIP_HF = "openai/clip-vit-base-patch16"
OPEN_CLIP = "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"
DINOV2 = "facebook/dinov2-with-registers-base"
DINOV3 = "facebook/dinov3-vitb16-pretrain-lvd1689m"
SAM = "facebook/sam-vit-base"
PRIVATE = "someone/private-clip"
NO_WEIGHTS = "someone/config-only"
SHARDED = "someone/sharded"
GOOD_TOKEN, PRIVATE_TOKEN = "hf_good_token", "hf_private_token"
VOCAB = 514  # 2 x 256 byte symbols + <|startoftext|> + <|endoftext|>: the smallest CLIP-style vocabulary


def _saved(model: torch.nn.Module) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return folder_files(Path(folder))


def _randomise(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Add noise to every parameter (transformers initialises biases and LayerNorms to 0 / 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def hf_clip(seed: int = 0) -> torch.nn.Module:
    """transformers' CLIPModel: 2 heads of 64, patch 16, 64 px, byte-level vocabulary."""
    text = {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2, "num_hidden_layers": 2}
    text |= {"vocab_size": VOCAB, "max_position_embeddings": 77, "bos_token_id": 512, "eos_token_id": 513}
    vision = {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2, "num_hidden_layers": 2}
    vision |= {"image_size": 64, "patch_size": 16}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)
    torch.manual_seed(seed)
    return _randomise(transformers.CLIPModel(config), seed)


def _clip_tokenizer() -> dict[str, bytes]:
    """A Hugging Face CLIP tokenizer: byte symbols, no merges, the two special tokens last."""
    from ovss.text.tokenizer import EOT_TOKEN, SOT_TOKEN, bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + [SOT_TOKEN, EOT_TOKEN]
    return {
        "vocab.json": json.dumps({s: i for i, s in enumerate(vocab)}).encode(),
        "merges.txt": b"#version: 0.2\n",
    }


def clip_repo(model: torch.nn.Module) -> dict[str, bytes]:
    """openai/clip-vit-base-patch16's layout: config, both weights formats, TF / Flax weights, tokenizer."""
    files = _saved(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    files["pytorch_model.bin"] = buffer.getvalue()
    files["tf_model.h5"] = b"not read by ovss"
    files["flax_model.msgpack"] = b"not read by ovss"
    files["README.md"] = b"---\nlicense: mit\n---\n"
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    files["preprocessor_config.json"] = json.dumps({"image_mean": mean, "image_std": std}).encode()
    return files | _clip_tokenizer()


def open_clip_state_dict() -> dict[str, torch.Tensor]:
    """OpenAI-layout CLIP weights (what open_clip saves): width 128 = 2 heads of 64."""
    return tiny_clip_state_dict(seed=3)


def open_clip_repo(sd: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """laion/CLIP-ViT-B-16-laion2B-s34B-b88K's layout: open_clip_config.json and the two weights files."""
    config = {
        "model_cfg": {
            "embed_dim": 64,
            "vision_cfg": {"image_size": 224, "layers": 3, "width": 128, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }
    buffer = io.BytesIO()
    torch.save(dict(sd), buffer)
    return {
        "open_clip_config.json": json.dumps(config).encode(),
        "open_clip_model.safetensors": save({k: v.contiguous() for k, v in sd.items()}),
        "open_clip_pytorch_model.bin": buffer.getvalue(),
        "README.md": b"---\nlicense: mit\nlibrary_name: open_clip\n---\n",
    }


def hf_dinov2_registers(seed: int = 0) -> torch.nn.Module:
    """transformers' Dinov2WithRegistersModel: width 64, 2 heads, patch 14, 56 px (a 4 x 4 grid), 4 registers."""
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=4,
        patch_size=14,
        image_size=56,
        num_register_tokens=4,
    )
    return trained_like(transformers.Dinov2WithRegistersModel(config), seed).eval()


def build_hub(
    clip: torch.nn.Module, dinov2: torch.nn.Module, dinov3: dict[str, torch.nn.Module], sam: torch.nn.Module
) -> FakeHub:
    """The server with every repository; DINOv3 is gated (``GOOD_TOKEN``) with an old commit tagged v1.0."""
    hub = FakeHub()
    clip_files = clip_repo(clip)
    hub.add(CLIP_HF, Repo()).commit(clip_files)
    hub.add(OPEN_CLIP, Repo()).commit(open_clip_repo(open_clip_state_dict()))
    hub.add(DINOV2, Repo()).commit(_saved(dinov2))
    gated = Repo(gated=True, tokens=frozenset({GOOD_TOKEN}))
    gated.commit(_saved(dinov3["old"]) | {"README.md": b"old"}, tag="v1.0")
    gated.commit(_saved(dinov3["new"]) | {"README.md": b"new"})
    hub.add(DINOV3, gated)
    hub.add(SAM, Repo()).commit(_saved(sam))
    hub.add(PRIVATE, Repo(private=True, tokens=frozenset({PRIVATE_TOKEN}))).commit(clip_files)
    hub.add(NO_WEIGHTS, Repo()).commit({"config.json": b"{}", "README.md": b"no weights"})
    sharded = {"model-00001-of-00002.safetensors": b"a", "model.safetensors.index.json": b"{}"}
    hub.add(SHARDED, Repo()).commit(sharded)
    return hub.start()


def models() -> dict[str, object]:
    """The reference transformers models behind the served repositories."""
    return {
        "clip": hf_clip(),
        "dinov2": hf_dinov2_registers(),
        "dinov3": {"old": hf_dinov3(seed=1), "new": hf_dinov3(seed=0)},
        "sam": _tiny_hf_sam(),
    }
