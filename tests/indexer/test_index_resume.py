"""Durable progress smaller than a shard: spills, Ctrl-C, and resume keys.

A build under the default shard size (100,000 rows) over a small catalog never finishes
a shard before the end; its progress must survive an interrupt or a kill anyway, and a
re-run must resume from it and end with exactly the rows of a clean build.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest

from clipsearch.indexer.ann import IndexOptions
from clipsearch.indexer.build import (
    STAGING_DIR,
    BuildOptions,
    IngestInterrupted,
    add,
    build,
    resume_key,
)
from clipsearch.indexer.fetch import FetchOptions
from clipsearch.indexer.sources import SourceOptions
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.manifest import read_current
from tests.indexer.helpers import canonical, make_images, snapshot_rows

ROOT = Path(__file__).resolve().parents[2]
ENC = FakeEncoder(32)
# Default shard size on purpose: no shard completes before the end of these builds.
OPTS = BuildOptions(batch_size=4, workers=2, checkpoint_items=5)

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from clipsearch.indexer.build import BuildOptions, add, build
    from clipsearch.retrieval.encoders import FakeEncoder
    op, out, opts, *sources = sys.argv[1:]
    options = BuildOptions(**json.loads(opts))
    if op == "build":
        build(sources, out, encoder=FakeEncoder(32), options=options)
    else:
        add(out, sources, encoder=FakeEncoder(32), options=options)
    """
)


def _killed_run(op: str, out: Path, sources: list[Path], crash_at: str, **opts: object) -> int:
    env = dict(os.environ, CLIPSEARCH_CRASH_AT=crash_at)
    args = [sys.executable, "-c", SCRIPT, op, str(out), json.dumps(opts), *map(str, sources)]
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, timeout=120).returncode


def _same(a: Path, b: Path) -> None:
    rows_a, vec_a = snapshot_rows(a)
    rows_b, vec_b = snapshot_rows(b)
    assert canonical(rows_a) == canonical(rows_b)
    np.testing.assert_array_equal(vec_a, vec_b)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("resume")
    make_images(base / "first", 30)
    (base / "first" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    make_images(base / "second", 12, seed=3, prefix="second")
    clean = base / "clean"
    build([base / "first"], clean, encoder=ENC, options=OPTS)
    clean_add = base / "clean-add"
    build([base / "first"], clean_add, encoder=ENC, options=OPTS)
    add(clean_add, [base / "second"], encoder=ENC, options=OPTS)
    return {"first": base / "first", "second": base / "second", "clean": clean,
            "clean_add": clean_add}  # fmt: skip


class _CtrlC(FakeEncoder):
    """The fake encoder, with Ctrl-C pressed during its ``n``-th image batch (the
    forward pass is where a real build spends its time)."""

    def __init__(self, n: int) -> None:
        super().__init__(32)
        self.calls, self.n = 0, n

    def encode_prepared(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return super().encode_prepared(batch)


def test_ctrl_c_keeps_the_work_and_the_rerun_resumes_it(
    tmp_path: Path, corpus: dict[str, Path]
) -> None:
    out = tmp_path / "idx"
    opts = replace(OPTS, checkpoint_items=1000)  # no periodic checkpoint: Ctrl-C saves
    with pytest.raises(IngestInterrupted) as info:
        build([corpus["first"]], out, encoder=_CtrlC(6), options=opts)
    e = info.value
    # broken.jpg (sorted first, skipped) and five batches of 4 images came before Ctrl-C.
    assert e.items_kept == 21 and e.total == 31
    assert "re-run the same command to resume" in str(e) and str(out) in str(e)
    assert not (out / "CURRENT").exists() and not (out / "LOCK").exists()
    summary = build([corpus["first"]], out, encoder=ENC, options=opts)
    assert summary.items_resumed == e.items_kept
    assert (summary.input, summary.indexed, summary.skipped) == (31, 30, 1)
    _same(out, corpus["clean"])
    assert not (out / STAGING_DIR).exists()  # a successful build leaves no staging folder


def test_second_interrupt_resumes_from_the_first(tmp_path: Path, corpus: dict[str, Path]) -> None:
    out = tmp_path / "idx"
    with pytest.raises(IngestInterrupted) as first:
        build([corpus["first"]], out, encoder=_CtrlC(3), options=OPTS)
    with pytest.raises(IngestInterrupted) as second:
        build([corpus["first"]], out, encoder=_CtrlC(3), options=OPTS)
    assert (first.value.items_kept, second.value.items_kept) == (9, 17)
    summary = build([corpus["first"]], out, encoder=ENC, options=OPTS)
    assert summary.items_resumed == second.value.items_kept
    _same(out, corpus["clean"])


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["embed:item:13", "spill:written:3", "embed:item:29"])
def test_kill_under_the_default_shard_size_loses_at_most_one_checkpoint(
    tmp_path: Path, corpus: dict[str, Path], crash_at: str
) -> None:
    out = tmp_path / "idx"
    rc = _killed_run("build", out, [corpus["first"]], crash_at, batch_size=4, checkpoint_items=5)
    assert rc == -signal.SIGKILL
    assert not (out / "CURRENT").exists()
    summary = build([corpus["first"]], out, encoder=ENC, options=OPTS)
    killed_at = int(crash_at.rsplit(":", 1)[1])
    if crash_at.startswith("embed"):
        # Items before the kill, less at most one checkpoint interval, were kept.
        assert killed_at - 1 - 5 <= summary.items_resumed <= killed_at - 1
    else:
        assert summary.items_resumed == 15
    _same(out, corpus["clean"])
    assert not (out / STAGING_DIR).exists()


@pytest.mark.slow
def test_killed_add_resumes_spills(tmp_path: Path, corpus: dict[str, Path]) -> None:
    out = tmp_path / "idx"
    build([corpus["first"]], out, encoder=ENC, options=OPTS)
    rc = _killed_run(
        "add", out, [corpus["second"]], "embed:item:9", batch_size=4, checkpoint_items=5
    )
    assert rc == -signal.SIGKILL
    assert read_current(out).version == 1
    _same(out, corpus["clean"])
    summary = add(out, [corpus["second"]], encoder=ENC, options=OPTS)
    assert summary.items_resumed >= 5
    _same(out, corpus["clean_add"])


def test_resume_key_covers_every_option_but_the_harmless_ones() -> None:
    key = resume_key(OPTS)
    assert set(key) == {f.name for f in fields(BuildOptions)} - BuildOptions.NOT_IN_RESUME_KEY
    assert set(key["index"]) == {f.name for f in fields(IndexOptions)}
    assert set(key["sources"]) == {f.name for f in fields(SourceOptions)}
    assert set(key["fetch"]) == {f.name for f in fields(FetchOptions)} - {
        "concurrency", "timeout_s", "retries", "backoff_s", "cache_dir"
    }  # fmt: skip
    # Fields that change the rows change the key; the harmless ones do not.
    assert resume_key(replace(OPTS, max_image_pixels=10)) != key
    assert resume_key(replace(OPTS, index=IndexOptions(device="cpu"))) != key
    assert resume_key(replace(OPTS, workers=7, checkpoint_seconds=3.0, max_errors=4)) == key


def test_changed_option_starts_over_harmless_change_resumes(
    tmp_path: Path, corpus: dict[str, Path]
) -> None:
    out = tmp_path / "idx"
    with pytest.raises(IngestInterrupted):
        build([corpus["first"]], out, encoder=_CtrlC(4), options=OPTS)
    # A different pixel cap could skip other items: its journal must not be reused.
    changed = replace(OPTS, max_image_pixels=10_000)
    with pytest.raises(IngestInterrupted) as again:
        build([corpus["first"]], out, encoder=_CtrlC(2), options=changed)
    assert again.value.items_kept == 5  # started over
    summary = build([corpus["first"]], out, encoder=ENC, options=replace(OPTS, workers=1))
    assert summary.items_resumed == 13
    _same(out, corpus["clean"])


def test_ctrl_c_while_the_journal_is_replaced_keeps_what_it_reports(
    tmp_path: Path, corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipsearch.indexer import fsutil

    real = fsutil.fsync_file
    journal_writes = [0]

    def fsync(path: Path) -> None:
        if path.name.startswith("journal.json"):
            journal_writes[0] += 1
            if journal_writes[0] == 2:  # the second checkpoint's journal, before its rename
                raise KeyboardInterrupt
        real(path)

    monkeypatch.setattr(fsutil, "fsync_file", fsync)
    out = tmp_path / "idx"
    with pytest.raises(IngestInterrupted) as e:
        build([corpus["first"]], out, encoder=ENC, options=OPTS)
    monkeypatch.undo()
    assert e.value.items_kept >= 10
    summary = build([corpus["first"]], out, encoder=ENC, options=OPTS)
    assert summary.items_resumed == e.value.items_kept  # what Ctrl-C said was kept, was
    _same(out, corpus["clean"])
