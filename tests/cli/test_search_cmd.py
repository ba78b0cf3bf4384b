"""clipsearch search / classify / eval through typer's CliRunner on small real indexes.

The fake encoder puts colour words and mostly-one-colour images in the same colour slot,
so "red" finds the red shirt; that is what the ranking assertions below rely on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from clipsearch.cli.app import app
from clipsearch.indexer.ann import IndexOptions
from clipsearch.indexer.build import BuildOptions, build
from clipsearch.indexer.sources import SourceOptions
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.engine import SearchEngine
from clipsearch.retrieval.options import SearchOptions
from clipsearch.retrieval.queries import ComposedQuery

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
                "category": "tops",  # a column the default table leaves out
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
    assert res.exit_code == 1 and "give a query: --text and/or --image" in res.output
    res = runner.invoke(app, ["search", str(index), "--minus-text", "red"])
    assert res.exit_code == 1 and "only subtract" in res.output
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


# ---------------------------------------------------------------- composed queries, boosts,
# columns and ranks (issue 10)


def _search_json(index: Path, *argv: str) -> dict[str, Any]:
    res = runner.invoke(app, ["search", str(index), *argv, "--json"])
    assert res.exit_code == 0, res.output
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def _library(index: Path, query: Any, options: SearchOptions) -> list[tuple[str, int, float]]:
    with SearchEngine.open(index) as engine:
        return [(h.doc_id, h.row_id, h.score) for h in engine.search(query, options)]


def _hits(out: dict[str, Any]) -> list[tuple[str, int, float]]:
    return [(h["doc_id"], h["row_id"], h["score"]) for h in out["hits"]]


def _table(output: str) -> tuple[list[str], list[list[str]]]:
    """Header cells and body rows of the rich table in ``output`` (fold lines skipped)."""
    lines = output.splitlines()
    header = next(line for line in lines if "┃" in line)
    rows = [
        [c.strip() for c in line.strip().strip("│").split("│")]
        for line in lines
        if line.startswith("│")
    ]
    return [c.strip() for c in header.strip().strip("┃").split("┃")], [r for r in rows if r[0]]


def _plain(output: str) -> str:
    """Output with rich's panel borders and line wrapping removed."""
    return " ".join(output.replace("│", " ").split())


@pytest.mark.parametrize(
    ("argv", "terms"),
    [
        # this blue photo + "red" - "striped"
        (
            ["--image", "blue.png", "--text", "red", "--minus-text", "striped"],
            ((1.0, "blue.png"), (1.0, "red"), (-1.0, "striped")),
        ),
        # weights apply in order; --minus-weight scales every negative term
        (
            [
                "--text", "red", "--text-weight", "0.3",
                "--text", "yellow", "--text-weight", "1.5",
                "--minus-image", "green.png", "--minus-weight", "0.5",
            ],
            ((0.3, "red"), (1.5, "yellow"), (-0.5, "green.png")),
        ),
    ],
)  # fmt: skip
def test_composed_query_equals_the_library(
    index: Path, argv: list[str], terms: tuple[tuple[float, str], ...]
) -> None:
    folder = index.parent
    argv = [str(folder / a) if a.endswith(".png") else a for a in argv]
    query = ComposedQuery(
        terms=tuple((w, folder / t if t.endswith(".png") else t) for w, t in terms)
    )
    got = _hits(_search_json(index, *argv, "-k", "4"))
    want = _library(index, query, SearchOptions(k=4))
    assert [h[:2] for h in got] == [h[:2] for h in want]
    assert [h[2] for h in got] == pytest.approx([h[2] for h in want], abs=1e-6)
    # and the terms mattered: neither case ranks like its first term alone
    first = _hits(_search_json(index, argv[0], argv[1], "-k", "4"))
    assert [h[2] for h in got] != pytest.approx([h[2] for h in first], abs=1e-3)


def test_composed_photo_plus_text_ranks_both_colours_first(index: Path) -> None:
    blue = str(index.parent / "blue.png")
    # Vector mode: the composition of embeddings is what is tested (hybrid, the default
    # for an index with a lexical part, also fuses BM25 on the titles' words).
    out = _search_json(
        index, "--image", blue, "--text", "red", "--minus-text", "striped", "--mode", "vector"
    )
    assert [h["doc_id"] for h in out["hits"][:2]] == ["p1", "p0"]


def test_minus_text_pushes_that_colour_to_the_bottom(index: Path) -> None:
    vector = ("-k", "4", "--mode", "vector")
    both = [h["doc_id"] for h in _search_json(index, "-t", "red yellow", *vector)["hits"]]
    assert set(both[:2]) == {"p0", "p3"}
    minus = _search_json(index, "-t", "red yellow", "--minus-text", "yellow", *vector)
    order = [h["doc_id"] for h in minus["hits"]]
    assert order[0] == "p0" and order[-1] == "p3"


def test_weights_beyond_the_terms_are_a_usage_error(index: Path) -> None:
    res = runner.invoke(
        app, ["search", str(index), "-t", "red", "--text-weight", "1", "--text-weight", "2"]
    )
    assert res.exit_code == 2
    assert "2 weights for 1 --text term(s)" in _plain(res.output)


def test_boost_orders_like_the_library(index: Path) -> None:
    # Vector mode: boosts on cosine scores (hybrid, the default here, boosts fused scores).
    vector = ("--mode", "vector")
    got = _hits(_search_json(index, "-t", "red", "--boost", "price=0.1", "-k", "4", *vector))
    want = _library(index, "red", SearchOptions(k=4, boosts={"price": 0.1}, mode="vector"))
    assert [h[:2] for h in got] == [h[:2] for h in want]
    assert [h[2] for h in got] == pytest.approx([h[2] for h in want], abs=1e-6)
    # the boost outweighs the colour: the dearest shirt first, the red one last
    assert [h[0] for h in got] == ["p3", "p2", "p1", "p0"]


@pytest.mark.parametrize("spec", ["price", "=0.1", "price=cheap", "price:0.1"])
def test_bad_boost_syntax_says_how_to_write_it(index: Path, spec: str) -> None:
    res = runner.invoke(app, ["search", str(index), "-t", "red", "--boost", spec])
    assert res.exit_code == 2 and "Traceback" not in res.output
    msg = _plain(res.output)
    assert "Invalid value for '--boost'" in msg and "is not FIELD=WEIGHT" in msg


def test_boost_values_are_checked_by_search_options(index: Path) -> None:
    # one validation, in SearchOptions: its message reaches the user as a one-line error
    res = runner.invoke(
        app, ["search", str(index), "-t", "red", "--boost", "price=1", "--boost", "price=2"]
    )
    assert res.exit_code == 1 and "boost field 'price' is given twice" in _plain(res.output)
    res = runner.invoke(app, ["search", str(index), "-t", "red", "--boost", "price=nan"])
    assert res.exit_code == 1 and "must be finite" in _plain(res.output)


def test_default_table_is_rank_score_doc_title_price(index: Path) -> None:
    res = runner.invoke(app, ["search", str(index), "-t", "red", "-k", "3"])
    assert res.exit_code == 0, res.output
    header, rows = _table(res.stdout)
    assert header == ["#", "score", "doc_id", "title", "price"]
    assert rows[0] == ["1", rows[0][1], "p0", "red shirt", "10.0"]
    assert len(rows) == 3
    assert "tops" not in res.stdout and "red.png" not in res.stdout


def test_default_table_shows_a_text_rows_own_text(index: Path) -> None:
    res = runner.invoke(app, ["search", str(index), "-t", "blue", "--modality", "text"])
    assert res.exit_code == 0, res.output
    _, rows = _table(res.stdout)
    assert rows[0][2:] == ["p1", "blue shirt", "20.0"]


def test_fields_choose_table_columns_and_json_metadata(index: Path) -> None:
    res = runner.invoke(
        app, ["search", str(index), "-t", "green", "-k", "2", "--fields", "category,modality"]
    )
    assert res.exit_code == 0, res.output
    header, rows = _table(res.stdout)
    assert header == ["#", "score", "doc_id", "category", "modality"]
    assert rows[0][2:] == ["p2", "tops", "image"]
    # --json stays complete without --fields, and keeps only the named metadata with it
    full = _search_json(index, "-t", "green", "-k", "2")
    assert full["hits"][0]["metadata"] == {
        "title": "green shirt",
        "price": 30.0,
        "category": "tops",
    }
    only = _search_json(index, "-t", "green", "-k", "2", "--fields", "price")
    assert [h["metadata"] for h in only["hits"]] == [
        {"price": h["metadata"]["price"]} for h in full["hits"]
    ]
    assert {"rank", "score", "doc_id", "row_id", "modality", "source"} <= set(only["hits"][0])


def test_unknown_field_is_a_usage_error_with_a_suggestion(index: Path) -> None:
    res = runner.invoke(app, ["search", str(index), "-t", "red", "--fields", "title,prise"])
    assert res.exit_code == 2
    assert "unknown field 'prise' (did you mean 'price'?)" in _plain(res.output)


def test_ranks_are_one_based_in_table_and_json(index: Path) -> None:
    for offset, ranks in ((0, [1, 2]), (2, [3, 4])):
        argv = ["search", str(index), "-t", "shirt", "-k", "2", "--offset", str(offset)]
        res = runner.invoke(app, argv)
        assert res.exit_code == 0, res.output
        assert [row[0] for row in _table(res.stdout)[1]] == [str(r) for r in ranks]
        out = _search_json(index, *argv[2:])
        assert [h["rank"] for h in out["hits"]] == ranks


@pytest.fixture(scope="module")
def photos_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """d0: a red and a blue photo; d1: one mostly red photo (a quarter white). No titles."""
    folder = tmp_path_factory.mktemp("photos")
    Image.new("RGB", (16, 16), COLOURS["red"]).save(folder / "red.png")
    Image.new("RGB", (16, 16), COLOURS["blue"]).save(folder / "blue.png")
    mostly_red = Image.new("RGB", (16, 16), COLOURS["red"])
    mostly_red.paste((250, 250, 250), (0, 0, 16, 4))
    mostly_red.save(folder / "mostly-red.png")
    rows = [("d0", "red.png"), ("d0", "blue.png"), ("d1", "mostly-red.png")]
    (folder / "photos.jsonl").write_text(
        "".join(json.dumps({"doc_id": d, "image": p}) + "\n" for d, p in rows)
    )
    options = BuildOptions(
        workers=1,
        index=IndexOptions(index="flat"),
        sources=SourceOptions(image_col="image", id_col="doc_id", on_duplicate="group"),
    )
    build(
        [folder / "photos.jsonl"], folder / "idx", encoder=FakeEncoder(32, seed=1), options=options
    )
    return folder / "idx"


def test_group_mode_mean_scores_a_doc_by_all_its_photos(photos_index: Path) -> None:
    best = _search_json(photos_index, "-t", "red", "--group-by-doc")
    assert [h["doc_id"] for h in best["hits"]] == ["d0", "d1"]  # d0's pure red photo wins
    mean = _search_json(photos_index, "-t", "red", "--group-mode", "mean")
    assert [h["doc_id"] for h in mean["hits"]] == ["d1", "d0"]  # d0's blue photo drags it
    want = _library(photos_index, "red", SearchOptions(group_by_doc="mean"))
    assert [h[2] for h in _hits(mean)] == pytest.approx([h[2] for h in want], abs=1e-6)
    res = runner.invoke(app, ["search", str(photos_index), "-t", "red", "--group-mode", "median"])
    assert res.exit_code == 1 and "group_by_doc must be 'max', 'mean'" in _plain(res.output)


def test_table_without_a_title_column_shows_the_source(photos_index: Path) -> None:
    res = runner.invoke(app, ["search", str(photos_index), "-t", "red", "-k", "2"])
    assert res.exit_code == 0, res.output
    header, rows = _table(res.stdout)
    assert header == ["#", "score", "doc_id", "source"]
    assert [r[2] for r in rows] == ["d0", "d1"]


def test_backend_option_is_checked(index: Path) -> None:
    bad = runner.invoke(app, ["search", str(index), "--text", "red", "--backend", "tensorrt"])
    assert bad.exit_code != 0 and "tensorrt" in bad.output
    # The fake encoder has one runtime: any explicit backend re-creates it.
    ok = runner.invoke(app, ["search", str(index), "--text", "red", "--backend", "torch", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["hits"][0]["metadata"]["title"] == "red shirt"


def test_search_backends_agree_on_a_tiny_open_clip_index(
    tiny_onnx: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index built with torch answers the same from ONNX (the export was checked)."""
    import shutil

    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path / "cache"))
    from clipsearch.retrieval.encoders.onnx import cache_dir_for

    torch_enc = tiny_onnx.torch_encoder
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 30), rgb).save(folder / f"{name}.png")
    build([folder], tmp_path / "idx", encoder=torch_enc, options=BuildOptions(workers=1))
    argv = ["search", str(tmp_path / "idx"), "--image", str(folder / "red.png"), "--json"]
    missing = runner.invoke(app, [*argv, "--backend", "onnx"])
    assert missing.exit_code != 0 and "clipsearch models export" in missing.output
    # Put the export where --backend auto/onnx look for it: the cache folder of the model.
    shutil.copytree(tiny_onnx.folder, cache_dir_for(torch_enc.fingerprint))
    runs = {}
    for backend in ("torch", "onnx", "auto"):
        result = runner.invoke(app, [*argv, "--backend", backend])
        assert result.exit_code == 0, result.output
        runs[backend] = [h["doc_id"] for h in json.loads(result.output)["hits"]]
    assert runs["torch"] == runs["onnx"] == runs["auto"]
    assert "red" in runs["onnx"][0]  # the query image itself comes first
