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
