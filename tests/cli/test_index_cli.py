"""`clipsearch index ...` through typer's CliRunner, with the fake encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from clipsearch.cli import common
from clipsearch.cli.app import app
from clipsearch.retrieval.manifest import read_current
from tests.indexer.helpers import make_images, write_products

runner = CliRunner()


def test_build_info_delete_compact_verify_json(tmp_path: Path) -> None:
    csv = write_products(tmp_path, 6)
    out = tmp_path / "idx"
    args = ["index", "build", str(csv), "--out", str(out), "--model", "fake-32",
            "--image-col", "image_path", "--text-col", "title", "--id-col", "sku",
            "--shard-size", "4", "--json"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["input"], summary["indexed"], summary["skipped"]) == (12, 12, 0)

    r = runner.invoke(app, ["index", "info", str(out), "--json"])
    data = json.loads(r.stdout)
    assert data["rows"]["by_modality"] == {"image": 6, "text": 6} and data["version"] == 1

    r = runner.invoke(app, ["index", "delete", str(out), "--ids", "SKU0001,SKU0002", "--json"])
    assert json.loads(r.stdout)["deleted_rows"] == 4
    r = runner.invoke(app, ["index", "delete", str(out), "--where", "category = 'yellow'"])
    assert r.exit_code == 0 and "deleted 2 rows of 1 documents" in r.stdout

    r = runner.invoke(app, ["index", "compact", str(out), "--json"])
    assert json.loads(r.stdout)["rows_removed"] == 6
    r = runner.invoke(app, ["index", "verify", str(out)])
    assert r.exit_code == 0 and "ok" in r.stdout

    shard = read_current(out).shards[0]
    path = out / shard.metadata.path
    path.write_bytes(path.read_bytes()[:-10])
    r = runner.invoke(app, ["index", "verify", str(out), "--json"])
    assert r.exit_code == 1
    assert shard.name in json.loads(r.stdout)["problems"]


def test_errors_are_one_clear_line_not_a_traceback(tmp_path: Path) -> None:
    r = runner.invoke(app, ["index", "info", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "no such directory" in r.output and "Traceback" not in r.output
    make_images(tmp_path / "imgs", 2)
    r = runner.invoke(app, ["index", "build", str(tmp_path / "imgs"), "--out", str(tmp_path / "i"),
                            "--model", "fake-32", "--shard-size", "0"])  # fmt: skip
    assert r.exit_code == 1 and "shard size must be >= 1" in r.output


def test_human_build_output_shows_summary(tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"")
    r = runner.invoke(app, ["index", "build", str(tmp_path / "imgs"), "--out", str(tmp_path / "i"),
                            "--model", "fake-32"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "indexed" in r.output and "skipped (errors)" in r.output and "errors report" in r.output


def test_progress_renderer_shows_every_stage_and_json_stays_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rich draws bars only on an interactive terminal: make the runner's stderr one.
    tty = Console(stderr=True, force_terminal=True, force_interactive=True, width=200)
    monkeypatch.setattr(common, "err_console", tty)
    csv = write_products(tmp_path, 30)
    out = tmp_path / "idx"
    args = ["index", "build", str(csv), "--out", str(out), "--model", "fake-32",
            "--image-col", "image_path", "--text-col", "title", "--id-col", "sku",
            "--shard-size", "15", "--index", "ivf"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    for stage in ("scan", "embed", "train index", "fill index", "tune index", "write shard",
                  "commit"):  # fmt: skip
        assert stage in r.stderr, stage
    assert "60/60 items" in r.stderr and "items/s" in r.stderr
    assert "indexed" in r.stdout  # the summary table, after the bars

    r = runner.invoke(app, ["index", "delete", str(out), "--ids", "SKU0001"])
    assert r.exit_code == 0 and "read metadata" in r.stderr
    r = runner.invoke(app, ["index", "compact", str(out)])
    assert r.exit_code == 0
    assert "rewrite shards" in r.stderr and "remove files" in r.stderr

    r = runner.invoke(app, [*args[:-2], "--json", "--out", str(tmp_path / "again")])
    assert r.exit_code == 0 and r.stderr == ""
    assert json.loads(r.stdout)["indexed"] == 60
