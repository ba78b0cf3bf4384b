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


def test_build_stdout_holds_only_the_result_whatever_else_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray's driver prints the lines it forwards from raylets and workers (a disk-space
    # warning, a worker's print) on sys.stdout while a build runs; stand in for it with
    # a build that prints.
    import clipsearch.indexer.build as build_module

    real_build = build_module.build

    def noisy_build(*args: object, **kwargs: object) -> object:
        print("(raylet) file_system_monitor.cc:116: /tmp/ray is over 95% full")
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(build_module, "build", noisy_build)
    csv = write_products(tmp_path, 3)
    args = ["index", "build", str(csv), "--model", "fake-32", "--image-col", "image_path",
            "--text-col", "title", "--id-col", "sku"]  # fmt: skip
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "a"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["indexed"] == 6  # the whole of stdout is the JSON
    assert "over 95% full" in r.stderr

    r = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "over 95% full" not in r.stdout and "indexed" in r.stdout


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


def _messy_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    make_images(folder, 3)
    for i in range(2):
        (folder / f"bad{i}.png").write_text("not a png")
    (folder / "notes.xyz").write_text("x")
    (folder / "b.xyz").write_text("x")
    return folder


def test_summary_names_skip_reasons_unconsidered_files_and_the_errors_command(
    tmp_path: Path,
) -> None:
    out = tmp_path / "i"
    r = runner.invoke(app, ["index", "build", str(_messy_folder(tmp_path)), "--out", str(out),
                            "--model", "fake-32"])  # fmt: skip
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # rich wraps long lines
    assert "2 items skipped; most common reasons" in text and "decode: cannot decode" in text
    assert "2 files in source folders not considered" in text and ".xyz 2" in text
    assert f"clipsearch index errors {out}" in text

    r = runner.invoke(app, ["index", "errors", str(out), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["skipped"] == 2 and {row["doc_id"] for row in data["rows"]} == {
        "bad0.png",
        "bad1.png",
    }
    assert data["top_reasons"][0]["items"] == 2
    r = runner.invoke(app, ["index", "errors", str(out)])
    assert r.exit_code == 0 and "bad0.png" in r.stdout and "2 items skipped" in r.stdout


def test_max_errors_fails_the_command_and_commits_nothing(tmp_path: Path) -> None:
    out = tmp_path / "i"
    base = ["index", "build", str(_messy_folder(tmp_path)), "--out", str(out), "--model", "fake-32"]
    for limit in ("1", "0.3", "30%"):  # 2 of 5 items fail (40%)
        r = runner.invoke(app, [*base, "--max-errors", limit])
        assert r.exit_code == 1, r.output
        assert "nothing was committed" in " ".join(r.output.split())
        assert not (out / "CURRENT").exists()
    r = runner.invoke(app, [*base, "--max-errors", "2", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["items_resumed"] == 5
    r = runner.invoke(app, [*base, "--max-errors", "lots"])
    assert r.exit_code == 1 and "give a count" in r.output


def test_ctrl_c_says_what_was_kept_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from clipsearch.retrieval.encoders import FakeEncoder

    class CtrlC(FakeEncoder):
        calls = 0

        def encode_prepared(self, batch: np.ndarray) -> np.ndarray:
            CtrlC.calls += 1
            if CtrlC.calls == 2:  # during the second batch
                raise KeyboardInterrupt
            return super().encode_prepared(batch)

    import clipsearch.retrieval.encoders as encoders

    monkeypatch.setattr(encoders, "load_encoder", lambda *a, **k: CtrlC(32))
    make_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "bad.png").write_text("x")  # sorted first, skipped
    args = ["index", "build", str(tmp_path / "imgs"), "--out", str(tmp_path / "i"),
            "--model", "fake-32", "--batch-size", "1"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 130
    text = " ".join(r.output.split())
    assert "kept 2 of 4 items (1 embedded rows)" in text
    assert "re-run the same command to resume" in text and "Traceback" not in text


def test_build_refuses_random_weights_unless_asked(tmp_path: Path, tiny_arch: str) -> None:
    """An architecture without weights would index random vectors: refused by default."""
    make_images(tmp_path / "photos", 3)
    out = tmp_path / "idx"
    base = ["index", "build", str(tmp_path / "photos"), "--out", str(out), "--model", tiny_arch]
    refused = runner.invoke(app, [*base, "--json"])
    assert refused.exit_code != 0
    assert "--random-weights" in refused.output
    assert not (out / "CURRENT").exists()
    ok = runner.invoke(app, [*base, "--random-weights", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["indexed"] == 3
    assert read_current(out).encoder.pretrained == ""
