"""`clipsearch index ...` through typer's CliRunner, with the fake encoder."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

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
