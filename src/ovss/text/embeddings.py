"""Class-name text embeddings (spec §3): prompt-ensembled, L2-normalised CLIP text features, with caches.

For every name: fill each template with the name verbatim, tokenise, encode with the CLIP text tower,
L2-normalise each template embedding, average over templates, L2-normalise again.

The tower runs on prompts sorted by length, each batch cut to its longest prompt instead of all 77
positions (exact: the tower is causal and read at [EOT]). :class:`EmbeddingCache` keeps embeddings in
memory and, by default, on disk (:mod:`ovss.text.disk_cache`), so a name is encoded once per model and
template set across processes.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from ovss.errors import OvssError
from ovss.text import disk_cache
from ovss.text.tokenizer import Tokenizer

# encode_text(tokens (B, T) long, T <= 77) -> (B, E) float: CLIP text features at the EOT token after
# ln_final and text_projection, not normalised. T is 77, or at least the batch's longest text (EOT included).
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
def encode_prompts(
    encode_text: EncodeText,
    tokens: torch.Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    trim: bool = True,
) -> torch.Tensor:
    """Text-tower features of tokenised prompts, batch by batch.

    Args:
        encode_text: the CLIP text tower (see :data:`EncodeText`).
        tokens: (P, 77) int64 token rows, [SOT] ... [EOT] then zero padding.
        batch_size: prompts per ``encode_text`` call.
        device: where the tokens are sent (the text tower's device).
        trim: sort the prompts by length and cut each batch to its longest prompt (its [EOT] included)
            instead of running all 77 positions; identical up to fp32 round-off, several times faster.
            False runs the 77-position batches in the given order (the reference path).

    Returns:
        Float32 CPU tensor (P, E), row p the un-normalised features of prompt p.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = tokens.argmax(dim=-1) + 1  # (P,) positions up to and including [EOT] (the highest id)
    order = torch.argsort(lengths, stable=True) if trim else torch.arange(tokens.shape[0])  # (P,)
    features: torch.Tensor | None = None
    for start in range(0, tokens.shape[0], batch_size):
        index = order[start : start + batch_size]  # (b,)
        positions = int(lengths[index].max()) if trim else tokens.shape[1]
        batch = tokens[index, :positions].to(device)  # (b, T)
        out = encode_text(batch)  # (b, E)
        if out.ndim != 2 or out.shape[0] != batch.shape[0]:
            raise ValueError(f"encode_text must return (B, E) for B={batch.shape[0]}, got {tuple(out.shape)}")
        if features is None:
            features = torch.empty(tokens.shape[0], out.shape[1])  # (P, E)
        features[index] = out.float().cpu()
    if features is None:
        raise ValueError("no prompts to encode")
    return features


def _embed(
    encode_text: EncodeText,
    tokenizer: Tokenizer,
    names: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int,
    device: torch.device | str,
    trim: bool,
) -> tuple[torch.Tensor, set[str]]:
    """Embeddings (Q, E) as :func:`text_embeddings`, and the names whose prompts were cut to the context."""
    if not names:
        raise OvssError("no class names given; pass at least one name")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = fill_templates(names, templates)  # Q * K prompts, name-major
    num_names, num_templates = len(names), len(templates)
    tokens = tokenizer(prompts, truncate=True)  # (Q * K, 77): a longer prompt keeps 76 tokens + <|endoftext|>
    full = (tokens.argmax(dim=-1) + 1 == tokens.shape[1]).nonzero().flatten().tolist()  # rows filling the context
    truncated = {
        names[row // num_templates]
        for row in full
        if len(tokenizer.encode(prompts[row])) + 2 > tokens.shape[1]  # + [SOT] and [EOT]
    }
    features = encode_prompts(encode_text, tokens, batch_size=batch_size, device=device, trim=trim)  # (Q * K, E)
    features = features.view(num_names, num_templates, -1)  # (Q, K, E)
    features = F.normalize(features, dim=-1)  # (Q, K, E) unit-norm per template
    embeddings = features.mean(dim=1)  # (Q, E)
    return F.normalize(embeddings, dim=-1), truncated  # (Q, E)


def _warn_truncated(names: Iterable[str], stacklevel: int) -> None:
    """One ``UserWarning`` per name whose prompts were cut to CLIP's 77-token context."""
    for name in names:
        warnings.warn(
            f"label {name[:60]!r}{'...' if len(name) > 60 else ''} is longer than CLIP's 77-token context "
            "in its prompts; only its first tokens are used (shorten it to silence this warning)",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def text_embeddings(
    encode_text: EncodeText,
    tokenizer: Tokenizer,
    names: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    trim: bool = True,
) -> torch.Tensor:
    """Prompt-ensembled text embeddings of class names (spec §3 steps 1-4).

    Args:
        encode_text: CLIP text tower, tokens (B, T) long on ``device`` -> features (B, E) at the EOT
            token after ln_final and text_projection, not normalised; any float dtype. T is 77, or with
            ``trim`` the longest prompt of the batch.
        tokenizer: the CLIP BPE tokenizer.
        names: Q class names (each synonym is its own name).
        templates: K prompt templates, each with one ``{}``; order does not matter, count does.
        batch_size: prompts per ``encode_text`` call.
        device: where the tokens are sent (the text tower's device).
        trim: run the tower on length-sorted batches cut to their longest prompt (default); False runs
            all 77 positions (same result up to fp32 round-off, several times slower; for comparison).

    Returns:
        Float32 CPU tensor (Q, E) of unit-norm rows t_n = normalise(mean_k normalise(t_{n,k})).

    Raises:
        OvssError: no names, an empty name, no templates or a bad template. A prompt longer than CLIP's
            77-token context is truncated as open_clip does (first 76 tokens + ``<|endoftext|>``), with one
            ``UserWarning`` per name.
    """
    embeddings, truncated = _embed(
        encode_text, tokenizer, names, templates, batch_size=batch_size, device=device, trim=trim
    )  # (Q, E)
    _warn_truncated(sorted(truncated, key=list(names).index), stacklevel=2)
    return embeddings


CacheKey = tuple[str, tuple[str, ...], str]  # (model key, templates, stripped name)


class EmbeddingCache:
    """Text embeddings keyed by (model key, template set, name): an LRU in memory, and a cache on disk.

    Repeated or overlapping label sets only encode names not seen before with the same model and
    templates. In memory each entry is one (E,) float32 CPU row; the least recently used names are evicted
    beyond ``max_entries``. With ``persistent``, names missing from memory are looked up in (and new ones
    added to) the shard file of the model and template set under ``<ovss cache>/text/``
    (:mod:`ovss.text.disk_cache`), so other processes reuse them; ``OVSS_TEXT_CACHE=0`` turns that off.
    A cache file that cannot be read or written gives a warning, never an error.

    Args:
        max_entries: most names kept in memory (>= 1); one entry is E floats (2 KiB for E=512).
        persistent: use the disk cache (unless ``OVSS_TEXT_CACHE=0``, read at every lookup).
    """

    def __init__(self, max_entries: int = 4096, *, persistent: bool = True) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.persistent = persistent
        self._entries: OrderedDict[CacheKey, disk_cache.Entry] = OrderedDict()
        self._write_failed = False  # the disk cache could not be written once: do not warn again

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry held in memory (the disk cache is cleared by ``ovss cache clear``)."""
        self._entries.clear()

    def get(
        self,
        model_key: str,
        encode_text: EncodeText,
        tokenizer: Tokenizer | Callable[[], Tokenizer],
        names: Sequence[str],
        templates: Sequence[str],
        *,
        batch_size: int = 256,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Text embeddings of ``names``, encoding only the names found neither in memory nor on disk.

        Args:
            model_key: identifies the text tower's weights and the template set (e.g. the weights'
                fingerprint); embeddings of different keys never mix. Part of the disk file's name.
            tokenizer: the tokenizer, or a function returning it, called only when a name must be encoded
                (a warm cache never parses the vocabulary).
            encode_text, names, templates, batch_size, device: as in ``text_embeddings``.

        Returns:
            Float32 CPU tensor (Q, E) of unit-norm rows, a new tensor (safe to modify).
        """
        if not names:
            raise OvssError("no class names given; pass at least one name")
        template_key = tuple(templates)
        wanted = list(dict.fromkeys(name.strip() for name in names))  # unique, in order
        found: dict[str, disk_cache.Entry] = {}
        for name in wanted:
            key = (model_key, template_key, name)
            if key in self._entries:
                self._entries.move_to_end(key)
                found[name] = self._entries[key]
        missing = [name for name in wanted if name not in found]
        if missing:
            shard = self._shard(model_key, templates)
            stored = shard.load() if shard is not None else {}
            fresh: dict[str, disk_cache.Entry] = {name: stored[name] for name in missing if name in stored}
            to_encode = [name for name in missing if name not in fresh]
            if to_encode:
                tok = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer()
                computed, truncated = _embed(
                    encode_text, tok, to_encode, templates, batch_size=batch_size, device=device, trim=True
                )  # (len(to_encode), E)
                encoded = {
                    name: (row.clone(), name in truncated) for name, row in zip(to_encode, computed, strict=True)
                }
                if shard is not None:
                    self._store(shard, encoded)
                fresh.update(encoded)
            found.update(fresh)
            for name, entry in fresh.items():
                self._entries[(model_key, template_key, name)] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        _warn_truncated([name for name in wanted if found[name][1]], stacklevel=2)
        return torch.stack([found[name.strip()][0] for name in names])  # (Q, E) a new tensor

    def _shard(self, model_key: str, templates: Sequence[str]) -> disk_cache.TextEmbeddingShard | None:
        if not (self.persistent and disk_cache.enabled()):
            return None
        return disk_cache.TextEmbeddingShard(model_key, templates)

    def _store(self, shard: disk_cache.TextEmbeddingShard, entries: dict[str, disk_cache.Entry]) -> None:
        """Add entries to the disk cache; a failure warns once per cache and is otherwise ignored."""
        try:
            shard.add(entries)
        except (OvssError, OSError) as error:
            if not self._write_failed:
                warnings.warn(
                    f"text embeddings are not cached on disk ({error}); they are recomputed in every new "
                    f"process (set {disk_cache.CACHE_ENV_VAR}=0 to stop trying)",
                    UserWarning,
                    stacklevel=3,
                )
            self._write_failed = True
