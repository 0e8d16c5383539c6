"""CLIP = the ViT image tower + the causal text transformer, built from an OpenAI-layout state dict."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from ovss.errors import OvssError
from ovss.models.layers import LayerNorm
from ovss.models.normalization import InputNorm
from ovss.models.vit import Transformer, VisionTransformer
from ovss.models.vit_build import build_vit, load_frozen, resolve_heads
from ovss.tuning import DEFAULT_TUNING


@dataclass(frozen=True)
class TextConfig:
    """Architecture of the text tower; read off the weights by :func:`build_clip`."""

    vocab_size: int  # token vocabulary V (49408 for the OpenAI BPE)
    context_length: int  # tokens per text (77)
    width: int  # token width W (512 for ViT-B CLIP)
    layers: int  # number of blocks (12)
    heads: int  # attention heads (from the checkpoint's config or registry entry; else width // 64)
    output_dim: int  # joint embedding size E (512 for ViT-B/16)
    act: str = "quick_gelu"  # MLP activation


class TextTransformer(nn.Module):
    """CLIP's text tower: token + position embeddings, causal blocks, ln_final, projection at [EOT]."""

    attn_mask: torch.Tensor  # (context_length, context_length) causal mask buffer: -inf above the diagonal

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Uninitialised like every ovss layer: the checkpoint's values are loaded (random init costs 0.1 s).
        empty = torch.empty(cfg.vocab_size, cfg.width)  # (V, W) uninitialised: nn.Embedding skips its init
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, _weight=empty)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.act)
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.zeros(cfg.width, cfg.output_dim))
        mask = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor, *, block_tokens: int = DEFAULT_TUNING.block_tokens) -> torch.Tensor:
        """Encode token ids.

        The tower is causal and reads its output at [EOT], so padding after the last [EOT] of the batch
        cannot change the result: ``tokens`` may be cut to any length T from the batch's longest text
        (its [EOT] included) up to ``context_length``; the position table and the causal mask are cut to
        the same T (exact up to fp32 round-off, see ``ovss.text.embeddings.text_embeddings``).

        Args:
            tokens: (B, T) int64 ids, [SOT] ... [EOT] then zero padding, 1 <= T <= context_length.
            block_tokens: tokens per pass through the blocks (:attr:`ovss.tuning.Tuning.block_tokens`).

        Returns:
            (B, E) features at the [EOT] token (the highest id in each row), after ln_final and the
            projection; not normalised.

        Raises:
            ValueError: more than ``context_length`` positions.
        """
        T = tokens.shape[1]
        if not 1 <= T <= self.cfg.context_length:
            raise ValueError(f"tokens must have 1..{self.cfg.context_length} positions, got {T}")
        x = self.token_embedding(tokens) + self.positional_embedding[:T]  # (B, T, W)
        mask = self.attn_mask[:T, :T].to(x.dtype)  # (T, T) causal: -inf above the diagonal
        x = self.transformer(x, mask, block_tokens=block_tokens)  # (B, T, W)
        x = self.ln_final(x)  # (B, T, W)
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, W)
        return eot @ self.text_projection.to(eot.dtype)  # (B, E)


class CLIP(nn.Module):
    """A frozen CLIP model: ``visual`` (:class:`VisionTransformer`) and ``text`` (:class:`TextTransformer`).

    ``input_norm`` holds the RGB statistics the image tower was trained with (kept on ``visual``; the
    pipeline normalises with them, see :meth:`InputNorm.pixel_statistics`).
    """

    def __init__(
        self,
        visual: VisionTransformer,
        text: TextTransformer | None,
        fingerprint: str,
        input_norm: InputNorm | None = None,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        self.fingerprint = fingerprint  # identifies the weights (text-embedding cache key, run records)
        if input_norm is not None:
            visual.input_norm = input_norm

    @property
    def input_norm(self) -> InputNorm:
        """RGB statistics of the image tower's training images (0-1 scale); default OpenAI's."""
        return self.visual.input_norm

    def require_text(self) -> TextTransformer:
        """The text tower; OvssError for a vision-only checkpoint (checked before any tokenizer is needed)."""
        if self.text is None:
            raise OvssError(
                "this CLIP checkpoint holds only vision weights (no text tower), so class names cannot be "
                "embedded; load a full CLIP checkpoint, or pass text_embeddings= to predict()"
            )
        return self.text

    def encode_text(self, tokens: torch.Tensor, *, block_tokens: int = DEFAULT_TUNING.block_tokens) -> torch.Tensor:
        """(B, T) token ids, T <= 77 (see :meth:`TextTransformer.forward`) -> (B, E) un-normalised text features.

        Raises:
            OvssError: the checkpoint has no text tower (vision-only weights).
        """
        text = self.require_text()
        return text(tokens.to(text.positional_embedding.device), block_tokens=block_tokens)


def state_dict_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short content hash of a state dict (names, shapes and a sample of values), stable across formats."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().float().flatten()
        h.update(key.encode())
        h.update(str(tuple(state_dict[key].shape)).encode())
        h.update(t[:: max(1, t.numel() // 64)][:64].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_clip(
    state_dict: dict[str, torch.Tensor],
    act: str = "quick_gelu",
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    input_norm: InputNorm | None = None,
    source: str = "state dict",
) -> CLIP:
    """Build CLIP from an OpenAI-layout state dict (``visual.*`` and the top-level text keys).

    Every size but the number of heads is read off the weight shapes (openai/CLIP's ``build_model``);
    heads come from the checkpoint's config or registry entry, else width // 64. A dict with only
    ``visual.*`` keys gives a CLIP without text tower (text embeddings must then be supplied).

    Args:
        state_dict: fp32 tensors in the OpenAI layout (see :mod:`ovss.models.formats`).
        act: MLP activation of both towers: "quick_gelu" (OpenAI, MetaCLIP) or "gelu" (most OpenCLIP).
        vision_heads: attention heads of the image tower; None: width // 64.
        text_heads: attention heads of the text tower; None: width // 64.
        input_norm: RGB statistics of the training images; None: OpenAI's.
        source: names the checkpoint in errors.

    Returns:
        The model in eval mode with gradients disabled, on CPU in fp32.

    Raises:
        OvssError: the heads are unknown (width not a multiple of 64 and none declared) or do not divide
            the width.
    """
    visual_sd = {k[len("visual.") :]: v for k, v in state_dict.items() if k.startswith("visual.")}
    width = visual_sd["conv1.weight"].shape[0]
    heads = resolve_heads(width, vision_heads, f"CLIP checkpoint {source}: the vision tower")
    visual = build_vit(visual_sd, heads=heads, act=act)
    text: TextTransformer | None = None
    if "token_embedding.weight" in state_dict:
        text_sd = {
            k: v
            for k, v in state_dict.items()
            if not k.startswith("visual.")
            and k not in ("logit_scale", "input_resolution", "context_length", "vocab_size")
        }
        vocab, width = text_sd["token_embedding.weight"].shape
        layers = len({k.split(".")[2] for k in text_sd if k.startswith("transformer.resblocks.")})
        cfg = TextConfig(
            vocab_size=vocab,
            context_length=text_sd["positional_embedding"].shape[0],
            width=width,
            layers=layers,
            heads=resolve_heads(width, text_heads, f"CLIP checkpoint {source}: the text tower"),
            output_dim=text_sd["text_projection"].shape[1],
            act=act,
        )
        text = TextTransformer(cfg)
        load_frozen(text, text_sd)
    return CLIP(visual, text, state_dict_fingerprint(state_dict), input_norm).eval()
