"""kill -9 at chosen points of build/add/compact: the old version stays readable, and
rerunning the same command resumes and ends with exactly the rows of a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from clipsearch.indexer.build import BuildOptions, add, build
from clipsearch.indexer.maintenance import compact, delete
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.manifest import read_current
from tests.indexer.helpers import canonical, make_images, snapshot_rows

ROOT = Path(__file__).resolve().parents[2]
ENC = FakeEncoder(32)
OPTS = BuildOptions(shard_size=7, batch_size=4, workers=2)

SCRIPT = textwrap.dedent(
    """
    import sys
    from clipsearch.indexer.build import BuildOptions, add, build
    from clipsearch.indexer.maintenance import compact
    from clipsearch.retrieval.encoders import FakeEncoder
    op, out, *sources = sys.argv[1:]
    opts = BuildOptions(shard_size=7, batch_size=4, workers=2)
    if op == "build":
        build(sources, out, encoder=FakeEncoder(32), options=opts)
    elif op == "add":
        add(out, sources, encoder=FakeEncoder(32), options=opts)
    else:
        compact(out)
    """
)


def _run(op: str, out: Path, sources: list[Path], crash_at: str | None) -> int:
    env = dict(os.environ)
    env.pop("CLIPSEARCH_CRASH_AT", None)
    if crash_at:
        env["CLIPSEARCH_CRASH_AT"] = crash_at
    args = [sys.executable, "-c", SCRIPT, op, str(out), *map(str, sources)]
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, timeout=120).returncode


def _same(a: Path, b: Path) -> None:
    rows_a, vec_a = snapshot_rows(a)
    rows_b, vec_b = snapshot_rows(b)
    assert canonical(rows_a) == canonical(rows_b)
    np.testing.assert_array_equal(vec_a, vec_b)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("corpus")
    make_images(base / "first", 20)
    (base / "first" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    make_images(base / "second", 16, seed=3, prefix="second")
    clean = base / "clean"
    build([base / "first"], clean, encoder=ENC, options=OPTS)
    clean_add = base / "clean-add"
    build([base / "first"], clean_add, encoder=ENC, options=OPTS)
    add(clean_add, [base / "second"], encoder=ENC, options=OPTS)
    return {
        "first": base / "first",
        "second": base / "second",
        "clean": clean,
        "clean_add": clean_add,
    }


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["embed:item:10", "shard:written:2", "commit:manifest:1"])
def test_killed_build_resumes_to_the_clean_result(
    tmp_path: Path, corpus: dict[str, Path], crash_at: str
) -> None:
    out = tmp_path / "idx"
    assert _run("build", out, [corpus["first"]], crash_at) == -signal.SIGKILL
    assert not (out / "CURRENT").exists()  # nothing committed yet: no half index visible
    assert _run("build", out, [corpus["first"]], None) == 0
    _same(out, corpus["clean"])
    assert not (out / ".staging").exists() or not any((out / ".staging").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["shard:written:1", "embed:item:12"])
def test_killed_add_leaves_previous_version_then_resumes(
    tmp_path: Path, corpus: dict[str, Path], crash_at: str
) -> None:
    out = tmp_path / "idx"
    build([corpus["first"]], out, encoder=ENC, options=OPTS)
    assert _run("add", out, [corpus["second"]], crash_at) == -signal.SIGKILL
    _same(out, corpus["clean"])  # still version 1, fully readable and verified
    assert read_current(out).version == 1
    assert _run("add", out, [corpus["second"]], None) == 0
    _same(out, corpus["clean_add"])


@pytest.mark.slow
def test_resume_redoes_only_unfinished_shards(tmp_path: Path, corpus: dict[str, Path]) -> None:
    out = tmp_path / "idx"
    assert _run("build", out, [corpus["first"]], "shard:written:2") == -signal.SIGKILL
    summary = build([corpus["first"]], out, encoder=ENC, options=OPTS)
    assert (summary.shards_resumed, summary.shards_written) == (2, 1)
    assert summary.indexed + summary.skipped == summary.input == 21


@pytest.mark.slow
def test_killed_compact_keeps_the_index_readable(tmp_path: Path, corpus: dict[str, Path]) -> None:
    out = tmp_path / "idx"
    build([corpus["first"]], out, encoder=ENC, options=OPTS)
    delete(out, ids=["img0001.jpg", "img0015.jpg"])
    before = snapshot_rows(out)
    assert _run("compact", out, [], "compact:shard:1") == -signal.SIGKILL
    after = snapshot_rows(out)
    assert canonical(before[0]) == canonical(after[0])
    assert _run("compact", out, [], None) == 0
    rows, vecs = snapshot_rows(out)
    # Rewritten shards get fresh row ids, so compare by doc_id, without row_id.
    order_a = np.argsort([r["doc_id"] for r in before[0]])
    order_b = np.argsort([r["doc_id"] for r in rows])
    strip = [{k: v for k, v in before[0][i].items() if k != "row_id"} for i in order_a]
    again = [{k: v for k, v in rows[i].items() if k != "row_id"} for i in order_b]
    assert canonical(again) == canonical(strip) and len(rows) == 18
    np.testing.assert_array_equal(vecs[order_b], before[1][order_a])
    assert read_current(out).n_tombstones == 0
    compact(out)  # idempotent
