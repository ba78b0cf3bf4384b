"""clipsearch search / classify / eval through typer's CliRunner on a small real index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from clipsearch.cli.app import app
from clipsearch.indexer.ann import IndexOptions
from clipsearch.indexer.build import BuildOptions, build
from clipsearch.indexer.sources import SourceOptions
from clipsearch.retrieval.encoders import FakeEncoder

runner = CliRunner()
COLOURS = {
    "red": (220, 30, 30),
    "blue": (30, 70, 220),
    "green": (40, 170, 60),
    "yellow": (240, 220, 30),
}


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shop")
    rows, pairs = [], []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (16, 16), rgb).save(folder / f"{name}.png")
        rows.append(
            {
                "doc_id": f"p{i}",
                "image": f"{name}.png",
                "title": f"{name} shirt",
                "price": 10.0 * (i + 1),
            }
        )
        pairs.append({"image": f"{name}.png", "text": f"a {name} shirt"})
    (folder / "catalog.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    options = BuildOptions(
        workers=1,
        index=IndexOptions(index="flat"),
        sources=SourceOptions(image_col="image", text_cols=("title",), id_col="doc_id"),
    )
    build(
        [folder / "catalog.jsonl"], folder / "idx", encoder=FakeEncoder(32, seed=1), options=options
    )
    return folder / "idx"


def test_search_json_finds_the_red_product(index: Path) -> None:
    res = runner.invoke(app, ["search", str(index), "--text", "red", "-k", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["hits"][0]["doc_id"] == "p0" and len(out["hits"]) == 2


def test_search_filter_sort_and_table(index: Path) -> None:
    res = runner.invoke(
        app,
        [
            "search",
            str(index),
            "-t",
            "shirt",
            "--where",
            "price >= 20",
            "--sort",
            "price:desc",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    prices = [h["metadata"]["price"] for h in json.loads(res.stdout)["hits"]]
    assert prices == [40.0, 30.0, 20.0]
    table = runner.invoke(
        app, ["search", str(index), "--image", str(index.parent / "blue.png"), "-k", "1"]
    )
    assert table.exit_code == 0 and "p1" in table.stdout


def test_search_errors_are_one_line(index: Path) -> None:
    res = runner.invoke(app, ["search", str(index), "--text", "red", "--where", "prise < 3"])
    assert res.exit_code == 1 and "did you mean 'price'" in res.output
    res = runner.invoke(app, ["search", str(index)])
    assert res.exit_code == 1 and "exactly one of --text or --image" in res.output
    res = runner.invoke(app, ["search", str(index), "-t", "x", "--where", "__import__('os')"])
    assert res.exit_code == 1 and "Traceback" not in res.output


def test_classify_and_eval(index: Path) -> None:
    res = runner.invoke(
        app,
        [
            "classify",
            str(index.parent / "green.png"),
            "--labels",
            "red,green,blue",
            "--model",
            "fake-32",
            "--pretrained",
            "1",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["label"] == "green"
    res = runner.invoke(
        app, ["eval", str(index), "--pairs", str(index.parent / "pairs.jsonl"), "--json"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["pairs"] == 4 and report["text_to_image"]["R@1"] == 1.0
    assert report["index_recall@10"]["text_to_image"] == 1.0


def test_search_device_cpu_and_cuda_without_gpu_faiss(index: Path) -> None:
    import faiss

    res = runner.invoke(
        app, ["search", str(index), "-t", "red", "-k", "1", "--device", "cpu", "--json"]
    )
    assert res.exit_code == 0 and json.loads(res.stdout)["hits"][0]["doc_id"] == "p0"
    if faiss.get_num_gpus() > 0:
        pytest.skip("faiss sees a GPU here: --device cuda is valid")
    res = runner.invoke(app, ["search", str(index), "-t", "red", "--device", "cuda"])
    # a clear one-line error that says how to get a GPU build of faiss
    assert res.exit_code == 1 and "faiss" in res.output and "Traceback" not in res.output
