"""CLIP BPE tokenizer: id parity with OpenAI's tokenizer on the real vocabulary, HF-file parity, loading."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import regex
import torch

from ovss.errors import OvssError
from ovss.text.templates import IMAGENET_TEMPLATES, TEMPLATE_SETS
from ovss.text.tokenizer import CONTEXT_LENGTH, Tokenizer, bytes_to_unicode, clean_text, load_tokenizer

SOT, EOT = 49406, 49407

LONG_WORD_IDS = [28714, 749, 20253, 9800, 535, 532, 1065, 901, 1556, 13697, 9916, 78, 39031, 13903]

# Ids from OpenAI's clip/simple_tokenizer.py (commit d05afc4 vocabulary), recorded once by running it.
HARD_STRINGS: dict[str, list[int]] = {
    "a photo of a cat.": [320, 1125, 539, 320, 2368, 269],
    "Hello, World!!! 123": [3306, 267, 1002, 995, 272, 273, 274],
    "it's the dog's bone; don't": [585, 568, 518, 1929, 568, 6195, 282, 847, 713],
    "I'M YOU'LL WE'VE THEY'RE HE'D": [328, 880, 592, 1342, 649, 1200, 889, 982, 797, 1896],
    "café naïve Zoë": [15304, 1097, 35689, 563, 4397, 40520],
    "🐶 dog 👍🏽": [10631, 1929, 43722],
    "fish &amp; chips &amp;amp; &lt;b&gt;": [2759, 261, 8855, 261, 283, 321, 285],
    "cafÃ©": [15304],  # mojibake of "café", repaired by ftfy
    "  double   spaces\tand\nnewlines  ": [3200, 9006, 537, 1218, 3418],
    "pneumonoultramicroscopicsilicovolcanoconiosis": LONG_WORD_IDS,
    "trafficlight": [12080, 1395],
    "chestofdrawers": [18217, 684, 38975],
    "pottedplant": [3547, 4841, 3912],
    "tvmonitor": [3197, 10198],
    "3.14 e-mail@x.org": [274, 269, 272, 275, 324, 268, 2614, 287, 343, 269, 5593],
    "東京": [48338, 21078, 361],
    "": [],
    "   ": [],
}

# Ids of every word of the 80 templates filled with "person in jacket" (OpenAI's tokenizer, one word at a
# time). CLIP merges never cross the regex word boundaries, so a prompt's ids are its words' ids in order.
TEMPLATE_WORD_IDS: dict[str, list[int]] = {
    "a": [320], "bad": [2103], "photo": [1125], "of": [539], "person": [2533], "in": [530],
    "jacket": [6164], ".": [269], "many": [1346], "sculpture": [8757], "the": [518], "hard": [1626],
    "to": [531], "see": [862], "low": [1042], "resolution": [9977], "rendering": [21339],
    "graffiti": [11676], "cropped": [31139], "tattoo": [6325], "embroidered": [22381], "bright": [4852],
    "clean": [3772], "dirty": [7615], "dark": [3144], "drawing": [3610], "my": [607], "plastic": [6102],
    "cool": [2077], "close": [2660], "-": [268], "up": [705], "black": [1449], "and": [537],
    "white": [1579], "painting": [3086], "pixelated": [14384, 943], "jpeg": [73, 11207],
    "corrupted": [30429, 775], "blurry": [21977], "good": [886], "video": [1455], "game": [1063],
    "one": [637], "doodle": [9388], "origami": [31832], "sketch": [5269], "toy": [5988],
    "rendition": [28891], "large": [3638], "nice": [1805], "weird": [5613], "cartoon": [7651],
    "art": [794], "itap": [529, 2728], "plushie": [2052, 26638], "small": [2442],
}  # fmt: skip


@pytest.fixture(scope="module")
def bpe_file(assets_dir: Path) -> Path:
    return assets_dir / "clip-bpe-vocab" / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="module")
def hf_dir(assets_dir: Path) -> Path:
    return assets_dir / "clip-tokenizer"


@pytest.fixture(scope="module")
def tokenizer(bpe_file: Path) -> Tokenizer:
    return Tokenizer.from_bpe_file(bpe_file)


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir: Path) -> Tokenizer:
    return Tokenizer.from_hf_files(hf_dir / "vocab.json", hf_dir / "merges.txt")


def test_bytes_to_unicode_is_a_printable_bijection() -> None:
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord("!")] == "!"
    assert table[ord(" ")] == "Ġ"  # space is byte 32, the 33rd non-printable byte -> chr(256 + 32)
    assert table[0] == "Ā"  # chr(256)
    assert all(not char.isspace() for char in table.values())


def test_clean_text_steps() -> None:
    assert clean_text("  A\tB\n\nC  ") == "a b c"
    assert clean_text("&amp;amp; &lt;") == "& <"  # unescaped twice
    assert clean_text("cafÃ©") == "café"  # ftfy


def test_vocabulary_layout(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 49408
    assert tokenizer.sot_token_id == SOT and tokenizer.eot_token_id == EOT
    assert tokenizer.encoder["!"] == 0 and tokenizer.encoder["!</w>"] == 256
    assert tokenizer.encoder["in"] == 512  # first merge "i n"
    assert len(tokenizer.bpe_ranks) == 49152 - 256 - 2


def test_photo_of_a_cat_row(tokenizer: Tokenizer) -> None:
    tokens = tokenizer("a photo of a cat.")
    expected = torch.zeros(1, CONTEXT_LENGTH, dtype=torch.long)
    expected[0, :8] = torch.tensor([SOT, 320, 1125, 539, 320, 2368, 269, EOT])
    assert tokens.dtype == torch.long and tokens.shape == (1, 77)
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize(("text", "ids"), list(HARD_STRINGS.items()))
def test_hard_strings_match_openai(
    tokenizer: Tokenizer, hf_tokenizer: Tokenizer, text: str, ids: list[int]
) -> None:
    assert tokenizer.encode(text) == ids
    assert hf_tokenizer.encode(text) == ids


def test_equivalent_spellings(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("cafÃ©") == tokenizer.encode("café")
    assert tokenizer.encode("A  Photo\tOF a CAT.") == tokenizer.encode("a photo of a cat.")
    assert tokenizer.encode("fish &amp; chips") == tokenizer.encode("fish & chips")
    assert tokenizer.encode("trafficlight ") == tokenizer.encode("trafficlight")
    assert tokenizer.encode("traffic light") != tokenizer.encode("trafficlight")


def test_all_80_templates_match_word_ids(tokenizer: Tokenizer) -> None:
    texts = [template.format("person in jacket") for template in IMAGENET_TEMPLATES]
    tokens = tokenizer(texts)  # (80, 77)
    assert tokens.shape == (80, 77)
    for row, text in zip(tokens, texts, strict=True):
        words = regex.findall(r"[\p{L}]+|[^\s\p{L}\p{N}]+", text)  # the prompts hold no digits/apostrophes
        ids = [SOT] + [i for word in words for i in TEMPLATE_WORD_IDS[word]] + [EOT]
        assert row[: len(ids)].tolist() == ids, text
        assert not row[len(ids) :].any()
    assert tokens[57, :5].tolist() == [SOT, 320, 22381, 2533, 530]  # "a embroidered person in ..."
    assert tokens[59, :5].tolist() == [SOT, 529, 2728, 539, 518]  # "itap of the ..."


def test_hf_files_give_identical_ids(tokenizer: Tokenizer, hf_tokenizer: Tokenizer) -> None:
    assert hf_tokenizer.encoder == tokenizer.encoder
    assert hf_tokenizer.bpe_ranks == tokenizer.bpe_ranks
    names = ["person in jacket", "trafficlight", "chestofdrawers", "Crème brûlée", "t-shirt", "o'clock"]
    for templates in TEMPLATE_SETS.values():
        texts = [template.format(name) for name in names for template in templates]
        assert torch.equal(hf_tokenizer(texts), tokenizer(texts))


def test_tokenizer_json_agrees_with_vocab_and_merges(hf_dir: Path, tokenizer: Tokenizer) -> None:
    model = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert model["vocab"] == tokenizer.encoder
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    assert merges == list(tokenizer.bpe_ranks)


@pytest.mark.parametrize("text", list(HARD_STRINGS))
def test_decode_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    decoded = tokenizer.decode(ids)
    assert tokenizer.encode(decoded) == ids
    words = regex.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", clean_text(text))
    assert decoded == "".join(word + " " for word in words)


def test_decode_special_tokens(tokenizer: Tokenizer) -> None:
    row = tokenizer("a photo of a cat.")[0]
    assert tokenizer.decode(row[:8].tolist()) == "<|startoftext|>a photo of a cat . <|endoftext|>"


def test_context_length_limit_and_truncate(tokenizer: Tokenizer) -> None:
    word_id = tokenizer.encode("word")[0]
    fits = tokenizer("word " * 75)  # SOT + 75 + EOT = 77 tokens
    assert fits[0].tolist() == [SOT] + [word_id] * 75 + [EOT]
    with pytest.raises(OvssError, match="truncate=True"):
        tokenizer(["a cat", "word " * 76])
    truncated = tokenizer("word " * 200, truncate=True)
    assert truncated[0].tolist() == [SOT] + [word_id] * 75 + [EOT]
    short = tokenizer(["a cat", "a dog"], context_length=10)
    assert short.shape == (2, 10)
    assert short[1, :4].tolist() == [SOT, 320, 1929, EOT]


def test_load_tokenizer_sources_and_cache(
    bpe_file: Path, hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_gz = load_tokenizer(bpe_file)
    assert load_tokenizer(str(bpe_file)) is from_gz  # cached per resolved path
    from_hf = load_tokenizer(hf_dir)
    assert from_hf is not from_gz and from_hf.encoder == from_gz.encoder
    monkeypatch.setenv("OVSS_BPE_PATH", str(bpe_file))
    assert load_tokenizer() is from_gz

    monkeypatch.delenv("OVSS_BPE_PATH")
    calls: list[tuple[str, str, bool]] = []

    def fake_resolve(name: str, kind: str = "clip", download: bool = True) -> Path:
        calls.append((name, kind, download))
        return hf_dir

    fake_hub = types.ModuleType("ovss.storage.hub")
    fake_hub.resolve = fake_resolve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ovss.storage.hub", fake_hub)
    assert load_tokenizer() is from_hf
    assert load_tokenizer(download=False) is from_hf
    assert calls == [("clip-bpe", "tokenizer", True), ("clip-bpe", "tokenizer", False)]


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(OvssError, match="not found"):
        load_tokenizer(tmp_path / "missing.txt.gz")
    with pytest.raises(OvssError, match=r"vocab\.json"):
        load_tokenizer(tmp_path)  # empty folder
    not_gz = tmp_path / "vocab.txt"
    not_gz.write_text("hello")
    with pytest.raises(OvssError, match="gzipped"):
        load_tokenizer(not_gz)
    bad_gz = tmp_path / "bad.txt.gz"
    bad_gz.write_bytes(b"not gzip")
    with pytest.raises(OvssError, match="cannot read"):
        load_tokenizer(bad_gz)
