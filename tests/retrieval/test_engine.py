"""SearchEngine against a numpy oracle on random indexes built with the real indexer."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from query_fixtures import (
    Oracle,
    build_index,
    encoder,
    mean_recall,
    noisy_queries,
)

from clipsearch.indexer.maintenance import delete
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.engine import SearchEngine
from clipsearch.retrieval.errors import FilterError, FingerprintMismatchError, QueryError
from clipsearch.retrieval.planner import PlannerConfig
from clipsearch.retrieval.queries import ComposedQuery

FILTERS = [
    None,
    "price < 30",
    "category = 'mugs' and in_stock",
    "rating >= 4 or title contains 'red'",
]


@pytest.mark.parametrize("where", FILTERS)
def test_topk_matches_the_oracle(index: Path, where: str | None) -> None:
    oracle = Oracle.load(index, "text")
    xq = noisy_queries(oracle, 20)
    expected = oracle.search(xq, 10, where)
    with SearchEngine.open(index) as engine:
        results = engine.search_batch(list(xq), k=10, where=where, modality="text")
    flat = index.name.startswith("flat")
    exact_plans = all(p.startswith("exact") for p in results[0].plans.values())
    if flat or (where is not None and exact_plans):
        assert [r.row_ids for r in results] == expected
    else:
        assert mean_recall(results, expected) >= 0.9
    for r in results:
        assert len(r) == 10 and all(np.isfinite(h.score) and h.row_id >= 0 for h in r)
        assert [h.rank for h in r] == list(range(1, 11))


@pytest.mark.parametrize("where", FILTERS[1:])
def test_filtered_ann_plan_reaches_stated_recall(index: Path, where: str) -> None:
    oracle = Oracle.load(index, "text")
    xq = noisy_queries(oracle, 20, seed=1)
    with SearchEngine.open(
        index, config=PlannerConfig(exact_max_rows=0, ivf_exact_max_rows=0, flat_subset_fraction=0)
    ) as engine:
        results = engine.search_batch(list(xq), k=10, where=where, modality="text")
    assert mean_recall(results, oracle.search(xq, 10, where)) >= 0.9
    assert all(len(r) == 10 for r in results)


@pytest.mark.parametrize(
    "where",
    [
        "price < 0",  # 0 rows
        "doc_id = 'd0007'",  # 2 text rows (title + description)
        "doc_id in ('d0001', 'd0002', 'd0003', 'd0004', 'd0005')",  # k - 0 = 10 rows
        "doc_id in ('d0001', 'd0002', 'd0003', 'd0004', 'd0005') and source contains 'item'",  # 5 rows
        "rating >= 2",  # many
    ],
)
@pytest.mark.parametrize("exact_max_rows", [0, 20_000])
def test_filtered_queries_return_min_k_matches(
    index: Path, where: str, exact_max_rows: int
) -> None:
    oracle = Oracle.load(index, "text")
    matches = int(oracle.mask(where).sum())
    xq = noisy_queries(oracle, 4)
    config = PlannerConfig(
        exact_max_rows=exact_max_rows, ivf_exact_max_rows=exact_max_rows, flat_subset_fraction=0
    )
    with SearchEngine.open(index, config=config) as engine:
        for k in (1, 9, 10, 11):
            for r in engine.search_batch(list(xq), k=k, where=where, modality="text"):
                assert len(r) == min(k, matches)
                assert r.total_matches == matches
                mask_ids = set(oracle.row_ids[oracle.mask(where)].tolist())
                assert set(r.row_ids) <= mask_ids


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_tombstoned_rows_are_never_returned(corpus: Path, tmp_path: Path, kind: str) -> None:
    root = build_index(tmp_path / "idx", corpus, kind)
    engine = SearchEngine.open(root)
    oracle = Oracle.load(root, "text")
    xq = oracle.vectors[:5]
    before = engine.search_batch(list(xq), k=5, modality="text")
    victims = sorted({h.doc_id for r in before for h in r})
    delete(root, ids=victims)
    assert (
        engine.search_batch(list(xq), k=5, modality="text")[0].row_ids == before[0].row_ids
    )  # pinned
    assert engine.reload() is True
    after = engine.search_batch(list(xq), k=5, modality="text")
    after_filtered = engine.search_batch(list(xq), k=5, modality="text", where="price > 0")
    for r in after + after_filtered:
        assert len(r) == 5 and not set(r.doc_ids) & set(victims)
    oracle = Oracle.load(root, "text")
    if kind == "flat":
        assert [r.row_ids for r in after] == oracle.search(xq, 5)
    else:
        assert mean_recall(after, oracle.search(xq, 5)) >= 0.9
    engine.close()


def test_text_image_and_vector_queries(index: Path, corpus: Path) -> None:
    with SearchEngine.open(index) as engine:
        hits = engine.search("red shirt", k=3)
        assert {h.modality for h in hits} == {"image"}  # text -> image by default
        text_hits = engine.search("red shirt", k=3, modality="text")
        assert {h.modality for h in text_hits} == {"text"}
        assert "red" in text_hits[0].source or "shirt" in text_hits[0].source
        image_path = corpus.parent / "img0005.png"
        for image in (image_path, image_path.read_bytes()):
            assert engine.search(image, k=1)[0].doc_id == "d0005"  # image -> image finds itself
        to_text = engine.search(image_path, k=2, modality="text")
        assert {h.modality for h in to_text} == {"text"}
        oracle = Oracle.load(index, "image")
        assert engine.search(oracle.vectors[7], k=1).row_ids == [int(oracle.row_ids[7])]
        with pytest.raises(QueryError):
            engine.search("red", modality="audio")
        with pytest.raises(QueryError):
            engine.search("   ")
        with pytest.raises(QueryError):
            engine.search("red", k=0)


def test_composed_and_batch_queries_match_single_queries(index: Path) -> None:
    with SearchEngine.open(index) as engine:
        single = engine.search("striped cotton shirt", k=5)
        composed = engine.search(ComposedQuery(((1.0, "striped cotton shirt"),)), k=5)
        assert composed.row_ids == single.row_ids
        texts = ["red lamp", "blue mug", "soft wool dress"]
        batch = engine.search_batch(texts, k=5, where="price < 60")
        assert [b.row_ids for b in batch] == [
            engine.search(t, k=5, where="price < 60").row_ids for t in texts
        ]
        enc = engine.encoder
        assert enc is not None
        v = enc.encode_texts(["red"])[0] * 2 - enc.encode_texts(["striped"])[0]
        # Vector mode: the text terms of a composed query also search lexically in hybrid.
        mixed = engine.search(ComposedQuery(((2.0, "red"), (-1.0, "striped"))), k=5, mode="vector")
        assert mixed.row_ids == engine.search(v, k=5).row_ids
        with pytest.raises(QueryError):
            engine.search(ComposedQuery(((1.0, "red"), (-1.0, "red"))))


def test_grouping_pagination_and_reranking(index: Path) -> None:
    with SearchEngine.open(index) as engine:
        grouped = engine.search("red shirt", k=10, modality="text", group_by_doc=True)
        assert len(grouped) == 10 and len(set(grouped.doc_ids)) == 10
        pages = [
            engine.search("red shirt", k=5, offset=o, modality="text", group_by_doc=True)
            for o in (0, 5)
        ]
        assert pages[0].doc_ids + pages[1].doc_ids == grouped.doc_ids
        assert [h.rank for h in pages[1]] == list(range(6, 11))
        plain = engine.search("red shirt", k=20, modality="text")
        paged = [
            engine.search("red shirt", k=5, offset=o, modality="text").row_ids
            for o in range(0, 20, 5)
        ]
        assert [r for page in paged for r in page] == plain.row_ids
        by_price = engine.search("red shirt", k=10, sort="price", min_score=0.2)
        prices = [h.metadata["price"] for h in by_price]
        assert prices == sorted(prices) and all(h.score >= 0.2 for h in by_price)
        newest = engine.search("red shirt", k=10, sort="added:desc")
        assert [h.metadata["added"] for h in newest] == sorted(
            (h.metadata["added"] for h in newest), reverse=True
        )
        boosted = engine.search("red shirt", k=10, boosts={"rating": 1.0})
        assert boosted[0].metadata["rating"] >= 4
        diverse = engine.search("red shirt", k=10, mmr=0.3)
        assert len(diverse) == 10 and len(set(diverse.row_ids)) == 10
        with pytest.raises(QueryError, match="nope"):
            engine.search("red", sort="nope")


def test_errors_are_clear(index: Path) -> None:
    with SearchEngine.open(index) as engine:
        with pytest.raises(FilterError, match="did you mean 'price'"):
            engine.search("red", where="prise < 30")
        with pytest.raises(FilterError):
            engine.search("red", where="price < 30; import os")
        with pytest.raises(QueryError, match="dimension"):
            engine.search(np.ones(5, np.float32))
    with pytest.raises(FingerprintMismatchError, match="dim") as e:
        SearchEngine.open(index, encoder=FakeEncoder(48, seed=3))
    assert "pretrained" not in str(e.value)
    with pytest.raises(FingerprintMismatchError, match="pretrained"):
        SearchEngine.open(index, encoder=FakeEncoder(32, seed=4))
    assert SearchEngine.open(index, encoder=encoder()).version >= 1


def test_results_are_typed_and_serialisable(index: Path) -> None:
    with SearchEngine.open(index) as engine:
        r = engine.search("red", k=3, where="in_stock")
    rows = r.to_dicts()
    assert [d["rank"] for d in rows] == [1, 2, 3] and all(d["metadata"]["in_stock"] for d in rows)
    table = r.to_arrow()
    assert table.num_rows == 3 and table.column("row_id").to_pylist() == r.row_ids
    assert set(r.timings) >= {"encode", "filter", "search", "rerank", "total"}
    assert r.index_version == engine.version and r.total_matches is not None


def test_concurrent_searches_and_reload(corpus: Path, tmp_path: Path) -> None:
    root = build_index(tmp_path / "idx", corpus, "ivf")
    engine = SearchEngine.open(root)
    expected = {
        w: engine.search(w, k=5, where=w2).row_ids
        for w, w2 in [("red", None), ("blue", "price < 50")]
    }
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(15):
                assert engine.search("red", k=5).row_ids == expected["red"]
                assert engine.search("blue", k=5, where="price < 50").row_ids == expected["blue"]
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert engine.reload() is False
    engine.close()


def test_classify_uses_the_zero_shot_recipe(index: Path, tmp_path: Path) -> None:
    from PIL import Image

    red = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (220, 30, 30)).save(red)
    with SearchEngine.open(index) as engine:
        probs = engine.classify(red, ["blue", "red", "green"])
    assert probs[0][0] == "red" and abs(sum(p for _, p in probs) - 1.0) < 1e-5
    with pytest.raises(QueryError):
        SearchEngine.open(index).classify(red, ["only one"])


def test_cutoff_then_sort_ranks_every_row_above_the_cutoff(index: Path) -> None:
    oracle = Oracle.load(index, "image")
    with SearchEngine.open(index) as engine:
        everything = engine.search("red shirt", k=10, min_score=-1.0, sort="price")
        cheapest = sorted(oracle.metadata.column("price").to_pylist())[:10]
        assert [h.metadata["price"] for h in everything] == cheapest  # beyond the 100-row window
        above = engine.search("red shirt", k=50, min_score=0.5, sort="price:desc")
        scores = oracle.vectors @ engine.encoder.encode_texts(["red shirt"])[0]  # type: ignore[union-attr]
        assert len(above) == min(50, int((scores >= 0.5).sum()))


def test_snapshot_property_pins_the_version(index: Path) -> None:
    with SearchEngine.open(index) as engine:
        assert engine.snapshot.version == engine.version == engine.manifest.version
        assert sum(s.record.rows for s in engine.snapshot.shards) == engine.manifest.n_rows


@pytest.fixture(scope="module")
def rated_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4000 text rows with a numeric ``rating`` (0..10) and ``price``: enough rows that
    a boost can lift rows from far below the first candidate pool over a cutoff."""
    from clipsearch.indexer.build import BuildOptions, build
    from clipsearch.indexer.sources import SourceOptions

    folder = tmp_path_factory.mktemp("rated")
    rng = np.random.default_rng(7)
    lines = ["id,title,rating,price"]
    for i in range(4000):
        lines.append(f"r{i},item {i} {rng.integers(1 << 30)},{rng.integers(0, 11)},{i % 97}")
    (folder / "rated.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    options = BuildOptions(
        workers=1, sources=SourceOptions(text_cols=("title",), id_col="id"), shard_size=1500
    )
    build([folder / "rated.csv"], folder / "idx", encoder=FakeEncoder(32), options=options)
    return folder / "idx"


def _boosted_oracle(
    root: Path, q: np.ndarray, weight: float, min_score: float | None, sort: str | None
) -> list[int]:
    """Every row ranked exactly as the documented stages would rank the whole index."""
    oracle = Oracle.load(root, "text")
    rating = oracle.metadata.column("rating").to_numpy().astype(np.float32)
    scores = (oracle.vectors @ q).astype(np.float32) + np.float32(weight) * rating
    order = np.lexsort((oracle.row_ids, -scores))
    if min_score is not None:
        order = order[scores[order] >= min_score]
    if sort is not None:
        price = oracle.metadata.column("price").to_numpy()[order]
        order = order[np.argsort(-price, kind="stable")]
    return oracle.row_ids[order].tolist()


@pytest.mark.parametrize(("cutoff", "sort"), [(True, "price:desc"), (True, None), (False, None)])
def test_min_score_and_boosts_page_like_the_oracle(
    rated_index: Path, cutoff: bool, sort: str | None
) -> None:
    rng = np.random.default_rng(11)
    q = rng.standard_normal(32).astype(np.float32)
    q /= np.linalg.norm(q)
    raw = Oracle.load(rated_index, "text").vectors @ q
    # rating 10 (boost +1.0) passes from 60% down the raw ranking: rows ~2,400 deep
    min_score = float(1.0 + np.quantile(raw, 0.4)) if cutoff else None
    expected = _boosted_oracle(rated_index, q, 0.1, min_score, sort)
    if cutoff:
        rank = np.empty(len(raw), np.int64)
        rank[np.argsort(-raw)] = np.arange(len(raw))
        # row ids are positions here (one text-only build)
        assert len(expected) > 100 and rank[np.array(expected)].max() > 2000
    with SearchEngine.open(rated_index) as engine:
        for offset in (0, 10, 90):
            page = engine.search(
                q, k=10, offset=offset, min_score=min_score, sort=sort, boosts={"rating": 0.1}
            )
            assert page.row_ids == expected[offset : offset + 10]
