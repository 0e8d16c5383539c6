"""Class-name text embeddings (spec §3): prompt-ensembled, L2-normalised CLIP text features, with a cache.

For every name: fill each template with the name verbatim, tokenise, encode with the CLIP text tower,
L2-normalise each template embedding, average over templates, L2-normalise again.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ovss.errors import OvssError
from ovss.text.tokenizer import Tokenizer

# encode_text(tokens (B, 77) long) -> (B, E) float: CLIP text features at the EOT token after ln_final
# and text_projection, not normalised.
EncodeText = Callable[[torch.Tensor], torch.Tensor]


def fill_templates(names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Prompts for every (name, template) pair, name-major: prompt ``q * K + k`` is template k of name q.

    Names are used verbatim (no case change, no spaces inserted); only leading/trailing whitespace is
    stripped.

    Raises:
        OvssError: an empty name, no templates, or a template without exactly one ``{}``.
    """
    if not templates:
        raise OvssError("no prompt templates given; pass e.g. ovss.text.templates.IMAGENET_TEMPLATES")
    for template in templates:
        if template.count("{}") != 1:
            raise OvssError(f"template {template!r} must contain exactly one '{{}}' for the class name")
    prompts: list[str] = []
    for name in names:
        stripped = name.strip()
        if not stripped:
            raise OvssError(f"empty class name {name!r} in the name list; remove it or give it a name")
        prompts.extend(template.replace("{}", stripped) for template in templates)
    return prompts


@torch.no_grad()
def text_embeddings(
    encode_text: EncodeText,
    tokenizer: Tokenizer,
    names: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Prompt-ensembled text embeddings of class names (spec §3 steps 1-4).

    Args:
        encode_text: CLIP text tower, tokens (B, 77) long on ``device`` -> features (B, E) at the EOT
            token after ln_final and text_projection, not normalised; any float dtype.
        tokenizer: the CLIP BPE tokenizer.
        names: Q class names (each synonym is its own name).
        templates: K prompt templates, each with one ``{}``; order does not matter, count does.
        batch_size: prompts per ``encode_text`` call.
        device: where the tokens are sent (the text tower's device).

    Returns:
        Float32 CPU tensor (Q, E) of unit-norm rows t_n = normalise(mean_k normalise(t_{n,k})).

    Raises:
        OvssError: no names, an empty name, no templates or a bad template. A prompt longer than CLIP's
            77-token context is truncated as open_clip does (first 76 tokens + ``<|endoftext|>``), with one
            ``UserWarning`` per name.
    """
    if not names:
        raise OvssError("no class names given; pass at least one name")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = fill_templates(names, templates)  # Q * K prompts, name-major
    num_names, num_templates = len(names), len(templates)
    chunks = []
    truncated: set[str] = set()  # names with a prompt longer than the context, truncated as open_clip does
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        try:
            tokens = tokenizer(batch)  # (b, 77)
        except OvssError:
            tokens = tokenizer(batch, truncate=True)  # (b, 77) first 76 tokens + <|endoftext|>
            for offset, prompt in enumerate(batch):
                if len(tokenizer.encode(prompt)) + 2 > tokens.shape[1]:
                    truncated.add(names[(start + offset) // num_templates])
        tokens = tokens.to(device)  # (b, 77)
        features = encode_text(tokens)  # (b, E)
        if features.ndim != 2 or features.shape[0] != tokens.shape[0]:
            raise ValueError(f"encode_text must return (B, E) for B={tokens.shape[0]}, got {features.shape}")
        chunks.append(features.float().cpu())
    for name in sorted(truncated, key=list(names).index):
        warnings.warn(
            f"label {name[:60]!r}{'...' if len(name) > 60 else ''} is longer than CLIP's 77-token context "
            "in its prompts; only its first tokens are used (shorten it to silence this warning)",
            UserWarning,
            stacklevel=2,
        )
    features = torch.cat(chunks)  # (Q * K, E)
    features = features.view(num_names, num_templates, -1)  # (Q, K, E)
    features = F.normalize(features, dim=-1)  # (Q, K, E) unit-norm per template
    embeddings = features.mean(dim=1)  # (Q, E)
    return F.normalize(embeddings, dim=-1)  # (Q, E)


class EmbeddingCache:
    """LRU cache of text embeddings keyed by (model key, template set, name).

    Repeated or overlapping label sets only encode names not seen before with the same model and
    templates. Each entry is one (E,) float32 CPU row; the least recently used names are evicted beyond
    ``max_entries``.

    Args:
        max_entries: most names kept (>= 1); one entry is E floats (2 KiB for E=512).
    """

    def __init__(self, max_entries: int = 4096) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, tuple[str, ...], str], torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()

    def get(
        self,
        model_key: str,
        encode_text: EncodeText,
        tokenizer: Tokenizer,
        names: Sequence[str],
        templates: Sequence[str],
        *,
        batch_size: int = 256,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Text embeddings of ``names``, encoding only the names missing from the cache.

        Args:
            model_key: identifies the text tower and its weights (e.g. ``"ViT-B/16"``); embeddings of
                different keys never mix.
            encode_text, tokenizer, names, templates, batch_size, device: as in ``text_embeddings``.

        Returns:
            Float32 CPU tensor (Q, E) of unit-norm rows, a new tensor (safe to modify).
        """
        if not names:
            raise OvssError("no class names given; pass at least one name")
        template_key = tuple(templates)
        keys = [(model_key, template_key, name.strip()) for name in names]
        missing = list(dict.fromkeys(key[2] for key in keys if key not in self._entries))
        fresh: dict[tuple[str, tuple[str, ...], str], torch.Tensor] = {}
        if missing:
            computed = text_embeddings(
                encode_text, tokenizer, missing, templates, batch_size=batch_size, device=device
            )  # (len(missing), E)
            fresh = {
                (model_key, template_key, name): row for name, row in zip(missing, computed, strict=True)
            }
        rows = []
        for key in keys:
            if key in fresh:
                rows.append(fresh[key])
            else:
                self._entries.move_to_end(key)
                rows.append(self._entries[key])
        for key, row in fresh.items():
            self._entries[key] = row.clone()  # own storage, not a view of the batch result
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return torch.stack(rows)  # (Q, E)
