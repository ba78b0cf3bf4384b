"""``serve --ray``: the existing HTTP app in front of the distributed engine answers as it
does in front of the local engine (search, filters, items, facets, reload)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ray_fixtures import build_options, encoder, write_corpus

from clipsearch.indexer.build import build
from clipsearch.retrieval.distributed import DistributedOptions, DistributedSearchEngine
from clipsearch.retrieval.engine import SearchEngine

pytest.importorskip("fastapi", reason="needs the serve extra")


def test_http_app_over_the_distributed_engine_answers_like_the_local_one(
    ray_cluster: Any, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from clipsearch.retrieval.service.app import create_app

    corpus = write_corpus(tmp_path / "corpus", 40, bad=False)
    root = tmp_path / "index"
    build([corpus], root, encoder=encoder(), options=build_options(shard_size=20))
    options = DistributedOptions(groups=2, cpus_per_host=0)
    requests = [
        ("post", "/search", {"text": "red shirt", "k": 5}),
        ("post", "/search", {"text": "wool", "k": 8, "filter": "price < 50"}),
        ("get", "/items/d0007", None),
        ("get", "/facets", None),
    ]
    answers = []
    with (
        SearchEngine.open(root, encoder()) as local,
        DistributedSearchEngine.open(root, encoder(), options=options) as dist,
    ):
        for engine in (local, dist):
            with TestClient(create_app(engine)) as client:
                got = []
                for method, path, body in requests:
                    r = getattr(client, method)(path, **({"json": body} if body else {}))
                    assert r.status_code == 200, r.text
                    payload = r.json()
                    for volatile in ("timings", "took_ms"):
                        payload.pop(volatile, None)
                    got.append(payload)
                answers.append(got)
    assert answers[0] == answers[1]


def test_serve_ray_refuses_several_workers(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from clipsearch.cli.app import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--ray", "auto", "--workers", "2"])
    assert result.exit_code != 0
    assert "--workers must be 1 with --ray" in result.output
