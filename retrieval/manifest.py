"""The manifest: the one JSON file that describes a committed version of an index.

An index directory holds many immutable manifests (``manifests/v000007.json``) and a
``CURRENT`` file naming the live one. A manifest lists every shard with its files, byte
sizes and sha256s, so a reader can pin a version and check it before trusting it. The
dataclasses here are shared by the reader (``clipsearch.retrieval.store``) and the writer
(``indexer``); both go through :func:`read_manifest` / :meth:`Manifest.to_dict`.

Layout (all paths in a manifest are relative to the index root)::

    CURRENT                      # "v000007.json\\n"
    manifests/v000007.json
    shards/s000042.faiss         # FAISS index, CPU form, ids = row offsets 0..rows-1
    shards/s000042.parquet       # metadata, row i describes vector i
    shards/s000042.f16.npy       # float16 [rows, dim] vectors for exact rescoring
    shards/s000042.lex/...       # optional: tantivy full-text index of the shard's text
                                 # fields (every file of it listed with size and hashes)
    tombstones/v000007.parquet   # row_id (int64), doc_id: every deleted row, cumulative
    errors/v000007-build.parquet # source, doc_id, stage, reason of skipped/flagged items
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipsearch.retrieval.encoders.base import EncoderFingerprint
from clipsearch.retrieval.errors import ConfigError, IndexFormatError, IndexNotFoundError

# Bump when a reader of the previous version could misread the new layout.
FORMAT_VERSION = 1
CURRENT_FILE = "CURRENT"
MANIFEST_DIR = "manifests"
SHARD_DIR = "shards"
TOMBSTONE_DIR = "tombstones"
ERRORS_DIR = "errors"
# Inner product on L2-normalised vectors, i.e. cosine similarity.
METRIC = "inner_product"
MODALITIES = ("image", "text")
# Fixed metadata columns, in order, before the user's own columns.
FIXED_COLUMNS = ("row_id", "doc_id", "modality", "source", "content_hash")

# Last key of a manifest file: "xxh3_128:<hex>" of the file's JSON without this key.
CHECKSUM_KEY = "checksum"

_VERSION_NAME = re.compile(r"^v(\d{6,})\.json$")
_CURRENT_FIX = (
    "it must hold the live manifest's file name: write the name of the newest manifest "
    f"in {MANIFEST_DIR}/ (e.g. 'v000007.json') back into it"
)


def version_name(version: int) -> str:
    """``7 -> "v000007"`` (the stem shared by a manifest, its tombstones and error files)."""
    return f"v{version:06d}"


def shard_name(number: int) -> str:
    """``42 -> "s000042"``; shard numbers are never reused within one index."""
    return f"s{number:06d}"


def manifest_path(version: int) -> str:
    """Path of a version's manifest relative to the index root."""
    return f"{MANIFEST_DIR}/{version_name(version)}.json"


def check_relative_path(path: str) -> str:
    """``path`` when it is a plain relative path that stays inside the index root.

    Refuses absolute paths, ``..`` components, backslashes and empty names (a manifest
    naming ``../../etc/passwd`` must never make a reader open it). Symlinks are checked
    by the reader (:func:`clipsearch.retrieval.store.resolve_in_root`), which knows the root.
    """
    norm = posixpath.normpath(path) if path else ""
    if (
        not path
        or "\\" in path
        or "\x00" in path
        or path.startswith("/")
        or norm != path
        or norm == "."
        or norm.split("/")[0] == ".."
    ):
        raise IndexFormatError(
            f"manifest path {path!r} leaves the index folder (or is not a plain relative "
            "path); the manifest is corrupt or hostile: restore the index from a backup"
        )
    return path


@dataclass(frozen=True, kw_only=True)
class FileRecord:
    """One file a manifest depends on."""

    # Path relative to the index root, with "/" separators; never leaves the root.
    path: str
    # Exact size in bytes; checked on every open.
    bytes: int
    # sha256 hex of the content; checked by `index verify` (the slow, strong check).
    sha256: str
    # XXH3-128 hex of the content (~10 GB/s, so every open can afford it); None in
    # manifests written before it existed: readers then check sha256 at open instead.
    xxh3: str | None = None

    def __post_init__(self) -> None:
        check_relative_path(self.path)
        if self.bytes < 0:
            raise IndexFormatError(f"{self.path}: negative byte size {self.bytes} in the manifest")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}
        if self.xxh3 is not None:
            d["xxh3_128"] = self.xxh3
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileRecord:
        xxh3 = d.get("xxh3_128")
        return cls(
            path=str(d["path"]),
            bytes=int(d["bytes"]),
            sha256=str(d["sha256"]),
            xxh3=None if xxh3 is None else str(xxh3),
        )


@dataclass(frozen=True, kw_only=True)
class IndexSpec:
    """How one shard's FAISS index was built and how it should be searched."""

    # What was asked for: "auto", "flat", "ivf", "ivfpq", "hnsw" or a factory string.
    requested: str
    # The FAISS factory string actually built ("Flat", "IVF256,Flat", "HNSW32", ...).
    factory: str
    # Search-time parameters, applied with faiss.ParameterSpace-style names:
    #   "nprobe" (IVF lists visited), "efSearch" (HNSW beam), and "k_factor": fetch
    #   k * k_factor candidates from FAISS, then rescore them exactly with the fp16
    #   vectors and keep the best k (1 = no re-ranking).
    search_params: dict[str, int] = field(default_factory=dict)
    # recall@10 measured against exact search on held-out vectors with these params;
    # None when the index is exact (flat) or too small to measure.
    measured_recall: float | None = None
    # The recall@10 the parameter tuning aimed for.
    target_recall: float | None = None
    # Every option the index was chosen and tuned with (``IndexOptions.to_dict()`` of
    # clipsearch.indexer.ann: index, target_recall, max_memory, flat_max_rows, ...), so
    # ``compact`` rebuilds a shard exactly as it was built. None in manifests written
    # before it was recorded (compact then keeps the index family of ``factory``).
    build_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.factory:
            raise ConfigError("IndexSpec.factory must be a FAISS factory string, got ''")
        for k, v in self.search_params.items():
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"search parameter {k}={v!r} must be a positive integer")

    @property
    def k_factor(self) -> int:
        return int(self.search_params.get("k_factor", 1))

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "factory": self.factory,
            "search_params": dict(self.search_params),
            "measured_recall": self.measured_recall,
            "target_recall": self.target_recall,
            **({} if self.build_options is None else {"build_options": dict(self.build_options)}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexSpec:
        recall = d.get("measured_recall")
        target = d.get("target_recall")
        options = d.get("build_options")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"index build_options must be an object, got {options!r}")
        return cls(
            requested=str(d["requested"]),
            factory=str(d["factory"]),
            search_params={str(k): int(v) for k, v in d.get("search_params", {}).items()},
            measured_recall=None if recall is None else float(recall),
            target_recall=None if target is None else float(target),
            build_options=None if options is None else dict(options),
        )


@dataclass(frozen=True, kw_only=True)
class LexicalRecord:
    """The lexical (full-text) part of a shard: a tantivy index in ``shards/<name>.lex/``.

    A tantivy index is a folder of files (segments plus ``meta.json``); every one of them
    is listed here with its size and hashes and checked like the shard's other files.
    """

    # Metadata columns whose text was indexed ("source" is the row's text for text rows).
    fields: tuple[str, ...]
    # Name and version of the analysis (tokenizers, stemming, CJK bigrams) the index was
    # written with; a reader refuses one it does not know (queries must be analysed alike).
    analyzer: str
    # Documents in the index (== the shard's rows; document i is row i).
    rows: int
    # Every file of the folder, sorted by path.
    files: tuple[FileRecord, ...]

    def __post_init__(self) -> None:
        if not self.files:
            raise IndexFormatError("a lexical index record lists no files")

    @property
    def folder(self) -> str:
        """The folder holding the files, relative to the index root."""
        return posixpath.dirname(self.files[0].path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fields": list(self.fields),
            "analyzer": self.analyzer,
            "rows": self.rows,
            "files": [f.to_dict() for f in self.files],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LexicalRecord:
        fields_ = d["fields"]
        if not isinstance(fields_, list):
            raise TypeError(f"lexical fields must be a list, got {fields_!r}")
        return cls(
            fields=tuple(str(f) for f in fields_),
            analyzer=str(d["analyzer"]),
            rows=int(d["rows"]),
            files=tuple(FileRecord.from_dict(f) for f in d["files"]),
        )


@dataclass(frozen=True, kw_only=True)
class ShardRecord:
    """One shard: vectors of one modality, with aligned metadata and a FAISS index."""

    # "s000042"; the stem of the shard's three files.
    name: str
    # "image" or "text".
    modality: str
    # Vectors in the shard (== FAISS ntotal == metadata rows == .npy rows).
    rows: int
    # row_id of the shard's first row; row i has row_id row_id_start + i.
    row_id_start: int
    # Vector dimension (== encoder dim).
    dim: int
    # How the FAISS index was built and should be searched.
    index: IndexSpec
    # The shard's files.
    faiss: FileRecord
    vectors: FileRecord
    metadata: FileRecord
    # The full-text index of the shard's text fields; None when the shard has none
    # (built without text fields, or by a clipsearch before hybrid search).
    lexical: LexicalRecord | None = None

    def __post_init__(self) -> None:
        if self.lexical is not None and self.lexical.rows != self.rows:
            raise IndexFormatError(
                f"shard {self.name}: lexical index has {self.lexical.rows} documents, the "
                f"shard {self.rows} rows"
            )
        if self.modality not in MODALITIES:
            raise ConfigError(f"shard {self.name}: modality must be one of {MODALITIES}")
        if self.rows < 0 or self.row_id_start < 0 or self.dim < 1:
            raise ConfigError(f"shard {self.name}: negative row count, row id or dim")

    @property
    def row_id_end(self) -> int:
        """One past the last row_id of the shard."""
        return self.row_id_start + self.rows

    @property
    def files(self) -> tuple[FileRecord, ...]:
        """Every file of the shard (the lexical index's files included)."""
        lexical = self.lexical.files if self.lexical is not None else ()
        return (self.faiss, self.vectors, self.metadata, *lexical)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modality": self.modality,
            "rows": self.rows,
            "row_id_start": self.row_id_start,
            "dim": self.dim,
            "index": self.index.to_dict(),
            "files": {
                "faiss": self.faiss.to_dict(),
                "vectors": self.vectors.to_dict(),
                "metadata": self.metadata.to_dict(),
            },
            # Absent (not null) without one, exactly as older manifests read.
            **({} if self.lexical is None else {"lexical": self.lexical.to_dict()}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardRecord:
        files = d["files"]
        return cls(
            name=str(d["name"]),
            modality=str(d["modality"]),
            rows=int(d["rows"]),
            row_id_start=int(d["row_id_start"]),
            dim=int(d["dim"]),
            index=IndexSpec.from_dict(d["index"]),
            faiss=FileRecord.from_dict(files["faiss"]),
            vectors=FileRecord.from_dict(files["vectors"]),
            metadata=FileRecord.from_dict(files["metadata"]),
            lexical=None if d.get("lexical") is None else LexicalRecord.from_dict(d["lexical"]),
        )


@dataclass(frozen=True, kw_only=True)
class ErrorReport:
    """The errors report of one build/add: items skipped or flagged, with the reason."""

    # The Parquet file (columns source, doc_id, stage, reason).
    file: FileRecord
    # Rows in the report.
    rows: int
    # The version the operation committed.
    version: int
    # "build" or "add".
    operation: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file.to_dict(),
            "rows": self.rows,
            "version": self.version,
            "operation": self.operation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ErrorReport:
        return cls(
            file=FileRecord.from_dict(d["file"]),
            rows=int(d["rows"]),
            version=int(d["version"]),
            operation=str(d["operation"]),
        )


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A committed version of an index. Immutable once written."""

    # On-disk format version (FORMAT_VERSION when written by this code).
    format_version: int = FORMAT_VERSION
    # This version's number (1, 2, ...); the manifest file is manifests/v{version:06d}.json.
    version: int
    # The version this one was derived from (None for the first).
    parent_version: int | None = None
    # ISO-8601 UTC time of the commit.
    created_at: str
    # What produced it: "build", "add", "delete", "compact".
    operation: str
    # The encoder every vector was produced with.
    encoder: EncoderFingerprint
    # Similarity of the stored vectors; always "inner_product" (cosine on unit vectors).
    metric: str = METRIC
    # Every live shard, in row_id order.
    shards: tuple[ShardRecord, ...] = ()
    # Cumulative deleted rows (row_id, doc_id), or None when nothing is deleted.
    tombstones: FileRecord | None = None
    # Rows in the tombstones file.
    n_tombstones: int = 0
    # Errors reports of the builds/adds whose shards are still live.
    errors: tuple[ErrorReport, ...] = ()
    # Next unused row id and shard number (never reused, even after compaction).
    next_row_id: int = 0
    next_shard: int = 0
    # Resolved absolute folders the indexed images came from (image folders, manifest
    # folders, the folders of absolute image paths outside them), minimal and sorted:
    # the service serves an image only from inside one of them. None when the manifest
    # was written by a clipsearch that did not record them (readers then infer a root).
    image_roots: tuple[str, ...] | None = None
    # Calibrated relevance thresholds of the encoder, ((direction, cosine), ...) such as
    # ("text->image", 0.344): what ``min_score="auto"`` resolves to, recorded at build
    # time from the model card so the index keeps them without the card. None when the
    # model has no calibration, or the manifest predates this field.
    relevance_thresholds: tuple[tuple[str, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.metric != METRIC:
            raise IndexFormatError(f"unsupported metric {self.metric!r}; expected {METRIC!r}")
        if self.version < 1:
            raise ConfigError(f"manifest version must be >= 1, got {self.version}")
        for root in self.image_roots or ():
            if not isinstance(root, str) or not root.startswith("/"):
                raise IndexFormatError(
                    f"image root {root!r} is not an absolute folder path; the manifest is "
                    "corrupt, rebuild the index with `clipsearch index build`"
                )
        for direction, value in self.relevance_thresholds or ():
            if not isinstance(direction, str) or "->" not in direction:
                raise IndexFormatError(
                    f"relevance threshold direction {direction!r} is not 'query->rows'; "
                    "the manifest is corrupt, rebuild the index with `clipsearch index build`"
                )
            if not (isinstance(value, float) and -1.0 <= value <= 1.0):
                raise IndexFormatError(
                    f"relevance threshold {value!r} for {direction} is not a cosine in "
                    "[-1, 1]; the manifest is corrupt, rebuild the index with "
                    "`clipsearch index build`"
                )

    def relevance_threshold(self, direction: str) -> float | None:
        """The calibrated relevance threshold for ``direction`` ("text->image", ...):
        the one recorded in this manifest, else the model card's for these very weights
        (indexes built before thresholds were recorded); None when neither has one."""
        for recorded, value in self.relevance_thresholds or ():
            if recorded == direction:
                return value
        from clipsearch.retrieval.models import calibrated_threshold

        return calibrated_threshold(self.encoder, direction)

    @property
    def name(self) -> str:
        """``"v000007"``."""
        return version_name(self.version)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def n_rows(self) -> int:
        """Stored rows including tombstoned ones."""
        return sum(s.rows for s in self.shards)

    @property
    def n_live(self) -> int:
        """Rows that searches can return."""
        return self.n_rows - self.n_tombstones

    @property
    def n_errors(self) -> int:
        return sum(e.rows for e in self.errors)

    def rows_by_modality(self) -> dict[str, int]:
        """Stored rows (tombstoned included) per modality."""
        out = dict.fromkeys(MODALITIES, 0)
        for s in self.shards:
            out[s.modality] += s.rows
        return out

    def files(self) -> tuple[FileRecord, ...]:
        """Every file this version references (shards, tombstones, errors reports)."""
        out = [f for s in self.shards for f in s.files]
        if self.tombstones is not None:
            out.append(self.tombstones)
        out.extend(e.file for e in self.errors)
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "version": self.version,
            "parent_version": self.parent_version,
            "created_at": self.created_at,
            "operation": self.operation,
            "encoder": self.encoder.to_dict(),
            "metric": self.metric,
            "next_row_id": self.next_row_id,
            "next_shard": self.next_shard,
            "counts": {
                "rows": self.n_rows,
                "live": self.n_live,
                "tombstones": self.n_tombstones,
                "errors": self.n_errors,
                "by_modality": self.rows_by_modality(),
            },
            "shards": [s.to_dict() for s in self.shards],
            "tombstones": None if self.tombstones is None else self.tombstones.to_dict(),
            "n_tombstones": self.n_tombstones,
            "errors": [e.to_dict() for e in self.errors],
            # Absent (not null) when unknown, exactly as older manifests read.
            **({} if self.image_roots is None else {"image_roots": list(self.image_roots)}),
            **(
                {}
                if self.relevance_thresholds is None
                else {"relevance_thresholds": dict(self.relevance_thresholds)}
            ),
        }

    def to_json(self) -> str:
        """The manifest file's text: ``to_dict()`` plus a last key ``checksum``, the
        XXH3-128 of the same JSON without it, so a reader detects a changed byte."""
        d = self.to_dict()
        d[CHECKSUM_KEY] = _manifest_checksum(d)
        return _dump(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        fmt = d.get("format_version")
        if fmt != FORMAT_VERSION:
            raise IndexFormatError(
                f"index format version {fmt!r} is not supported by this clipsearch "
                f"(it reads version {FORMAT_VERSION}); upgrade clipsearch or rebuild the index"
            )
        tomb = d.get("tombstones")
        parent = d.get("parent_version")
        roots = d.get("image_roots")
        if roots is not None and not isinstance(roots, list):
            raise TypeError(f"image_roots must be a list of folder paths, got {roots!r}")
        thresholds = d.get("relevance_thresholds")
        if thresholds is not None and not isinstance(thresholds, dict):
            raise TypeError(f"relevance_thresholds must be an object, got {thresholds!r}")
        return cls(
            format_version=int(fmt),
            version=int(d["version"]),
            parent_version=None if parent is None else int(parent),
            created_at=str(d["created_at"]),
            operation=str(d["operation"]),
            encoder=EncoderFingerprint.from_dict(d["encoder"]),
            metric=str(d["metric"]),
            shards=tuple(ShardRecord.from_dict(s) for s in d["shards"]),
            tombstones=None if tomb is None else FileRecord.from_dict(tomb),
            n_tombstones=int(d.get("n_tombstones", 0)),
            errors=tuple(ErrorReport.from_dict(e) for e in d.get("errors", [])),
            next_row_id=int(d["next_row_id"]),
            next_shard=int(d["next_shard"]),
            image_roots=None if roots is None else tuple(str(r) for r in roots),
            relevance_thresholds=None
            if thresholds is None
            else tuple((str(k), float(v)) for k, v in thresholds.items()),
        )


def _dump(d: dict[str, Any]) -> str:
    return json.dumps(d, indent=2, sort_keys=False) + "\n"


def _manifest_checksum(d: dict[str, Any]) -> str:
    import xxhash

    return "xxh3_128:" + xxhash.xxh3_128(_dump(d).encode("utf-8")).hexdigest()


def _check_manifest_checksum(text: str, data: dict[str, Any], where: str) -> None:
    """Compare a manifest's ``checksum`` with its content; manifests written before the
    checksum existed have none and are accepted (their shard files still carry sha256)."""
    if CHECKSUM_KEY not in data:
        return
    recorded = data.pop(CHECKSUM_KEY)
    expected = _manifest_checksum(data)
    # Byte-exact: the file must be what to_json wrote (a changed space is a changed byte).
    if recorded != expected or text != _dump({**data, CHECKSUM_KEY: recorded}):
        raise IndexFormatError(
            f"{where}: the manifest's content does not match its checksum (corrupt file); "
            "restore it from a backup or rebuild the index with `clipsearch index build`"
        )


def parse_manifest(text: str, *, where: str) -> Manifest:
    """Parse manifest JSON; ``where`` names the file in error messages."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, found {type(data).__name__}")
        if data.get("format_version") == FORMAT_VERSION:  # else from_dict says "upgrade"
            _check_manifest_checksum(text, data, where)
        return Manifest.from_dict(data)
    except IndexFormatError as e:
        if str(e).startswith(where):
            raise
        raise IndexFormatError(f"{where}: {e}") from e
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise IndexFormatError(
            f"{where}: not a valid clipsearch manifest ({type(e).__name__}: {e}); "
            "the index is corrupt, restore it or rebuild it with `clipsearch index build`"
        ) from e


def read_manifest(root: str | Path, version: int) -> Manifest:
    """Read one version's manifest from an index directory."""
    path = Path(root) / manifest_path(version)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise IndexFormatError(f"{path}: manifest of version {version} is missing") from e
    except UnicodeDecodeError as e:
        raise IndexFormatError(
            f"{path}: manifest of version {version} is not UTF-8 text (corrupt file at byte "
            f"{e.start}); restore it from a backup or rebuild the index"
        ) from e
    m = parse_manifest(text, where=str(path))
    if m.version != version:
        raise IndexFormatError(f"{path}: file says version {m.version}, expected {version}")
    return m


def current_version(root: str | Path) -> int | None:
    """The version ``CURRENT`` names, or None when the directory has no committed index."""
    root = Path(root)
    path = root / CURRENT_FILE
    try:
        # Exactly the name and an optional line end: any other byte is damage (a
        # changed byte must never pass as a harmless space).
        text = path.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise IndexFormatError(
            f"{path}: corrupt (a non-UTF-8 byte at offset {e.start}); {_CURRENT_FIX}"
        ) from e
    m = _VERSION_NAME.match(text)
    if not m:
        raise IndexFormatError(
            f"{path}: expected a manifest name like 'v000007.json', found {text[:60]!r} "
            f"(corrupt file); {_CURRENT_FIX}"
        )
    return int(m.group(1))


def read_current(root: str | Path) -> Manifest:
    """The live manifest of an index; raises IndexNotFoundError when there is none."""
    root = Path(root)
    if not root.exists():
        raise IndexNotFoundError(
            f"{root}: no such directory; build an index with `clipsearch index build ... --out {root}`"
        )
    version = current_version(root)
    if version is None:
        raise IndexNotFoundError(
            f"{root}: not a clipsearch index (no {CURRENT_FILE} file); "
            f"build one with `clipsearch index build ... --out {root}`"
        )
    return read_manifest(root, version)


def list_versions(root: str | Path) -> list[int]:
    """Every version with a manifest file in ``root``, ascending."""
    mdir = Path(root) / MANIFEST_DIR
    if not mdir.is_dir():
        return []
    out = []
    for p in mdir.iterdir():
        m = _VERSION_NAME.match(p.name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)
