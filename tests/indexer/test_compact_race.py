"""Readers racing ``compact``: an open or reload never fails because compaction removed
the files of the version it started on, and never tells a user to rebuild a healthy index."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from clipsearch.indexer.build import BuildOptions, build
from clipsearch.indexer.maintenance import compact, delete
from clipsearch.indexer.sources import SourceOptions
from clipsearch.retrieval import store
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.engine import SearchEngine
from clipsearch.retrieval.store import open_snapshot

N_DOCS = 60


@pytest.fixture()
def index(tmp_path: Path) -> Path:
    catalog = tmp_path / "catalog.csv"
    rows = [f"d{i:03d},item number {i}" for i in range(N_DOCS)]
    catalog.write_text("id,title\n" + "\n".join(rows) + "\n", encoding="utf-8")
    options = BuildOptions(
        shard_size=6, workers=1, sources=SourceOptions(text_cols=("title",), id_col="id")
    )
    build([catalog], tmp_path / "idx", encoder=FakeEncoder(16), options=options)
    return tmp_path / "idx"


def _delete_and_compact(root: Path, doc: str) -> None:
    """One writer step: tombstone a document, then compact away every older version."""
    delete(root, ids=[doc])
    compact(root, keep_versions=1)


@pytest.mark.parametrize("hook", ["current_version", "read_manifest"])
def test_compaction_between_reading_current_and_the_files(
    index: Path, monkeypatch: pytest.MonkeyPatch, hook: str
) -> None:
    """Compaction lands right after the reader looked at CURRENT (before it read the
    manifest) or right after it read the manifest (before it opened the shard files):
    the files of that version are gone, and the open continues on the new version."""
    real = getattr(store, hook)
    fired = []

    def racing(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        if not fired:
            fired.append(True)
            _delete_and_compact(index, "d000")
        return out

    monkeypatch.setattr(store, hook, racing)
    snap = open_snapshot(index)
    assert fired and snap.version == 3  # build, delete, compact
    assert snap.manifest.n_rows == N_DOCS - 1


def test_compaction_between_checking_and_opening_a_lexical_part(
    index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tantivy opens a shard's lexical folder after its files were checked: compaction
    removing them in between is a replaced version (the open continues on the new one),
    not damage (seen once in CI as "version 8 cannot be served")."""
    from clipsearch.retrieval import lexical

    assert store.read_current(index).shards[0].lexical is not None
    real = lexical.open_lexical
    fired = []

    def racing(root: Path, record: Any) -> Any:
        if not fired:
            fired.append(True)
            _delete_and_compact(index, "d000")
        return real(root, record)

    monkeypatch.setattr(lexical, "open_lexical", racing)
    snap = open_snapshot(index)
    assert fired and snap.version == 3  # build, delete, compact
    assert snap.manifest.n_rows == N_DOCS - 1


def test_engine_reload_during_compaction(index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with SearchEngine.open(index) as engine:
        real = store.read_manifest
        fired = []

        def racing(root: Path, version: int) -> Any:
            out = real(root, version)
            if not fired:
                fired.append(True)
                _delete_and_compact(index, "d001")
            return out

        delete(index, ids=["d002"])
        monkeypatch.setattr(store, "read_manifest", racing)
        assert engine.reload()
        assert engine.count() == N_DOCS - 2


def test_missing_file_without_a_newer_version_is_reported_not_retried(index: Path) -> None:
    shard = store.read_current(index).shards[1]
    (index / shard.faiss.path).unlink()
    with pytest.raises(store.IndexFormatError, match=r"version 1 .*s000001\.faiss is missing"):
        open_snapshot(index)


def test_opens_and_reloads_while_writers_compact(index: Path) -> None:
    """Threads open and reload in bounded loops while a writer deletes and compacts."""
    errors: list[BaseException] = []
    versions: list[int] = []
    writer_done = threading.Event()

    def writer() -> None:
        try:
            for i in range(12):
                _delete_and_compact(index, f"d{10 + i:03d}")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            writer_done.set()

    def opener() -> None:
        try:
            for _ in range(40):
                versions.append(open_snapshot(index).version)
                if writer_done.is_set():
                    break
        except BaseException as e:
            errors.append(e)

    def reloader() -> None:
        try:
            with SearchEngine.open(index) as engine:
                for _ in range(40):
                    engine.reload()
                    versions.append(engine.version)
                    if writer_done.is_set():
                        break
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=f) for f in (writer, opener, opener, reloader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert versions
    final = open_snapshot(index)
    assert final.manifest.n_rows == N_DOCS - 12
