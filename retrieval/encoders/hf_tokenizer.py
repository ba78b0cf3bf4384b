"""Hugging Face text towers' tokenizers without torch or transformers.

open_clip's ``HFTokenizer`` cleans each text (``whitespace`` by default), then calls a
transformers fast tokenizer with ``max_length=context_length, padding="max_length",
truncation=True``. A fast tokenizer is the ``tokenizers`` library running the
``tokenizer.json`` of the model, so loading that same file with ``tokenizers`` (a small
Rust extension, no torch) and asking for the same padding and truncation gives the same
ids. ONNX exports copy ``tokenizer.json`` next to the graphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipsearch.retrieval.encoders.bpe import CLEAN_MODES, CLEANERS
from clipsearch.retrieval.errors import ConfigError, ModelNotFoundError

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
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ConfigError(
                "this model's tokenizer needs the `tokenizers` package: pip install tokenizers"
            ) from e
        if clean not in CLEANERS:
            raise ConfigError(f"unknown tokenizer clean mode {clean!r}; expected {CLEAN_MODES}")
        try:
            self._plain = Tokenizer.from_file(str(path))
            self._fixed = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception subclasses
            raise ModelNotFoundError(
                f"cannot read the tokenizer {path}: {e}; re-export the model"
            ) from e
        self._plain.no_truncation()
        self._plain.no_padding()
        self._fixed.enable_truncation(max_length=context_length)
        self._fixed.enable_padding(length=context_length, pad_id=pad_id)
        self.context_length = context_length
        self.clean = clean
        self._clean_fn = CLEANERS[clean]
        self.strip_sep_id = strip_sep_id

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` needs, special tokens included, before any truncation."""
        return len(self._plain.encode(self._clean_fn(text)).ids)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``[n, context_length]`` and int64 ``[n]`` token counts before cutting."""
        clean = [self._clean_fn(t) for t in texts]
        ids = np.array([e.ids for e in self._fixed.encode_batch(clean)], dtype=np.int64)
        ids = ids.reshape(len(texts), self.context_length)
        if self.strip_sep_id is not None:
            ids[ids == self.strip_sep_id] = 0
        counts = np.array([len(e.ids) for e in self._plain.encode_batch(clean)], dtype=np.int64)
        return ids, counts

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenize(texts)[0]
