"""The lexical (full-text) side of a shard: BM25 over its text fields, on tantivy.

A shard may carry ``shards/<name>.lex/``: a tantivy index with one document per row
(document i is row i, kept in the fast field ``row``), written by
:mod:`clipsearch.indexer.lexical` over the shard's chosen text fields. This module
defines that format (schema, analysis) and reads it: :class:`LexicalIndex` answers a
text query with BM25 scores per local row, under the same :class:`AllowedRows` mask the
vector side uses, so filters and tombstones hold on both sides.

Analysis (``ANALYZER``), applied alike to documents and queries:

* ``words``: tantivy's simple tokenizer (runs of letters and digits), lower case,
  tokens over 40 bytes dropped, English Snowball stemming ("mugs" -> "mug",
  "striped" -> "stripe"). "SKU-000102" gives "sku" and "000102".
* ``cjk``: runs of Chinese, Japanese and Korean characters become overlapping
  character bigrams ("马克杯" -> "马克", "克杯"), a lone character stays a unigram. Bigrams
  need no dictionary and find every word a shopper types, at the cost of some spurious
  pairs across word boundaries (BM25 weighs those down: they are rare in queries and
  common nowhere). Word segmentation (jieba) would add a 20 MB dictionary and a second
  tokenizer whose errors the query side must repeat; bigrams are what Lucene's CJK
  analyzer does.

Query semantics (per shard, BM25 with tantivy's k1 = 1.2, b = 0.75,
idf = ln(1 + (N - n + 0.5) / (n + 0.5))):

* every distinct query token is a term; a row's score is the sum of its terms' BM25;
* *common* terms (in more than ``COMMON_TERM_SHARE`` of the shard's rows, e.g. "sku" when
  every row has a SKU) only add to the score of rows that match a rarer term, as Lucene's
  common-terms query does, so "SKU-000102" returns that product and not every row;
* a word the shard does not know (a misspelling: "nortwind") matches words within one
  edit (two from 8 characters on) of it or of its stem at the constant score
  ``FUZZY_SCORE``; when nothing
  matches it (nor another rare term), the query matches nothing rather than every row
  holding its common terms ("SKU-999999" returns no row, not every SKU).

Filters: the shard's scalar metadata columns (numbers, booleans, short strings) are
indexed too, unscored, one tantivy field each (``FILTERS_FILE`` in the folder maps columns
to fields). A selective filter's comparisons, ranges and IN lists become a clause inside
tantivy (:func:`filter_clause`), which matches a superset of the filter's rows (parts it
cannot express, such as ``contains`` or ``not``, match every row); the hits are then
checked against the exact :class:`AllowedRows` mask, so the results are those of the
mask alone. Lexical parts written before carry no such fields and use the other two
paths (a term set of the allowed rows, or skipping the hits outside the mask).

Importing this module is cheap; tantivy is imported on first use (``hybrid`` extra).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.retrieval.errors import ConfigError, IndexFormatError

if TYPE_CHECKING:
    import pyarrow as pa

    from clipsearch.retrieval.filters import Node
    from clipsearch.retrieval.manifest import LexicalRecord
    from clipsearch.retrieval.planner import AllowedRows

log = logging.getLogger(__name__)

# Name and version of the analysis below; a change in tokenization bumps it.
ANALYZER = "clipsearch-bm25-v2"
# Suffix of a shard's lexical folder: shards/s000042.lex/.
LEXICAL_SUFFIX = ".lex"
# tantivy fields: analysed words, CJK bigrams, and the shard-local row (fast field).
FIELD_WORDS = "words"
FIELD_CJK = "cjk"
FIELD_ROW = "row"
# tantivy names under which the two analyzers are registered on an index.
WORDS_TOKENIZER = "clipsearch_words"
CJK_TOKENIZER = "clipsearch_cjk"
# A term in more than this share of a shard's rows only scores rows matching a rarer one.
COMMON_TERM_SHARE = 0.5
# Score of a fuzzy (misspelt word) match: about the BM25 of a word in a tenth of the rows.
FUZZY_SCORE = 1.0
# Words shorter than this are never matched fuzzily ("mg" is not a misspelt "mug").
FUZZY_MIN_CHARS = 4
# Misspelt words this long or longer match words two edits away (shorter: one edit).
FUZZY_TWO_EDITS_CHARS = 8
# Filters: a selective one is applied inside tantivy as a set of row terms (cost grows
# with the allowed rows), a broad one by skipping the hits it does not allow (cost grows
# with the hits fetched: limit / selectivity, at most every match). Measured at 250k rows
# per shard: ~5 us per row term, ~0.75 us per hit fetched.
TERM_SET_US_PER_ROW = 5.0
FETCH_US_PER_HIT = 0.75
# A filter clause on the indexed metadata fields costs at most this per allowed row (one
# term of a range or IN list per row at worst; measured ~0.4 us per term at 250k rows,
# far less for low-cardinality columns), and needs no count nor over-fetch.
FILTER_US_PER_ROW = 0.5
# The folder's map of filter columns to tantivy fields (absent in parts written before).
FILTERS_FILE = "clipsearch-filters.json"
# Metadata columns never indexed for filters (internal, or one value per shard: modality).
NOT_FILTERED = frozenset({"row_id", "modality", "source", "content_hash"})
# A string column is indexed for filters only when every value is this short (bytes):
# an exact term per value; long texts (descriptions) are not what filters compare.
FILTER_STRING_MAX_BYTES = 256
# Float comparisons are widened by this relative margin inside tantivy (a float32 column
# compares in float32: the clause must still match every row the mask allows).
FLOAT_MARGIN = 1e-6
# Tokens longer than this (bytes) are dropped (hashes, base64 blobs).
MAX_TOKEN_BYTES = 40
# Hiragana, katakana, CJK unified ideographs (and extension A), compatibility
# ideographs, Hangul syllables.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")


def require_tantivy() -> Any:
    """The tantivy module, or ConfigError saying how to install it."""
    try:
        import tantivy
    except ImportError as e:
        raise ConfigError(
            "lexical and hybrid search need tantivy: pip install 'clipsearch[hybrid]' "
            "(or `pip install tantivy`)"
        ) from e
    return tantivy


def have_tantivy() -> bool:
    try:
        import tantivy  # noqa: F401
    except ImportError:
        return False
    return True


def split_cjk(text: str) -> tuple[str, str]:
    """``(text with CJK runs blanked, the runs' bigrams joined by spaces)``.

    ``"Northwind 红色马克杯"`` -> ``("Northwind      ", "红色 色马 马克 克杯")``.
    """
    runs = _CJK.findall(text)
    if not runs:
        return text, ""
    grams: list[str] = []
    for run in runs:
        grams.extend([run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)])
    return _CJK.sub(" ", text), " ".join(grams)


@functools.cache
def analyzers() -> tuple[Any, Any]:
    """The (words, cjk) tantivy TextAnalyzers of ``ANALYZER``."""
    tantivy = require_tantivy()
    builder, tok, filt = tantivy.TextAnalyzerBuilder, tantivy.Tokenizer, tantivy.Filter
    words = (
        builder(tok.simple())
        .filter(filt.remove_long(MAX_TOKEN_BYTES))
        .filter(filt.lowercase())
        .filter(filt.stemmer("english"))
        .build()
    )
    return words, builder(tok.whitespace()).build()


def schema(filters: Sequence[FilterField] = ()) -> Any:
    """The tantivy schema of a lexical index (no stored fields: rows live in Parquet;
    term frequencies without positions: BM25 needs no more), with ``filters``' fields
    (indexed, not fast: a range over the term dictionary reads only the terms in range)."""
    tantivy = require_tantivy()
    sb = tantivy.SchemaBuilder()
    sb.add_text_field(FIELD_WORDS, tokenizer_name=WORDS_TOKENIZER, index_option="freq")
    sb.add_text_field(FIELD_CJK, tokenizer_name=CJK_TOKENIZER, index_option="freq")
    # Indexed too: a selective filter becomes a term-set clause on it.
    sb.add_integer_field(FIELD_ROW, indexed=True, fast=True)
    for f in filters:
        if f.kind == "str":
            sb.add_text_field(f.field, tokenizer_name="raw", index_option="basic")
        else:
            add = {
                "i64": sb.add_integer_field,
                "u64": sb.add_unsigned_field,
                "f64": sb.add_float_field,
                "bool": sb.add_boolean_field,
            }[f.kind]
            add(f.field, indexed=True)
    return sb.build()


@dataclass(frozen=True)
class FilterField:
    """A metadata column indexed for filters: its tantivy field and value kind."""

    column: str
    # tantivy field name ("filter0", ...): column names need not be valid field names.
    field: str
    # "i64", "u64", "f64", "bool" or "str".
    kind: str


def filter_fields(metadata: pa.Table) -> tuple[FilterField, ...]:
    """The columns of ``metadata`` a lexical part indexes for filters (see the module
    docstring): integers, floats (32 and 64 bit), booleans, strings of at most
    ``FILTER_STRING_MAX_BYTES`` bytes; not dates, lists or the internal columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out: list[FilterField] = []
    for f in metadata.schema:
        t, kind = f.type, None
        if f.name in NOT_FILTERED:
            continue
        if pa.types.is_signed_integer(t):
            kind = "i64"
        elif pa.types.is_unsigned_integer(t):
            kind = "u64"
        elif pa.types.is_float32(t) or pa.types.is_float64(t):
            kind = "f64"
        elif pa.types.is_boolean(t):
            kind = "bool"
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            longest = pc.max(pc.binary_length(metadata.column(f.name))).as_py()
            kind = "str" if (longest or 0) <= FILTER_STRING_MAX_BYTES else None
        if kind is not None:
            out.append(FilterField(f.name, f"filter{len(out)}", kind))
    return tuple(out)


def filter_clause(node: Node, fields: dict[str, FilterField], tantivy_schema: Any) -> Any | None:
    """A score-free tantivy clause matching a superset of the rows ``node`` keeps (over
    the indexed ``fields``), or None when it cannot narrow them (every row may match).

    Exact for comparisons, ranges and IN lists on integer, boolean and string fields;
    float ranges are widened by ``FLOAT_MARGIN``; ``!=``, ``not``, ``is null``,
    ``startswith``/``contains``, dates and unindexed columns match every row (an AND
    drops them, an OR containing one is None)."""
    import tantivy

    from clipsearch.retrieval.filters import And, Between, Compare, In, Or

    occur = tantivy.Occur
    if isinstance(node, And):
        found = [filter_clause(x, fields, tantivy_schema) for x in node.items]
        parts = [q for q in found if q is not None]
        if len(parts) < 2:
            return parts[0] if parts else None
        return tantivy.Query.boolean_query([(occur.Must, q) for q in parts])
    if isinstance(node, Or):
        parts = [filter_clause(x, fields, tantivy_schema) for x in node.items]
        if any(q is None for q in parts):
            return None
        return tantivy.Query.boolean_query([(occur.Should, q) for q in parts])
    if not isinstance(node, (Compare, In, Between)) or node.column not in fields:
        return None
    f = fields[node.column]
    if isinstance(node, In):
        values = [_term_value(f, v.value, v.kind) for v in node.values]
        if any(v is None for v in values):
            return None
        clauses = [_range(tantivy_schema, f, v, v, True, True) for v in values]
        return tantivy.Query.boolean_query([(occur.Should, q) for q in clauses])
    if isinstance(node, Between):
        low = _term_value(f, node.low.value, node.low.kind, "low")
        high = _term_value(f, node.high.value, node.high.kind, "high")
        if low is None or high is None:
            return None
        return _range(tantivy_schema, f, low, high, True, True)
    if node.op == "!=":
        return None
    side = {"=": None, "<": "high", "<=": "high", ">": "low", ">=": "low"}[node.op]
    value = _term_value(f, node.value.value, node.value.kind, side)
    if value is None:
        return None
    if node.op == "=":
        return _range(tantivy_schema, f, value, value, True, True)
    if f.kind in ("str", "bool"):
        return None  # string and boolean order: left to the mask
    strict = f.kind != "f64" and node.op in ("<", ">") and value == node.value.value
    if side == "high":
        return _range(tantivy_schema, f, None, value, True, not strict)
    return _range(tantivy_schema, f, value, None, not strict, True)


_I64 = (-(2**63), 2**63 - 1)
_U64 = (0, 2**64 - 1)


def _term_value(f: FilterField, value: Any, kind: str, side: str | None = None) -> Any | None:
    """``value`` as a term of field ``f``, rounded outward for a range bound (``side``
    "low"/"high"; None: an equality) and clamped to an integer field's range; NaN where
    no integer can match (an equality with a non-integral number, a bound past the
    type's far end: its clause is empty); None: not expressible."""
    if f.kind == "str":
        return value if kind == "string" else None
    if f.kind == "bool":
        return value if kind == "bool" else None
    if kind not in ("int", "float") or isinstance(value, bool):
        return None
    if f.kind == "f64":
        return float(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if not value.is_integer():
            if side is None:
                return math.nan
            value = math.floor(value) if side == "high" else math.ceil(value)
        value = int(value)
    lo, hi = _I64 if f.kind == "i64" else _U64
    if lo <= value <= hi:
        return value
    # Beyond the type: a bound on the far side holds for every value (clamped: the
    # clamped bound is inclusive), one on the near side and an equality for none.
    if side == "low" and value < lo:
        return lo
    if side == "high" and value > hi:
        return hi
    return math.nan


def _range(
    tantivy_schema: Any, f: FilterField, low: Any, high: Any, inc_low: bool, inc_high: bool
) -> Any:
    """A score-0 range (or term) clause on ``f``; an empty query for a NaN bound."""
    import tantivy

    if f.kind == "f64":
        if (low is not None and math.isnan(low)) or (high is not None and math.isnan(high)):
            return tantivy.Query.empty_query()
        if low is not None:
            low, inc_low = low - abs(low) * FLOAT_MARGIN - 1e-300, True
        if high is not None:
            high, inc_high = high + abs(high) * FLOAT_MARGIN + 1e-300, True
    elif isinstance(low, float) or isinstance(high, float):  # NaN: no integer equals it
        return tantivy.Query.empty_query()
    if low is not None and low == high and inc_low and inc_high and f.kind != "f64":
        q = tantivy.Query.term_query(tantivy_schema, f.field, low)
    else:
        field_type = {
            "i64": tantivy.FieldType.Integer,
            "u64": tantivy.FieldType.Unsigned,
            "f64": tantivy.FieldType.Float,
        }[f.kind]
        q = tantivy.Query.range_query(
            tantivy_schema,
            f.field,
            field_type,
            low,
            high,
            include_lower=inc_low,
            include_upper=inc_high,
            use_inverted_index=True,
        )
    return tantivy.Query.const_score_query(q, 0.0)


def register_analyzers(index: Any) -> None:
    """Register ``ANALYZER``'s tokenizers on a tantivy Index (not persisted by tantivy)."""
    words, cjk = analyzers()
    index.register_tokenizer(WORDS_TOKENIZER, words)
    index.register_tokenizer(CJK_TOKENIZER, cjk)


@dataclass(frozen=True)
class QueryTerms:
    """The distinct analysed tokens of a query text, per field, in first-seen order."""

    words: tuple[str, ...]
    cjk: tuple[str, ...]
    # Per word, the lower-cased word before stemming (the pattern of a fuzzy match:
    # stems of misspellings drift, "oakhave" -> "oakhav" against "oakhaven").
    surface: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.words or self.cjk)


@dataclass(frozen=True)
class PreparedQuery:
    """A query's tantivy queries on one shard (:meth:`LexicalIndex.prepare`): the
    search's (None: nothing can match), the rows holding every term's (None: no row
    can), and the postings the search walks."""

    terms: QueryTerms
    query: Any | None
    every: Any | None
    postings: int


@functools.cache
def _surface_analyzer() -> Any:
    """``ANALYZER``'s words analysis without stemming (same tokens, same order)."""
    tantivy = require_tantivy()
    builder, tok, filt = tantivy.TextAnalyzerBuilder, tantivy.Tokenizer, tantivy.Filter
    return (
        builder(tok.simple()).filter(filt.remove_long(MAX_TOKEN_BYTES)).filter(filt.lowercase())
    ).build()


def analyze(text: str) -> QueryTerms:
    """Tokens of ``text`` exactly as a document holding it was indexed."""
    words, cjk = analyzers()
    latin, grams = split_cjk(text)
    pairs: dict[str, str] = {}
    if latin.strip():
        for stem, word in zip(
            words.analyze(latin), _surface_analyzer().analyze(latin), strict=True
        ):
            pairs.setdefault(stem, word)
    c = tuple(dict.fromkeys(cjk.analyze(grams))) if grams else ()
    return QueryTerms(tuple(pairs), c, tuple(pairs.values()))


def read_filter_fields(folder: Path) -> tuple[FilterField, ...]:
    """The filter fields listed in ``folder``'s ``FILTERS_FILE`` (() when it has none)."""
    path = folder / FILTERS_FILE
    if not path.exists():
        return ()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        fields = tuple(FilterField(str(d["column"]), str(d["field"]), str(d["kind"])) for d in data)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IndexFormatError(
            f"{path}: unreadable list of filter fields ({e}); run `clipsearch index verify` "
            "and rebuild the lexical part if it is damaged"
        ) from e
    bad = [f.kind for f in fields if f.kind not in ("i64", "u64", "f64", "bool", "str")]
    if bad:
        raise IndexFormatError(
            f"{path}: unknown filter field kind {bad[0]!r}; upgrade clipsearch to read it"
        )
    return fields


def lexical_folder(name: str) -> str:
    """``"s000042"`` -> ``"shards/s000042.lex"`` (relative to the index root)."""
    from clipsearch.retrieval.manifest import SHARD_DIR

    return f"{SHARD_DIR}/{name}{LEXICAL_SUFFIX}"


class LexicalIndex:
    """One shard's lexical index, open for search; safe to share between threads."""

    def __init__(self, path: Path, record: LexicalRecord) -> None:
        tantivy = require_tantivy()
        if record.analyzer != ANALYZER:
            raise IndexFormatError(
                f"{path}: lexical index written with analyzer {record.analyzer!r}; this "
                f"clipsearch reads {ANALYZER!r}: upgrade clipsearch, or rebuild the lexical "
                "part with `clipsearch index add INDEX --text-fields ...` after a compact"
            )
        try:
            self.index = tantivy.Index.open(str(path))
            register_analyzers(self.index)
            self.searcher = self.index.searcher()
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"{path}: not a readable tantivy index ({e})") from e
        self.path = path
        self.record = record
        self.schema = self.index.schema
        # Metadata column -> its filter field (none in parts written before them).
        self.filters = {f.column: f for f in read_filter_fields(path)}
        # AllowedRows -> (filter, its clause) of the filter fields.
        self._clauses: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()
        # AllowedRows -> its term-set clause (entries go with the filter cache's objects).
        self._restrictions: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.docs = int(self.searcher.num_docs)
        if self.docs != record.rows:
            raise IndexFormatError(
                f"{path}: lexical index holds {self.docs} documents, the manifest says "
                f"{record.rows}"
            )

    def prepare(self, terms: QueryTerms) -> PreparedQuery:
        """``terms``' queries on this shard (see the module docstring) and the postings
        a search of them walks, from one lookup of each term's document frequency.

        A hybrid query prepares in the calling thread and searches in the lexical pool:
        each lookup releases the GIL, and a thread taking the GIL back while the vector
        side holds it waits for a hand-off (~40 us where the cores are virtual)."""
        fields = [(FIELD_WORDS, t) for t in terms.words] + [(FIELD_CJK, t) for t in terms.cjk]
        if not fields or not self.docs:
            return PreparedQuery(terms, None, None, 0)
        df = [int(self.searcher.doc_freq(field, token)) for field, token in fields]
        query, every = self._query(terms, df)
        return PreparedQuery(terms, query, every, self._postings(df))

    def _query(self, terms: QueryTerms, df: Sequence[int]) -> tuple[Any | None, Any | None]:
        """The tantivy query of ``terms`` (document frequencies ``df``, words then CJK
        terms) on this shard, or None when nothing can match; and the query of rows
        holding every term (a misspelt one within its edits), or None when no row can."""
        import tantivy

        rare: list[Any] = []
        common: list[Any] = []
        every: list[Any] | None = []
        unknown = 0
        surface = terms.surface or terms.words
        fields = [(FIELD_WORDS, t, w) for t, w in zip(terms.words, surface, strict=True)]
        fields += [(FIELD_CJK, t, t) for t in terms.cjk]
        for (field, token, word), n in zip(fields, df, strict=True):
            if n == 0:
                unknown += 1
                if field == FIELD_WORDS and len(word) >= FUZZY_MIN_CHARS and not word.isdigit():
                    fuzzy = self._fuzzy(token, word)
                    rare.append(tantivy.Query.boost_query(fuzzy, FUZZY_SCORE))
                    every = None if every is None else [*every, fuzzy]
                else:
                    every = None
                continue
            q = tantivy.Query.term_query(self.schema, field, token, index_option="freq")
            (common if n > COMMON_TERM_SHARE * self.docs else rare).append(q)
            every = None if every is None else [*every, q]
        should, must = tantivy.Occur.Should, tantivy.Occur.Must
        complete = tantivy.Query.boolean_query([(must, q) for q in every]) if every else None
        if not rare:
            if not common or unknown:  # "SKU-999999": no row has the specific word
                return None, None
            return tantivy.Query.boolean_query([(should, q) for q in common]), complete
        need = (
            rare[0] if len(rare) == 1 else tantivy.Query.boolean_query([(should, q) for q in rare])
        )
        if not common:  # a flat disjunction of terms: tantivy prunes it (block-max WAND)
            return need, complete
        return tantivy.Query.boolean_query([(must, need), *((should, q) for q in common)]), complete

    def _postings(self, df: Sequence[int]) -> int:
        """Every term's postings, except common terms beside a rarer one (they only
        score the rarer one's rows; see :meth:`_query`). A hybrid query's lexical side
        weighs it."""
        rare = [n for n in df if n <= COMMON_TERM_SHARE * self.docs]
        return sum(rare) if rare else sum(df)

    def _fuzzy(self, stem: str, word: str) -> Any:
        """Indexed words within one edit of the misspelt ``word`` (two edits from
        ``FUZZY_TWO_EDITS_CHARS`` characters on), matched from its surface form and its
        stem (stems of misspellings drift: "tidewate" -> "tidew" vs "tidewat")."""
        import tantivy

        distance = 1 if len(word) < FUZZY_TWO_EDITS_CHARS else 2
        patterns = dict.fromkeys([word, stem])
        fuzzy = [
            tantivy.Query.fuzzy_term_query(self.schema, FIELD_WORDS, p, distance) for p in patterns
        ]
        return fuzzy[0] if len(fuzzy) == 1 else tantivy.Query.disjunction_max_query(fuzzy)

    def search(
        self,
        terms: QueryTerms | PreparedQuery,
        limit: int,
        allowed: AllowedRows | None = None,
        *,
        with_complete: bool = False,
        where: Node | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The best ``limit`` allowed rows for ``terms`` (or their queries on this shard,
        :meth:`prepare`): (float32 BM25 scores descending,
        int64 local rows, bool "holds every query term"), ties by row. With ``allowed``,
        rows outside its mask are skipped and the search widens until ``limit`` allowed
        rows are found or no matching row is left, so a filter never costs results.
        ``where``: the filter ``allowed`` was made from (its comparisons may then narrow
        the search inside tantivy; the results are the same without it).
        ``with_complete=False`` leaves the third array all False (one search less)."""
        empty = np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, bool)
        prepared = terms if isinstance(terms, PreparedQuery) else self.prepare(terms)
        query, every, terms = prepared.query, prepared.every, prepared.terms
        if query is None or limit < 1:
            return empty
        import tantivy

        must = tantivy.Occur.Must
        mask = None if allowed is None else allowed.mask
        fetch, n_matching = limit, self.docs
        clause = None if allowed is None or where is None else self._clause(where, allowed)
        if clause is not None and allowed is not None:
            # Hits to fetch over-fetching, at most (before counting the matches).
            most = -(-limit * self.docs // max(1, allowed.count)) + limit
            if allowed.count * FILTER_US_PER_ROW >= most * FETCH_US_PER_HIT:
                clause = None  # a broad filter: over-fetching costs less
        if clause is not None:  # a superset of the allowed rows, inside tantivy
            query = tantivy.Query.boolean_query([(must, query), (must, clause)])
            if every is not None:
                every = tantivy.Query.boolean_query([(must, every), (must, clause)])
        elif allowed is not None:
            n_matching = int(self.searcher.search(query, limit=1, count=True).count)
            # Hits to fetch for `limit` allowed ones, if the filter is independent of the text.
            fetch = min(n_matching, -(-limit * self.docs // max(1, allowed.count)) + limit)
            if allowed.count * TERM_SET_US_PER_ROW < fetch * FETCH_US_PER_HIT:
                restrict = self._restriction(allowed)  # the query returns allowed rows only
                query = tantivy.Query.boolean_query([(must, query), (must, restrict)])
                if every is not None:
                    every = tantivy.Query.boolean_query([(must, every), (must, restrict)])
                mask, fetch = None, limit
            fetch = max(fetch, 1)
        while True:
            hits = self.searcher.search(query, limit=fetch, count=False).hits
            scores = np.fromiter((h[0] for h in hits), np.float32, len(hits))
            rows = np.asarray(
                self.searcher.fast_field_values(FIELD_ROW, [h[1] for h in hits]), np.int64
            )
            if mask is None:
                keep = np.ones(len(rows), bool)
                break
            keep = mask[rows]
            if int(keep.sum()) >= limit or len(hits) < fetch or len(hits) >= n_matching:
                break
            fetch = min(n_matching, fetch * 4)
        scores, rows = scores[keep], rows[keep]
        order = np.lexsort((rows, -scores))[:limit]
        scores, rows = scores[order], rows[order]
        complete = np.zeros(len(rows), bool)
        if with_complete and len(terms.words) + len(terms.cjk) == 1:
            complete[:] = True  # one word: every matching row holds it
        elif with_complete and every is not None and len(rows):
            # A complete row scores the same under both queries, so one among the
            # `fetch` hits has fewer than `fetch` complete rows above it: the best `fetch`
            # complete rows hold every complete row of this list. (A term set of the
            # listed rows would be exact too, at ~5x the cost.)
            found = self.searcher.search(every, limit=max(fetch, len(rows)), count=False).hits
            # A set of at most `fetch` ints: 13 us against np.isin's 44 us at 100 rows.
            whole = set(self.searcher.fast_field_values(FIELD_ROW, [h[1] for h in found]))
            complete = np.fromiter((r in whole for r in rows.tolist()), bool, len(rows))
        return scores, rows, complete

    def _clause(self, where: Node, allowed: AllowedRows) -> Any | None:
        """``where``'s clause on the filter fields (:func:`filter_clause`), cached per
        AllowedRows (the engine keeps one per filter)."""
        if not self.filters:
            return None
        with self._lock:
            cached = self._clauses.get(allowed)
        if cached is not None and cached[0] == where:
            return cached[1]
        clause = filter_clause(where, self.filters, self.schema)
        with self._lock:
            self._clauses[allowed] = (where, clause)
        return clause

    def _restriction(self, allowed: AllowedRows) -> Any:
        """A score-free clause matching only ``allowed``'s rows (cached per AllowedRows:
        the engine keeps one per filter)."""
        with self._lock:
            cached = self._restrictions.get(allowed)
        if cached is None:
            import tantivy

            rows = [int(r) for r in allowed.rows]
            terms = tantivy.Query.term_set_query(self.schema, FIELD_ROW, rows)
            cached = tantivy.Query.const_score_query(terms, 0.0)
            with self._lock:
                self._restrictions[allowed] = cached
        return cached


def open_lexical(root: Path, record: LexicalRecord) -> LexicalIndex:
    """Open a shard's lexical folder (its files already checked against ``record``)."""
    from clipsearch.retrieval.store import resolve_in_root

    return LexicalIndex(resolve_in_root(root, record.folder), record)
