"""The distribution: one `clipsearch` import package, a cheap front door, a clean wheel."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import clipsearch

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "faiss", "fastapi", "uvicorn", "onnxruntime", "ray", "tantivy")


def _python(code: str, *, cwd: Path, env_path: Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter of this environment; return its stdout."""
    env = None
    if env_path is not None:
        import os

        env = {**os.environ, "PYTHONPATH": str(env_path)}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_import_is_cheap_and_exports_resolve_lazily(tmp_path: Path) -> None:
    out = _python(
        f"""
        import sys, json
        import clipsearch
        names = [clipsearch.SearchEngine, clipsearch.SearchOptions, clipsearch.Hit,
                 clipsearch.SearchResults, clipsearch.QueryError, clipsearch.Progress]
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
        """,
        cwd=tmp_path,
    )
    assert json.loads(out) == []


def test_all_matches_the_lazy_exports_and_every_name_resolves() -> None:
    assert set(clipsearch.__all__) == {"__version__", *clipsearch._EXPORTS}
    for name in clipsearch.__all__:
        assert getattr(clipsearch, name) is not None, name
    assert clipsearch.verify is clipsearch.retrieval.store.verify_index
    assert issubclass(clipsearch.QueryError, clipsearch.ClipsearchError)
    assert issubclass(clipsearch.QueryError, ValueError)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = clipsearch.nope  # type: ignore[attr-defined]


def test_logger_names_sit_under_clipsearch() -> None:
    from clipsearch.indexer import build
    from clipsearch.retrieval import engine

    for module in (engine, build):
        assert module.log.name.startswith("clipsearch."), module.log.name
        assert module.log.parent is not None
    # Configuring "clipsearch" configures every library logger at once.
    assert (
        logging.getLogger(engine.log.name).getEffectiveLevel()
        == logging.getLogger("clipsearch").getEffectiveLevel()
    )


def test_host_project_with_its_own_retrieval_and_indexer_packages(tmp_path: Path) -> None:
    """A backend whose own retrieval/ indexer/ cli/ come first on sys.path still works."""
    host = tmp_path / "host"
    for name in ("retrieval", "indexer", "cli"):
        (host / name).mkdir(parents=True)
        (host / name / "__init__.py").write_text(f"HOST = {name!r}\n")
    (host / "retrieval" / "engine.py").write_text("raise ImportError('the host engine')\n")
    (host / "titles.txt").write_text("".join(f"product number {i}\n" for i in range(6)))
    out = _python(
        """
        import json, sys
        import retrieval, indexer, cli  # the host's own packages
        import clipsearch
        from clipsearch.retrieval.encoders import load_encoder

        enc = load_encoder("fake-16")
        summary = clipsearch.build(["titles.txt"], "idx", encoder=enc)
        with clipsearch.SearchEngine.open("idx", encoder=enc) as engine:
            hits = engine.search("product number 3", k=2).hits
        print(json.dumps({
            "host": [retrieval.HOST, indexer.HOST, cli.HOST],
            "host_file": retrieval.__file__,
            "indexed": summary.indexed,
            "top": hits[0].source.strip(),
            "clipsearch_mods": sorted(
                {m.split(".")[1] for m in sys.modules if m.startswith("clipsearch.")}
            ),
        }))
        """,
        cwd=host,
        env_path=host,
    )
    got = json.loads(out.strip().splitlines()[-1])
    assert got["host"] == ["retrieval", "indexer", "cli"]
    assert Path(got["host_file"]).resolve().parent == (host / "retrieval").resolve()
    assert got["indexed"] == 6
    assert got["top"] == "product number 3"
    assert {"retrieval", "indexer"} <= set(got["clipsearch_mods"])


@pytest.mark.slow
def test_wheel_holds_one_top_level_package_with_model_and_assets(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("clipsearch", "retrieval", "indexer", "cli"):
        shutil.copytree(
            ROOT / name,
            src / name,
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    dist = tmp_path / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip_wheel, "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("clipsearch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"clipsearch", wheel.name.split("-py3")[0] + ".dist-info"}
    for asset in (
        "clipsearch/retrieval/models/clipsearch-demo.safetensors",
        "clipsearch/retrieval/models/clipsearch-demo.json",
        "clipsearch/retrieval/service/static/index.html",
        "clipsearch/retrieval/service/static/app.js",
        "clipsearch/retrieval/models/clipsearch-demo-onnx/clipsearch-onnx.json",
        "clipsearch/retrieval/models/clipsearch-demo-onnx/text.onnx",
    ):
        assert asset in names
    sources = {
        f"clipsearch/{p.relative_to(ROOT).as_posix()}"
        for sub in ("retrieval", "indexer", "cli")
        for p in (ROOT / sub).rglob("*.py")
    }
    assert sources <= set(names), sorted(sources - set(names))
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))
    )
    assert b"clipsearch = clipsearch.cli.app:main" in entry_points
