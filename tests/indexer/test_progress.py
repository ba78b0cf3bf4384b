"""The one progress protocol: every long operation reports Progress events, in stage order,
with done never past total, and the ANN index's training and tuning as their own stages."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from clipsearch.indexer.ann import IndexOptions
from clipsearch.indexer.build import BuildOptions, add, build
from clipsearch.indexer.demo.generate import generate_catalog
from clipsearch.indexer.maintenance import compact, delete
from clipsearch.indexer.sources import SourceOptions
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.manifest import read_current
from clipsearch.retrieval.progress import Progress, prefixed, within
from tests.indexer.helpers import write_products

ENC = FakeEncoder(32)
SOURCES = SourceOptions(image_col="image_path", text_cols=("title",), id_col="sku")


def _options(index: str, shard_size: int) -> BuildOptions:
    return BuildOptions(
        shard_size=shard_size,
        index=IndexOptions(index=index, tune_queries=20, device="cpu"),
        sources=SOURCES,
    )


def check_events(events: list[object]) -> list[Progress]:
    """Every event is a Progress with a unit and 0 <= done <= total; returns them typed."""
    assert events, "no progress reported"
    typed = [e for e in events if isinstance(e, Progress)]
    assert len(typed) == len(events), {type(e).__name__ for e in events}
    for e in typed:
        assert e.unit and e.stage
        assert e.done >= 0 and (e.total is None or e.done <= e.total), e
        assert 0 <= e.skipped <= e.done, e
    return typed


def runs(events: list[Progress]) -> list[str]:
    """Stage names with consecutive repeats collapsed: the order stages ran in."""
    return [stage for stage, _ in itertools.groupby(e.stage for e in events)]


def last(events: list[Progress], stage: str) -> Progress:
    return [e for e in events if e.stage == stage][-1]


@pytest.mark.parametrize(
    ("index", "per_shard"),
    [
        ("ivf", ["train index", "fill index", "tune index", "write shard"]),
        ("hnsw", ["fill index", "tune index", "write shard"]),
        ("flat", ["fill index", "write shard"]),
    ],
)
def test_build_reports_every_stage_in_order(
    tmp_path: Path, index: str, per_shard: list[str]
) -> None:
    csv = write_products(tmp_path, 60)
    seen: list[object] = []
    summary = build(
        [csv], tmp_path / "idx", encoder=ENC, options=_options(index, 30), progress=seen.append
    )
    events = check_events(seen)
    order = runs(events)
    assert order[:2] == ["scan", "embed"] and order[-1] == "commit"
    n_shards = len(read_current(tmp_path / "idx").shards)
    assert n_shards == 4
    # Between scan and commit: embedding, interrupted by each shard's index + write stages.
    assert [s for s in order[2:-1] if s != "embed"] == per_shard * n_shards
    assert last(events, "scan").done == last(events, "scan").total == summary.input == 120
    assert last(events, "embed").done == last(events, "embed").total == 120
    assert (last(events, "commit").done, last(events, "commit").total) == (1, 1)
    assert {e.unit for e in events if e.stage == "embed"} == {"items"}
    tune = [e for e in events if e.stage == "tune index"]
    if tune:
        assert tune[-1].total == tune[-1].done >= 1  # closed once tuning stopped
        assert "recall@10" in tune[-1].detail


def test_add_reports_unchanged_items_as_skipped(tmp_path: Path) -> None:
    csv = write_products(tmp_path, 8)
    build([csv], tmp_path / "idx", encoder=ENC, options=_options("flat", 100))
    seen: list[object] = []
    add(tmp_path / "idx", [csv], encoder=ENC, options=_options("flat", 100), progress=seen.append)
    embed = last(check_events(seen), "embed")
    assert (embed.done, embed.skipped, embed.detail["unchanged"]) == (16, 16, 16)
    assert "write shard" not in runs(check_events(seen))  # nothing new to write


def test_delete_and_compact_report_through_the_same_type(tmp_path: Path) -> None:
    csv = write_products(tmp_path, 10)
    root = tmp_path / "idx"
    build([csv], root, encoder=ENC, options=_options("flat", 4))
    deleted: list[object] = []
    delete(root, ids=["SKU0001", "SKU0002", "SKU0009"], progress=deleted.append)
    events = check_events(deleted)
    assert runs(events) == ["read metadata", "commit"]
    assert last(events, "read metadata").done == len(read_current(root).shards) == 6

    seen: list[object] = []
    summary = compact(root, progress=seen.append)
    events = check_events(seen)
    order = runs(events)
    assert order[0] == "rewrite shards" and order[-2:] == ["commit", "remove files"]
    rewrite = last(events, "rewrite shards")
    # SKU0001-2 share image shard 0 and text shard 0; SKU0009 sits in the last shard of each.
    assert rewrite.done == rewrite.total == 4
    assert summary.shards_rewritten == 4
    assert order.count("write shard") == summary.shards_rewritten
    removed = last(events, "remove files")
    assert removed.done == removed.total == summary.files_removed > 0


def test_generate_catalog_reports_products(tmp_path: Path) -> None:
    seen: list[object] = []
    generate_catalog(tmp_path, products=3, seed=1, progress=seen.append)
    events = check_events(seen)
    assert [(e.stage, e.done, e.total, e.unit) for e in events] == [
        ("generate catalog", d, 3, "products") for d in range(4)
    ]


def test_helpers_rename_and_rebase_events() -> None:
    seen: list[Progress] = []
    forward = prefixed(seen.append, "index: ")
    assert forward is not None and prefixed(None, "x") is None
    forward(Progress("embed", 2, 5, "items", skipped=1))
    part = within(seen.append, offset=10, total=15)
    assert part is not None and within(None, offset=0, total=1) is None
    part(Progress("load images", 5, 5, "images"))
    assert seen == [
        Progress("index: embed", 2, 5, "items", skipped=1),
        Progress("load images", 15, 15, "images"),
    ]
