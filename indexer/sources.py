"""Corpus sources: image folders, Parquet/CSV/JSONL manifests and plain text files.

``scan_sources`` turns the paths a user passes into a deterministic list of
:class:`Item` (one per vector to compute) plus the problems found while reading them
(missing ids, duplicate ids, metadata of the wrong type...), which become rows of the
errors report instead of aborting the build. It also returns a fingerprint of the
inputs, which keys resumable builds: a rerun over unchanged inputs resumes.

* A folder yields one image item per file with an allowed extension, recursively, in
  sorted order; ``doc_id`` is the path relative to the folder. Symlinks (to files or
  folders) are followed only when they resolve inside the folder.
* A manifest (``.parquet``, ``.csv``, ``.jsonl``/``.ndjson``) yields, per row, an image
  item (``image_col``; paths relative to the manifest's folder or absolute) and one text
  item per ``text_cols`` entry, all sharing the row's ``doc_id`` (``id_col``). The other
  columns become metadata; untyped CSV/JSONL columns get the type most of their values
  have, and rows whose value does not fit are reported and skipped.
* A ``.txt`` file yields one text item per line; ``doc_id`` is ``<file name>:<line>``.

The scan also names the folders the images come from (:attr:`SourceScan.image_roots`,
recorded in the manifest so the service serves images from nowhere else): each image
folder and each manifest's folder. The folders of manifest images that resolve outside
those are added by the build only for images that were actually indexed
(:func:`outside_folders`), so a row naming ``/etc/passwd`` never makes ``/etc`` a root.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipsearch.retrieval.errors import ConfigError, SourceError
from clipsearch.retrieval.manifest import FIXED_COLUMNS

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

# The extensions every Pillow build decodes; the default allowlist is wider (see
# decodable_extensions), this is the floor it never goes below.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# Formats Pillow registers but cannot decode by itself: identify-only stubs that need a
# handler the user installs (BUFR, GRIB, HDF5), MPEG (identify only), WMF/EMF (load only
# on Windows).
_UNDECODABLE_FORMATS = frozenset({"BUFR", "GRIB", "HDF5", "MPEG", "WMF"})
MANIFEST_EXTENSIONS = (".parquet", ".csv", ".jsonl", ".ndjson")
TEXT_EXTENSIONS = (".txt",)
DUPLICATE_POLICIES = ("reject", "last", "group")
# Image roots a manifest records at most before the deepest ones are replaced by their
# parents (a catalog with one folder per product must not list a million folders).
MAX_IMAGE_ROOTS = 64
# Never widen a root by lifting it to a folder with fewer path parts ("/", "/home").
_MIN_LIFTED_PARTS = 3


@dataclass(frozen=True, kw_only=True)
class SourceOptions:
    """How manifests map onto items, and how duplicate ids are handled."""

    # Manifest column holding image paths (relative to the manifest's folder, or absolute).
    image_col: str | None = None
    # Manifest columns holding texts; each non-empty one yields a text row.
    text_cols: tuple[str, ...] = ()
    # Manifest column holding the document id; default: the image path, else "<file>#<row>".
    id_col: str | None = None
    # A doc_id seen twice: "reject" keeps the first and reports the later ones; "last" keeps
    # the last and reports the earlier ones (each dropped record is reported); "group"
    # keeps every record as rows of one document (a product with several photos, one row
    # per photo), indexing an identical item (same modality and source) only once.
    on_duplicate: str = "reject"
    # File extensions (lower case, with dot) taken from image folders; None: every
    # extension this Pillow can decode (decodable_extensions()). Narrow it to index only
    # some formats, e.g. (".jpg", ".jpeg", ".png").
    extensions: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.on_duplicate not in DUPLICATE_POLICIES:
            raise ConfigError(
                f"on_duplicate must be one of {DUPLICATE_POLICIES}, got {self.on_duplicate!r}"
            )
        if self.extensions is not None:
            if not self.extensions:
                raise ConfigError("the image extension allowlist is empty")
            bad = [e for e in self.extensions if not e.startswith(".") or e != e.lower()]
            if bad:
                raise ConfigError(
                    f"image extensions must be lower case and start with a dot, got {bad} "
                    "(e.g. .jpg,.png)"
                )

    @property
    def allowed_extensions(self) -> tuple[str, ...]:
        """The allowlist in effect (the default resolved against this Pillow)."""
        return self.extensions if self.extensions is not None else decodable_extensions()

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_col": self.image_col,
            "text_cols": list(self.text_cols),
            "id_col": self.id_col,
            "on_duplicate": self.on_duplicate,
            "extensions": list(self.allowed_extensions),
        }


_DECODABLE: tuple[str, ...] | None = None


def decodable_extensions() -> tuple[str, ...]:
    """Every file extension the installed Pillow can decode, sorted.

    Pillow's registered extensions, minus formats it only writes (PDF, Palm) and formats
    it only identifies (see ``_UNDECODABLE_FORMATS``); EPS only when Ghostscript is
    installed. MPO photos are opened by the JPEG plugin, so ``.mpo`` counts.
    """
    global _DECODABLE
    if _DECODABLE is None:
        from PIL import EpsImagePlugin, Image

        Image.init()
        opens = set(Image.OPEN) | {"MPO"}
        skip = set(_UNDECODABLE_FORMATS)
        if not EpsImagePlugin.has_ghostscript():
            skip.add("EPS")
        found = {
            ext.lower()
            for ext, fmt in Image.registered_extensions().items()
            if fmt in opens and fmt not in skip
        }
        _DECODABLE = tuple(sorted(found | set(IMAGE_EXTENSIONS)))
    return _DECODABLE


@dataclass(frozen=True, kw_only=True)
class Item:
    """One vector to compute."""

    doc_id: str
    # "image" or "text".
    modality: str
    # Images: absolute path; texts: the text itself (the `source` metadata column).
    source: str
    # User metadata of the record (column -> value, already of the column's type).
    metadata: dict[str, Any] = field(default_factory=dict)
    # Where the record came from, for messages: "products.csv row 12", "photos/a.jpg".
    origin: str = ""


@dataclass(frozen=True, kw_only=True)
class Problem:
    """A record or item that is skipped (or flagged) and goes to the errors report."""

    source: str
    doc_id: str
    # "scan" (ids, duplicates, metadata types, missing values), "read", "decode", "text".
    stage: str
    reason: str
    # "skipped" (no row indexed) or "kept" (indexed, but flagged, e.g. a truncated text).
    action: str = "skipped"
    # Items (would-be rows) this problem accounts for; not part of the report.
    n_items: int = 1

    def to_dict(self) -> dict[str, str]:
        return {
            "source": self.source,
            "doc_id": self.doc_id,
            "stage": self.stage,
            "reason": self.reason,
            "action": self.action,
        }


@dataclass
class SourceScan:
    """The result of reading every source."""

    # Items in a deterministic order: all image items, then all text items.
    items: list[Item]
    # Records/items dropped while scanning (they count as input that was skipped).
    problems: list[Problem]
    # Arrow schema of the user metadata columns (shared by every item).
    schema: pa.Schema
    # sha256 over the sources' identities, sizes and mtimes and the options.
    fingerprint: str
    # Files not taken from folders (wrong extension, symlink leaving the folder).
    ignored: int = 0
    # Of those, per reason: ".tga" (extension outside the allowlist; "(none)" for files
    # without one) or "symlink outside the folder" -> files.
    not_considered: dict[str, int] = field(default_factory=dict)
    # Resolved absolute image folders and manifest folders the sources name (the
    # build adds the folders of indexed images lying outside them; see outside_folders).
    image_roots: tuple[str, ...] = ()

    @property
    def n_input(self) -> int:
        """Items offered by the sources (indexed + skipped at any stage)."""
        return len(self.items) + sum(p.n_items for p in self.problems if p.action == "skipped")


@dataclass
class _Record:
    doc_id: str
    items: list[Item]
    origin: str


def scan_sources(paths: list[str | Path], options: SourceOptions) -> SourceScan:
    """Read every source path into items, problems, a metadata schema and a fingerprint."""
    import pyarrow as pa

    if not paths:
        raise SourceError("no sources given; pass image folders, manifests or text files")
    digest = hashlib.sha256(json.dumps(options.to_dict(), sort_keys=True).encode())
    records: list[_Record] = []
    problems: list[Problem] = []
    fields: dict[str, pa.DataType] = {}
    not_considered: Counter[str] = Counter()
    roots: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise SourceError(f"{path}: no such file or folder; check the source path")
        digest.update(f"\0{path.resolve()}".encode())
        if path.is_dir():
            recs, skipped_files = _scan_folder(path, options, digest)
            not_considered.update(skipped_files)
            records.extend(recs)
            if recs:
                roots.append(str(path.resolve()))
            continue
        suffix = path.suffix.lower()
        st = path.stat()
        digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        if suffix in TEXT_EXTENSIONS:
            recs, probs = _scan_text_file(path)
        elif suffix in MANIFEST_EXTENSIONS:
            recs, probs, schema = _scan_manifest(path, options)
            roots.extend(_manifest_image_folders(path, recs))
            for f in schema:
                if f.name in fields and fields[f.name] != f.type:
                    raise SourceError(
                        f"{path}: column {f.name!r} is {f.type} here but {fields[f.name]} in an "
                        "earlier source; make the types agree"
                    )
                fields[f.name] = f.type
        else:
            raise SourceError(
                f"{path}: unknown source type {suffix!r}; pass a folder of images, a "
                f"manifest ({', '.join(MANIFEST_EXTENSIONS)}) or a .txt file (one text per line)"
            )
        records.extend(recs)
        problems.extend(probs)
    records = _resolve_duplicates(records, options.on_duplicate, problems)
    items = [it for r in records for it in r.items]
    items.sort(key=lambda it: it.modality != "image")  # stable: images first, then texts
    return SourceScan(
        items=items,
        problems=problems,
        schema=pa.schema(list(fields.items())),
        fingerprint=digest.hexdigest(),
        ignored=sum(not_considered.values()),
        not_considered=dict(not_considered.most_common()),
        image_roots=covering_folders(roots),
    )


def _manifest_image_folders(path: Path, records: list[_Record]) -> list[str]:
    """The manifest's resolved folder when it names local images. Folders of images
    outside it are added by the build once those images are indexed (outside_folders)."""
    if any(it.modality == "image" and not _is_url(it.source) for r in records for it in r.items):
        return [os.path.realpath(path.parent)]
    return []


def outside_folders(sources: list[str], roots: tuple[str, ...]) -> set[str]:
    """The resolved folders of the local image ``sources`` that lie outside every root
    (an absolute path elsewhere, or a symlink leading out). URLs have no folder."""
    prefixes = tuple(r.rstrip(os.sep) + os.sep for r in roots)
    out = set()
    for source in sources:
        if _is_url(source):
            continue
        real = os.path.realpath(source)
        if not real.startswith(prefixes):
            out.add(os.path.dirname(real))
    return out


def _is_url(source: str) -> bool:
    from clipsearch.indexer.fetch import url_scheme

    return url_scheme(source) is not None


def covering_folders(folders: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The smallest sorted set of the given absolute folders covering all of them.

    A folder inside another listed one is dropped. While more than
    :data:`MAX_IMAGE_ROOTS` remain, the deepest ones are replaced by their parents (never
    by ``/`` or a folder one level below it), so a catalog with a folder per product
    records the folder of those folders instead of each.
    """
    parts = _prune_nested({Path(f).parts for f in folders})
    while len(parts) > MAX_IMAGE_ROOTS:
        deepest = max(len(p) for p in parts)
        if deepest - 1 < _MIN_LIFTED_PARTS:
            break
        parts = _prune_nested({p[:-1] if len(p) == deepest else p for p in parts})
    return tuple(str(Path(*p)) for p in parts)


def _prune_nested(folders: set[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Drop every folder inside another; in sorted part order a folder's descendants
    follow it directly."""
    kept: list[tuple[str, ...]] = []
    for p in sorted(folders):
        if kept and p[: len(kept[-1])] == kept[-1]:
            continue
        kept.append(p)
    return kept


def _scan_folder(
    root: Path, options: SourceOptions, digest: Any
) -> tuple[list[_Record], Counter[str]]:
    real_root = root.resolve()
    allowed = set(options.allowed_extensions)
    found: list[tuple[str, Path]] = []
    ignored: Counter[str] = Counter()
    seen_dirs: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real_here = here.resolve()
        if real_here in seen_dirs or not real_here.is_relative_to(real_root):
            dirnames[:] = []
            continue
        seen_dirs.add(real_here)
        dirnames.sort()
        for name in filenames:
            p = here / name
            suffix = p.suffix.lower()
            if suffix not in allowed:
                ignored[suffix or "(none)"] += 1
                continue
            real = p.resolve()
            if not real.is_relative_to(real_root):
                log.info("ignoring %s: symlink leads outside %s", p, root)
                ignored["symlink outside the folder"] += 1
                continue
            found.append((p.relative_to(root).as_posix(), real))
    found.sort()
    records = []
    for rel, real in found:
        try:
            st = real.stat()
            digest.update(f"\0{rel}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            digest.update(f"\0{rel}:?".encode())
        item = Item(doc_id=rel, modality="image", source=str(real), origin=str(root / rel))
        records.append(_Record(doc_id=rel, items=[item], origin=item.origin))
    log.info("%s: %d images, %d files not considered", root, len(records), ignored.total())
    return records, ignored


def _scan_text_file(path: Path) -> tuple[list[_Record], list[Problem]]:
    records, problems = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            text = line.rstrip("\r\n")
            doc_id = f"{path.name}:{lineno}"
            origin = f"{path} line {lineno}"
            if not text.strip():
                problems.append(
                    Problem(source=origin, doc_id=doc_id, stage="text", reason="empty text")
                )
                continue
            item = Item(doc_id=doc_id, modality="text", source=text, origin=origin)
            records.append(_Record(doc_id=doc_id, items=[item], origin=origin))
    return records, problems


def _read_manifest_rows(path: Path) -> tuple[list[dict[str, Any]], pa.Schema | None, list[Problem]]:
    """Rows as dicts; a schema when the format is typed (Parquet); unparseable lines."""
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    problems: list[Problem] = []
    try:
        if suffix == ".parquet":
            table = pq.read_table(path)
            return table.to_pylist(), table.schema, problems
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                csv_rows = []
                for r in reader:
                    if None in r:  # more fields than the header (an unquoted comma)
                        problems.append(
                            Problem(
                                source=f"{path} line {reader.line_num}",
                                doc_id="",
                                stage="scan",
                                reason=f"row has more fields than the header's "
                                f"{len(reader.fieldnames or [])}; quote values holding commas",
                            )
                        )
                        continue
                    csv_rows.append(dict(r))
                return csv_rows, None, problems
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append(
                        Problem(
                            source=f"{path} line {lineno}",
                            doc_id="",
                            stage="scan",
                            reason=f"invalid JSON: {e}",
                        )
                    )
                    continue
                if not isinstance(obj, dict):
                    problems.append(
                        Problem(
                            source=f"{path} line {lineno}",
                            doc_id="",
                            stage="scan",
                            reason="line is not a JSON object",
                        )
                    )
                    continue
                rows.append(obj)
        return rows, None, problems
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SourceError(f"{path}: cannot read manifest ({e})") from e
    except Exception as e:  # pyarrow raises ArrowInvalid for a broken Parquet file
        raise SourceError(f"{path}: cannot read manifest ({type(e).__name__}: {e})") from e


def _scan_manifest(
    path: Path, options: SourceOptions
) -> tuple[list[_Record], list[Problem], pa.Schema]:
    import pyarrow as pa

    rows, typed_schema, problems = _read_manifest_rows(path)
    columns: list[str] = list(typed_schema.names) if typed_schema is not None else []
    for r in rows:
        columns.extend(c for c in r if c not in columns)
    wanted = [c for c in (options.image_col, options.id_col, *options.text_cols) if c]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise SourceError(
            f"{path}: no column(s) {missing}; the manifest has {columns[:20]}; "
            "fix --image-col/--text-col/--id-col"
        )
    if not options.image_col and not options.text_cols:
        raise SourceError(
            f"{path}: a manifest needs --image-col and/or --text-col (columns: {columns[:20]})"
        )
    meta_cols = [c for c in columns if c not in (options.image_col, options.id_col)]
    clash = [c for c in meta_cols if c in FIXED_COLUMNS]
    if clash:
        raise SourceError(
            f"{path}: column(s) {clash} clash with clipsearch's fixed columns "
            f"{list(FIXED_COLUMNS)}; rename them in the manifest"
        )
    if typed_schema is not None:
        schema = pa.schema([typed_schema.field(c) for c in meta_cols])
        converters: dict[str, Any] = {}
    else:
        schema, converters = _infer_schema(rows, meta_cols)
    records = []
    for i, row in enumerate(rows, start=1):
        origin = f"{path} row {i}"
        rec, found = _manifest_record(row, origin, path, options, meta_cols, converters)
        problems.extend(found)
        if rec is not None:
            records.append(rec)
    return records, problems, schema


def _manifest_record(
    row: dict[str, Any],
    origin: str,
    path: Path,
    options: SourceOptions,
    meta_cols: list[str],
    converters: dict[str, Any],
) -> tuple[_Record | None, list[Problem]]:
    image = row.get(options.image_col) if options.image_col else None
    would_be = (1 if image not in (None, "") else 0) + sum(
        1 for c in options.text_cols if row.get(c) is not None and str(row.get(c)).strip()
    )
    n_items = max(1, would_be)
    if options.id_col:
        raw_id = row.get(options.id_col)
        doc_id = "" if raw_id is None else str(raw_id).strip()
        if not doc_id:
            return None, [
                Problem(
                    source=origin,
                    doc_id="",
                    stage="scan",
                    reason=f"empty id column {options.id_col!r}",
                    n_items=n_items,
                )
            ]
    elif image not in (None, ""):
        doc_id = str(image)
    else:
        doc_id = f"{path.name}#{origin.rsplit(' ', 1)[-1]}"
    metadata: dict[str, Any] = {}
    for c in meta_cols:
        value = row.get(c)
        conv = converters.get(c)
        if conv is not None and value is not None and value != "":
            try:
                value = conv(value)
            except (ValueError, TypeError):
                return None, [
                    Problem(
                        source=origin,
                        doc_id=doc_id,
                        stage="scan",
                        reason=f"column {c!r}: {value!r} is not a {conv.__name__} like the column's other values",
                        n_items=n_items,
                    )
                ]
        elif conv is not None:
            value = None
        metadata[c] = value
    items: list[Item] = []
    problems: list[Problem] = []
    if options.image_col:
        if image in (None, ""):
            problems.append(
                Problem(
                    source=origin,
                    doc_id=doc_id,
                    stage="scan",
                    reason=f"empty image column {options.image_col!r}",
                )
            )
        else:
            source = _image_source(str(image).strip(), path)
            if source.startswith("!"):
                problems.append(
                    Problem(source=origin, doc_id=doc_id, stage="scan", reason=source[1:])
                )
            else:
                items.append(
                    Item(
                        doc_id=doc_id,
                        modality="image",
                        source=source,
                        metadata=metadata,
                        origin=origin,
                    )
                )
    for col in options.text_cols:
        text = row.get(col)
        if text is None or not str(text).strip():
            problems.append(
                Problem(
                    source=origin,
                    doc_id=doc_id,
                    stage="text",
                    reason=f"empty text in column {col!r}",
                )
            )
            continue
        items.append(
            Item(doc_id=doc_id, modality="text", source=str(text), metadata=metadata, origin=origin)
        )
    return (_Record(doc_id=doc_id, items=items, origin=origin) if items else None), problems


def _image_source(value: str, manifest: Path) -> str:
    """A manifest's image cell as an item source: an http(s) URL as is, a path made
    absolute against the manifest's folder; ``"!<reason>"`` for an unsupported URL."""
    from clipsearch.indexer.fetch import url_scheme
    from clipsearch.retrieval.netguard import SCHEMES

    scheme = url_scheme(value)
    if scheme in SCHEMES:
        return value
    if scheme is not None:
        return (
            f"!unsupported image URL scheme {scheme!r}; use an http(s) URL or a local path "
            "(download the files first)"
        )
    if value.lower().startswith("data:"):
        return "!data: URLs are not supported; save the image to a file and list its path"
    p = Path(value)
    return str((p if p.is_absolute() else manifest.parent / p).absolute())


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "yes", "1"):
        return True
    if s in ("false", "no", "0"):
        return False
    raise ValueError(v)


def _int(v: Any) -> int:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(v)
    if isinstance(v, str):
        return int(v.strip())
    if isinstance(v, int | float):
        return int(v)
    raise TypeError(v)


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(v)
    if isinstance(v, str | int | float):
        return float(v)
    raise TypeError(v)


def _str(v: Any) -> str:
    if isinstance(v, dict | list):
        return json.dumps(v, sort_keys=True)
    return str(v)


_bool.__name__, _int.__name__, _float.__name__, _str.__name__ = "bool", "int64", "float64", "string"


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        s = v.strip()
        for kind, conv in (("int", int), ("float", float)):
            try:
                conv(s)
            except ValueError:
                continue
            return kind
        if s.lower() in ("true", "false"):
            return "bool"
    return "string"


def _infer_schema(rows: list[dict[str, Any]], cols: list[str]) -> tuple[pa.Schema, dict[str, Any]]:
    """Per column, the type most non-empty values have (ints count as floats when floats
    are present); values that do not fit are rejected row by row."""
    import pyarrow as pa

    types = {
        "bool": (pa.bool_(), _bool),
        "int": (pa.int64(), _int),
        "float": (pa.float64(), _float),
        "string": (pa.string(), _str),
    }
    fields, converters = [], {}
    for c in cols:
        kinds = Counter(_kind(r[c]) for r in rows if r.get(c) not in (None, ""))
        if kinds["float"]:
            kinds["float"] += kinds.pop("int", 0)
        kind = kinds.most_common(1)[0][0] if kinds else "string"
        arrow_type, conv = types[kind]
        fields.append(pa.field(c, arrow_type))
        converters[c] = conv
    return pa.schema(fields), converters


def _resolve_duplicates(
    records: list[_Record], policy: str, problems: list[Problem]
) -> list[_Record]:
    if policy == "group":
        return _group_duplicates(records)
    by_id: dict[str, int] = {}
    keep: list[_Record | None] = []
    for rec in records:
        earlier = by_id.get(rec.doc_id)
        if earlier is None:
            by_id[rec.doc_id] = len(keep)
            keep.append(rec)
            continue
        first = keep[earlier]
        assert first is not None  # internal invariant: by_id only points at kept records
        if policy == "reject":
            problems.append(
                Problem(
                    source=rec.origin,
                    doc_id=rec.doc_id,
                    stage="scan",
                    reason=f"duplicate doc_id, first seen at {first.origin}; rejected (use --on-duplicate last to keep the last)",
                    n_items=len(rec.items),
                )
            )
            continue
        problems.append(
            Problem(
                source=first.origin,
                doc_id=rec.doc_id,
                stage="scan",
                reason=f"duplicate doc_id, superseded by {rec.origin} (--on-duplicate last)",
                n_items=len(first.items),
            )
        )
        keep[earlier] = None
        by_id[rec.doc_id] = len(keep)
        keep.append(rec)
    return [r for r in keep if r is not None]


def iter_doc_ids(scan: SourceScan) -> Iterator[str]:
    """Distinct doc ids of the scan's items, in order."""
    seen: set[str] = set()
    for it in scan.items:
        if it.doc_id not in seen:
            seen.add(it.doc_id)
            yield it.doc_id


def _group_duplicates(records: list[_Record]) -> list[_Record]:
    """Keep every record; drop items repeating one already kept for the same document."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for rec in records:
        items = []
        for it in rec.items:
            key = (it.doc_id, it.modality, it.source)
            if key not in seen:
                seen.add(key)
                items.append(it)
        if items:
            out.append(_Record(doc_id=rec.doc_id, items=items, origin=rec.origin))
    return out
