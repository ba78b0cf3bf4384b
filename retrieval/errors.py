"""The clipsearch exception family.

Every error a user can cause subclasses both ``ClipsearchError`` (so a backend can catch
all of ours at once) and the matching built-in (so ``except ValueError`` keeps working).
Messages say what went wrong, where, and how to fix it.
"""

from __future__ import annotations

import os


class ClipsearchError(Exception):
    """Base class of every error clipsearch raises on purpose."""


class ConfigError(ClipsearchError, ValueError):
    """An option or configuration value is invalid (bad batch size, unknown preset...)."""


class ModelNotFoundError(ClipsearchError, FileNotFoundError):
    """Encoder weights could not be found locally and could not be downloaded."""


class ImageDecodeError(ClipsearchError, ValueError):
    """An image could not be decoded, or is unsafe to decode (bomb, absurd size)."""


class FingerprintMismatchError(ClipsearchError, ValueError):
    """The encoder does not match the one an index was built with."""


class IndexFormatError(ClipsearchError, ValueError):
    """An index directory is missing files, corrupt, or of an unknown format version."""


class IndexNotFoundError(ClipsearchError, FileNotFoundError):
    """No index exists at the given path."""


class IndexLockedError(ClipsearchError, RuntimeError):
    """Another writer holds the index lock."""


class FilterError(ClipsearchError, ValueError):
    """A filter expression is malformed, names an unknown column, or mistypes a value."""


class QueryError(ClipsearchError, ValueError):
    """A query is malformed (empty, bad k, unknown modality...)."""


class SourceError(ClipsearchError, ValueError):
    """A corpus source (folder, manifest, text file) cannot be read as configured."""


class InvalidOptionError(QueryError):
    """A search option has a bad value, or is not an option at all.

    ``option`` names it ("k", "offset", "boosts", ...), so a surface can map it onto its
    own error codes (the HTTP API answers k_out_of_range for "k"); the message names it
    too, with the allowed values.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        # The SearchOptions field (or the unknown name) the error is about.
        self.option = option


class IndexWriteError(ClipsearchError, OSError):
    """Writing an index file failed (disk full, read-only filesystem, no permission).

    An ``OSError`` (``errno`` and ``filename`` are set) whose message says what failed,
    where, and how to fix it. The operation wrote nothing under a final name that a
    committed version depends on, so the previous version stays live.
    """

    def __init__(self, message: str, *, code: int, path: str | os.PathLike[str]) -> None:
        super().__init__(code, message, str(path))
        self.message = message

    def __str__(self) -> str:
        return self.message
