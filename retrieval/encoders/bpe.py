"""CLIP's byte-level BPE tokenizer in plain Python and numpy (no torch, no open_clip).

A port of open_clip's ``SimpleTokenizer`` (itself OpenAI CLIP's, MIT licence) that gives
the same token ids for every text: the same cleaning (ftfy, double HTML unescape,
whitespace collapse, lower case), the same pre-tokenising pattern, the same merges
read from the same vocabulary (open_clip's ``bpe_simple_vocab_16e6.txt.gz``; ONNX
exports hold the part of it CLIP uses, uncompressed, as ``bpe_merges.txt``: 0.5 MB that
load in a few ms, where decompressing the whole file cost a CLI query ~50 ms), and the
same truncation (cut to the context, last token set to
end-of-text). Parity with open_clip is tested on a few hundred strings.

``ftfy`` and ``regex`` (the pattern needs ``\\p{L}``) are small pure-Python / C
libraries, imported when a tokenizer is created.
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from clipsearch.retrieval.errors import ConfigError, ModelNotFoundError

# The vocabulary open_clip ships (gzipped, 262k merges of which CLIP uses the first
# N_MERGES), and the trimmed, uncompressed copy exports hold.
OPEN_CLIP_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_FILE = "bpe_merges.txt"
# Merges used from the file: 49152 - 256 byte tokens - 2 special tokens, as in CLIP.
N_MERGES = 49152 - 256 - 2
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
CLEAN_MODES = ("lower", "whitespace", "canonicalize")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _ftfy_is_identity(text: str) -> bool:
    """True when ``ftfy.fix_text`` and ``html.unescape`` return ``text`` unchanged.

    On ASCII, ftfy's fixes that can apply are HTML entities (``&``), line breaks
    (``\\r``), terminal escapes (``\\x1b``) and control characters; its mojibake, width,
    quote and ligature fixes and NFC need non-ASCII characters. So printable ASCII
    plus tab and newline without ``&`` passes through, and most queries skip importing
    ftfy (~35 ms of a cold CLI search). Tested against ftfy on every ASCII character.
    """
    return (
        text.isascii()
        and "&" not in text
        and (text.isprintable() or text.replace("\t", " ").replace("\n", " ").isprintable())
    )


def _basic_clean(text: str) -> str:
    if _ftfy_is_identity(text):
        return text.strip()
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


def _canonicalize(text: str) -> str:
    text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.lower().split()).strip()


CLEANERS: dict[str, Callable[[str], str]] = {
    "lower": lambda t: _whitespace_clean(_basic_clean(t)).lower(),
    "whitespace": lambda t: _whitespace_clean(_basic_clean(t)),
    "canonicalize": lambda t: _canonicalize(_basic_clean(t)),
}


def read_merges(path: Path) -> list[str]:
    """The lines of a merges file (header line first), gzipped or plain."""
    if path.suffix == ".gz":
        with gzip.open(path) as f:
            return f.read().decode("utf-8").split("\n")
    return path.read_text(encoding="utf-8").split("\n")


def write_merges(source: Path, target: Path) -> None:
    """Copy the header and the ``N_MERGES`` merges CLIP uses, uncompressed."""
    lines = read_merges(source)[: N_MERGES + 1]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")


class ClipTokenizer:
    """Texts -> int64 ``[n, context_length]`` token ids, zero-padded, as open_clip makes them."""

    def __init__(self, vocab_path: str | Path, *, context_length: int, clean: str = "lower"):
        """
        Args:
            vocab_path: the BPE merges file: open_clip's gzipped one, or an export's
                plain ``bpe_merges.txt`` (see :func:`write_merges`).
            context_length: tokens per text, start and end tokens included.
            clean: open_clip's text cleaning mode: ``lower`` (CLIP's), ``whitespace``
                or ``canonicalize``.
        """
        import regex

        if clean not in CLEANERS:
            raise ConfigError(f"unknown tokenizer clean mode {clean!r}; expected {CLEAN_MODES}")
        if context_length < 2:
            raise ConfigError(f"context_length must be >= 2, got {context_length}")
        path = Path(vocab_path)
        try:
            lines = read_merges(path)
        except OSError as e:
            raise ModelNotFoundError(
                f"cannot read the BPE vocabulary {path}: {e}; re-export the model "
                "(clipsearch models export MODEL --format onnx --out DIR)"
            ) from e
        # Merges stay "a b" strings (symbols never contain spaces): splitting 49k lines
        # into tuples was half of the tokenizer's start-up, which a CLI query pays.
        merges = lines[1 : N_MERGES + 1]
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars]
        vocab += [m.replace(" ", "") for m in merges] + list(SPECIAL_TOKENS)
        self.encoder = dict(zip(vocab, range(len(vocab)), strict=True))
        self.bpe_ranks = dict(zip(merges, range(len(merges)), strict=True))
        self.byte_encoder = bytes_to_unicode()
        self.sot_token_id = self.encoder[SPECIAL_TOKENS[0]]
        self.eot_token_id = self.encoder[SPECIAL_TOKENS[1]]
        self.context_length = context_length
        self.clean = clean
        self._clean_fn = CLEANERS[clean]
        self._cache: dict[str, str] = {t: t for t in SPECIAL_TOKENS}
        special = "|".join(SPECIAL_TOKENS)
        self._pattern = regex.compile(
            special + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def _bpe(self, token: str) -> str:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word: tuple[str, ...] = (*token[:-1], token[-1] + "</w>")
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        ranks = self.bpe_ranks
        while True:
            bigram = min(pairs, key=lambda p: ranks.get(p, N_MERGES))
            if bigram not in ranks:
                break
            first, second = bigram.split(" ")
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        out = " ".join(word)
        self._cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens and without truncation."""
        ids: list[int] = []
        for token in self._pattern.findall(self._clean_fn(text)):
            chars = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(chars).split(" "))
        return ids

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` needs, start/end tokens included, before any truncation."""
        return len(self.encode(text)) + 2

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """int64 ``[len(texts), context_length]``; over-long texts end in end-of-text."""
        return self.tokenize(texts)[0]

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``[n, context_length]`` and int64 ``[n]`` token counts before cutting."""
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        counts = np.zeros(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            counts[i] = len(ids)
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot_token_id
            out[i, : len(ids)] = ids
        return out, counts


def _pairs(word: tuple[str, ...]) -> set[str]:
    """Adjacent symbol pairs as "a b" strings, the form of the merges file's lines."""
    return {f"{a} {b}" for a, b in itertools.pairwise(word)}
