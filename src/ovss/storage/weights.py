"""The named weights and assets ovss can download: a plain-dict registry (data only, no I/O).

:mod:`ovss.storage.hub` resolves these names to cached files (download, SHA-256, offline messages).
"""

from __future__ import annotations

from dataclasses import dataclass

from ovss.models.normalization import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    OPENAI_MEAN,
    OPENAI_STD,
)

KINDS = ("clip", "vfm", "tokenizer", "sam")


@dataclass(frozen=True)
class WeightsEntry:
    """One downloadable file: model weights or a tokenizer vocabulary."""

    name: str  # registry name, e.g. "ViT-B/16"
    url: str  # where the file is downloaded from
    sha256: str | None  # expected SHA-256 (hex); None = unknown, the first download's digest is recorded
    filename: str  # file name inside cache_dir() (unique across the registry)
    format: str  # file format: "openai-jit", "open_clip", "dino", "dinov2", "dinov3", "bpe" or "sam"
    act: str | None  # MLP activation the weights were trained with: "quick_gelu", "gelu"; None for assets
    kind: str  # "clip", "vfm", "tokenizer" or "sam"
    description: str  # one line for listings
    mean: tuple[float, float, float] | None = None  # RGB mean the model expects (0..1 scale); None for assets
    std: tuple[float, float, float] | None = None  # RGB std the model expects; None for assets
    heads: tuple[int, int] | None = None  # attention heads (image tower, text tower; text 0 for a VFM;
    # SAM: image encoder, mask decoder)


# Attention heads (image, text) of the released architectures (open_clip's model configs).
_B, _L = (12, 8), (16, 12)  # ViT-B/16, ViT-B/32: widths 768 / 512; ViT-L/14: widths 1024 / 768


def _openai(name: str, url: str, heads: tuple[int, int], description: str) -> WeightsEntry:
    """An OpenAI CLIP release: the SHA-256 is the hex path component of its URL (as openai/CLIP checks)."""
    filename = url.rsplit("/", 1)[1]
    sha = url.rsplit("/", 2)[1]
    return WeightsEntry(
        name, url, sha, filename, "openai-jit", "quick_gelu", "clip", description, OPENAI_MEAN, OPENAI_STD, heads
    )


def _open_clip(
    name: str, url: str, act: str, heads: tuple[int, int], description: str, inception: bool = False
) -> WeightsEntry:
    """An open_clip / MetaCLIP tag ``ARCH/tag``; its cache name is the name with '/' replaced by '-'."""
    filename = name.replace("/", "-") + "." + url.rsplit(".", 1)[1]
    mean, std = (INCEPTION_MEAN, INCEPTION_STD) if inception else (OPENAI_MEAN, OPENAI_STD)
    return WeightsEntry(name, url, None, filename, "open_clip", act, "clip", description, mean, std, heads)


def _vfm(name: str, url: str, fmt: str, heads: int, description: str) -> WeightsEntry:
    """A self-supervised ViT (DINO / DINOv2 / DINOv3) from dl.fbaipublicfiles.com; all use nn.GELU."""
    filename = url.rsplit("/", 1)[1]
    return WeightsEntry(
        name, url, None, filename, fmt, "gelu", "vfm", description, IMAGENET_MEAN, IMAGENET_STD, (heads, 0)
    )


_OPENAI_URL = "https://openaipublic.azureedge.net/clip/models"
_HF = "https://huggingface.co"
_DINO = "https://dl.fbaipublicfiles.com/dino"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"
_DINOV3 = "https://dl.fbaipublicfiles.com/dinov3"
_ENTRIES = (
    _openai(
        "ViT-B/16",
        f"{_OPENAI_URL}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
        _B,
        "OpenAI CLIP ViT-B/16, 224 px (default)",
    ),
    _openai(
        "ViT-B/32",
        f"{_OPENAI_URL}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
        _B,
        "OpenAI CLIP ViT-B/32, 224 px",
    ),
    _openai(
        "ViT-L/14",
        f"{_OPENAI_URL}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
        _L,
        "OpenAI CLIP ViT-L/14, 224 px",
    ),
    _openai(
        "ViT-L/14@336px",
        f"{_OPENAI_URL}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
        _L,
        "OpenAI CLIP ViT-L/14, 336 px",
    ),
    _open_clip(
        "ViT-B-16/laion2b_s34b_b88k",
        f"{_HF}/laion/CLIP-ViT-B-16-laion2B-s34B-b88K/resolve/main/open_clip_pytorch_model.bin",
        "gelu",
        _B,
        "OpenCLIP ViT-B/16 trained on LAION-2B",
    ),
    _open_clip(
        "ViT-B-32/laion2b_s34b_b79k",
        f"{_HF}/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/open_clip_pytorch_model.bin",
        "gelu",
        _B,
        "OpenCLIP ViT-B/32 trained on LAION-2B",
    ),
    _open_clip(
        "ViT-L-14/laion2b_s32b_b82k",
        f"{_HF}/laion/CLIP-ViT-L-14-laion2B-s32B-b82K/resolve/main/open_clip_pytorch_model.bin",
        "gelu",
        _L,
        "OpenCLIP ViT-L/14 trained on LAION-2B (inputs normalised with mean = std = 0.5)",
        inception=True,
    ),
    _open_clip(
        "ViT-B-16-quickgelu/metaclip_400m",
        "https://dl.fbaipublicfiles.com/MMPT/metaclip/b16_400m.pt",
        "quick_gelu",
        _B,
        "MetaCLIP ViT-B/16 trained on 400M curated pairs",
    ),
    _open_clip(
        "ViT-L-14-quickgelu/metaclip_400m",
        "https://dl.fbaipublicfiles.com/MMPT/metaclip/l14_400m.pt",
        "quick_gelu",
        _L,
        "MetaCLIP ViT-L/14 trained on 400M curated pairs",
    ),
    WeightsEntry(
        "clip-bpe",
        "https://raw.githubusercontent.com/openai/CLIP/main/clip/bpe_simple_vocab_16e6.txt.gz",
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
        "bpe_simple_vocab_16e6.txt.gz",
        "bpe",
        None,
        "tokenizer",
        "CLIP byte-pair-encoding merges (openai/CLIP)",
    ),
    _vfm(
        "dino-vitb8",
        f"{_DINO}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
        "dino",
        12,
        "DINO ViT-B/8 (default VFM)",
    ),
    _vfm("dino-vitb16", f"{_DINO}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", "dino", 12, "DINO ViT-B/16"),
    _vfm("dino-vits8", f"{_DINO}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth", "dino", 6, "DINO ViT-S/8"),
    _vfm(
        "dino-vits16",
        f"{_DINO}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
        "dino",
        6,
        "DINO ViT-S/16",
    ),
    _vfm(
        "dinov2-vitb14-reg",
        f"{_DINOV2}/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
        "dinov2",
        12,
        "DINOv2 ViT-B/14 with 4 registers",
    ),
    _vfm(
        "dinov2-vitl14-reg",
        f"{_DINOV2}/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth",
        "dinov2",
        16,
        "DINOv2 ViT-L/14 with 4 registers",
    ),
    _vfm(  # gated by the DINOv3 licence: where the link is refused, fetch it from Meta and pass --vfm PATH
        "dinov3_vitb16",
        f"{_DINOV3}/dinov3_vitb16/dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
        "dinov3",
        12,
        "DINOv3 ViT-B/16, LVD-1689M (RoPE, 4 registers; licence-gated download)",
    ),
)
_SAM = (
    WeightsEntry(
        "sam-vitb",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        None,  # Meta publishes no SHA-256 (01ec64 is an MD5 prefix): the first download's digest is recorded
        "sam_vit_b_01ec64.pth",
        "sam",
        "gelu",
        "sam",
        "Segment Anything ViT-B (image encoder, prompt encoder, mask decoder; Trident)",
        IMAGENET_MEAN,  # SAM normalises with 123.675, 116.28, 103.53 / 58.395, 57.12, 57.375 on 0-255
        IMAGENET_STD,
        (12, 8),
    ),
)
REGISTRY: dict[str, WeightsEntry] = {e.name: e for e in (*_ENTRIES, *_SAM)}
DEFAULT_CLIP = "ViT-B/16"
DEFAULT_VFM = "dino-vitb8"

# The same models on the Hugging Face Hub (transformers / OpenCLIP layouts), for `ovss models` and the docs.
# A registry name keeps downloading the original release file above (its published SHA-256, and results
# bit-identical to earlier runs); the Hub id fetches the Hub's copy into the Hugging Face cache instead.
HUB_IDS: dict[str, str] = {
    "ViT-B/16": "hf-hub:openai/clip-vit-base-patch16",
    "ViT-B/32": "hf-hub:openai/clip-vit-base-patch32",
    "ViT-L/14": "hf-hub:openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "hf-hub:openai/clip-vit-large-patch14-336",
    "ViT-B-16/laion2b_s34b_b88k": "hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
    "ViT-B-32/laion2b_s34b_b79k": "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
    "ViT-L-14/laion2b_s32b_b82k": "hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
    "dino-vitb8": "hf-hub:facebook/dino-vitb8",
    "dino-vitb16": "hf-hub:facebook/dino-vitb16",
    "dino-vits8": "hf-hub:facebook/dino-vits8",
    "dino-vits16": "hf-hub:facebook/dino-vits16",
    "dinov2-vitb14-reg": "hf-hub:facebook/dinov2-with-registers-base",
    "dinov2-vitl14-reg": "hf-hub:facebook/dinov2-with-registers-large",
    "dinov3_vitb16": "hf-hub:facebook/dinov3-vitb16-pretrain-lvd1689m",
    "sam-vitb": "hf-hub:facebook/sam-vit-base",
}
