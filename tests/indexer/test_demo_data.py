"""The demo catalog generator: determinism, attribute consistency, layout, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipsearch.cli.app import app
from clipsearch.indexer.demo.catalog import (
    COLOURS,
    KINDS,
    PATTERNS,
    attribute_caption,
    make_product,
)
from clipsearch.indexer.demo.generate import generate_catalog
from clipsearch.retrieval.errors import ConfigError


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_byte_identical_catalogs(tmp_path: Path) -> None:
    a = generate_catalog(tmp_path / "a", products=30, seed=3)
    b = generate_catalog(tmp_path / "b", products=30, seed=3)
    fa, fb = _files(a.out_dir), _files(b.out_dir)
    assert fa.keys() == fb.keys()
    assert len([k for k in fa if k.endswith(".jpg")]) == a.images
    assert fa == fb


def test_different_seed_gives_a_different_catalog(tmp_path: Path) -> None:
    a = generate_catalog(tmp_path / "a", products=30, seed=3)
    b = generate_catalog(tmp_path / "b", products=30, seed=4)
    assert (a.manifest.read_bytes()) != (b.manifest.read_bytes())
    front = "images/SKU-000000-front.jpg"
    assert (a.out_dir / front).read_bytes() != (b.out_dir / front).read_bytes()


def test_product_does_not_depend_on_catalog_size() -> None:
    assert make_product(5, 17) == make_product(5, 17)
    assert make_product(5, 17) != make_product(6, 17)


def test_titles_descriptions_and_captions_match_the_attributes(tmp_path: Path) -> None:
    summary = generate_catalog(tmp_path, products=120, seed=11)
    rows = pq.read_table(summary.manifest).to_pylist()
    assert len(rows) == summary.images >= 120
    for r in rows:
        title, desc = r["title"].lower(), r["description"].lower()
        assert r["kind"] in title and r["colour"] in title
        assert r["pattern"] in title or r["pattern"] == "plain"
        for attr in ("kind", "colour", "pattern"):
            assert r[attr] in desc, (attr, desc)
        assert r["caption"] == attribute_caption(r["kind"], r["colour"], r["pattern"])
        assert r["category"] == KINDS[r["kind"]][0]
        lo, hi = KINDS[r["kind"]][2]
        assert lo <= r["price"] <= hi + 1
        assert 1.0 <= r["rating"] <= 5.0
        assert (tmp_path / r["image_path"]).is_file()
    # the generator covers the advertised vocabulary
    assert len({r["kind"] for r in rows}) == len(KINDS) >= 10
    assert len({r["colour"] for r in rows}) == len(COLOURS) >= 10
    assert len({r["pattern"] for r in rows}) == len(PATTERNS) >= 4


def test_two_photo_products_share_their_sku(tmp_path: Path) -> None:
    summary = generate_catalog(tmp_path, products=80, seed=2)
    rows = pq.read_table(summary.manifest).to_pylist()
    by_sku: dict[str, list[dict[str, object]]] = {}
    for r in rows:
        by_sku.setdefault(str(r["sku"]), []).append(r)
    assert len(by_sku) == 80
    pairs = [v for v in by_sku.values() if len(v) == 2]
    assert pairs, "some products must have a front and a back photo"
    for front, back in pairs:
        assert (front["view"], back["view"]) == ("front", "back")
        assert front["title"] == back["title"] and front["price"] == back["price"]
        a = Image.open(tmp_path / str(front["image_path"]))
        b = Image.open(tmp_path / str(back["image_path"]))
        assert a.size == b.size == (128, 128) and a.mode == "RGB"
        assert a.tobytes() != b.tobytes()


def test_regenerating_replaces_the_previous_catalog(tmp_path: Path) -> None:
    generate_catalog(tmp_path, products=40, seed=1)
    summary = generate_catalog(tmp_path, products=5, seed=1)
    images = list((tmp_path / "images").iterdir())
    assert len(images) == summary.images
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("products", [0, -3])
def test_bad_product_count_is_a_config_error(tmp_path: Path, products: int) -> None:
    with pytest.raises(ConfigError, match="--products"):
        generate_catalog(tmp_path, products=products, seed=1)


def test_cli_demo_data_writes_the_catalog(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["demo-data", "--products", "12", "--seed", "9", "--out", str(tmp_path), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["products"] == 12 and summary["seed"] == 9
    assert json.loads((tmp_path / "catalog.json").read_text())["images"] == summary["images"]
    bad = CliRunner().invoke(app, ["demo-data", "--products", "0", "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "--products" in bad.output


def test_chinese_columns_name_every_attribute_in_chinese(tmp_path: Path) -> None:
    from clipsearch.indexer.demo.catalog import COLOURS_ZH, KINDS_ZH, PATTERNS_ZH

    assert set(KINDS_ZH) == set(KINDS) and set(COLOURS_ZH) == set(COLOURS)
    assert set(PATTERNS_ZH) == set(PATTERNS)
    summary = generate_catalog(tmp_path, products=40, seed=2)
    for r in pq.read_table(summary.manifest).to_pylist():
        zh = COLOURS_ZH[r["colour"]] + PATTERNS_ZH[r["pattern"]] + KINDS_ZH[r["kind"]]
        assert r["caption_zh"] == zh
        assert r["title_zh"].startswith(r["brand"] + " " + COLOURS_ZH[r["colour"]])
        assert r["title_zh"].endswith(KINDS_ZH[r["kind"]])
        assert (r["kind_zh"], r["colour_zh"]) == (KINDS_ZH[r["kind"]], COLOURS_ZH[r["colour"]])


def _words(text: str) -> set[str]:
    import re

    return {w for w in re.split(r"[\s,.:;/!?]+", text.lower()) if w}


def test_evaluation_paraphrases_use_no_word_of_the_training_captions(tmp_path: Path) -> None:
    """The unseen-synonym evaluation is only meaningful if training never saw its words."""
    from clipsearch.indexer.demo import phrasings
    from clipsearch.indexer.demo.catalog import TRANSLATION_TEMPLATES
    from clipsearch.indexer.training import template_set
    from clipsearch.indexer.training.data import fix_articles

    summary = generate_catalog(tmp_path, products=400, seed=1)
    rows = pq.read_table(summary.manifest).to_pylist()
    templates = [*template_set("shop"), *(t for pair in TRANSLATION_TEMPLATES for t in pair)]
    seen: set[str] = set()
    for r in rows:
        fields = {k: str(v) for k, v in r.items()}
        seen |= _words(r["caption"]) | _words(r["title"])
        for t in templates:
            seen |= _words(fix_articles(t.format(**fields)))
    unseen: set[str] = set()
    for table in (phrasings.COLOUR_SYNONYMS, phrasings.PATTERN_SYNONYMS, phrasings.KIND_SYNONYMS):
        for synonyms in table.values():
            for s in synonyms:
                unseen |= _words(s)
    for p in phrasings.PHRASINGS:
        unseen |= _words(p.format(kind="", colour="", pattern=""))
    assert unseen and not unseen & seen, sorted(unseen & seen)
    for p in phrasings.PHRASINGS_ZH:
        frame = p.format(kind_zh="", colour_zh="", pattern_zh="")
        assert frame and not any(frame in c for c in seen), frame
