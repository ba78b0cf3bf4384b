"""The bundled demo model: shipped, small, loadable offline, and good enough on new products."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from clipsearch.cli.app import app
from clipsearch.indexer.demo.evaluate import QUALITY_BAR, evaluate_catalog
from clipsearch.indexer.demo.generate import generate_catalog
from clipsearch.retrieval.models import (
    MODELS_DIR,
    bundled_weights,
    companion_folder,
    model_card,
    relevance_threshold,
)

# The demo's filters, as Python predicates over a catalog row.
DEMO_FILTERS: dict[str | None, Callable[[dict[str, Any]], bool]] = {
    None: lambda r: True,
    "price < 60 and in_stock": lambda r: r["price"] < 60 and r["in_stock"],
    "price < 30 and in_stock": lambda r: r["price"] < 30 and r["in_stock"],
    "rating >= 4.5 and in_stock": lambda r: r["rating"] >= 4.5 and r["in_stock"],
}
# Held-out seed: the bundled model was trained on seed 1 (docs/demo-model.md).
HELD_OUT_SEED = 4242


def test_bundled_model_files_are_shipped_small_and_credited() -> None:
    path = bundled_weights("clipsearch-demo")
    assert path is not None, f"missing {MODELS_DIR / 'clipsearch-demo.safetensors'}"
    folder = companion_folder("clipsearch-demo")
    files = [path, *(p for p in folder.iterdir() if p.is_file())]
    assert sum(p.stat().st_size for p in files) < 80 * 2**20
    for name in ("tokenizer.json", "vocab.txt", "config.json", "model_card.json"):
        assert (folder / name).is_file(), name
    card = model_card("clipsearch-demo")
    assert card is not None
    assert "all-MiniLM-L6-v2" in card["text_tower"]["origin"]
    assert card["text_tower"]["licence"] == "Apache-2.0"


def test_bundled_model_loads_offline_with_a_stable_portable_fingerprint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from clipsearch.retrieval.encoders import (
        EncoderFingerprint,
        encoder_from_fingerprint,
        load_encoder,
    )
    from clipsearch.retrieval.encoders.weights import file_sha256

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    enc = load_encoder("clipsearch-demo", device="cpu", precision="fp32")
    fp = enc.fingerprint
    assert (fp.arch, fp.pretrained) == ("clipsearch-demo", "bundled")
    assert fp.weights_sha256 == file_sha256(MODELS_DIR / "clipsearch-demo.safetensors")
    assert fp.image_size == 64 and fp.context_length == 32 and fp.dim == 384
    # the tokenizer is named by its place in the package, not by this checkout's path
    assert fp.tokenizer == "HFTokenizer:bundled:clipsearch_demo"
    assert str(MODELS_DIR) not in json.dumps(fp.to_dict())
    again = encoder_from_fingerprint(EncoderFingerprint.from_dict(fp.to_dict()), device="cpu")
    assert again.fingerprint == fp


def test_chinese_and_english_tokenize_and_encode_into_one_space() -> None:
    import numpy as np
    from tokenizers import Tokenizer

    from clipsearch.retrieval.encoders import load_encoder

    enc = load_encoder("clipsearch-demo", device="cpu", precision="fp32", backend="torch")
    ids = enc.tokenizer(["红色条纹T恤", "a red striped t-shirt"])  # type: ignore[attr-defined]
    unk = enc.tokenizer.tokenizer.unk_token_id  # type: ignore[attr-defined]
    assert ids.shape == (2, 32) and not (ids == unk).any()
    # the contract of torch-free runtimes: tokenizer.json alone gives the same ids
    plain = Tokenizer.from_file(str(companion_folder("clipsearch-demo") / "tokenizer.json"))
    for row, text in zip(ids.tolist(), ["红色条纹T恤", "a red striped t-shirt"], strict=True):
        assert plain.encode(text).ids == [i for i in row if i != 0]
    zh_red, en_red, en_mug, zh_mug = enc.encode_texts(
        ["红色条纹T恤", "a red striped t-shirt", "a blue dotted mug", "蓝色波点马克杯"]
    )
    assert np.isclose(np.linalg.norm(zh_red), 1.0, atol=1e-5)
    assert zh_red @ en_red > zh_red @ en_mug + 0.2
    assert zh_mug @ en_mug > zh_mug @ en_red + 0.2
    # the torch-free runtime (the shipped ONNX export) follows the same contract
    onnx = load_encoder("clipsearch-demo", backend="onnx")
    got = onnx.encode_texts(["红色条纹T恤", "a red striped t-shirt"])
    assert (got * np.stack([zh_red, en_red])).sum(axis=1).min() > 0.999


def test_calibrated_thresholds_are_stored_for_these_weights() -> None:
    from clipsearch.retrieval.encoders.weights import file_sha256

    sha = file_sha256(MODELS_DIR / "clipsearch-demo.safetensors")
    for direction in ("text->image", "image->image", "image->text"):
        value = relevance_threshold("clipsearch-demo", direction, weights_sha256=sha)
        assert value is not None and -1.0 < value < 1.0, direction
        # a threshold belongs to the weights it was calibrated on
        assert relevance_threshold("clipsearch-demo", direction, weights_sha256="0" * 64) is None
    card = model_card("clipsearch-demo")
    assert card is not None and card["calibration"]["precision_target"] == 0.90


def test_draft_decoding_embeds_a_large_photo_like_a_full_decode(tmp_path: Path) -> None:
    """Images are decoded at 2x the model's input side (JPEG DCT scaling) on every path;
    a 1024 px photo must embed as its full-size decode does, and index == query."""
    import io

    import numpy as np

    from clipsearch.indexer.demo.catalog import make_product
    from clipsearch.indexer.demo.render import render_photo
    from clipsearch.retrieval.encoders import load_encoder, load_image_for
    from clipsearch.retrieval.images import load_image

    enc = load_encoder("clipsearch-demo", device="cpu", precision="fp32")
    photo = render_photo(make_product(3, 0), "front", 3, 0).resize((1024, 1024))
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=92)
    draft = load_image_for(enc, buf.getvalue())
    assert draft.size == (128, 128)  # 1/8 scale: 2 x 64 px input side
    full, fast = enc.encode_images([load_image(buf.getvalue()), draft])
    assert float(np.dot(full, fast)) > 0.98


# Goals of the bar the bundled model does not reach yet (docs/demo-model.md, "Quality"):
# checked by their own strict-xfail test, so the day one is met the test says so.
SHORT_OF_THE_BAR = ("paraphrase_unseen_precision@1",)


@pytest.fixture(scope="module")
def held_out_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from clipsearch.retrieval.encoders import load_encoder

    where = tmp_path_factory.mktemp("held-out")
    generate_catalog(where, products=400, seed=HELD_OUT_SEED)
    enc = load_encoder("clipsearch-demo", device="cpu", precision="fp32")
    # thresholds come from the bundled calibration (another seed); 400 products keep it quick
    return evaluate_catalog(enc, where)


@pytest.mark.slow
def test_bundled_model_meets_the_quality_bar_on_unseen_products(
    held_out_report: dict[str, Any],
) -> None:
    m = held_out_report["metrics"]
    assert held_out_report["thresholds"] is not None
    for key, bar in QUALITY_BAR.items():
        if key not in SHORT_OF_THE_BAR:
            assert m[key] >= bar, (key, m)
    # kind-only synonyms have no bar in the issue; keep what the model reaches
    assert m["kind_synonyms_precision@1"] >= 0.8, m
    # above the threshold, a text query's top answer is right (the demo's promise)
    for family, c in m["confident_wrong_answers"].items():
        assert c["wrong_above_threshold"] <= 0.02, (family, c)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True, reason="unseen synonyms: 0.09 measured, goal 0.80 (docs/demo-model.md)"
)
def test_bundled_model_understands_unseen_synonyms(held_out_report: dict[str, Any]) -> None:
    m = held_out_report["metrics"]
    for key in SHORT_OF_THE_BAR:
        assert m[key] >= QUALITY_BAR[key], (key, m[key])


# What each text question of the demo names: (colour, pattern, kind) or (colour, kind).
DEMO_TEXT_QUERIES: dict[str, dict[str, str]] = {
    "red striped t-shirt": {"colour": "red", "pattern": "striped", "kind": "t-shirt"},
    "红色条纹T恤": {"colour": "red", "pattern": "striped", "kind": "t-shirt"},
    "a white dotted mug": {"colour": "white", "pattern": "dotted", "kind": "mug"},
    "blue checked dress": {"colour": "blue", "pattern": "checked", "kind": "dress"},
    "black boot": {"colour": "black", "kind": "boot"},
}


@pytest.mark.slow
def test_demo_runs_end_to_end_and_answers_sensibly(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--products", "80", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert json.loads((tmp_path / "demo_report.json").read_text())["queries"] == report["queries"]
    # every hit names its product (the index's doc_id), as the result tables show it
    assert all(
        h["sku"].startswith("SKU-")
        for q in report["queries"]
        if q["kind"] != "classify"
        for h in q["hits"]
    )
    table = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--products", "80"])
    assert table.exit_code == 0, table.output
    assert "red striped t-shirt" in table.output and "红色条纹T恤" in table.output
    assert "SKU-" in table.output
    # the photo from outside the shop gets no answer, and the demo says why
    text = " ".join(table.output.split())
    assert "no good match" in text and "only knows the demo shop" in text
    # the demo ends by telling the user how to serve the index it built
    assert f"serve {tmp_path / 'index'}" in text
    rows = pq.read_table(tmp_path / "catalog" / "products.parquet").to_pylist()
    for q in report["queries"]:
        if q["kind"] != "text":
            continue
        wanted = DEMO_TEXT_QUERIES[q["query"]]
        keep = DEMO_FILTERS[q["filter"]]
        exists = [r for r in rows if all(r[k] == v for k, v in wanted.items()) and keep(r)]
        assert all(keep(h) for h in q["hits"])
        # never a wrong answer unmarked: a hit at or above the threshold is the product asked for
        for h in q["hits"]:
            if not h["low_confidence"]:
                assert {k: h[k] for k in wanted} == wanted, (q["query"], h)
        if exists:  # the shop has such a product: it must come first, with confidence
            top = q["hits"][0]
            assert {k: top[k] for k in wanted} == wanted
            assert not top["low_confidence"] and not q["no_good_match"]
        if q["sort"] == "price":  # sorted after the relevance cutoff: only matches, cheapest first
            prices = [h["price"] for h in q["hits"]]
            assert prices == sorted(prices) and bool(q["hits"]) == bool(exists)
            assert all(not h["low_confidence"] for h in q["hits"])
    filtered = next(q for q in report["queries"] if q["filter"] == "price < 60 and in_stock")
    assert filtered["hits"] and all(h["price"] < 60 and h["in_stock"] for h in filtered["hits"])
    assert filtered["matches"] == sum(r["price"] < 60 and r["in_stock"] for r in rows)
    # the probe is a back photo: the best front photo and the zero-shot caption match it
    probe = next(q for q in report["queries"] if q["kind"] == "image" and q["filter"])
    truth = next(r for r in rows if probe["query"].endswith(r["image_path"]))
    top = probe["hits"][0]
    assert top["view"] == "front" and not top["low_confidence"]
    assert (top["kind"], top["colour"], top["pattern"]) == (
        truth["kind"], truth["colour"], truth["pattern"],
    )  # fmt: skip
    what = next(q for q in report["queries"] if q["kind"] == "classify")
    assert what["hits"][0]["caption"] == truth["caption"]
    outside = next(q for q in report["queries"] if q["query"] == "not-a-product.png")
    assert outside["no_good_match"] and all(h["low_confidence"] for h in outside["hits"])
