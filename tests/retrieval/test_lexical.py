"""Lexical search: BM25 equal to a brute-force oracle, CJK, stemming, fuzzy, filters,
tombstones, verification of the lexical files, old indexes without a lexical part."""

from __future__ import annotations

from pathlib import Path

import pytest
from lexical_fixtures import bm25_oracle, build_catalog, doc_text, products, write_catalog

from clipsearch.indexer.maintenance import compact, delete
from clipsearch.retrieval.engine import SearchEngine
from clipsearch.retrieval.errors import IndexFormatError, QueryError
from clipsearch.retrieval.lexical import FUZZY_SCORE, analyze
from clipsearch.retrieval.manifest import read_current
from clipsearch.retrieval.store import open_snapshot, verify_index

pytest.importorskip("tantivy")

FIELDS = ("title", "title_zh", "sku")
QUERIES = [
    "Northwind mug",
    "red striped mugs",
    "blue hat",
    "SKU-000017",
    "Cobalt Lane dotted lamp",
    "马克杯",
    "红色帽子",
    "green",
]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]]]:
    rows = products(60)
    folder = tmp_path_factory.mktemp("lexcat")
    root = build_catalog(folder / "index", write_catalog(folder, rows))
    return root, rows


def _lexical(engine: SearchEngine, query: str, **kw: object) -> list[tuple[str, float]]:
    res = engine.search(query, k=1000, mode="lexical", **kw)  # type: ignore[arg-type]
    return [(h.doc_id, h.score) for h in res]


def _expected(rows: list[dict[str, object]], query: str, keep: set[int] | None = None):
    texts = [doc_text(r, FIELDS) for r in rows]
    scores = bm25_oracle(texts, query)
    ranked = sorted(
        ((str(rows[i]["sku"]), s) for i, s in scores.items() if keep is None or i in keep),
        key=lambda t: (-t[1], t[0]),
    )
    return ranked


@pytest.mark.parametrize("query", QUERIES)
def test_lexical_results_equal_brute_force_bm25(catalog, query: str) -> None:
    root, rows = catalog
    with SearchEngine.open(root) as engine:
        got = _lexical(engine, query)
    want = _expected(rows, query)
    assert want, "the oracle must match something"
    assert [d for d, _ in got] == [d for d, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def test_a_shards_lexical_part_is_one_segment(catalog) -> None:
    # Every query searches each segment of a part: a shard's rows go to one.
    root, rows = catalog
    with SearchEngine.open(root) as engine:
        parts = [s.lexical for s in engine.snapshot.shards if s.lexical is not None]
    assert parts and sum(p.docs for p in parts) == len(rows)
    assert all(p.searcher.num_segments == 1 for p in parts)


def test_postings_count_what_a_search_walks(catalog) -> None:
    root, rows = catalog
    texts = [analyze(doc_text(r, FIELDS)) for r in rows]
    with SearchEngine.open(root) as engine:
        parts = [s.lexical for s in engine.snapshot.shards if s.lexical is not None]

        def postings(query: str) -> int:
            return sum(p.prepare(analyze(query)).postings for p in parts)

        mugs = sum("mug" in t.words for t in texts)
        reds = sum("red" in t.words for t in texts)
        assert 0 < mugs < len(rows) // 2 and postings("mug") == mugs
        assert postings("red mug") == mugs + reds
        # "sku" is in every row: only the rows of the rarer "000017" are walked.
        assert postings("SKU-000017") == 1
        assert postings("zzzz") == 0


def test_common_terms_only_score_rows_matching_a_rare_one(catalog) -> None:
    root, _ = catalog
    with SearchEngine.open(root) as engine:
        got = _lexical(engine, "SKU-000017")  # "sku" is in every row, "000017" in one
    assert [d for d, _ in got] == ["SKU-000017"]


def test_stemming_cjk_and_misspellings(catalog) -> None:
    root, rows = catalog
    with SearchEngine.open(root) as engine:
        mugs = {d for d, _ in _lexical(engine, "mugs")}
        assert mugs == {str(r["sku"]) for r in rows if "mug" in str(r["title"])}
        zh = {d for d, _ in _lexical(engine, "马克杯")}
        assert zh == mugs
        fuzzy = _lexical(engine, "nortwind")  # one edit from "northwind", unknown itself
        assert {d for d, _ in fuzzy} == {str(r["sku"]) for r in rows if r["brand"] == "Northwind"}
        assert {s for _, s in fuzzy} == {FUZZY_SCORE}
        top = _lexical(engine, "nortwind mug")[0][0]
        assert next(r for r in rows if r["sku"] == top)["brand"] == "Northwind"
        assert "mug" in str(next(r for r in rows if r["sku"] == top)["title"])
        assert _lexical(engine, "zzzz qqqq") == []


# 25 and 10 of 60 rows: hits outside the filter are skipped; 2 of 60: cheaper as a
# term-set clause inside tantivy (TERM_SET_US_PER_ROW vs FETCH_US_PER_HIT).
@pytest.mark.parametrize("price", [30, 15, 7])
def test_filters_apply_to_the_lexical_side(catalog, price: int) -> None:
    root, rows = catalog
    where = f"price < {price}"
    keep = {i for i, r in enumerate(rows) if float(r["price"]) < price}  # type: ignore[arg-type]
    with SearchEngine.open(root) as engine:
        for query in ("Northwind mug", "red striped mugs", "blue hat"):
            got = _lexical(engine, query, where=where)
            want = _expected(rows, query, keep)
            assert [d for d, _ in got] == [d for d, _ in want]
            assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-5)
        want = _expected(rows, "Northwind mug", keep)
        # k smaller than the matches: exactly k, the best of them.
        few = engine.search("Northwind mug", k=2, mode="lexical", where=where)
        assert [h.doc_id for h in few] == [d for d, _ in want[:2]]


def test_tombstoned_rows_never_return_and_compaction_rebuilds_the_lexical_part(
    tmp_path: Path,
) -> None:
    rows = products(60)
    catalog = write_catalog(tmp_path / "cat", rows)
    root = build_catalog(tmp_path / "index", catalog)
    gone = {str(r["sku"]) for r in rows if r["brand"] == "Northwind"}
    delete(root, ids=sorted(gone)[:6])
    dead = set(sorted(gone)[:6])
    with SearchEngine.open(root) as engine:
        got = _lexical(engine, "Northwind mug")
        assert got and not dead & {d for d, _ in got}
        hybrid = engine.search("Northwind mug", k=50, mode="hybrid")
        assert not dead & set(hybrid.doc_ids)
    compact(root)
    assert all(s.lexical is not None for s in read_current(root).shards)
    live = [r for r in rows if r["sku"] not in dead]
    fresh = build_catalog(tmp_path / "fresh", write_catalog(tmp_path / "cat2", live))
    with SearchEngine.open(root) as engine, SearchEngine.open(fresh) as reference:
        for q in QUERIES:
            after = _lexical(engine, q)
            assert [d for d, _ in after] == [d for d, _ in _lexical(reference, q)]
            # Hits map to the right vector rows: the row's metadata is the product's.
            titles = {str(r["sku"]): r["title"] for r in live}
            res = engine.search(q, k=5, mode="lexical")
            assert res and all(h.source == titles[h.doc_id] for h in res)
    assert verify_index(root).ok
    lex_dirs = sorted(p.name for p in (root / "shards").iterdir() if p.is_dir())
    assert lex_dirs == [f"{s.name}.lex" for s in read_current(root).shards]


def test_index_without_lexical_part_searches_by_vectors(tmp_path: Path) -> None:
    rows = products(20)
    root = build_catalog(tmp_path / "index", write_catalog(tmp_path, rows), text_fields=())
    manifest = read_current(root)
    assert all(s.lexical is None for s in manifest.shards)
    assert "lexical" not in (root / "manifests" / "v000001.json").read_text()
    with SearchEngine.open(root) as engine:
        res = engine.search("Northwind mug", k=5)
        assert all(h.explain is None for h in res)
        assert res.row_ids == engine.search("Northwind mug", k=5, mode="vector").row_ids
        with pytest.raises(QueryError, match="--text-fields"):
            engine.search("Northwind mug", k=5, mode="hybrid")


def test_a_corrupted_lexical_file_is_detected(tmp_path: Path) -> None:
    root = build_catalog(tmp_path / "index", write_catalog(tmp_path, products(20)))
    record = read_current(root).shards[0].lexical
    assert record is not None
    target = max(record.files, key=lambda f: f.bytes)
    path = root / target.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify_index(root)
    assert not report.ok
    assert any(target.path in p for p in report.problems[read_current(root).shards[0].name])
    with pytest.raises(IndexFormatError, match=target.path):
        open_snapshot(root)


def test_a_missing_lexical_file_is_detected(tmp_path: Path) -> None:
    root = build_catalog(tmp_path / "index", write_catalog(tmp_path, products(20)))
    record = read_current(root).shards[0].lexical
    assert record is not None
    (root / record.files[-1].path).unlink()
    with pytest.raises(IndexFormatError, match="missing"):
        open_snapshot(root)


def test_a_lexical_part_of_another_analyzer_is_searched_by_vectors(tmp_path: Path) -> None:
    import json

    root = build_catalog(tmp_path / "index", write_catalog(tmp_path, products(10)))
    path = root / "manifests" / "v000001.json"
    data = json.loads(path.read_text())
    data.pop("checksum")
    data["shards"][0]["lexical"]["analyzer"] = "clipsearch-bm25-v0"
    path.write_text(json.dumps(data, indent=2) + "\n")
    with SearchEngine.open(root) as engine:
        assert engine.snapshot.shards[0].lexical is None
        assert all(h.explain is None for h in engine.search("Northwind mug", k=3))


# --------------------------------------------------------------------------- filters
# inside tantivy: a filter's comparisons on the metadata fields the lexical part indexes.

VOCAB = ("northwind", "bluefin", "mug", "hat", "lamp", "red", "blue", "striped", "plain")


@pytest.fixture(scope="module")
def typed(tmp_path_factory: pytest.TempPathFactory):
    """A lexical part over 400 rows with a column of every kind (nulls, NaN, float32
    values that float64 cannot hold exactly, a long text and a date: not indexed)."""
    import datetime as dt

    import numpy as np
    import pyarrow as pa

    from clipsearch.indexer.lexical import write_lexical
    from clipsearch.retrieval.lexical import LexicalIndex

    rng = np.random.default_rng(14)
    n = 400

    def nulls(values: list[object], share: float = 0.1) -> list[object]:
        return [None if rng.random() < share else v for v in values]

    words = rng.integers(0, len(VOCAB), (n, 4))
    prices = [float(round(v, 2)) for v in rng.uniform(0, 50, n)]
    prices = [float("nan") if rng.random() < 0.05 else p for p in prices]
    table = pa.table(
        {
            "row_id": pa.array(np.arange(n), pa.int64()),
            "doc_id": [f"SKU-{i:04d}" for i in range(n)],
            "title": [" ".join(VOCAB[j] for j in w[: 1 + i % 4]) for i, w in enumerate(words)],
            "n": pa.array(nulls(rng.integers(-5, 6, n).tolist()), pa.int64()),
            "u": pa.array(rng.integers(0, 11, n).tolist(), pa.uint32()),
            "price": pa.array(nulls(prices), pa.float64()),
            "weight": pa.array((rng.integers(0, 10, n) / 10).tolist(), pa.float32()),
            "ok": pa.array(nulls([bool(b) for b in rng.integers(0, 2, n)]), pa.bool_()),
            "cat": pa.array(nulls([("a", "b", "c", "d")[i] for i in rng.integers(0, 4, n)])),
            "long": ["x" * 300] * n,
            "day": pa.array([dt.date(2024, 1, 1 + i % 28) for i in range(n)], pa.date32()),
        }
    )
    root = tmp_path_factory.mktemp("typed")
    record = write_lexical(root, "s000000", table, ("title",))
    return table, LexicalIndex(root / "shards" / "s000000.lex", record)


def _random_filters(count: int, seed: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)

    def pick(xs):
        return xs[int(rng.integers(len(xs)))]

    def num() -> str:
        return pick(["3", "-2", "0", "2.5", "-0.5", "7", "100", "0.3", "0.1", "25.5", "10"])

    def leaf() -> str:
        col = pick(["n", "u", "price", "weight", "ok", "cat", "doc_id", "long", "day"])
        if col in ("n", "u", "price", "weight"):
            form = int(rng.integers(4))
            if form == 0:
                return f"{col} {pick(['=', '!=', '<', '<=', '>', '>='])} {num()}"
            if form == 1:
                return f"{col} in ({num()}, {num()}, {num()})"
            if form == 2:
                low, high = sorted([float(num()), float(num())])
                return f"{col} between {low} and {high}"
            return f"{col} is {pick(['', 'not '])}null"
        if col == "ok":
            return pick(["ok", "not ok", "ok = false", "ok is null"])
        if col in ("cat", "doc_id"):
            values = ["a", "b", "c", "zz"] if col == "cat" else ["SKU-0001", "SKU-0399", "x"]
            form = int(rng.integers(3))
            if form == 0:
                return f"{col} {pick(['=', '!='])} '{pick(values)}'"
            if form == 1:
                return f"{col} in ('{pick(values)}', '{pick(values)}')"
            return f"{col} startswith '{pick(values)[:1]}'"
        if col == "long":
            return "long = 'x'"
        return "day >= date '2024-01-10'"

    def expr(depth: int) -> str:
        if depth == 0 or rng.random() < 0.4:
            return leaf()
        op = pick(["and", "or", "and not"])
        return f"({expr(depth - 1)}) {op} ({expr(depth - 1)})"

    return [expr(2) for _ in range(count)]


def _matched_rows(index, clause) -> set[int]:
    from clipsearch.retrieval.lexical import FIELD_ROW

    hits = index.searcher.search(clause, limit=index.docs + 1).hits
    return set(index.searcher.fast_field_values(FIELD_ROW, [h[1] for h in hits]))


def test_filter_clauses_match_a_superset_of_the_rows_and_exactly_where_they_can(typed) -> None:
    import numpy as np

    from clipsearch.retrieval.filters import compile_filter
    from clipsearch.retrieval.lexical import filter_clause

    table, index = typed
    # Not: the long text, the date, the internal columns.
    assert set(index.filters) == {"doc_id", "title", "n", "u", "price", "weight", "ok", "cat"}
    translated = exact = 0
    for where in _random_filters(300, seed=1):
        compiled = compile_filter(where, table.schema)
        clause = filter_clause(compiled.node, index.filters, index.schema)
        if clause is None:
            continue
        translated += 1
        want = set(np.flatnonzero(compiled.mask(table)).tolist())
        got = _matched_rows(index, clause)
        assert want <= got, f"{where}: rows {sorted(want - got)[:5]} missing"
        # No float column, no part left to the mask: the clause is the filter itself.
        if not any(
            c in where for c in ("price", "weight", "!=", "not", "null", "start", "day", "long")
        ):
            assert got == want, where
            exact += 1
    assert translated > 100 and exact > 30, (translated, exact)  # both are exercised


@pytest.mark.parametrize("seed", [2, 3])
def test_a_filter_inside_tantivy_gives_the_results_of_the_mask_alone(typed, seed: int) -> None:
    import numpy as np

    from clipsearch.retrieval.filters import compile_filter
    from clipsearch.retrieval.lexical import analyze, filter_clause
    from clipsearch.retrieval.planner import AllowedRows

    table, index = typed
    pushed = 0
    for where in _random_filters(60, seed=seed):
        compiled = compile_filter(where, table.schema)
        mask = compiled.mask(table)
        pushed += filter_clause(compiled.node, index.filters, index.schema) is not None
        for query in ("northwind mug", "red striped lamp", "hat"):
            terms = analyze(query)
            for limit in (1, 5, 100):
                allowed = AllowedRows(mask.copy())
                want = index.search(terms, limit, allowed, with_complete=True)
                got = index.search(terms, limit, allowed, with_complete=True, where=compiled.node)
                for a, b in zip(got, want, strict=True):
                    np.testing.assert_array_equal(a, b, err_msg=f"{where} / {query} / {limit}")
                # k-results contract: min(limit, matching allowed rows).
                assert len(got[1]) == min(limit, int(mask[index.search(terms, 400)[1]].sum()))
    assert pushed > 15


def test_a_lexical_part_without_filter_fields_filters_by_the_mask(typed, tmp_path: Path) -> None:
    import shutil

    import numpy as np

    from clipsearch.retrieval.filters import compile_filter
    from clipsearch.retrieval.lexical import FILTERS_FILE, LexicalIndex, analyze
    from clipsearch.retrieval.planner import AllowedRows

    table, index = typed
    old = tmp_path / "old.lex"
    shutil.copytree(index.path, old)
    (old / FILTERS_FILE).unlink()  # as written before filter fields existed
    before = LexicalIndex(old, index.record)
    assert before.filters == {}
    compiled = compile_filter("n < 2 and cat = 'a'", table.schema)
    terms = analyze("northwind mug")
    allowed = AllowedRows(compiled.mask(table))
    want = index.search(terms, 10, allowed, where=compiled.node)
    got = before.search(terms, 10, allowed, where=compiled.node)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(got[1])
