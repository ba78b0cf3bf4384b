"""Hugging Face text towers' tokenizers without torch or transformers.

open_clip's ``HFTokenizer`` cleans each text (``whitespace`` by default), then calls a
transformers fast tokenizer with ``max_length=context_length, padding="max_length",
truncation=True``. A fast tokenizer is the ``tokenizers`` library running the
``tokenizer.json`` of the model, so loading that same file with ``tokenizers`` (a small
Rust extension, no torch) and asking for the same padding and truncation gives the same
ids. ONNX exports copy ``tokenizer.json`` next to the graphs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipsearch.retrieval.encoders.bpe import CLEAN_MODES, CLEANERS
from clipsearch.retrieval.errors import ConfigError, ModelNotFoundError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"


class HfTokenizer:
    """Texts -> int64 ``[n, context_length]`` ids, as open_clip's HFTokenizer makes them."""

    def __init__(
        self,
        path: str | Path,
        *,
        context_length: int,
        clean: str = "whitespace",
        pad_id: int = 0,
        strip_sep_id: int | None = None,
    ) -> None:
        """
        Args:
            path: the model's ``tokenizer.json``.
            context_length: tokens per text, special tokens included.
            clean: open_clip's cleaning mode (``whitespace`` for HF towers).
            pad_id: the padding id the tower expects (and masks out).
            strip_sep_id: when set, this id (the SEP token) is replaced by 0, as
                open_clip's ``strip_sep_token`` does.
        """
        try:
            import tokenizers  # noqa: F401
        except ImportError as e:
            raise ConfigError(
                "this model's tokenizer needs the `tokenizers` package: pip install tokenizers"
            ) from e
        if clean not in CLEANERS:
            raise ConfigError(f"unknown tokenizer clean mode {clean!r}; expected {CLEAN_MODES}")
        self.path = Path(path)
        self._plain = self._load()
        self._plain.no_truncation()
        self._plain.no_padding()
        # The truncating tokenizer is a second parse of tokenizer.json (~25 ms): made
        # only when a text is longer than the context (see tokenize).
        self._cutting: Tokenizer | None = None
        self._lock = threading.Lock()
        self.context_length = context_length
        self.pad_id = pad_id
        self.clean = clean
        self._clean_fn = CLEANERS[clean]
        self.strip_sep_id = strip_sep_id

    def _load(self) -> Tokenizer:
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises its own Exception subclasses
            raise ModelNotFoundError(
                f"cannot read the tokenizer {self.path}: {e}; re-export the model"
            ) from e

    def _truncating(self) -> Tokenizer:
        """The tokenizer with the model's truncation (what open_clip calls for texts
        longer than the context: special tokens kept, the text cut)."""
        with self._lock:
            if self._cutting is None:
                cutting = self._load()
                cutting.enable_truncation(max_length=self.context_length)
                self._cutting = cutting
            return self._cutting

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` needs, special tokens included, before any truncation."""
        return len(self._plain.encode(self._clean_fn(text)).ids)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``[n, context_length]`` and int64 ``[n]`` token counts before cutting."""
        clean = [self._clean_fn(t) for t in texts]
        encoded = [e.ids for e in self._plain.encode_batch(clean)]
        counts = np.array([len(e) for e in encoded], dtype=np.int64)
        # open_clip pads to the context on the right with pad_id: texts that fit are
        # their full encoding then padding; longer ones get the tokenizer's truncation.
        long = [i for i, n in enumerate(counts) if n > self.context_length]
        if long:
            cut = self._truncating().encode_batch([clean[i] for i in long])
            for i, encoding in zip(long, cut, strict=True):
                encoded[i] = encoding.ids
        ids = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int64)
        for row, row_ids in enumerate(encoded):
            if len(row_ids) > self.context_length:
                raise ConfigError(
                    f"the tokenizer {self.path} cut a text to {len(row_ids)} tokens, more "
                    f"than the {self.context_length}-token context; re-export the model"
                )
            ids[row, : len(row_ids)] = row_ids
        if self.strip_sep_id is not None:
            ids[ids == self.strip_sep_id] = 0
        return ids, counts

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenize(texts)[0]
