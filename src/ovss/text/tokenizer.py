"""CLIP's byte-level BPE tokenizer, id-for-id identical to OpenAI's ``clip/simple_tokenizer.py``.

Text is cleaned (ftfy fix, HTML unescape twice, whitespace collapse, lower-case), split by CLIP's regex,
mapped byte-by-byte to printable unicode, and merged with the first 48,894 BPE merges. ``Tokenizer(...)``
then wraps each text as ``<|startoftext|> ... <|endoftext|>`` and zero-pads it to the context length (77),
exactly as ``clip.tokenize``.

The vocabulary is data from outside and is not shipped in the package: ``load_tokenizer`` reads OpenAI's
``bpe_simple_vocab_16e6.txt.gz`` or a Hugging Face folder (``vocab.json`` + ``merges.txt``), which give the
same ids.
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ovss.errors import OvssError

SOT_TOKEN = "<|startoftext|>"  # start-of-text marker, id 49406 in CLIP's vocabulary
EOT_TOKEN = "<|endoftext|>"  # end-of-text marker, id 49407; CLIP's text tower reads features here
CONTEXT_LENGTH = 77  # token positions of every CLIP text model
NUM_MERGES = 49152 - 256 - 2  # 48,894 merges: the vocabulary is 512 byte symbols + merges + 2 specials
BPE_ENV_VAR = "OVSS_BPE_PATH"  # environment variable naming a vocabulary file or folder

# CLIP's pre-tokenisation pattern: special tokens, English contractions, letter runs, single digits,
# runs of other non-space characters. Copied verbatim from OpenAI (including IGNORECASE).
_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@functools.cache
def _patterns() -> tuple[Any, Any]:
    """CLIP's word pattern and the whitespace pattern, compiled on first use (``regex`` and ``ftfy`` are
    imported only when a text is tokenised: a run whose names are all in the text cache never needs them)."""
    import regex

    return regex.compile(_PATTERN, regex.IGNORECASE), regex.compile(r"\s+")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable unicode character (GPT-2 / CLIP byte-level BPE).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, soft hyphen, ...)
    map to ``chr(256 + i)`` in byte order, so no BPE symbol is whitespace or a control character.

    Returns:
        Dict from byte value (0..255) to a one-character string; insertion order is CLIP's vocabulary
        order of the 256 byte symbols.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + shifted)
            shifted += 1
    return {byte: chr(code) for byte, code in zip(byte_values, code_points, strict=True)}


def clean_text(text: str) -> str:
    """Normalise a text as CLIP does before splitting it into words.

    ftfy ``fix_text`` (mojibake, odd quotes), HTML unescape twice (``&amp;amp;`` -> ``&``), collapse every
    whitespace run to one space, strip, lower-case.
    """
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = _patterns()[1].sub(" ", text).strip()
    return text.lower()


class Tokenizer:
    """CLIP BPE tokenizer built from an encoder (symbol -> id) and ranked merges.

    Build it with ``Tokenizer.from_bpe_file`` or ``Tokenizer.from_hf_files`` (or ``load_tokenizer``);
    then ``tokenizer(texts)`` gives the (B, 77) long tensor that CLIP's text tower takes.

    Args:
        encoder: BPE symbol (byte-level unicode; word-final symbols end in ``</w>``) -> token id; must
            contain ``<|startoftext|>`` and ``<|endoftext|>``.
        merges: merge pairs, highest priority first.
    """

    def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]]) -> None:
        for special in (SOT_TOKEN, EOT_TOKEN):
            if special not in encoder:
                raise OvssError(f"the CLIP vocabulary has no {special} token; pass CLIP's BPE vocabulary")
        self.encoder = dict(encoder)
        self.decoder = {index: symbol for symbol, index in self.encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        # Memo of word -> BPE symbols; the special tokens stay whole (as in OpenAI's tokenizer).
        self._bpe_cache: dict[str, tuple[str, ...]] = {SOT_TOKEN: (SOT_TOKEN,), EOT_TOKEN: (EOT_TOKEN,)}

    @classmethod
    def from_bpe_file(cls, path: str | Path) -> Tokenizer:
        """Build the tokenizer from OpenAI's gzipped merges file ``bpe_simple_vocab_16e6.txt.gz``.

        The vocabulary is the 256 byte symbols, the same with ``</w>``, one symbol per merge (first
        48,894 merges after the header line), then ``<|startoftext|>`` (49406) and ``<|endoftext|>``
        (49407).
        """
        path = Path(path)
        try:
            with gzip.open(path, "rt", encoding="utf-8") as file:
                lines = file.read().split("\n")
        except (OSError, UnicodeDecodeError) as error:
            raise OvssError(
                f"cannot read CLIP BPE merges from {path} ({error}); pass bpe_simple_vocab_16e6.txt.gz"
            ) from error
        merge_lines = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
        merges = [tuple(line.split()) for line in merge_lines]
        if len(merges) != NUM_MERGES or any(len(merge) != 2 for merge in merges):
            raise OvssError(
                f"{path} is not CLIP's BPE merges file (need {NUM_MERGES} 'a b' lines after a header); "
                "pass bpe_simple_vocab_16e6.txt.gz"
            )
        byte_symbols = list(bytes_to_unicode().values())
        vocab = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
        vocab += ["".join(merge) for merge in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        encoder = {symbol: index for index, symbol in enumerate(vocab)}
        return cls(encoder, [(first, second) for first, second in merges])

    @classmethod
    def from_hf_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> Tokenizer:
        """Build the tokenizer from a Hugging Face CLIP tokenizer's ``vocab.json`` and ``merges.txt``.

        These files hold the same vocabulary and merges as OpenAI's file and give identical ids.
        """
        try:
            encoder = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
            lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        except (OSError, ValueError) as error:
            raise OvssError(
                f"cannot read CLIP tokenizer files {vocab_json}, {merges_txt} ({error}); "
                "pass a Hugging Face CLIP tokenizer folder"
            ) from error
        if not isinstance(encoder, dict):
            raise OvssError(f"{vocab_json} is not a token -> id mapping; pass a CLIP vocab.json")
        merges: list[tuple[str, str]] = []
        for line in lines:
            if not line or line.startswith("#version"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise OvssError(f"bad merge line {line!r} in {merges_txt}; pass a CLIP merges.txt")
            merges.append((parts[0], parts[1]))
        return cls({str(symbol): int(index) for symbol, index in encoder.items()}, merges)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (49408 for CLIP)."""
        return len(self.encoder)

    def bpe(self, word: str) -> tuple[str, ...]:
        """Merge one byte-level word into BPE symbols, lowest-rank pair first (OpenAI's algorithm).

        Args:
            word: a pre-tokenised word already mapped through ``bytes_to_unicode``.

        Returns:
            The word's symbols; the last one carries the ``</w>`` end-of-word suffix.
        """
        cached = self._bpe_cache.get(word)
        if cached is not None:
            return cached
        symbols = (*word[:-1], word[-1] + "</w>")
        while len(symbols) > 1:
            pairs = set(itertools.pairwise(symbols))
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):  # merge every occurrence of ``best``, left to right, no overlap
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = tuple(merged)
        self._bpe_cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without the start/end markers.

        Args:
            text: any string; cleaned by ``clean_text`` first.

        Returns:
            Ids in [0, vocab_size); ``[]`` for an empty or all-whitespace text.
        """
        ids: list[int] = []
        for word in _patterns()[0].findall(clean_text(text)):
            byte_word = "".join(self.byte_encoder[byte] for byte in word.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(byte_word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids, as OpenAI decodes: every ``</w>`` becomes a space.

        So ``decode(encode("a photo of a cat."))`` is ``"a photo of a cat . "``; special tokens decode to
        their marker text and padding zeros to ``"!"``, so strip those ids first when decoding a row of
        ``tokenizer(...)``. Invalid UTF-8 byte sequences decode to U+FFFD.
        """
        text = "".join(self.decoder[int(index)] for index in ids)
        raw = bytearray(self.byte_decoder[char] for char in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(
        self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: bool = False
    ) -> torch.Tensor:
        """Tokenise texts for CLIP's text tower, as ``clip.tokenize``.

        Args:
            texts: one text or a sequence of B texts.
            context_length: token positions per row (77 for every CLIP model).
            truncate: if a text is too long, keep its first ``context_length`` tokens and put
                ``<|endoftext|>`` last; otherwise raise.

        Returns:
            Long tensor (B, context_length): ``49406, ids..., 49407`` then zeros.

        Raises:
            OvssError: a text needs more than ``context_length`` tokens and ``truncate`` is False.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        tokens = torch.zeros(len(texts), context_length, dtype=torch.long)  # (B, T)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > context_length:
                if not truncate:
                    raise OvssError(
                        f"text {text[:60]!r} needs {len(ids)} tokens, more than the context length "
                        f"{context_length}; shorten it or pass truncate=True"
                    )
                ids = [*ids[: context_length - 1], self.eot_token_id]
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens


def _vocabulary_files(path: Path) -> tuple[Path, ...]:
    """The vocabulary files at a resolved path: ``(bpe.txt.gz,)`` or ``(vocab.json, merges.txt)``.

    Only names and existence are checked (cheap, at ``ovss.load``); the files are parsed on first use.

    Raises:
        OvssError: the path is missing, or holds no CLIP vocabulary by its file names.
    """
    if path.is_dir():
        vocab_json, merges_txt = path / "vocab.json", path / "merges.txt"
        if vocab_json.is_file() and merges_txt.is_file():
            return vocab_json, merges_txt
        gz_files = sorted(path.glob("*.txt.gz"))
        if len(gz_files) == 1:
            return (gz_files[0],)
        raise OvssError(
            f"{path} holds neither vocab.json + merges.txt nor one *.txt.gz BPE file; "
            "pass bpe_simple_vocab_16e6.txt.gz or a Hugging Face CLIP tokenizer folder"
        )
    if path.is_file():
        if path.name.endswith(".gz"):
            return (path,)
        raise OvssError(
            f"{path} is not a gzipped BPE file; pass bpe_simple_vocab_16e6.txt.gz or a folder with "
            "vocab.json + merges.txt"
        )
    raise OvssError(
        f"CLIP tokenizer vocabulary not found at {path}; pass an existing bpe_simple_vocab_16e6.txt.gz "
        f"or tokenizer folder (or set {BPE_ENV_VAR})"
    )


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(path: Path) -> Tokenizer:
    files = _vocabulary_files(path)
    return Tokenizer.from_bpe_file(files[0]) if len(files) == 1 else Tokenizer.from_hf_files(*files)


def resolve_tokenizer(
    path: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    model: str | os.PathLike[str] | None = None,
) -> Path:
    """Where the CLIP tokenizer's vocabulary is, checked by file names but not parsed (see `load_tokenizer`).

    ``ovss.load`` calls this so that a missing or wrong vocabulary fails before any image is read, while the
    0.1 s parse of the BPE merges is spent only when a name is not in the text-embedding cache.

    Returns:
        The resolved path (a ``.txt.gz`` file or a tokenizer folder), to pass to `load_tokenizer`.

    Raises:
        OvssError: as `load_tokenizer`, except for a file whose contents turn out not to be a vocabulary.
    """
    if path is None and model is not None:
        folder = Path(model).expanduser()
        if folder.is_dir() and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            path = folder
    if path is None:
        env_path = os.environ.get(BPE_ENV_VAR)
        if env_path:
            path = env_path
        else:
            from ovss.storage.hub import resolve  # lazy: the hub (and any download) only when no path is given

            path = resolve("clip-bpe", kind="tokenizer", download=download)
    resolved = Path(path).expanduser().resolve()
    _vocabulary_files(resolved)
    return resolved


def load_tokenizer(
    path: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    model: str | os.PathLike[str] | None = None,
) -> Tokenizer:
    """Load (once per path) the CLIP tokenizer.

    Args:
        path: OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, or a folder with Hugging Face ``vocab.json`` +
            ``merges.txt`` (or with one ``*.txt.gz``). ``None``: the CLIP model folder's own ``vocab.json`` +
            ``merges.txt`` (a Hugging Face CLIP folder given as ``model``), else the path in the environment
            variable ``OVSS_BPE_PATH`` if set, else ``ovss.storage.hub.resolve("clip-bpe", kind="tokenizer")``.
        download: allow downloading the default vocabulary when it is not cached.
        model: the CLIP checkpoint (name, file or folder) the tokenizer is for.

    Returns:
        The tokenizer; the same object for repeated calls with the same resolved path.

    Raises:
        OvssError: the path does not exist or does not hold a CLIP vocabulary; the default vocabulary is
            not cached and cannot be downloaded.
    """
    return _load_tokenizer_cached(resolve_tokenizer(path, download=download, model=model))
