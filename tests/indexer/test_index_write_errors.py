"""Disk full, read-only filesystem, no permission: a clear error, the previous version
intact, no partial files left. Simulated (root bypasses chmod): the fsync of the n-th
file written fails with ENOSPC / EROFS, at every n an operation reaches."""

from __future__ import annotations

import errno
import pathlib
from collections.abc import Callable
from pathlib import Path

import pytest

from clipsearch.indexer import fsutil
from clipsearch.indexer.build import STAGING_DIR, BuildOptions, add, build
from clipsearch.indexer.fsutil import TMP_MARKER
from clipsearch.indexer.maintenance import compact, delete
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.errors import IndexWriteError
from clipsearch.retrieval.manifest import read_current
from tests.indexer.helpers import canonical, make_images, snapshot_rows

ENC = FakeEncoder(32)
OPTS = BuildOptions(shard_size=4, batch_size=4, checkpoint_items=3)


def _fail_nth_write(monkeypatch: pytest.MonkeyPatch, n: int, code: int) -> list[int]:
    calls = [0]
    real = fsutil.fsync_file

    def fsync(path: Path) -> None:
        calls[0] += 1
        if calls[0] == n:
            raise OSError(code, "simulated", str(path))
        real(path)

    monkeypatch.setattr(fsutil, "fsync_file", fsync)
    return calls


def _writes(op: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> int:
    """How many files ``op`` writes (so every failure point is tried)."""
    calls = _fail_nth_write(monkeypatch, 10**9, errno.ENOSPC)
    op()
    monkeypatch.undo()
    return calls[0]


def _no_partial_files(idx: Path) -> None:
    leftovers = [p for p in idx.rglob("*") if TMP_MARKER in p.name]
    assert leftovers == []
    manifest = read_current(idx)
    referenced = {f.path for s in manifest.shards for f in s.files}
    journaled = " ".join(p.read_text() for p in (idx / STAGING_DIR).rglob("journal.json"))
    for p in (idx / "shards").iterdir():
        rel = p.relative_to(idx).as_posix()
        # A shard file is live, or journaled progress a re-run resumes; never an orphan.
        assert rel in referenced or p.name.split(".")[0] in journaled, rel
    for p in (idx / STAGING_DIR).rglob("*"):
        if p.is_file() and p.name != "journal.json":
            assert f'"{p.stem}"' in journaled, p  # every spill is journaled


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    make_images(tmp_path / "a", 9)
    make_images(tmp_path / "b", 6, seed=2, prefix="b")
    return {"a": tmp_path / "a", "b": tmp_path / "b"}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_add_fails_cleanly_at_every_write(
    tmp_path: Path, corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    probe = tmp_path / "probe"
    build([corpus["a"]], probe, encoder=ENC, options=OPTS)
    n_writes = _writes(lambda: add(probe, [corpus["b"]], encoder=ENC, options=OPTS), monkeypatch)
    assert n_writes >= 8
    for n in range(1, n_writes + 1):
        idx = tmp_path / f"idx{n}"
        build([corpus["a"]], idx, encoder=ENC, options=OPTS)
        before = canonical(snapshot_rows(idx)[0])
        _fail_nth_write(monkeypatch, n, code)
        with pytest.raises(IndexWriteError) as e:
            add(idx, [corpus["b"]], encoder=ENC, options=OPTS)
        monkeypatch.undo()
        assert e.value.errno == code
        text = str(e.value)
        assert "keeps its previous version" in text and str(idx) in text
        assert ("no space left" if code == errno.ENOSPC else "read-only") in text
        assert read_current(idx).version == 1
        assert canonical(snapshot_rows(idx)[0]) == before
        _no_partial_files(idx)
        # Once the disk has room again, the same command completes.
        add(idx, [corpus["b"]], encoder=ENC, options=OPTS)
        assert canonical(snapshot_rows(idx)[0]) == canonical(snapshot_rows(probe)[0])


def test_rebuild_disk_full_keeps_the_old_version(
    tmp_path: Path, corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    idx = tmp_path / "idx"
    build([corpus["a"]], idx, encoder=ENC, options=OPTS)
    before = canonical(snapshot_rows(idx)[0])
    for n in (1, 3, 6, 9):
        _fail_nth_write(monkeypatch, n, errno.ENOSPC)
        with pytest.raises(IndexWriteError, match="no space left"):
            build([corpus["b"]], idx, encoder=ENC, options=OPTS)
        monkeypatch.undo()
        assert canonical(snapshot_rows(idx)[0]) == before
        _no_partial_files(idx)


@pytest.mark.parametrize("op", ["delete", "compact"])
def test_delete_and_compact_report_disk_full(
    tmp_path: Path, corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    idx = tmp_path / "idx"
    build([corpus["a"]], idx, encoder=ENC, options=OPTS)
    if op == "compact":
        delete(idx, ids=["img0001.jpg"])
    before = canonical(snapshot_rows(idx)[0])
    version = read_current(idx).version
    run = (lambda: delete(idx, ids=["img0002.jpg"])) if op == "delete" else (lambda: compact(idx))
    _fail_nth_write(monkeypatch, 1, errno.ENOSPC)
    with pytest.raises(IndexWriteError, match="no space left"):
        run()
    monkeypatch.undo()
    assert read_current(idx).version == version
    assert canonical(snapshot_rows(idx)[0]) == before
    assert [p for p in idx.rglob("*") if TMP_MARKER in p.name] == []


def test_compact_failing_at_any_write_leaves_no_shard_files(
    tmp_path: Path, corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compact rewriting several shards fails at every write it makes: each time the
    live version is untouched and no rewritten shard's files stay behind."""
    idx = tmp_path / "idx"
    build([corpus["a"]], idx, encoder=ENC, options=OPTS)
    delete(idx, ids=["img0001.jpg", "img0005.jpg", "img0009.jpg"])
    before = canonical(snapshot_rows(idx)[0])
    files_before = sorted(p.name for p in (idx / "shards").iterdir())
    n_writes = _writes(lambda: compact(idx), monkeypatch)
    # _writes ran one compact to count; rebuild the same starting point for each trial.
    for n in range(1, n_writes + 1):
        trial = tmp_path / f"trial{n}"
        build([corpus["a"]], trial, encoder=ENC, options=OPTS)
        delete(trial, ids=["img0001.jpg", "img0005.jpg", "img0009.jpg"])
        version = read_current(trial).version
        _fail_nth_write(monkeypatch, n, errno.ENOSPC)
        with pytest.raises(IndexWriteError, match="no space left"):
            compact(trial)
        monkeypatch.undo()
        if read_current(trial).version != version:
            continue  # the failure hit the garbage collection after the commit
        assert canonical(snapshot_rows(trial)[0]) == before
        assert sorted(p.name for p in (trial / "shards").iterdir()) == files_before


def test_read_only_index_folder_fails_at_the_lock_with_a_clear_message(
    tmp_path: Path, corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    idx = tmp_path / "idx"
    build([corpus["a"]], idx, encoder=ENC, options=OPTS)
    real = pathlib.Path.write_text

    def read_only(self: Path, *args: object, **kwargs: object) -> int:
        if self.parent == idx:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pathlib.Path, "write_text", read_only)
    with pytest.raises(IndexWriteError, match="read-only") as e:
        add(idx, [corpus["b"]], encoder=ENC, options=OPTS)
    assert "LOCK" in str(e.value) and "taking the index lock" in str(e.value)
    assert not (idx / "LOCK").exists()


def test_cli_prints_the_error_not_a_traceback(
    tmp_path: Path, corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from clipsearch.cli.app import app

    _fail_nth_write(monkeypatch, 1, errno.ENOSPC)
    r = CliRunner().invoke(
        app,
        [
            "index",
            "build",
            str(corpus["a"]),
            "--out",
            str(tmp_path / "idx"),
            "--model",
            "fake-32",
        ],
    )
    assert r.exit_code == 1 and r.exception is not None
    assert isinstance(r.exception, SystemExit)
    assert "no space left on the device" in r.output and "Traceback" not in r.output
