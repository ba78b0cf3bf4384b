"""``clipsearch serve``: refuses a missing index clearly, and serves a real one."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from service_fixtures import Catalog
from typer.testing import CliRunner

from clipsearch.cli.app import app


def test_serve_refuses_a_folder_without_an_index(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert result.exit_code == 1
    assert "no committed index" in result.output
    bad = CliRunner().invoke(app, ["serve", str(tmp_path), "--api-key", "short"])
    assert bad.exit_code == 1 and "at least 8 characters" in bad.output


def test_serve_runs_the_api_and_page(catalog: Catalog) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from clipsearch.cli.app import main; main()", "serve", str(catalog.index),
           "--port", str(port), "--api-key", "test-key-12345"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        assert "<title>clipsearch" in httpx.get(base + "/").text
        assert httpx.post(base + "/search", json={"text": "red"}).status_code == 401
        r = httpx.post(
            base + "/search", json={"text": "red"}, headers={"X-API-Key": "test-key-12345"}
        )
        assert r.status_code == 200 and r.json()["hits"][0]["metadata"]["colour"] == "red"
    finally:
        proc.terminate()
        proc.communicate(timeout=20)  # reaps it and closes the pipe
