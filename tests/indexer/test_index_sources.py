"""Sources: folders, manifests and text files become items (or reported problems)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clipsearch.indexer.sources import SourceOptions, scan_sources
from clipsearch.retrieval.errors import SourceError
from tests.indexer.helpers import make_images, write_products


def test_folder_is_recursive_filters_extensions_and_ignores_symlinks_leaving_it(
    tmp_path: Path,
) -> None:
    root = tmp_path / "photos"
    make_images(root, 2)
    make_images(root / "sub" / "deeper", 2, prefix="deep")
    (root / "notes.txt").write_text("not an image")
    outside = make_images(tmp_path / "elsewhere", 1, prefix="out")[0]
    os.symlink(outside, root / "link-out.jpg")
    os.symlink(root / "img0000.jpg", root / "link-in.jpg")
    os.symlink(tmp_path / "elsewhere", root / "dir-out")
    scan = scan_sources([root], SourceOptions())
    ids = [it.doc_id for it in scan.items]
    assert ids == sorted(ids)
    assert set(ids) == {
        "img0000.jpg", "img0001.jpg", "link-in.jpg",
        "sub/deeper/deep0000.jpg", "sub/deeper/deep0001.jpg",
    }  # fmt: skip
    assert all(it.modality == "image" and Path(it.source).is_absolute() for it in scan.items)
    assert scan.ignored == 2  # notes.txt and link-out.jpg


def test_manifest_row_yields_image_and_text_sharing_doc_id(tmp_path: Path) -> None:
    csv = write_products(tmp_path, 4)
    opts = SourceOptions(image_col="image_path", text_cols=("title",), id_col="sku")
    scan = scan_sources([csv], opts)
    images = [it for it in scan.items if it.modality == "image"]
    texts = [it for it in scan.items if it.modality == "text"]
    assert (
        [it.doc_id for it in images]
        == [it.doc_id for it in texts]
        == [f"SKU{i:04d}" for i in range(4)]
    )
    assert Path(images[0].source) == (tmp_path / "photos" / "img0000.jpg").absolute()
    assert texts[1].source == "green shirt number 1"
    assert images[0].metadata == {"title": "red shirt number 0", "price": 10.5, "category": "red"}
    assert scan.schema.field("price").type.id != scan.schema.field("category").type.id
    assert scan.n_input == 8 and not scan.problems


def test_metadata_of_the_wrong_type_rejects_the_row(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    rows = [{"id": f"d{i}", "text": f"item {i}", "price": float(i)} for i in range(5)]
    rows[3]["price"] = "cheap"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n")
    scan = scan_sources([path], SourceOptions(text_cols=("text",), id_col="id"))
    assert [it.doc_id for it in scan.items] == ["d0", "d1", "d2", "d4"]
    reasons = sorted(p.reason for p in scan.problems)
    assert any("'price'" in r and "'cheap'" in r for r in reasons)
    assert any("invalid JSON" in r for r in reasons)
    assert str(scan.schema.field("price").type) == "double"


@pytest.mark.parametrize(("policy", "kept_title"), [("reject", "first"), ("last", "second")])
def test_duplicate_ids_are_never_silent(tmp_path: Path, policy: str, kept_title: str) -> None:
    path = tmp_path / "m.csv"
    path.write_text("id,title\na,first\nb,other\na,second\n")
    scan = scan_sources(
        [path], SourceOptions(text_cols=("title",), id_col="id", on_duplicate=policy)
    )
    assert {it.doc_id: it.source for it in scan.items}["a"] == kept_title
    assert len(scan.problems) == 1 and "duplicate doc_id" in scan.problems[0].reason
    assert scan.n_input == 3


def test_text_file_one_text_per_line_blank_lines_reported(tmp_path: Path) -> None:
    path = tmp_path / "q.txt"
    path.write_text("a red shirt\n   \nblue mug\n")
    scan = scan_sources([path], SourceOptions())
    assert [(it.doc_id, it.source) for it in scan.items] == [
        ("q.txt:1", "a red shirt"),
        ("q.txt:3", "blue mug"),
    ]
    assert scan.problems[0].doc_id == "q.txt:2" and scan.problems[0].reason == "empty text"


def test_bad_source_configuration_is_a_clear_error(tmp_path: Path) -> None:
    csv = write_products(tmp_path, 2)
    with pytest.raises(SourceError, match="no column"):
        scan_sources([csv], SourceOptions(image_col="photo"))
    with pytest.raises(SourceError, match="needs --image-col"):
        scan_sources([csv], SourceOptions())
    with pytest.raises(SourceError, match="no such file"):
        scan_sources([tmp_path / "missing"], SourceOptions())
    (tmp_path / "x.docx").write_text("?")
    with pytest.raises(SourceError, match="unknown source type"):
        scan_sources([tmp_path / "x.docx"], SourceOptions())


def test_group_policy_keeps_every_photo_of_a_product_and_its_title_once(tmp_path: Path) -> None:
    make_images(tmp_path / "p", 3)
    path = tmp_path / "m.csv"
    path.write_text(
        "sku,image,title\n"
        "A,p/img0000.jpg,red mug\nA,p/img0001.jpg,red mug\nB,p/img0002.jpg,blue lamp\n"
    )
    opts = SourceOptions(
        image_col="image", text_cols=("title",), id_col="sku", on_duplicate="group"
    )
    scan = scan_sources([path], opts)
    keys = [(it.doc_id, it.modality) for it in scan.items]
    assert keys == [("A", "image"), ("A", "image"), ("B", "image"), ("A", "text"), ("B", "text")]
    assert not scan.problems and scan.n_input == 5
