"""Lock contention, tombstones, compaction + GC, content-hash skipping on add."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipsearch.indexer.build import BuildOptions, add, build
from clipsearch.indexer.lock import LOCK_FILE, IndexLock
from clipsearch.indexer.maintenance import compact, delete, info
from clipsearch.indexer.sources import SourceOptions
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.errors import (
    ConfigError,
    FilterError,
    FingerprintMismatchError,
    IndexLockedError,
)
from clipsearch.retrieval.manifest import list_versions, read_current
from clipsearch.retrieval.store import open_snapshot, verify_index
from tests.indexer.helpers import make_images, snapshot_rows, write_products

ENC = FakeEncoder(32)
CSV_OPTS = BuildOptions(
    shard_size=4, sources=SourceOptions(image_col="image_path", text_cols=("title",), id_col="sku")
)


@pytest.fixture()
def catalog(tmp_path: Path) -> Path:
    csv = write_products(tmp_path, 10)
    build([csv], tmp_path / "idx", encoder=ENC, options=CSV_OPTS)
    return tmp_path / "idx"


def test_second_writer_fails_clearly_while_the_first_holds_the_lock(catalog: Path) -> None:
    with IndexLock(catalog, "build"):
        with pytest.raises(
            IndexLockedError, match=r"another writer holds the index lock \(build by pid"
        ):
            delete(catalog, ids=["SKU0001"])
        assert open_snapshot(catalog).version == 1  # readers never need the lock
    assert not (catalog / LOCK_FILE).exists()
    assert delete(catalog, ids=["SKU0001"]).deleted_rows == 2


def test_stale_lock_of_a_dead_process_is_taken_over(catalog: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(proc.stdout)
    (catalog / LOCK_FILE).write_text(
        json.dumps({"pid": dead_pid, "host": socket.gethostname(), "operation": "build"})
    )
    assert delete(catalog, ids=["SKU0002"]).deleted_rows == 2
    (catalog / LOCK_FILE).write_text(
        json.dumps({"pid": 1, "host": "some-other-host", "operation": "add"})
    )
    with pytest.raises(IndexLockedError, match="some-other-host"):
        compact(catalog)


def test_delete_by_ids_and_where_then_compact_reclaims(catalog: Path) -> None:
    r = delete(catalog, ids=["SKU0000", "SKU0003", "NOPE"])
    assert (r.deleted_rows, r.deleted_docs, r.not_found) == (4, 2, ("NOPE",))
    r2 = delete(catalog, where="price > 17 and category = 'purple'")  # SKU0009 (19.5, purple)
    assert (r2.deleted_rows, r2.deleted_docs) == (2, 1)
    assert delete(catalog, ids=["SKU0000"]).deleted_rows == 0  # already deleted: no new version
    snap = open_snapshot(catalog)
    assert snap.version == 3 and len(snap.tombstones) == 6
    rows, _ = snapshot_rows(catalog)
    assert {r["doc_id"] for r in rows} == {f"SKU{i:04d}" for i in (1, 2, 4, 5, 6, 7, 8)}
    assert info(catalog)["rows"]["live"] == 14
    with pytest.raises(FilterError):
        delete(catalog, where="colour = 'red'")
    with pytest.raises(ConfigError):
        delete(catalog)
    size_before = sum(p.stat().st_size for p in catalog.rglob("*") if p.is_file())
    result = compact(catalog)
    assert result.rows_removed == 6 and result.versions_removed == (1, 2, 3)
    assert list_versions(catalog) == [4]
    after, _ = snapshot_rows(catalog)
    assert sorted((r["doc_id"], r["modality"]) for r in after) == sorted(
        (r["doc_id"], r["modality"]) for r in rows
    )
    assert read_current(catalog).n_tombstones == 0
    referenced = {f.path for f in read_current(catalog).files()} | {
        "manifests/v000004.json",
        "CURRENT",
    }
    on_disk = {p.relative_to(catalog).as_posix() for p in catalog.rglob("*") if p.is_file()}
    assert on_disk == referenced
    assert sum(p.stat().st_size for p in catalog.rglob("*") if p.is_file()) < size_before
    assert verify_index(catalog).ok


def test_readd_skips_unchanged_and_replaces_changed(tmp_path: Path, catalog: Path) -> None:
    csv = tmp_path / "products.csv"
    again = add(catalog, [csv], options=CSV_OPTS)  # encoder re-created from the manifest
    assert (again.indexed, again.unchanged, again.replaced) == (0, 20, 0)
    lines = csv.read_text().splitlines()
    lines[3] = lines[3].replace("shirt number 2", "sweater number 2")  # SKU0002 title changed
    new_photo = make_images(tmp_path / "new", 1, seed=77)[0]
    (tmp_path / "photos" / "img0004.jpg").write_bytes(
        new_photo.read_bytes()
    )  # SKU0004 photo changed
    lines.append("SKU0100,photos/img0001.jpg,brand new,1.0,red")
    csv.write_text("\n".join(lines) + "\n")
    summary = add(catalog, [csv], encoder=ENC, options=CSV_OPTS)
    assert (summary.indexed, summary.unchanged, summary.replaced) == (4, 18, 2)
    rows, _ = snapshot_rows(catalog)
    live = {(r["doc_id"], r["modality"]): r for r in rows}
    assert len(live) == 22
    assert live[("SKU0002", "text")]["source"] == "blue sweater number 2"
    assert live[("SKU0100", "image")]["content_hash"] == live[("SKU0001", "image")]["content_hash"]
    assert live[("SKU0004", "image")]["row_id"] >= 20


def test_add_refuses_a_different_encoder(catalog: Path, tmp_path: Path) -> None:
    with pytest.raises(FingerprintMismatchError, match="seed"):
        add(catalog, [tmp_path / "products.csv"], encoder=FakeEncoder(32, seed=1), options=CSV_OPTS)


def test_info_reports_counts_model_and_errors(catalog: Path) -> None:
    data = info(catalog)
    assert data["rows"]["by_modality"] == {"image": 10, "text": 10}
    assert data["model"]["arch"] == "fake-32" and data["shards"] == 6
    assert data["index_types"] == {"Flat": 6} and data["errors"] == 0
    assert np.isclose(data["bytes"], sum(f.bytes for f in read_current(catalog).files()))


def test_compact_rebuilds_a_shard_with_its_recorded_build_options(tmp_path: Path) -> None:
    """An IVF-PQ shard chosen by ``auto`` under a memory budget stays IVF-PQ after
    compaction (the budget and thresholds are recorded per shard, not just "auto")."""
    from clipsearch.indexer.ann import IndexOptions

    catalog = tmp_path / "catalog.csv"
    catalog.write_text(
        "id,title\n" + "\n".join(f"d{i},product {i} {i * 7919 % 1000}" for i in range(2000)),
        encoding="utf-8",
    )
    index_options = IndexOptions(
        index="auto", max_memory=20_000, flat_max_rows=100, tune_queries=30, target_recall=0.8
    )
    options = BuildOptions(
        workers=1, index=index_options, sources=SourceOptions(text_cols=("title",), id_col="id")
    )
    build([catalog], tmp_path / "idx", encoder=FakeEncoder(16), options=options)
    (before,) = read_current(tmp_path / "idx").shards
    assert before.index.factory.startswith("IVF") and "PQ" in before.index.factory
    assert before.index.build_options == index_options.to_dict()
    delete(tmp_path / "idx", ids=[f"d{i}" for i in range(0, 200, 2)])
    compact(tmp_path / "idx")
    (after,) = read_current(tmp_path / "idx").shards
    assert after.rows == 1900 and after.name != before.name
    assert after.index.factory.startswith("IVF") and "PQ" in after.index.factory
    assert after.index.build_options == before.index.build_options
    assert open_snapshot(tmp_path / "idx").shards[0].index.ntotal == 1900
