"""``min_score="auto"``: the model's calibrated relevance threshold, per query direction.

The shared fake-encoder index stands in for a calibrated model: ``calibrated_threshold``
is monkeypatched to answer for its fingerprint. One test reads the bundled demo model's
real card. The CLI is driven through typer's CliRunner.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from query_fixtures import build_index
from typer.testing import CliRunner

from clipsearch.cli.app import app
from clipsearch.retrieval import models
from clipsearch.retrieval.engine import SearchEngine, relevance_threshold
from clipsearch.retrieval.errors import IndexFormatError, InvalidOptionError
from clipsearch.retrieval.manifest import Manifest, current_version, read_manifest
from clipsearch.retrieval.options import SearchOptions
from clipsearch.retrieval.queries import ComposedQuery

runner = CliRunner()
QUERY = "summer linen dresses"


@pytest.fixture(scope="module")
def engine(built_index: Callable[[str], Path]) -> Iterator[SearchEngine]:
    with SearchEngine.open(built_index("flat")) as e:
        yield e


def _image(corpus: Path, n: int) -> Path:
    return corpus.parent / f"img{n:04d}.png"


def _nth_score(engine: SearchEngine, query: Any, n: int) -> float:
    """The n-th best vector score (1-based): a threshold that keeps about n rows."""
    return engine.search(query, k=n, mode="vector").hits[n - 1].score


def _rows(results: Any) -> list[tuple[int, float]]:
    return [(h.row_id, h.score) for h in results.hits]


def test_auto_is_the_bundled_demo_cards_threshold_per_direction() -> None:
    card_path = models.companion_folder("clipsearch-demo") / models.CARD_NAME
    calibration = json.loads(card_path.read_text(encoding="utf-8"))["calibration"]
    demo = _demo_manifest(calibration["weights_sha256"])
    for direction in ("text->image", "image->image", "image->text"):
        assert relevance_threshold(demo, direction) == calibration["thresholds"][direction]
    assert relevance_threshold(demo, "text->image") == pytest.approx(0.344, abs=5e-4)
    # No text->text calibration: the error names the directions the model does have.
    with pytest.raises(InvalidOptionError) as err:
        relevance_threshold(demo, "text->text")
    assert err.value.option == "min_score"
    assert "text->image, image->image, image->text only" in str(err.value)
    assert "pass min_score as a number" in str(err.value)
    # The threshold belongs to the weights it was calibrated on.
    with pytest.raises(InvalidOptionError, match="no calibrated relevance threshold"):
        relevance_threshold(_demo_manifest("0" * 64), "text->image")


def _demo_manifest(sha: str) -> Manifest:
    """A manifest of an index built with the bundled demo model's weights ``sha``,
    written before thresholds were recorded in manifests (so the card answers)."""
    from clipsearch.retrieval.encoders import FakeEncoder

    fake = FakeEncoder(32).fingerprint
    demo = dataclasses.replace(
        fake, arch="clipsearch-demo", pretrained="bundled", weights_sha256=sha
    )
    return Manifest(version=1, created_at="", operation="build", encoder=demo)


def test_a_build_records_the_thresholds_and_auto_keeps_them_without_the_card(
    corpus: Path, tmp_path: Path, calibrate: Callable[[dict[str, float]], None]
) -> None:
    calibrate({"text->image": 0.31, "image->image": 0.82})
    root = build_index(tmp_path / "idx", corpus, "flat")
    version = current_version(root)
    assert version is not None
    manifest = read_manifest(root, version)
    assert manifest.relevance_thresholds == (("text->image", 0.31), ("image->image", 0.82))
    # Written to the manifest file, and read back from it.
    assert Manifest.from_dict(json.loads(manifest.to_json())) == manifest
    # The model card no longer knows the model (moved, other weights): the index still does.
    calibrate({})
    with SearchEngine.open(root) as engine:
        assert engine.relevance_threshold("text") == 0.31
        assert engine.relevance_threshold("image") == 0.82
        with pytest.raises(InvalidOptionError, match=r"text->image, image->image only"):
            engine.relevance_threshold("text", "text")
        hits = engine.search(QUERY, k=50, min_score="auto").hits
        assert hits == engine.search(QUERY, k=50, min_score=0.31).hits


def test_manifest_thresholds_that_are_not_cosines_are_a_format_error() -> None:
    manifest = _demo_manifest("0" * 64)
    record = json.loads(manifest.to_json())
    record.pop("checksum")
    for bad in ({"text->image": 3.0}, {"text image": 0.3}):
        with pytest.raises(IndexFormatError, match="relevance threshold"):
            Manifest.from_dict({**record, "relevance_thresholds": bad})


def test_auto_equals_a_numeric_min_score_with_the_directions_threshold(
    engine: SearchEngine, corpus: Path, calibrate: Callable[[dict[str, float]], None]
) -> None:
    photo = _image(corpus, 7)
    text_cut, image_cut = _nth_score(engine, QUERY, 6), _nth_score(engine, photo, 3)
    calibrate({"text->image": text_cut, "image->image": image_cut})
    assert engine.relevance_threshold("text") == text_cut
    assert engine.relevance_threshold("image") == image_cut
    for query, cut in ((QUERY, text_cut), (photo, image_cut)):
        auto = engine.search(query, k=20, min_score="auto")
        numeric = engine.search(query, k=20, min_score=cut)
        assert _rows(auto) == _rows(numeric)
        # The results say which cutoff "auto" applied, as they do for a number.
        assert auto.min_score == numeric.min_score == cut
        assert auto.to_dict()["min_score"] == cut
        assert 1 <= len(auto.hits) < 20 and all(h.score >= cut for h in auto.hits)
    assert engine.search(QUERY, k=3).min_score is None
    # One batch mixing directions: each query gets its own threshold.
    both = engine.search_batch([QUERY, photo, QUERY], k=20, min_score="auto")
    assert [len(r.hits) for r in both] == [
        len(engine.search(QUERY, k=20, min_score=text_cut).hits),
        len(engine.search(photo, k=20, min_score=image_cut).hits),
        len(engine.search(QUERY, k=20, min_score=text_cut).hits),
    ]
    assert len(both[0].hits) != len(both[1].hits)
    # A composed query of texts only is a text query; with a photo it is an image query.
    texts_only = ComposedQuery(terms=((1.0, QUERY), (-0.5, "winter")))
    with_photo = ComposedQuery(terms=((1.0, photo), (0.5, "red")))
    assert _rows(engine.search(texts_only, k=20, min_score="auto")) == _rows(
        engine.search(texts_only, k=20, min_score=text_cut)
    )
    assert _rows(engine.search(with_photo, k=20, min_score="auto")) == _rows(
        engine.search(with_photo, k=20, min_score=image_cut)
    )


def test_auto_cuts_before_sort_and_grows_the_pool_like_a_number(
    engine: SearchEngine, calibrate: Callable[[dict[str, float]], None]
) -> None:
    # A threshold more than RERANK_WINDOW (100) rows pass: "cutoff then sort" must grow
    # the pool to every row above it, exactly as with the number.
    cut = _nth_score(engine, QUERY, 180)
    calibrate({"text->image": cut})
    options = SearchOptions(k=50, offset=100, sort="price", min_score="auto")
    auto = engine.search(QUERY, options)
    numeric = engine.search(QUERY, options.replace(min_score=cut))
    assert _rows(auto) == _rows(numeric) and len(auto.hits) == 50
    prices = [h.metadata["price"] for h in auto.hits]
    assert prices == sorted(prices)
    grouped = SearchOptions(k=10, group_by_doc=True, min_score="auto")
    assert _rows(engine.search(QUERY, grouped)) == _rows(
        engine.search(QUERY, grouped.replace(min_score=cut))
    )


def test_auto_searches_vectors_even_where_the_index_has_a_lexical_part(
    engine: SearchEngine, calibrate: Callable[[dict[str, float]], None]
) -> None:
    if all(s.lexical is None for s in engine.snapshot.shards):
        pytest.skip("tantivy (hybrid extra) is not installed: the index has no lexical part")
    calibrate({"text->image": -1.0})
    assert engine.search(QUERY, k=5).hits[0].explain is not None  # default: hybrid
    auto = engine.search(QUERY, k=5, min_score="auto")
    assert all(h.explain is None for h in auto.hits)  # plain cosines
    assert _rows(auto) == _rows(engine.search(QUERY, k=5, mode="vector"))
    with pytest.raises(InvalidOptionError, match="not cosines") as err:
        engine.search(QUERY, min_score="auto", mode="hybrid")
    assert err.value.option == "min_score"


def test_auto_on_an_uncalibrated_model_says_how_to_fix_it(engine: SearchEngine) -> None:
    with pytest.raises(InvalidOptionError) as err:
        engine.search(QUERY, min_score="auto")
    message = str(err.value)
    assert err.value.option == "min_score"
    assert "has no calibrated relevance threshold" in message
    assert "pass min_score as a number" in message and "--write-card" in message


def test_auto_needs_to_know_what_a_vector_query_is(
    engine: SearchEngine, calibrate: Callable[[dict[str, float]], None]
) -> None:
    calibrate({"text->image": 0.0, "image->image": 0.0})
    vector = np.ones(engine.manifest.dim, np.float32)
    with pytest.raises(InvalidOptionError, match="raw vector") as err:
        engine.search(vector, min_score="auto")
    assert err.value.option == "min_score"


@pytest.mark.parametrize("value", ["high", "0.3", "", True, [0.3]])
def test_min_score_takes_a_number_or_auto_only(value: Any) -> None:
    with pytest.raises(InvalidOptionError) as err:
        SearchOptions(min_score=value)
    assert err.value.option == "min_score"
    assert "'auto'" in str(err.value)
    options = SearchOptions(min_score=" Auto ")
    assert options.min_score == "auto"
    assert SearchOptions.from_dict(options.to_dict()) == options


# ---------------------------------------------------------------------------- CLI


def test_cli_search_min_score_auto_says_the_threshold(
    built_index: Callable[[str], Path],
    engine: SearchEngine,
    calibrate: Callable[[dict[str, float]], None],
) -> None:
    index = built_index("flat")
    cut = _nth_score(engine, QUERY, 4)
    calibrate({"text->image": cut})
    args = ["search", str(index), "--text", QUERY, "--min-score", "auto", "-k", "10"]
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    assert f"auto = {cut:.3f}" in table.output and "text->image" in table.output
    out = runner.invoke(app, [*args, "--json"])
    assert out.exit_code == 0, out.output
    body = json.loads(out.output)
    assert body["relevance_cutoff"] == pytest.approx(cut) and body["no_good_match"] is False
    expected = engine.search(QUERY, k=10, min_score=cut)
    assert [h["row_id"] for h in body["hits"]] == [h.row_id for h in expected.hits]


def test_cli_search_says_no_good_match_when_nothing_passes(
    built_index: Callable[[str], Path], calibrate: Callable[[dict[str, float]], None]
) -> None:
    calibrate({"text->image": 0.999})
    args = ["search", str(built_index("flat")), "--text", QUERY, "--min-score", "auto"]
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "no good match" in table.output and "closest, below 0.999" in table.output
    body = json.loads(runner.invoke(app, [*args, "--json"]).output)
    assert body["hits"] == [] and body["no_good_match"] is True


def test_cli_min_score_errors(built_index: Callable[[str], Path]) -> None:
    index = str(built_index("flat"))
    bad = runner.invoke(app, ["search", index, "--text", QUERY, "--min-score", "high"])
    assert bad.exit_code != 0 and "neither a number" in bad.output
    uncalibrated = runner.invoke(app, ["search", index, "--text", QUERY, "--min-score", "auto"])
    assert uncalibrated.exit_code != 0
    assert "no calibrated relevance threshold" in uncalibrated.output
