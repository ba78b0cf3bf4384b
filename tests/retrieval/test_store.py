"""The on-disk store: open_snapshot pins and checks a version; verify reports damage per shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipsearch.indexer.build import BuildOptions, build
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.errors import IndexFormatError, IndexNotFoundError
from clipsearch.retrieval.manifest import CURRENT_FILE, FIXED_COLUMNS, read_current
from clipsearch.retrieval.store import open_snapshot, verify_index
from tests.indexer.helpers import make_images


@pytest.fixture()
def index(tmp_path: Path) -> Path:
    make_images(tmp_path / "imgs", 30)
    out = tmp_path / "idx"
    build([tmp_path / "imgs"], out, encoder=FakeEncoder(32), options=BuildOptions(shard_size=12))
    return out


def test_open_snapshot_loads_every_shard_aligned(index: Path) -> None:
    snap = open_snapshot(index, verify_hashes=True)
    assert snap.version == 1
    assert [s.record.rows for s in snap.shards] == [12, 12, 6]
    for s in snap.shards:
        assert s.index.ntotal == s.record.rows
        assert s.vectors.dtype == np.float16 and s.vectors.shape == (s.record.rows, 32)
        assert tuple(s.metadata.column_names[:5]) == FIXED_COLUMNS
        assert s.metadata.column("row_id").to_pylist() == list(
            range(s.record.row_id_start, s.record.row_id_end)
        )
    assert len(snap.tombstones) == 0


def test_snapshot_stays_pinned_while_a_new_version_is_committed(
    index: Path, tmp_path: Path
) -> None:
    snap = open_snapshot(index)
    make_images(tmp_path / "more", 5, seed=9, prefix="more")
    build([tmp_path / "more"], index, encoder=FakeEncoder(32))
    assert snap.version == 1 and sum(s.record.rows for s in snap.shards) == 30
    assert open_snapshot(index).version == 2


def test_missing_index_and_non_index_dirs(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError, match="no such directory"):
        open_snapshot(tmp_path / "nope")
    with pytest.raises(IndexNotFoundError, match="not a clipsearch index"):
        open_snapshot(tmp_path)


def test_garbage_current_and_future_format_are_refused(index: Path) -> None:
    (index / CURRENT_FILE).write_text("hello")
    with pytest.raises(IndexFormatError, match="expected a manifest name"):
        open_snapshot(index)
    (index / CURRENT_FILE).write_text("v000001.json\n")
    mpath = index / "manifests" / "v000001.json"
    data = json.loads(mpath.read_text())
    data["format_version"] = 99
    mpath.write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match="format version 99"):
        open_snapshot(index)


def test_truncated_shard_file_fails_open_and_is_reported_by_verify(index: Path) -> None:
    shard = read_current(index).shards[1]
    path = index / shard.vectors.path
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IndexFormatError, match=r"s000001\.f16\.npy has .* bytes"):
        open_snapshot(index)
    report = verify_index(index)
    assert not report.ok
    assert list(report.problems) == ["s000001"]
    assert "truncated" in report.problems["s000001"][0]


def test_flipped_byte_is_caught_at_open_and_by_quick_verify(index: Path) -> None:
    shard = read_current(index).shards[2]
    path = index / shard.faiss.path
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    # sizes match; the XXH3 check at open still sees the changed byte
    with pytest.raises(IndexFormatError, match=r"version 1 .*s000002\.faiss content differs"):
        open_snapshot(index)
    with pytest.raises(IndexFormatError, match="corrupt"):
        open_snapshot(index, verify_hashes=True)
    open_snapshot(index, verify="size")  # only when asked not to check content
    report = verify_index(index)
    assert list(report.problems) == ["s000002"] and "corrupt" in report.problems["s000002"][0]
    quick = verify_index(index, verify_hashes=False)
    assert list(quick.problems) == ["s000002"]


def test_missing_metadata_file_is_reported(index: Path) -> None:
    shard = read_current(index).shards[0]
    (index / shard.metadata.path).unlink()
    report = verify_index(index)
    assert "s000000" in report.problems and "missing" in report.problems["s000000"][0]
    assert report.to_dict()["ok"] is False


def test_open_reads_each_shard_file_once(index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked and parsed from one read: every shard file is opened exactly once."""
    import builtins
    from collections import Counter

    opened: Counter[str] = Counter()
    real_open = builtins.open

    def counting_open(file: object, *args: object, **kwargs: object) -> object:
        if isinstance(file, (str, Path)) and Path(file).is_relative_to(index.resolve()):
            opened[Path(file).relative_to(index.resolve()).as_posix()] += 1
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", counting_open)
    snap = open_snapshot(index)
    shard_files = {f.path for s in snap.manifest.shards for f in s.files}
    assert {p: opened[p] for p in shard_files} == dict.fromkeys(shard_files, 1)
