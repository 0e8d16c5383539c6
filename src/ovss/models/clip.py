"""CLIP = the ViT image tower + the causal text transformer, built from an OpenAI-layout state dict."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from ovss.models.vit import LayerNorm, Transformer, VisionTransformer, build_vit


@dataclass(frozen=True)
class TextConfig:
    """Architecture of the text tower; read off the weights by :func:`build_clip`."""

    vocab_size: int  # token vocabulary V (49408 for the OpenAI BPE)
    context_length: int  # tokens per text (77)
    width: int  # token width W (512 for ViT-B CLIP)
    layers: int  # number of blocks (12)
    heads: int  # attention heads (width // 64)
    output_dim: int  # joint embedding size E (512 for ViT-B/16)
    act: str = "quick_gelu"  # MLP activation


class TextTransformer(nn.Module):
    """CLIP's text tower: token + position embeddings, causal blocks, ln_final, projection at [EOT]."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.act)
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.zeros(cfg.width, cfg.output_dim))
        mask = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encode token ids.

        Args:
            tokens: (B, context_length) int64 ids, [SOT] ... [EOT] then zero padding.

        Returns:
            (B, E) features at the [EOT] token (the highest id in each row), after ln_final and the
            projection; not normalised.
        """
        x = self.token_embedding(tokens) + self.positional_embedding  # (B, ctx, W)
        x = self.transformer(x, self.attn_mask.to(x.dtype))  # (B, ctx, W)
        x = self.ln_final(x)
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, W)
        return eot @ self.text_projection.to(eot.dtype)  # (B, E)


class CLIP(nn.Module):
    """A frozen CLIP model: ``visual`` (:class:`VisionTransformer`) and ``text`` (:class:`TextTransformer`)."""

    def __init__(self, visual: VisionTransformer, text: TextTransformer | None, fingerprint: str) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        self.fingerprint = fingerprint  # identifies the weights (text-embedding cache key, run records)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 77) token ids -> (B, E) un-normalised text features. Raises if the text tower is missing."""
        if self.text is None:
            raise RuntimeError("this CLIP checkpoint has no text tower; pass text_embeddings= to predict()")
        return self.text(tokens.to(self.text.positional_embedding.device))


def state_dict_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short content hash of a state dict (names, shapes and a sample of values), stable across formats."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().float().flatten()
        h.update(key.encode())
        h.update(str(tuple(state_dict[key].shape)).encode())
        h.update(t[:: max(1, t.numel() // 64)][:64].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_clip(state_dict: dict[str, torch.Tensor], act: str = "quick_gelu") -> CLIP:
    """Build CLIP from an OpenAI-layout state dict (``visual.*`` and the top-level text keys).

    Every size is read off the weight shapes (openai/CLIP's ``build_model``). A dict with only
    ``visual.*`` keys gives a CLIP without text tower (text embeddings must then be supplied).

    Args:
        state_dict: fp32 tensors in the OpenAI layout (see :mod:`ovss.models.formats`).
        act: MLP activation of both towers: "quick_gelu" (OpenAI, MetaCLIP) or "gelu" (most OpenCLIP).

    Returns:
        The model in eval mode with gradients disabled, on CPU in fp32.
    """
    visual_sd = {k[len("visual.") :]: v for k, v in state_dict.items() if k.startswith("visual.")}
    visual = build_vit(visual_sd, act=act)
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
            heads=max(width // 64, 1),
            output_dim=text_sd["text_projection"].shape[1],
            act=act,
        )
        text = TextTransformer(cfg)
        text.load_state_dict(text_sd, strict=True)
        text.eval().requires_grad_(False)
    return CLIP(visual, text, state_dict_fingerprint(state_dict)).eval()
