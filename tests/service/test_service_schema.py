"""Schema-driven testing: schemathesis runs every check it has (`--checks all`) against a
live server, with a bounded number of examples and a fixed seed. It fails on any
undocumented status, any body off its documented model, any 5xx, and any request the
schema allows that the server refuses (beyond the content rules no JSON schema can say)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from service_fixtures import running_server

from clipsearch.retrieval.service.config import ServiceConfig

# A 400 is the answer to content a schema cannot describe: image bytes that do not
# decode, "exactly one of text, image, image_url, like_doc or terms", a filter naming a
# column the index lacks. Every other status of a schema-valid request is a failure.
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]
"""


@pytest.mark.slow
def test_schemathesis_checks_all_pass(catalog: Any, tmp_path: Path) -> None:
    pytest.importorskip("schemathesis")
    from clipsearch.retrieval.encoders import load_encoder
    from clipsearch.retrieval.service.app import create_app

    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli is not None
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    # A relevance cutoff gives min_score "auto" a meaning for the fake model, which has
    # no calibration (without one, "auto" is refused with a 422 that says how to fix it).
    config = ServiceConfig(relevance_cutoff=0.2)
    app = create_app(catalog.index, config, encoder=load_encoder("fake"))
    with running_server(app) as base:
        run = subprocess.run(
            [cli, "--config-file", str(tmp_path / "schemathesis.toml"), "run",
             f"{base}/openapi.json", "--checks", "all", "--max-examples", "25",
             "--seed", "13", "--workers", "1", "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    generated = re.search(r"(\d+) generated", out)
    assert generated is not None and int(generated.group(1)) > 100, out[-2000:]
