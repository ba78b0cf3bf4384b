"""Distributed build and add: the same index as a single-process run, surviving failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray_fixtures
from ray_fixtures import build_options, encoder, index_content, write_corpus
from typer.testing import CliRunner

from clipsearch.indexer.build import STAGING_DIR, add, build
from clipsearch.indexer.distributed import RayOptions, add_on_ray, build_on_ray
from clipsearch.retrieval.engine import SearchEngine

QUERIES = ["red shirt", "dark wool lamp", "striped mug 7"]


def assert_same_index(a: Path, b: Path) -> None:
    """Same rows (all metadata, row ids), same shard cuts, vectors within fp16 rounding,
    same errors report and the same top-10 for fixed queries, text and image."""
    rows_a, vecs_a, shards_a = index_content(a)
    rows_b, vecs_b, shards_b = index_content(b)
    assert json.dumps(rows_a, default=str) == json.dumps(rows_b, default=str)
    assert shards_a == shards_b
    np.testing.assert_allclose(vecs_a, vecs_b, atol=1e-3)
    with SearchEngine.open(a) as ea, SearchEngine.open(b) as eb:
        errors_a = [e.to_dict() for e in ea.manifest.errors]
        errors_b = [e.to_dict() for e in eb.manifest.errors]
        assert [e["rows"] for e in errors_a] == [e["rows"] for e in errors_b]
        for q in [*QUERIES, vecs_a[3]]:
            for modality in ("image", "text"):
                ha = ea.search(q, k=10, modality=modality).hits
                hb = eb.search(q, k=10, modality=modality).hits
                assert [h.row_id for h in ha] == [h.row_id for h in hb]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), 90)


@pytest.fixture(scope="module")
def local_index(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("local") / "index"
    build([corpus], root, encoder=encoder(), options=build_options())
    return root


def test_distributed_build_equals_local_build(
    ray_cluster: Any, corpus: Path, local_index: Path, tmp_path: Path
) -> None:
    summary = build_on_ray(
        [corpus],
        tmp_path / "index",
        encoder=encoder(),
        options=build_options(),
        ray_options=RayOptions(block_items=16, cpus_per_encoder=0.5),
    )
    assert summary.indexed == 182 and summary.skipped == 2  # a broken image, an empty title
    assert summary.shards_written == 6
    assert not (tmp_path / "index" / STAGING_DIR).exists()
    assert_same_index(local_index, tmp_path / "index")


def test_distributed_add_equals_local_add(ray_cluster: Any, corpus: Path, tmp_path: Path) -> None:
    more = write_corpus(tmp_path / "more", 30, seed=1, bad=False)  # same doc ids, new content
    roots = []
    for name, run in (("local", add), ("ray", add_on_ray)):
        root = tmp_path / name
        build([corpus], root, encoder=encoder(), options=build_options())
        kw: dict[str, Any] = (
            {"ray_options": RayOptions(cpus_per_encoder=0.5)} if name == "ray" else {}
        )
        s1 = run(root, [more], encoder=encoder(), options=build_options(), **kw)
        s2 = run(root, [more], encoder=encoder(), options=build_options(), **kw)
        assert (s1.replaced, s1.indexed) == (60, 60)  # 30 docs x (image, title) changed
        assert (s2.unchanged, s2.indexed) == (60, 0)  # skipped on the workers, not re-embedded
        roots.append(root)
    assert_same_index(*roots)


def test_killed_encoder_actor_is_restarted_and_the_build_completes(
    ray_cluster: Any, corpus: Path, local_index: Path, tmp_path: Path
) -> None:
    import ray

    ray.cloudpickle.register_pickle_by_value(ray_fixtures)  # workers cannot import tests/
    marker = tmp_path / "killed"
    build_on_ray(
        [corpus],
        tmp_path / "index",
        encoder=encoder(),
        options=replace(build_options(), batch_size=8),  # ~12 image batches
        ray_options=RayOptions(
            block_items=8,
            cpus_per_encoder=0.5,
            encoder_factory=ray_fixtures.DyingEncoderFactory(str(marker), die_at=3),
        ),
    )
    assert marker.exists(), "no encoder actor was killed"
    assert int(marker.read_text()) != os.getpid()
    assert_same_index(local_index, tmp_path / "index")


@pytest.mark.slow
def test_killed_driver_resumes_like_a_local_build(
    ray_cluster: Any, corpus: Path, local_index: Path, tmp_path: Path
) -> None:
    root = tmp_path / "index"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import ray
        from ray_fixtures import build_options, encoder
        from clipsearch.indexer.distributed import RayOptions, build_on_ray
        ray.init(address={ray_cluster.address!r}, logging_level="WARNING")
        build_on_ray([{str(corpus)!r}], {str(root)!r}, encoder=encoder(),
                     options=build_options(), ray_options=RayOptions(cpus_per_encoder=0.5))
        """
    )
    env = {**os.environ, "CLIPSEARCH_CRASH_AT": "shard:written:2"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=240)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (root / STAGING_DIR).exists() and not (root / "CURRENT").exists()

    summary = build_on_ray(
        [corpus],
        root,
        encoder=encoder(),
        options=build_options(),
        ray_options=RayOptions(cpus_per_encoder=0.5),
    )
    assert summary.shards_resumed == 2 and summary.items_resumed > 0
    assert_same_index(local_index, root)


def test_cli_index_build_with_ray(
    ray_cluster: Any, corpus: Path, local_index: Path, tmp_path: Path
) -> None:
    from clipsearch.cli.app import app

    args = ["index", "build", str(corpus), "--out", str(tmp_path / "index"), "--model", "fake-32"]
    args += ["--pretrained", "3", "--image-col", "image", "--text-col", "title"]
    args += ["--id-col", "doc_id", "--shard-size", "40", "--json"]
    # Ray is initialised in this process, so --ray uses that cluster whatever the address.
    result = CliRunner().invoke(app, [*args, "--ray", "auto", "--ray-encoders", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["indexed"] == 182  # nothing Ray forwards lands in it
    assert_same_index(local_index, tmp_path / "index")


def test_bad_ray_options_are_refused() -> None:
    from clipsearch.retrieval.errors import ConfigError

    with pytest.raises(ConfigError, match="encoders must be >= 1"):
        RayOptions(encoders=0)
    with pytest.raises(ConfigError, match="address is empty"):
        RayOptions(address="")
