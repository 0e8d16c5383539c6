"""Prompt templates, prompt-ensembled text embeddings (spec §3) and the embedding cache."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ovss.errors import OvssError
from ovss.text.embeddings import EmbeddingCache, fill_templates, text_embeddings
from ovss.text.templates import (
    IMAGENET_TEMPLATES,
    IMAGENET_TEMPLATES_7,
    MASKCLIP_TEMPLATES,
    TEMPLATE_SETS,
)
from ovss.text.tokenizer import Tokenizer, load_tokenizer

EMBED_DIM = 16
NAMES = ["person in jacket", "trafficlight", "  cat ", "Crème brûlée"]


class FakeTextTower:
    """Deterministic stand-in for CLIP's text tower: a random linear map of the bag of token ids.

    Token ids get random per-id scales so that prompt features have very different norms (which makes
    the per-template normalisation matter). Records every call, the positions T of each call, and every
    token row it sees (zero-padded back to 77 positions, so rows compare with ``tokenizer(...)``).
    """

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        scale = torch.rand(49408, 1, generator=generator) * 10  # (V, 1)
        self.weight = torch.randn(49408, EMBED_DIM, generator=generator) * scale  # (V, E)
        self.calls = 0
        self.rows: list[list[int]] = []
        self.positions: list[int] = []

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dtype != torch.long or not 1 <= tokens.shape[1] <= 77:
            raise ValueError(f"bad tokens {tokens.dtype} {tuple(tokens.shape)}")
        if (tokens.argmax(dim=1) >= tokens.shape[1]).any() or (tokens.max(dim=1).values != 49407).any():
            raise ValueError("a row was cut before its <|endoftext|>")
        self.calls += 1
        self.positions.append(tokens.shape[1])
        self.rows.extend(F.pad(tokens, (0, 77 - tokens.shape[1])).tolist())
        counts = torch.zeros(tokens.shape[0], 49408)  # (B, V)
        counts.scatter_add_(1, tokens, torch.ones(tokens.shape, dtype=torch.float))
        counts[:, 0] = 0  # padding
        return counts @ self.weight  # (B, E)


def direct_loop(
    encode_text: FakeTextTower, tokenizer: Tokenizer, names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Spec §3 steps 1-4 written out one prompt at a time."""
    rows = []
    for name in names:
        total = torch.zeros(EMBED_DIM)
        for template in templates:
            feature = encode_text(tokenizer(template.format(name.strip())))[0]
            total += feature / feature.norm()
        mean = total / len(templates)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


@pytest.fixture(scope="module")
def tokenizer(assets_dir: Path) -> Tokenizer:
    return load_tokenizer(assets_dir / "clip-bpe-vocab" / "bpe_simple_vocab_16e6.txt.gz")


def test_imagenet_templates_match_spec(shared_dir: Path) -> None:
    spec = (shared_dir / "spec" / "methods.md").read_text(encoding="utf-8")
    block = spec[spec.index("## 3. Text embeddings") :].split("```")[1]
    numbered = {}
    for line in block.strip("\n").split("\n"):
        for match in re.finditer(r"(\d+) (.+?)(?=\s{2,}\d+ |$)", line):
            numbered[int(match.group(1))] = match.group(2).strip()
    assert tuple(numbered[i] for i in range(1, 81)) == IMAGENET_TEMPLATES


def test_template_sets() -> None:
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert IMAGENET_TEMPLATES[44] == "a origami {}."
    assert IMAGENET_TEMPLATES[57] == "a embroidered {}."
    assert IMAGENET_TEMPLATES[76] == "itap of my {}."
    assert IMAGENET_TEMPLATES[79] == "a tattoo of the {}."
    assert set(IMAGENET_TEMPLATES_7) <= set(IMAGENET_TEMPLATES) and len(IMAGENET_TEMPLATES_7) == 7
    assert MASKCLIP_TEMPLATES[0] == "there is a {} in the scene." and len(MASKCLIP_TEMPLATES) == 5
    assert TEMPLATE_SETS == {
        "imagenet80": IMAGENET_TEMPLATES,
        "imagenet7": IMAGENET_TEMPLATES_7,
        "maskclip5": MASKCLIP_TEMPLATES,
    }
    for templates in TEMPLATE_SETS.values():
        assert all(template.count("{}") == 1 for template in templates)


def test_fill_templates_is_verbatim_and_name_major() -> None:
    prompts = fill_templates(["  trafficlight ", "Potted Plant"], ["a photo of a {}.", "itap of my {}."])
    assert prompts == [
        "a photo of a trafficlight.",
        "itap of my trafficlight.",
        "a photo of a Potted Plant.",
        "itap of my Potted Plant.",
    ]


def test_matches_direct_loop(tokenizer: Tokenizer) -> None:
    tower = FakeTextTower()
    result = text_embeddings(tower, tokenizer, NAMES, IMAGENET_TEMPLATES)
    expected = direct_loop(FakeTextTower(), tokenizer, NAMES, IMAGENET_TEMPLATES)
    assert result.shape == (4, EMBED_DIM) and result.dtype == torch.float32 and result.device.type == "cpu"
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.norm(dim=1), torch.ones(4))
    assert tower.calls == 2  # 320 prompts in batches of 256
    assert len(tower.rows) == 320


def test_batch_size_and_output_dtype_do_not_matter(tokenizer: Tokenizer) -> None:
    tower = FakeTextTower()
    reference = text_embeddings(tower, tokenizer, NAMES, IMAGENET_TEMPLATES)
    small_batches = text_embeddings(tower, tokenizer, NAMES, IMAGENET_TEMPLATES, batch_size=7)
    torch.testing.assert_close(small_batches, reference)

    def encode_double(tokens: torch.Tensor) -> torch.Tensor:
        return tower(tokens).double()

    as_double = text_embeddings(encode_double, tokenizer, NAMES, IMAGENET_TEMPLATES, device="cpu")
    assert as_double.dtype == torch.float32
    torch.testing.assert_close(as_double, reference)


def test_each_template_is_normalised_before_averaging(tokenizer: Tokenizer) -> None:
    tower = FakeTextTower()
    result = text_embeddings(tower, tokenizer, NAMES, IMAGENET_TEMPLATES)
    raw_mean = torch.stack(
        [
            torch.cat([tower(tokenizer(t.format(n.strip()))) for t in IMAGENET_TEMPLATES]).mean(0)
            for n in NAMES
        ]
    )  # (Q, E) mean of unnormalised features
    raw_mean = raw_mean / raw_mean.norm(dim=1, keepdim=True)
    assert not torch.allclose(result, raw_mean, atol=1e-3)


def test_template_order_does_not_matter_but_count_does(tokenizer: Tokenizer) -> None:
    tower = FakeTextTower()
    result = text_embeddings(tower, tokenizer, NAMES, IMAGENET_TEMPLATES)
    swapped = list(IMAGENET_TEMPLATES)
    swapped[3], swapped[70] = swapped[70], swapped[3]
    torch.testing.assert_close(text_embeddings(tower, tokenizer, NAMES, swapped), result)
    dropped = text_embeddings(tower, tokenizer, NAMES, IMAGENET_TEMPLATES[:-1])
    assert (dropped - result).abs().max() > 1e-4


def test_name_changes_result(tokenizer: Tokenizer) -> None:
    tower = FakeTextTower()
    joined, spaced = text_embeddings(tower, tokenizer, ["trafficlight", "traffic light"], IMAGENET_TEMPLATES)
    assert (joined - spaced).abs().max() > 1e-3
    stripped = text_embeddings(tower, tokenizer, ["trafficlight"], IMAGENET_TEMPLATES)[0]
    torch.testing.assert_close(stripped, joined)


def test_errors(tokenizer: Tokenizer) -> None:
    tower = FakeTextTower()
    with pytest.raises(OvssError, match="no class names"):
        text_embeddings(tower, tokenizer, [], IMAGENET_TEMPLATES)
    with pytest.raises(OvssError, match="empty class name"):
        text_embeddings(tower, tokenizer, ["cat", "  "], IMAGENET_TEMPLATES)
    with pytest.raises(OvssError, match="no prompt templates"):
        text_embeddings(tower, tokenizer, ["cat"], [])
    with pytest.raises(OvssError, match="exactly one"):
        text_embeddings(tower, tokenizer, ["cat"], ["a photo of a cat."])
    assert tower.calls == 0


def test_a_name_longer_than_the_context_is_truncated_as_open_clip_with_one_warning(tokenizer: Tokenizer) -> None:
    long_name = "cat " * 80
    tower = FakeTextTower()
    with pytest.warns(UserWarning, match="longer than CLIP's 77-token context") as caught:
        both = text_embeddings(tower, tokenizer, ["dog", long_name], IMAGENET_TEMPLATES)
    assert len(caught) == 1 and "'cat cat" in str(caught[0].message)
    expected = tokenizer([t.replace("{}", long_name.strip()) for t in IMAGENET_TEMPLATES], truncate=True)
    long_rows = [row for row in tower.rows if row[-1] != 0]  # rows filling all 77 positions
    assert sorted(long_rows) == sorted(expected.tolist())  # first 76 tokens (SOT included) + EOT, as open_clip
    assert all(row[-1] == tokenizer.eot_token_id for row in long_rows)
    alone = text_embeddings(FakeTextTower(), tokenizer, ["dog"], IMAGENET_TEMPLATES)
    torch.testing.assert_close(both[0], alone[0])


def test_cache_encodes_only_new_names(tokenizer: Tokenizer) -> None:
    tower = FakeTextTower()
    cache = EmbeddingCache()
    first = cache.get("fake-b16", tower, tokenizer, NAMES[:3], IMAGENET_TEMPLATES)
    torch.testing.assert_close(
        first, text_embeddings(FakeTextTower(), tokenizer, NAMES[:3], IMAGENET_TEMPLATES)
    )
    assert len(tower.rows) == 240 and len(cache) == 3

    tower.calls, tower.rows = 0, []
    again = cache.get("fake-b16", tower, tokenizer, NAMES[:3], IMAGENET_TEMPLATES)
    assert tower.calls == 0
    assert torch.equal(again, first)

    reordered = cache.get(
        "fake-b16", tower, tokenizer, ["Crème brûlée", "cat", "trafficlight"], IMAGENET_TEMPLATES
    )
    expected_prompts = [template.format("Crème brûlée") for template in IMAGENET_TEMPLATES]
    assert sorted(tower.rows) == sorted(tokenizer(expected_prompts).tolist())  # only the new name's 80 prompts
    assert torch.equal(reordered[1], first[2]) and torch.equal(reordered[2], first[1])
    torch.testing.assert_close(
        reordered,
        text_embeddings(FakeTextTower(), tokenizer, [NAMES[3], "cat", "trafficlight"], IMAGENET_TEMPLATES),
    )
    assert len(cache) == 4


def test_cache_keys_model_and_templates(tokenizer: Tokenizer) -> None:
    tower = FakeTextTower()
    cache = EmbeddingCache()
    base = cache.get("model-a", tower, tokenizer, ["cat"], IMAGENET_TEMPLATES)
    other_tower = FakeTextTower(seed=1)
    other_model = cache.get("model-b", other_tower, tokenizer, ["cat"], IMAGENET_TEMPLATES)
    assert other_tower.calls == 1 and not torch.allclose(base, other_model)
    tower.rows = []
    fewer = cache.get("model-a", tower, tokenizer, ["cat"], MASKCLIP_TEMPLATES)
    assert len(tower.rows) == 5 and not torch.allclose(base, fewer)
    assert len(cache) == 3


def test_cache_lru_eviction_and_duplicates(tokenizer: Tokenizer) -> None:
    tower = FakeTextTower()
    cache = EmbeddingCache(max_entries=2, persistent=False)  # in memory only: an evicted name is encoded again
    templates = IMAGENET_TEMPLATES_7
    both = cache.get("m", tower, tokenizer, ["cat", "dog", "cat"], templates)
    assert len(tower.rows) == 14  # "cat" encoded once
    assert torch.equal(both[0], both[2])
    cache.get("m", tower, tokenizer, ["cat"], templates)  # "dog" is now least recently used
    tower.rows = []
    cache.get("m", tower, tokenizer, ["bird"], templates)  # evicts "dog"
    assert len(tower.rows) == 7 and len(cache) == 2
    tower.rows = []
    cache.get("m", tower, tokenizer, ["cat"], templates)
    assert tower.rows == []
    cache.get("m", tower, tokenizer, ["dog"], templates)
    assert len(tower.rows) == 7
    returned = cache.get("m", tower, tokenizer, ["dog"], templates)
    returned.zero_()  # the caller's copy; the cache is unaffected
    assert cache.get("m", tower, tokenizer, ["dog"], templates).norm() > 0.99
    cache.clear()
    assert len(cache) == 0


# ---------------------------------------------------------------- the tower on cut sequences


def _prompt_with_tokens(tokenizer: Tokenizer, template: str, count: int) -> str:
    """A name that makes ``template`` exactly ``count`` tokens long ([SOT] and [EOT] included)."""
    base = len(tokenizer.encode(template.replace("{}", "cat"))) + 2 - 1  # the template's tokens without the name
    return " ".join(["cat"] * (count - base))


def test_tiny_text_tower_on_cut_sequences_equals_77_positions(tiny_clip, tokenizer: Tokenizer) -> None:
    template = "a photo of a {}."
    lengths = [8, 9, 19, 40, 76, 77]
    prompts = [template.replace("{}", _prompt_with_tokens(tokenizer, template, n)) for n in lengths]
    tokens = tokenizer(prompts)  # (6, 77)
    assert (tokens.argmax(dim=1) + 1).tolist() == lengths  # [EOT] is the last of n tokens
    full = tiny_clip.encode_text(tokens)  # (6, E) all 77 positions
    for cut in (77, 40, 19):  # the batch cut to its longest prompt; rows longer than the cut are left out
        rows = [i for i, n in enumerate(lengths) if n <= cut]
        torch.testing.assert_close(tiny_clip.encode_text(tokens[rows, :cut]), full[rows], rtol=1e-5, atol=1e-5)
    for i, n in enumerate(lengths):  # each prompt alone, cut at its own [EOT]
        torch.testing.assert_close(tiny_clip.encode_text(tokens[i : i + 1, :n]), full[i : i + 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full[0], full[1], atol=1e-3)  # the rows differ: the comparison can fail
    with pytest.raises(ValueError, match=r"1\.\.77 positions"):
        tiny_clip.text(torch.zeros(1, 78, dtype=torch.long))


def test_trimmed_embeddings_equal_full_length_on_tiny_clip(tiny_clip, tokenizer: Tokenizer) -> None:
    templates = ["a photo of a {}.", "itap of my {}.", "a bad photo of the {} in the scene."]
    names = ["cat", "potted plant", _prompt_with_tokens(tokenizer, templates[0], 77), "dog " * 40, "a b c d e f"]
    with pytest.warns(UserWarning, match="longer than CLIP's 77-token context"):
        full = text_embeddings(tiny_clip.encode_text, tokenizer, names, templates, batch_size=4, trim=False)
    seen: list[int] = []
    hook = tiny_clip.text.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        with pytest.warns(UserWarning, match="longer than CLIP's 77-token context"):
            cut = text_embeddings(tiny_clip.encode_text, tokenizer, names, templates, batch_size=4)
    finally:
        hook.remove()
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-5)
    assert seen[0] < 20 and seen[-1] == 77 and seen == sorted(seen)  # short batches first, cut short


def test_batches_are_sorted_by_length_and_cut_to_their_longest_prompt(tokenizer: Tokenizer) -> None:
    tower = FakeTextTower()
    trimmed = text_embeddings(tower, tokenizer, NAMES, IMAGENET_TEMPLATES, batch_size=7)
    lengths = [row.index(49407) + 1 for row in tower.rows]  # in call order
    assert lengths == sorted(lengths)
    calls = [lengths[7 * i : 7 * (i + 1)] for i in range(tower.calls)]  # 320 prompts in 46 batches of <= 7
    assert tower.calls == 46 and [max(c) for c in calls] == tower.positions
    assert max(tower.positions) < 30  # never 77 positions for these names
    reference = FakeTextTower()
    full = text_embeddings(reference, tokenizer, NAMES, IMAGENET_TEMPLATES, batch_size=7, trim=False)
    assert set(reference.positions) == {77}
    torch.testing.assert_close(trimmed, full)
