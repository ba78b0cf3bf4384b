"""Hybrid search: RRF and weighted fusion equal to a hand computation over the two
lists, filters keep the k-results contract, every hit explains itself, modes resolve,
grouping runs after fusion, the CLI flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from lexical_fixtures import build_catalog, doc_text, products, write_catalog
from typer.testing import CliRunner

from clipsearch.cli.app import app
from clipsearch.retrieval.engine import SearchEngine
from clipsearch.retrieval.errors import InvalidOptionError, QueryError
from clipsearch.retrieval.lexical import analyze
from clipsearch.retrieval.options import DEFAULT_FUSION_DEPTH as FUSION_DEPTH
from clipsearch.retrieval.options import SearchOptions
from clipsearch.retrieval.queries import ComposedQuery

pytest.importorskip("tantivy")

QUERIES = ["Northwind mug", "red striped hat", "SKU-000017", "马克杯", "blue"]


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hybrid")
    # Two shards, so fusion also merges lexical lists across shards.
    return build_catalog(folder / "index", write_catalog(folder, products(160)), shard_size=90)


def _lists(engine: SearchEngine, q: str, **kw: object) -> tuple[list, list]:
    vec = engine.search(q, k=FUSION_DEPTH, mode="vector", **kw)  # type: ignore[arg-type]
    lex = engine.search(q, k=FUSION_DEPTH, mode="lexical", **kw)  # type: ignore[arg-type]
    return [(h.row_id, h.score) for h in vec], [(h.row_id, h.score) for h in lex]


def _by_hand(
    vec: list,
    lex: list,
    *,
    fusion: str,
    k: int,
    wv: float,
    wl: float,
    rrf_k: int = 60,
    complete: frozenset[int] = frozenset(),
):
    parts: dict[int, dict[str, tuple[float, int]]] = {}
    for name, ranked in (("v", vec), ("l", lex)):
        for rank, (row, score) in enumerate(ranked, 1):
            parts.setdefault(row, {})[name] = (score, rank)
    bounds = {
        n: (min(s for _, s in r), max(s for _, s in r)) if r else (0.0, 0.0)
        for n, r in (("v", vec), ("l", lex))
    }
    weight = {"v": wv, "l": wl}
    out = []
    for row, p in parts.items():
        total = 0.0
        for n, (score, rank) in p.items():
            if fusion == "rrf":
                total += weight[n] / (rrf_k + rank)
            else:
                lo, hi = bounds[n]
                total += weight[n] * ((score - lo) / (hi - lo) if hi > lo else 1.0)
        if row in complete and "l" in p:
            total += wv + wl
        best = min(rank for _, rank in p.values())
        out.append((-total, best, "l" not in p, row))
    out.sort()
    return [(row, -neg) for neg, _, _, row in out[:k]]


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize(
    ("fusion", "wv", "wl", "rrf_k"),
    [
        ("rrf", 1.0, 1.0, 60),
        ("rrf", 0.5, 2.0, 10),
        ("weighted", 1.0, 1.0, 60),
        ("weighted", 0.3, 0.7, 60),
    ],
)
def test_hybrid_equals_fusion_of_the_two_lists_by_hand(
    index: Path, query: str, fusion: str, wv: float, wl: float, rrf_k: int
) -> None:
    with SearchEngine.open(index) as engine:
        vec, lex = _lists(engine, query)
        got = engine.search(
            query,
            k=10,
            mode="hybrid",
            fusion=fusion,  # type: ignore[arg-type]
            vector_weight=wv,
            lexical_weight=wl,
            rrf_k=rrf_k,
            all_words_first=False,
        )
    want = _by_hand(vec, lex, fusion=fusion, k=10, wv=wv, wl=wl, rrf_k=rrf_k)
    assert got.row_ids == [r for r, _ in want]
    assert [h.score for h in got] == pytest.approx([s for _, s in want], rel=1e-5)


def _holds_every_word(rows: list[dict[str, object]], query: str) -> frozenset[int]:
    q = analyze(query)
    out = set()
    for i, r in enumerate(rows):
        d = analyze(doc_text(r, ("title", "title_zh", "sku")))
        if set(q.words) <= set(d.words) and set(q.cjk) <= set(d.cjk):
            out.add(i)  # row id == product index: one text row per product, in order
    return frozenset(out)


@pytest.mark.parametrize("query", QUERIES)
def test_rows_holding_every_word_rank_first_in_fused_order(index: Path, query: str) -> None:
    complete = _holds_every_word(products(160), query)
    assert complete
    with SearchEngine.open(index) as engine:
        vec, lex = _lists(engine, query)
        got = engine.search(query, k=10, mode="hybrid")
    want = _by_hand(vec, lex, fusion="rrf", k=10, wv=1.0, wl=1.0, complete=complete)
    assert got.row_ids == [r for r, _ in want]
    assert [h.score for h in got] == pytest.approx([s for _, s in want], rel=1e-5)
    n_first = min(10, len(complete & {r for r, _ in lex}))
    assert set(got.row_ids[:n_first]) <= complete
    assert all(h.explain and h.explain["all_words"] == (h.row_id in complete) for h in got)


def test_every_hit_explains_its_score(index: Path) -> None:
    with SearchEngine.open(index) as engine:
        vec, lex = _lists(engine, "Northwind mug")
        res = engine.search("Northwind mug", k=10, mode="hybrid")
        vec_rank = {r: i for i, (r, _) in enumerate(vec, 1)}
        lex_rank = {r: i for i, (r, _) in enumerate(lex, 1)}
        for h in res:
            e = h.explain
            assert e is not None and e["mode"] == "hybrid" and e["fusion"] == "rrf"
            assert e["fused"] == pytest.approx(h.score, rel=1e-6)
            assert e["vector"]["rank"] == vec_rank.get(h.row_id)
            lexical = e["lexical"]
            assert (lexical and lexical["rank"]) == lex_rank.get(h.row_id)
            parts = [1 / (60 + p["rank"]) for p in (e["vector"], lexical) if p and p["rank"]]
            bonus = 2.0 if e["all_words"] else 0.0  # vector_weight + lexical_weight
            assert sum(parts) + bonus == pytest.approx(h.score, rel=1e-5)
            assert "explain" in h.to_dict()
        # A row outside the vector list still reports its cosine (exact, unranked).
        outside = [h for h in res if h.explain and h.explain["vector"]["rank"] is None]
        for h in outside:
            cos = engine.search("Northwind mug", k=1, mode="vector", where=f"doc_id = '{h.doc_id}'")
            assert h.explain["vector"]["score"] == pytest.approx(cos[0].score, abs=2e-3)


@pytest.mark.parametrize(
    "where", ["price < 12", "brand = 'Northwind' and price > 100", "price < 0"]
)
@pytest.mark.parametrize("mode", ["hybrid", "vector"])
def test_filtered_hybrid_keeps_the_k_results_contract(index: Path, where: str, mode: str) -> None:
    rows = products(160)
    brand_ok = (
        (lambda r: r["brand"] == "Northwind" and r["price"] > 100) if "brand" in where else None
    )
    limit = 12 if "12" in where else (0 if "< 0" in where else None)
    matching = [
        r
        for r in rows
        if (brand_ok(r) if brand_ok else r["price"] < limit)  # type: ignore[operator]
    ]
    with SearchEngine.open(index) as engine:
        for k in (1, 5, 50):
            res = engine.search("Northwind mug", k=k, where=where, mode=mode)  # type: ignore[arg-type]
            assert len(res) == min(k, len(matching))
            assert set(res.doc_ids) <= {r["sku"] for r in matching}
            assert res.total_matches == len(matching)


def test_mode_defaults_and_errors(index: Path) -> None:
    with SearchEngine.open(index) as engine:
        auto = engine.search("Northwind mug", k=5)
        assert auto.row_ids == engine.search("Northwind mug", k=5, mode="hybrid").row_ids
        assert all(h.explain is not None for h in auto)
        # A cosine cutoff keeps the default in vector mode (fused scores are no cosines).
        cut = engine.search("Northwind mug", k=5, min_score=-1.0)
        assert all(h.explain is None for h in cut)
        # Vector queries in hybrid mode rank by vectors alone.
        v = np.asarray(engine.encoder.encode_texts(["mug"])[0])  # type: ignore[union-attr]
        assert engine.search(v, k=5, mode="hybrid").row_ids == engine.search(v, k=5).row_ids
        with pytest.raises(QueryError, match="text query"):
            engine.search(v, k=5, mode="lexical")
        # A composed query's positive text terms are its lexical text.
        composed = ComposedQuery(((1.0, "Northwind mug"), (-0.5, "hat")))
        lex = engine.search(composed, k=5, mode="lexical")
        assert lex.row_ids == engine.search("Northwind mug", k=5, mode="lexical").row_ids
    for bad in ({"mode": "bm25"}, {"fusion": "sum"}, {"rrf_k": 0}, {"vector_weight": -1.0}):
        with pytest.raises(InvalidOptionError):
            SearchOptions(**bad)  # type: ignore[arg-type]
    for depth in (0, True, 2.5, 10_001):
        with pytest.raises(InvalidOptionError, match="fusion_depth") as e:
            SearchOptions(fusion_depth=depth)  # type: ignore[arg-type]
        assert e.value.option == "fusion_depth"
    with pytest.raises(InvalidOptionError):
        SearchOptions(vector_weight=0.0, lexical_weight=0.0)


@pytest.mark.parametrize("depth", [3, 12])
def test_fusion_depth_is_the_window_each_list_contributes(index: Path, depth: int) -> None:
    # Each list's best max(offset + k, fusion_depth) rows are fused: a row below that in
    # both lists is not in the answer, however well it would have fused.
    k = 5
    window = max(k, depth)
    with SearchEngine.open(index) as engine:
        for query in QUERIES:
            vec, lex = _lists(engine, query)
            got = engine.search(
                query, k=k, mode="hybrid", fusion_depth=depth, all_words_first=False
            )
            want = _by_hand(vec[:window], lex[:window], fusion="rrf", k=k, wv=1.0, wl=1.0)
            assert got.row_ids == [r for r, _ in want]
            assert [h.score for h in got] == pytest.approx([s for _, s in want], rel=1e-5)
            assert all(
                (h.explain["vector"] or {}).get("rank") in (None, *range(1, window + 1))
                for h in got
            )


def test_a_query_that_fails_to_encode_leaves_hybrid_search_working(
    index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lexical side starts before the query is encoded; an encoder error still
    # reaches the caller, and the next query is answered in full.
    with SearchEngine.open(index) as engine:
        want = engine.search("Northwind mug", k=5, mode="hybrid").row_ids
        encoder = engine.encoder
        assert encoder is not None

        def broken(texts: object) -> object:
            raise QueryError("the encoder failed")

        with monkeypatch.context() as m:
            m.setattr(encoder, "encode_texts", broken)
            with pytest.raises(QueryError, match="encoder failed"):
                engine.search("Northwind mug", k=5, mode="hybrid")
        assert engine.search("Northwind mug", k=5, mode="hybrid").row_ids == want


def test_lexical_mode_runs_no_encoder_unless_mmr_needs_the_query_vector(
    index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # BM25 alone ranks a lexical query: a SKU lookup must not pay for a text tower.
    with SearchEngine.open(index) as engine:
        want = engine.search("Northwind mug", k=5, mode="lexical")
        encoder = engine.encoder
        assert encoder is not None
        with monkeypatch.context() as m:
            m.setattr(encoder, "encode_texts", lambda texts: pytest.fail("encoded"))
            got = engine.search("Northwind mug", k=5, mode="lexical")
            [sku] = engine.search_batch(["SKU-000017"], k=1, mode="lexical")
        assert [(h.row_id, h.score) for h in got] == [(h.row_id, h.score) for h in want]
        assert sku.doc_ids == ["SKU-000017"] and got.timings["encode"] < 1.0
        for h in got:
            assert h.explain is not None and h.explain["mode"] == "lexical"
            assert h.explain["vector"] is None  # no query vector, so no cosine
            assert h.explain["lexical"]["score"] == pytest.approx(h.score)
        # MMR compares rows with the query vector: then the query is encoded.
        calls: list[object] = []
        real = encoder.encode_texts
        with monkeypatch.context() as m:
            m.setattr(encoder, "encode_texts", lambda texts: calls.append(texts) or real(texts))
            diverse = engine.search("Northwind mug", k=5, mode="lexical", mmr=0.5)
        assert calls and len(diverse) == 5


def test_grouping_and_sort_run_after_fusion(index: Path) -> None:
    with SearchEngine.open(index) as engine:
        fused = engine.search("Northwind mug", k=FUSION_DEPTH, mode="hybrid")
        grouped = engine.search("Northwind mug", k=5, mode="hybrid", group_by_doc=True)
        seen: list[str] = []
        for d in fused.doc_ids:  # one text row per product here: grouping keeps the order
            if d not in seen:
                seen.append(d)
        assert grouped.doc_ids == seen[:5]
        by_price = engine.search("Northwind mug", k=5, mode="lexical", sort="price:asc")
        prices = [h.metadata["price"] for h in by_price]
        assert prices == sorted(prices)


def test_cli_search_mode_and_build_text_fields(tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "cat", products(30))
    runner = CliRunner()
    r = runner.invoke(
        app,
        ["index", "build", str(catalog), "--out", str(tmp_path / "idx"), "--model", "fake-32",
         "--text-col", "title", "--id-col", "sku", "--text-fields", "title,sku", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "idx" / "manifests" / "v000001.json").read_text())
    assert manifest["shards"][0]["lexical"]["fields"] == ["title", "doc_id"]
    r = runner.invoke(
        app,
        ["search", str(tmp_path / "idx"), "--text", "SKU-000007", "--mode", "lexical", "--json"],
    )
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)["hits"]
    assert [h["doc_id"] for h in hits] == ["SKU-000007"]
    assert hits[0]["explain"]["lexical"]["rank"] == 1
    r = runner.invoke(app, ["search", str(tmp_path / "idx"), "--text", "x", "--mode", "bm25"])
    assert r.exit_code != 0 and "mode must be one of" in r.output
    idx = str(tmp_path / "idx")
    r = runner.invoke(app, ["search", idx, "--text", "mug", "--fusion-depth", "0"])
    assert r.exit_code != 0 and "fusion_depth must be between 1 and" in r.output
    r = runner.invoke(app, ["search", idx, "--text", "mug", "--fusion-depth", "5", "--json"])
    assert r.exit_code == 0, r.output
    ranks = [h["explain"]["vector"]["rank"] for h in json.loads(r.stdout)["hits"]]
    assert all(rank is None or rank <= 10 for rank in ranks)  # max(k = 10, depth 5)
    r = runner.invoke(
        app,
        ["index", "build", str(catalog), "--out", str(tmp_path / "bad"), "--model", "fake-32",
         "--text-col", "title", "--text-fields", "title,nope"],
    )  # fmt: skip
    assert r.exit_code != 0 and "'nope' is not a column" in r.output


def test_pre_encoded_queries_search_lexically_with_their_texts(index: Path) -> None:
    texts = ["Northwind mug", "SKU-000017", None]
    with SearchEngine.open(index) as engine:
        assert engine.encoder is not None
        vectors = list(engine.encoder.encode_texts(["Northwind mug", "SKU-000017", "blue"]))
        got = engine.search_batch(vectors, k=5, texts=texts)
        assert got[0].row_ids == engine.search("Northwind mug", k=5).row_ids
        assert got[1].row_ids == engine.search("SKU-000017", k=5).row_ids
        assert got[2].row_ids == engine.search(vectors[2], k=5).row_ids
        assert got[2].hits[0].explain is None
        with pytest.raises(QueryError, match="2 texts for 3 queries"):
            engine.search_batch(vectors, k=5, texts=texts[:2])


def test_a_query_no_row_matches_lexically_keeps_its_vector_ranking(index: Path) -> None:
    with SearchEngine.open(index) as engine:
        hybrid = engine.search("qqqq zzzz", k=5, mode="hybrid", group_by_doc="mean")
        vector = engine.search("qqqq zzzz", k=5, mode="vector", group_by_doc="mean")
        assert hybrid.row_ids == vector.row_ids
        assert [h.score for h in hybrid] == [h.score for h in vector]
        assert all(h.explain and h.explain["fusion"] == "none" for h in hybrid)


@pytest.mark.parametrize("fusion", ["rrf", "weighted"])
def test_fuse_on_arrays_equals_the_formula_row_by_row_with_ties(fusion: str) -> None:
    from clipsearch.retrieval.hybrid import fuse

    rng = np.random.default_rng(7)
    starts = [0, 1000, 5000]
    for trial in range(40):
        lists = []
        for _ in range(2):  # vector, lexical: overlapping rows, few distinct scores (ties)
            n = int(rng.integers(0, 60))
            picks = rng.choice(120, size=n, replace=False)
            scores = np.sort(rng.integers(0, 5, n).astype(np.float64) / 4)[::-1]
            lists.append(
                [(float(s), int(p % 3), int(p)) for s, p in zip(scores, picks, strict=True)]
            )
        vector, lexical = lists
        complete = frozenset((si, j) for _, si, j in lexical if rng.random() < 0.3)
        wv, wl = float(rng.choice([0.5, 1.0])), float(rng.choice([1.0, 2.0]))
        opts = SearchOptions(
            fusion=fusion, vector_weight=wv, lexical_weight=wl, all_words_first=bool(trial % 2)
        )
        got, parts = fuse(vector, lexical, opts, starts, complete)
        top, top_parts = fuse(vector, lexical, opts, starts, complete, limit=10)
        assert top == got[:10] and list(top_parts) == [(si, j) for _, si, j in top]
        gid = {(si, j): starts[si] + j for _, si, j in vector + lexical}
        want = _by_hand(
            [(gid[(si, j)], s) for s, si, j in vector],
            [(gid[(si, j)], s) for s, si, j in lexical],
            fusion=fusion,
            k=1000,
            wv=wv,
            wl=wl,
            complete=frozenset(gid[c] for c in complete) if opts.all_words_first else frozenset(),
        )
        assert [starts[si] + j for _, si, j in got] == [r for r, _ in want]
        assert [s for s, _, _ in got] == [s for _, s in want]  # the same float operations
        assert list(parts) == [(si, j) for _, si, j in got]
        for s, si, j in got:
            assert parts[(si, j)]["fused"] == s == top_parts.get((si, j), parts[(si, j)])["fused"]
            assert parts[(si, j)]["all_words"] == ((si, j) in complete)
        # Explanations of named rows only (lexical mode: the lexical list's first rows):
        # the same as in the whole list's, in the order named.
        named = [(si, j) for _, si, j in (lexical + vector)[:7]]
        none, named_parts = fuse(vector, lexical, opts, starts, complete, 0, named)
        assert none == [] and list(named_parts) == list(dict.fromkeys(named))
        assert all(named_parts[r] == parts[r] for r in named)
