"""`clipsearch serve` flags that reach ServiceConfig (refusals happen before binding)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipsearch.cli.app import app
from clipsearch.indexer.build import build
from clipsearch.retrieval.encoders import FakeEncoder

runner = CliRunner()


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    (root / "titles.txt").write_text("red mug\nblue lamp\n", encoding="utf-8")
    build([root / "titles.txt"], root / "idx", encoder=FakeEncoder(16))
    return root / "idx"


def test_admin_without_key_is_refused_on_a_public_host(index: Path) -> None:
    r = runner.invoke(app, ["serve", str(index), "--host", "0.0.0.0", "--admin-without-key"])
    assert r.exit_code != 0
    assert "--admin-without-key needs a loopback --host" in r.output


def test_decode_budget_below_the_image_cap_is_refused(index: Path) -> None:
    r = runner.invoke(app, ["serve", str(index), "--decode-pixel-budget", "1000"])
    assert r.exit_code != 0
    assert "decode_pixel_budget" in r.output
