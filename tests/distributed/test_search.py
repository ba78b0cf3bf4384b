"""Distributed search: the local engine's answers, through failures and rollouts.

The test index has lexical parts (titles), so plain text queries run in hybrid mode
as they do locally; modes are also forced."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray_fixtures import build_options, encoder, write_corpus

from clipsearch.indexer.build import add, build
from clipsearch.indexer.maintenance import delete
from clipsearch.retrieval.distributed import (
    DistributedOptions,
    DistributedSearchEngine,
    ShardsUnavailableError,
    assign_groups,
)
from clipsearch.retrieval.engine import SearchEngine
from clipsearch.retrieval.errors import FilterError
from clipsearch.retrieval.queries import ComposedQuery

HOSTS = DistributedOptions(groups=2, cpus_per_host=0)


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 documents (image + title rows), shards of 25 rows, 6 documents deleted."""
    folder = tmp_path_factory.mktemp("search")
    corpus = write_corpus(folder / "corpus", 90, bad=False)
    root = folder / "index"
    build([corpus], root, encoder=encoder(), options=build_options(shard_size=25))
    delete(root, ids=["d0003", "d0010", "d0011", "d0040", "d0077", "d0089"])
    return root


@pytest.fixture(scope="module")
def engines(
    ray_cluster: Any, index: Path
) -> Iterator[tuple[SearchEngine, DistributedSearchEngine]]:
    with (
        SearchEngine.open(index, encoder()) as local,
        DistributedSearchEngine.open(index, encoder(), options=HOSTS) as dist,
    ):
        yield local, dist


CASES: list[dict[str, Any]] = [
    {},
    {"k": 25, "offset": 5},
    {"where": "price < 20"},  # selective: exact scans of the allowed rows
    {"where": "category == 'mugs' and price > 50", "k": 40},  # fewer matches than k
    {"where": "price > 1000"},  # nothing matches
    {"group_by_doc": True, "modality": "text"},
    {"mmr": 0.5, "k": 8},
    {"boosts": {"price": 0.002}},
    {"sort": "price", "min_score": 0.1},
    {"mode": "vector"},
    {"mode": "lexical", "where": "price < 60"},
    {"mode": "hybrid", "fusion": "weighted", "k": 20},
]


def same(a: Any, b: Any) -> None:
    assert [(h.row_id, h.doc_id, h.metadata, h.explain) for h in a.hits] == [
        (h.row_id, h.doc_id, h.metadata, h.explain) for h in b.hits
    ]
    np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits], atol=1e-6)
    assert a.total_matches == b.total_matches and a.index_version == b.index_version


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(c) or "plain")
def test_distributed_search_equals_local(engines: Any, case: dict[str, Any]) -> None:
    local, dist = engines
    for query in ("red shirt", ComposedQuery(((1.0, "wool lamp"), (-0.5, "dark")))):
        same(local.search(query, **case), dist.search(query, **case))


def test_batches_counts_and_image_queries_match(engines: Any, index: Path) -> None:
    local, dist = engines
    image = next(index.parent.glob("corpus/img0005.png"))
    queries = ["blue mug", image, np.asarray(local.snapshot.shards[0].vectors[4], np.float32)]
    for a, b in zip(local.search_batch(queries, k=7), dist.search_batch(queries, k=7), strict=True):
        same(a, b)
    for where in (None, "price < 50", "category == 'lamps'"):
        for modality in (None, "image", "text"):
            assert dist.count(where, modality) == local.count(where, modality)
    assert dist.version == local.version and dist.target_modality() == "image"


def test_bad_filter_fails_like_the_local_engine(engines: Any) -> None:
    local, dist = engines
    with pytest.raises(FilterError) as lost:
        local.search("x", where="colour == 'red'")
    with pytest.raises(FilterError) as dlost:
        dist.search("x", where="colour == 'red'")
    assert str(lost.value) == str(dlost.value)


def test_shards_spread_over_both_nodes(engines: Any, ray_cluster: Any) -> None:
    _, dist = engines
    placement = dist.placement
    assert set(placement) == {s.name for s in dist.manifest.shards}
    assert all(len(nodes) == 1 for nodes in placement.values())
    # Two groups of about equal bytes, hosted on the cluster's two nodes.
    assert len({nodes[0] for nodes in placement.values()}) == 2


def test_assign_groups_balances_bytes_and_keeps_placed_shards(engines: Any) -> None:
    _, dist = engines
    shards = dist.manifest.shards
    groups = assign_groups(shards, 2)
    assert sorted(set(groups.values())) == [0, 1]
    flipped = {n: 1 - g for n, g in groups.items()}
    assert assign_groups(shards, 2, flipped) == flipped  # a rollout moves nothing


def _host(dist: DistributedSearchEngine, group: int, replica: int = 0) -> Any:
    return dist._replicas[group][replica].handle


def test_dead_replica_fails_over_mid_queries(ray_cluster: Any, index: Path) -> None:
    import ray

    options = DistributedOptions(groups=2, replicas=2, cpus_per_host=0, max_restarts=0)
    with (
        SearchEngine.open(index, encoder()) as local,
        DistributedSearchEngine.open(index, encoder(), options=options) as dist,
    ):
        expected = local.search("striped mug", k=30)
        errors: list[BaseException] = []
        results = []
        started = threading.Event()

        def query() -> None:
            try:
                for i in range(12):
                    results.append(dist.search("striped mug", k=30))
                    if i == 2:
                        started.set()
            except BaseException as e:
                errors.append(e)
                started.set()

        t = threading.Thread(target=query)
        t.start()
        started.wait(timeout=120)
        ray.kill(_host(dist, 0, 0), no_restart=True)  # while queries are running
        ray.kill(_host(dist, 1, 1), no_restart=True)
        t.join(timeout=300)
        assert not errors and len(results) == 12
        for r in results:
            same(expected, r)
        same(expected, dist.search("striped mug", k=30))


def test_last_replica_lost_names_the_shards_then_reload_heals(
    ray_cluster: Any, index: Path
) -> None:
    import ray

    options = DistributedOptions(groups=2, cpus_per_host=0, max_restarts=0)
    with (
        SearchEngine.open(index, encoder()) as local,
        DistributedSearchEngine.open(index, encoder(), options=options) as dist,
    ):
        lost = [n for n, g in dist._layout.group_of.items() if g == 1]
        ray.kill(_host(dist, 1), no_restart=True)
        with pytest.raises(ShardsUnavailableError) as e:
            dist.search("red shirt", modality="image")
        image_lost = {s.name for s in dist.manifest.shards if s.modality == "image"} & set(lost)
        assert set(e.value.shards) == image_lost
        for name in image_lost:
            assert name in str(e.value)
        assert dist.reload() is False  # same version; the lost host is replaced
        same(local.search("red shirt"), dist.search("red shirt"))


def test_crashed_host_is_restarted_by_ray_and_reloads(ray_cluster: Any, index: Path) -> None:
    import ray

    with (
        SearchEngine.open(index, encoder()) as local,
        DistributedSearchEngine.open(index, encoder(), options=HOSTS) as dist,
    ):
        pid = ray.get(_host(dist, 0).ping.remote())
        ray.kill(_host(dist, 0), no_restart=False)  # a crash: Ray restarts the actor
        same(local.search("red shirt", k=20), dist.search("red shirt", k=20))
        assert ray.get(_host(dist, 0).ping.remote()) != pid


@pytest.mark.slow
def test_new_version_rolls_out_without_failed_queries(ray_cluster: Any, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", 60, bad=False)
    root = tmp_path / "index"
    build([corpus], root, encoder=encoder(), options=build_options(shard_size=25))
    with DistributedSearchEngine.open(root, encoder(), options=HOSTS) as dist:
        v1 = dist.version
        seen: set[int] = set()
        errors: list[BaseException] = []
        stop = threading.Event()

        def query() -> None:
            while not stop.is_set():
                try:
                    seen.add(dist.search("soft wool", k=5).index_version)
                except BaseException as e:
                    errors.append(e)
                    return

        threads = [threading.Thread(target=query) for _ in range(2)]
        for t in threads:
            t.start()
        more = write_corpus(tmp_path / "more", 20, seed=5, bad=False)
        add(root, [more], encoder=encoder(), options=build_options(shard_size=25))
        assert dist.reload() is True
        after = dist.search("soft wool", k=5)
        stop.set()
        for t in threads:
            t.join(timeout=300)
        assert not errors
        assert seen <= {v1, v1 + 1} and after.index_version == v1 + 1
        with SearchEngine.open(root, encoder()) as local:
            same(local.search("soft wool", k=15), dist.search("soft wool", k=15))
            same(local.search("x", where="price < 30"), dist.search("x", where="price < 30"))
