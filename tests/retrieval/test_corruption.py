"""Corruption is detected before anything is served: a matrix over every file kind and
byte position, truncation and same-size replacement, plus the messages a user reads."""

from __future__ import annotations

import json
import os
import tokenize
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from clipsearch.indexer.build import BuildOptions, add, build
from clipsearch.indexer.maintenance import delete
from clipsearch.indexer.sources import SourceOptions
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.engine import SearchEngine
from clipsearch.retrieval.errors import IndexFormatError
from clipsearch.retrieval.manifest import CURRENT_FILE, read_current
from clipsearch.retrieval.store import open_snapshot, read_vectors, verify_index

OPTIONS = BuildOptions(
    shard_size=20, workers=1, sources=SourceOptions(text_cols=("title",), id_col="id")
)


def _catalog(path: Path, ids: range) -> Path:
    path.write_text(
        "id,title,price\n" + "\n".join(f"d{i},item {i},{i}.5" for i in ids) + "\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v1: build (2 shards), v2: add (a third shard), v3: delete (tombstones)."""
    folder = tmp_path_factory.mktemp("pristine")
    root = folder / "idx"
    build([_catalog(folder / "a.csv", range(40))], root, encoder=FakeEncoder(16), options=OPTIONS)
    add(root, [_catalog(folder / "b.csv", range(40, 50))], encoder=FakeEncoder(16), options=OPTIONS)
    delete(root, ids=["d3", "d45"])
    return root


@pytest.fixture()
def index(pristine: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(pristine, tmp_path / "idx")
    return tmp_path / "idx"


# file kind -> path relative to the root (live version 3)
KINDS = {
    "faiss": "shards/s000000.faiss",
    "f16.npy": "shards/s000001.f16.npy",
    "parquet": "shards/s000002.parquet",
    "manifest": "manifests/v000003.json",
    "CURRENT": CURRENT_FILE,
    "tombstones": "tombstones/v000003.parquet",
}
TEXT_KINDS = ("manifest", "CURRENT")


def _flip(position: Callable[[int], int]) -> Callable[[str, bytes], bytes]:
    def corrupt(kind: str, data: bytes) -> bytes:
        out = bytearray(data)
        # Text files get a flip that keeps them ASCII (so the JSON / name still parses
        # and the checksum, not the decoder, must catch it); 0x04 turns the CURRENT
        # digit into a version that does not exist. (A CURRENT edited into the name of
        # another intact kept version is indistinguishable from a deliberate rollback.)
        out[position(len(out))] ^= 0x04 if kind in TEXT_KINDS else 0xFF
        return bytes(out)

    return corrupt


def _truncate(kind: str, data: bytes) -> bytes:
    return data[: len(data) - min(7, len(data) // 2)]


def _same_size(kind: str, data: bytes) -> bytes:
    """Content of the same size: valid files of the same kind where that is possible."""
    import faiss

    rng = np.random.default_rng(5)
    if kind == "f16.npy":
        import io

        header_len = len(data) - 20 * 16 * 2
        fake = rng.standard_normal((20, 16)).astype(np.float16)
        buf = io.BytesIO()
        np.save(buf, fake)
        assert header_len == len(buf.getvalue()) - fake.nbytes
        return buf.getvalue()
    if kind == "faiss":
        index = faiss.IndexFlatIP(16)
        index.add(rng.standard_normal((20, 16)).astype(np.float32))
        out = faiss.serialize_index(index).tobytes()
        assert len(out) == len(data)
        return out
    return bytes(rng.integers(0, 256, len(data), dtype=np.uint8))


CORRUPTIONS: dict[str, Callable[[str, bytes], bytes]] = {
    "flip-header": _flip(lambda n: 0),
    "flip-middle": _flip(lambda n: n // 2),
    "flip-footer": _flip(lambda n: n - 2),
    "truncated": _truncate,
    "same-size": _same_size,
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_corruption_is_detected_before_anything_is_served(index: Path, kind: str, how: str) -> None:
    with SearchEngine.open(index) as engine:  # a server that opened the intact version
        before = engine.search(np.ones(16, np.float32) / 4.0, k=5).row_ids
        path = index / KINDS[kind]
        data = path.read_bytes()
        corrupted = CORRUPTIONS[how](kind, data)
        assert corrupted != data
        path.unlink()  # a new inode: what a restore, copy or disk error would produce
        path.write_bytes(corrupted)
        with pytest.raises(IndexFormatError) as e:
            SearchEngine.open(index)
        message = str(e.value)
        if kind not in TEXT_KINDS:
            assert KINDS[kind] in message and "version 3" in message
        with pytest.raises(IndexFormatError):
            engine.reload()
        # the server keeps serving the intact version it had
        assert engine.version == 3
        assert engine.search(np.ones(16, np.float32) / 4.0, k=5).row_ids == before
    if kind in TEXT_KINDS:
        with pytest.raises(IndexFormatError):
            verify_index(index)
    else:
        assert not verify_index(index, verify_hashes=False).ok
        assert not verify_index(index).ok


def test_message_says_whether_the_previous_version_is_intact(index: Path) -> None:
    # s000002 was written by the add (v2): v3 shares it, v2 has it, v1 does not
    for name, state in [("s000002.parquet", "damaged too"), ("s000000.parquet", "damaged too")]:
        path = index / "shards" / name
        data = path.read_bytes()
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        with pytest.raises(IndexFormatError, match="previous version 2 is " + state):
            open_snapshot(index)
        path.write_bytes(data)
    tomb = index / "tombstones" / "v000003.parquet"
    tomb.write_bytes(tomb.read_bytes()[:-3])
    with pytest.raises(IndexFormatError) as e:
        open_snapshot(index)
    message = str(e.value)
    assert "tombstones/v000003.parquet has" in message and "truncated" in message
    assert "previous version 2 is intact" in message and "v000002.json" in message
    assert "restore the file from a backup" in message


def test_manifests_without_xxh3_still_open_and_are_checked_with_sha256(index: Path) -> None:
    mpath = index / "manifests" / "v000003.json"
    data = json.loads(mpath.read_text())
    data.pop("checksum")

    def strip(node: object) -> None:
        if isinstance(node, dict):
            node.pop("xxh3_128", None)
            for v in node.values():
                strip(v)
        elif isinstance(node, list):
            for v in node:
                strip(v)

    strip(data)
    mpath.write_text(json.dumps(data, indent=2))
    snap = open_snapshot(index)
    assert snap.version == 3 and all(f.xxh3 is None for f in snap.manifest.files())
    npy = index / "shards" / "s000001.f16.npy"
    raw = bytearray(npy.read_bytes())
    raw[-3] ^= 0x10
    npy.write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError, match=r"s000001\.f16\.npy content differs .*sha256"):
        open_snapshot(index)


def test_every_npy_header_flip_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "v.f16.npy"
    np.save(path, np.ones((4, 8), np.float16))
    data = path.read_bytes()
    header_end = len(data) - 4 * 8 * 2
    causes = set()
    for pos in range(header_end):
        flipped = bytearray(data)
        flipped[pos] ^= 0xFF
        path.write_bytes(bytes(flipped))
        try:
            arr = read_vectors(path)
        except IndexFormatError as e:
            causes.add(type(e.__cause__))
        else:  # a flip numpy tolerates must still give a well-formed array
            assert isinstance(arr, np.ndarray)
    assert tokenize.TokenError in causes or SyntaxError in causes


def test_non_utf8_current_and_manifest_are_format_errors(index: Path) -> None:
    (index / CURRENT_FILE).write_bytes(b"v00\xff003.json\n")
    with pytest.raises(IndexFormatError, match=r"CURRENT: corrupt .*non-UTF-8"):
        open_snapshot(index)
    (index / CURRENT_FILE).write_bytes(b"v000003.json\n")
    mpath = index / "manifests" / "v000003.json"
    mpath.write_bytes(b"\xfe" + mpath.read_bytes()[1:])
    with pytest.raises(IndexFormatError, match="not UTF-8"):
        open_snapshot(index)


def test_manifest_paths_leaving_the_root_are_refused(index: Path, tmp_path: Path) -> None:
    mpath = index / "manifests" / "v000003.json"
    data = json.loads(mpath.read_text())
    data.pop("checksum")  # an attacker can write a checksum-less (older-format) manifest
    data["shards"][0]["files"]["metadata"]["path"] = "../../../../../../etc/passwd"
    mpath.write_text(json.dumps(data, indent=2))
    for call in (open_snapshot, verify_index):
        with pytest.raises(IndexFormatError, match="leaves the index folder"):
            call(index)


def test_symlinks_leading_out_of_the_root_are_refused(index: Path, tmp_path: Path) -> None:
    shard = read_current(index).shards[0]
    inside = index / shard.metadata.path
    outside = tmp_path / "elsewhere.parquet"
    outside.write_bytes(inside.read_bytes())  # same bytes: only the location is wrong
    inside.unlink()
    os.symlink(outside, inside)
    with pytest.raises(IndexFormatError, match="outside the index folder"):
        open_snapshot(index)
    assert not verify_index(index).ok
