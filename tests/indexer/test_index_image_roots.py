"""The manifest records the folders the indexed images came from (``image_roots``):
folder and manifest sources, add unions them, delete/compact carry them, older
manifests without the field still read."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsearch.indexer.build import BuildOptions, add, build
from clipsearch.indexer.maintenance import compact, delete, info
from clipsearch.indexer.sources import MAX_IMAGE_ROOTS, SourceOptions, covering_folders
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.errors import IndexFormatError
from clipsearch.retrieval.manifest import CURRENT_FILE, manifest_path, read_current
from tests.indexer.helpers import make_images

ENC = FakeEncoder(32, context_length=16)
PARQUET = SourceOptions(image_col="image_path", text_cols=("title",), id_col="sku")


def _parquet(path: Path, images: list[str]) -> Path:
    rows = [
        {"sku": f"SKU{i}", "image_path": p, "title": f"shirt {i}"} for i, p in enumerate(images)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_folder_source_records_its_resolved_root(tmp_path: Path) -> None:
    make_images(tmp_path / "real" / "photos" / "sub", 3)
    (tmp_path / "link").symlink_to(tmp_path / "real")  # indexed through a symlinked path
    build([tmp_path / "link" / "photos"], tmp_path / "idx", encoder=ENC)
    m = read_current(tmp_path / "idx")
    assert m.image_roots == (str((tmp_path / "real" / "photos").resolve()),)
    on_disk = json.loads((tmp_path / "idx" / manifest_path(m.version)).read_text())
    assert on_disk["image_roots"] == [str((tmp_path / "real" / "photos").resolve())]
    assert info(tmp_path / "idx")["image_roots"] == on_disk["image_roots"]


def test_parquet_source_records_its_folder_and_outside_image_folders(tmp_path: Path) -> None:
    inside = make_images(tmp_path / "cat" / "images", 2)
    far = make_images(tmp_path / "elsewhere" / "deep", 2, prefix="far")
    (tmp_path / "cat" / "images" / "linked.jpg").symlink_to(
        make_images(tmp_path / "linked", 1, prefix="lnk")[0]
    )
    manifest = _parquet(
        tmp_path / "cat" / "products.parquet",
        [
            f"images/{inside[0].name}",
            f"images/{inside[1].name}",
            str(far[0]),  # absolute, outside the manifest's folder
            str(far[1]),  # same folder: recorded once
            "images/linked.jpg",  # relative, but resolves outside
        ],
    )
    build([manifest], tmp_path / "idx", encoder=ENC, options=BuildOptions(sources=PARQUET))
    assert read_current(tmp_path / "idx").image_roots == tuple(
        sorted(str((tmp_path / d).resolve()) for d in ("cat", "elsewhere/deep", "linked"))
    )


def test_text_only_index_records_no_image_roots(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("a red mug\na blue shirt\n")
    build([tmp_path / "notes.txt"], tmp_path / "idx", encoder=ENC)
    assert read_current(tmp_path / "idx").image_roots == ()


def test_add_unions_roots_and_delete_compact_carry_them(tmp_path: Path) -> None:
    make_images(tmp_path / "a", 2)
    make_images(tmp_path / "b", 2, prefix="b")
    make_images(tmp_path / "a" / "nested", 1, prefix="n")
    idx = tmp_path / "idx"
    build([tmp_path / "a"], idx, encoder=ENC)
    add(idx, [tmp_path / "b"], encoder=ENC)
    both = (str((tmp_path / "a").resolve()), str((tmp_path / "b").resolve()))
    assert read_current(idx).image_roots == both
    add(idx, [tmp_path / "a" / "nested"], encoder=ENC)  # inside a: adds nothing
    assert read_current(idx).image_roots == both
    delete(idx, ids=["b0000.jpg", "img0000.jpg"])
    assert read_current(idx).operation == "delete" and read_current(idx).image_roots == both
    compact(idx)
    assert read_current(idx).operation == "compact" and read_current(idx).image_roots == both
    # A rebuild holds only its own sources, so only their roots.
    build([tmp_path / "b"], idx, encoder=ENC)
    assert read_current(idx).image_roots == (str((tmp_path / "b").resolve()),)


def _strip_image_roots(idx: Path) -> None:
    """Make the live manifest look like one written before image roots were recorded."""
    name = (idx / CURRENT_FILE).read_text().strip()
    path = idx / "manifests" / name
    data = json.loads(path.read_text())
    del data["image_roots"]
    data.pop("checksum", None)  # such manifests also predate the manifest checksum
    path.write_text(json.dumps(data))


def test_older_manifest_without_roots_reads_and_add_derives_them(tmp_path: Path) -> None:
    make_images(tmp_path / "old" / "x", 2)
    make_images(tmp_path / "old" / "y", 1, prefix="y")
    make_images(tmp_path / "new", 1, prefix="new")
    idx = tmp_path / "idx"
    build([tmp_path / "old"], idx, encoder=ENC)
    _strip_image_roots(idx)
    assert read_current(idx).image_roots is None and info(idx)["image_roots"] is None
    add(idx, [tmp_path / "new"], encoder=ENC)
    # The older images' folders are derived from their sources, so they stay servable.
    assert read_current(idx).image_roots == tuple(
        str((tmp_path / d).resolve()) for d in ("new", "old/x", "old/y")
    )


def test_corrupt_image_roots_are_a_format_error(tmp_path: Path) -> None:
    make_images(tmp_path / "a", 1)
    idx = tmp_path / "idx"
    build([tmp_path / "a"], idx, encoder=ENC)
    path = idx / manifest_path(read_current(idx).version)
    data = json.loads(path.read_text())
    data["image_roots"] = ["relative/folder"]
    data.pop("checksum", None)  # the field check, not the checksum, is under test
    path.write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match="not an absolute folder"):
        read_current(idx)


def test_covering_folders_is_minimal_and_bounded() -> None:
    assert covering_folders(["/srv/a/b", "/srv/a", "/srv/a-b", "/srv/c/d", "/srv/a/b/c"]) == (
        "/srv/a",
        "/srv/a-b",
        "/srv/c/d",
    )
    # A folder per product collapses to the folder holding them, never wider.
    per_product = [f"/data/shop/images/{i:05d}" for i in range(MAX_IMAGE_ROOTS + 1)]
    assert covering_folders([*per_product, "/data/other"]) == (
        "/data/other",
        "/data/shop/images",
    )
    shallow = [f"/d{i}/x" for i in range(MAX_IMAGE_ROOTS + 1)]
    assert covering_folders(shallow) == tuple(sorted(shallow))  # would lift to /dN: refused


def test_index_info_shows_the_image_roots(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from clipsearch.cli.app import app

    make_images(tmp_path / "p", 1)
    build([tmp_path / "p"], tmp_path / "idx", encoder=ENC)
    runner = CliRunner()
    r = runner.invoke(app, ["index", "info", str(tmp_path / "idx"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["image_roots"] == [str((tmp_path / "p").resolve())]
    r = runner.invoke(app, ["index", "info", str(tmp_path / "idx")])
    assert r.exit_code == 0 and "image roots" in r.stdout
    _strip_image_roots(tmp_path / "idx")
    r = runner.invoke(app, ["index", "info", str(tmp_path / "idx")])
    assert "not recorded (older index)" in r.stdout
