"""GET /items/{doc_id}/image serves only from the image roots the index recorded at build
time (plus --image-root): not from a wider inferred folder, and from every tree indexed."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from service_fixtures import COLOURS, assert_error, product_image

from clipsearch.retrieval.encoders import load_encoder
from clipsearch.retrieval.manifest import CURRENT_FILE, read_current


def _photos(folder: Path, names: list[str]) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate(names):
        product_image(list(COLOURS.values())[i % len(COLOURS)], i % 3).save(folder / name)
        out[name] = (folder / name).read_bytes()
    return out


def _build(sources: list[Path], out: Path) -> Path:
    from clipsearch.indexer.build import BuildOptions, build

    build(sources, out, encoder=load_encoder("fake"), options=BuildOptions(workers=1))
    return out


def _secret(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / "secret.png"
    product_image((1, 2, 3), 0).save(secret)
    return secret


def test_symlink_in_an_image_folder_pointing_out_is_refused(
    make_client: Any, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    a = _photos(site / "a", ["a0.png", "a1.png"])
    _photos(site / "b", ["b0.png"])
    index = _build([site / "a", site / "b"], tmp_path / "index")
    # Swapped for a link after indexing: it resolves into site/private, which holds no
    # indexed image (an inferred root would be site/ and serve it).
    secret = _secret(site / "private")
    (site / "a" / "a1.png").unlink()
    (site / "a" / "a1.png").symlink_to(secret)
    client = make_client(index=index)
    ok = client.get("/items/a0.png/image")
    assert ok.status_code == 200 and ok.content == a["a0.png"]
    err = assert_error(client.get("/items/a1.png/image"), 404, "image_not_found")
    assert "a1.png" in err["message"] and err["details"]["doc_id"] == "a1.png"


def _tamper_source(index: Path, doc_id: str, source: Path) -> None:
    """Rewrite the image row of ``doc_id`` to name ``source`` and commit that version, as
    a hand-edited (or hostile) metadata file would."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipsearch.indexer.commit import commit
    from clipsearch.indexer.writer import file_record

    m = read_current(index)
    shard = next(s for s in m.shards if s.modality == "image")
    path = index / shard.metadata.path
    table = pq.read_table(path)
    sources = [
        str(source) if d == doc_id else s
        for d, s in zip(
            table.column("doc_id").to_pylist(), table.column("source").to_pylist(), strict=True
        )
    ]
    i = table.schema.get_field_index("source")
    pq.write_table(table.set_column(i, "source", pa.array(sources, pa.string())), path)
    shards = tuple(
        replace(s, metadata=file_record(index, path)) if s is shard else s for s in m.shards
    )
    commit(index, replace(m, version=m.version + 1, parent_version=m.version, shards=shards))


def test_tampered_source_outside_the_roots_is_refused(make_client: Any, tmp_path: Path) -> None:
    shop = tmp_path / "shop"
    photos = _photos(shop / "images", ["p0.png", "p1.png"])
    index = _build([shop / "images"], tmp_path / "index")
    _tamper_source(index, "p1.png", _secret(shop / "private"))
    client = make_client(index=index)
    assert client.get("/items/p0.png/image").content == photos["p0.png"]
    assert_error(client.get("/items/p1.png/image"), 404, "image_not_found")


@pytest.fixture
def top_level_trees() -> Iterator[tuple[Path, Path]]:
    """Two image trees directly under /tmp: the deepest folder holding both is /tmp,
    far too wide to serve from, so only recorded roots can serve both."""
    base = Path("/tmp")
    if not base.is_dir():
        pytest.skip("needs a /tmp folder")
    made = [Path(tempfile.mkdtemp(prefix="clipsearch-roots-", dir=base)) for _ in range(2)]
    try:
        yield made[0], made[1]
    finally:
        for p in made:
            shutil.rmtree(p, ignore_errors=True)


def test_index_of_two_sibling_trees_serves_images_from_both(
    make_client: Any, tmp_path: Path, top_level_trees: tuple[Path, Path]
) -> None:
    one, two = top_level_trees
    first = _photos(one / "photos", ["first.png"])
    second = _photos(two / "photos", ["second.png"])
    index = _build([one / "photos", two / "photos"], tmp_path / "index")
    assert read_current(index).image_roots == tuple(
        sorted(str((t / "photos").resolve()) for t in (one, two))
    )
    client = make_client(index=index)
    r1, r2 = client.get("/items/first.png/image"), client.get("/items/second.png/image")
    assert (r1.status_code, r2.status_code) == (200, 200)
    assert (r1.content, r2.content) == (first["first.png"], second["second.png"])
    assert r1.headers["content-type"] == "image/png"


def _strip_image_roots(index: Path) -> None:
    path = index / "manifests" / (index / CURRENT_FILE).read_text().strip()
    data = json.loads(path.read_text())
    del data["image_roots"]
    data.pop("checksum", None)  # an older manifest has neither (its checksum would not match)
    path.write_text(json.dumps(data))


def test_older_manifest_falls_back_to_the_inferred_root_with_a_warning(
    make_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    photos = _photos(tmp_path / "shop" / "images", ["p0.png"])
    index = _build([tmp_path / "shop" / "images"], tmp_path / "index")
    _strip_image_roots(index)
    with caplog.at_level(logging.WARNING, logger="clipsearch.retrieval.service.state"):
        client = make_client(index=index)
        assert client.get("/items/p0.png/image").content == photos["p0.png"]
    warned = [
        r.getMessage() for r in caplog.records if r.name == "clipsearch.retrieval.service.state"
    ]
    assert any("does not record its image roots" in m for m in warned), warned
    # With --image-root, an older index serves from those folders only.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = make_client(index=index, image_roots=(str(elsewhere),))
    assert_error(other.get("/items/p0.png/image"), 404, "image_not_found")
