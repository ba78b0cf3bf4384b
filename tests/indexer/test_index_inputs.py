"""What the indexer agrees to read: regular files under a size cap, every format Pillow
decodes (others counted by extension), and manifest rows that cannot widen image roots."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipsearch.indexer.build import BuildOptions, build
from clipsearch.indexer.sources import SourceOptions, decodable_extensions, scan_sources
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.manifest import read_current
from tests.indexer.helpers import make_images, snapshot_rows

ENC = FakeEncoder(32)
CSV_OPTS = BuildOptions(sources=SourceOptions(image_col="img", id_col="sku"))


def _report(idx: Path, summary: object) -> dict[str, dict[str, str]]:
    path = idx / summary.errors_report  # type: ignore[attr-defined]
    return {r["doc_id"]: r for r in pq.read_table(path).to_pylist()}


def test_fifo_in_a_folder_is_reported_not_read(tmp_path: Path) -> None:
    make_images(tmp_path / "photos", 3)
    os.mkfifo(tmp_path / "photos" / "pipe.jpg")
    done: list[object] = []
    worker = threading.Thread(
        target=lambda: done.append(build([tmp_path / "photos"], tmp_path / "idx", encoder=ENC)),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=120)  # a deadline, not a synchronising sleep: a hang fails here
    assert done, "the build hung on a FIFO"
    summary = done[0]
    assert (summary.indexed, summary.skipped) == (3, 1)  # type: ignore[attr-defined]
    row = _report(tmp_path / "idx", summary)["pipe.jpg"]
    assert row["stage"] == "read" and "named pipe" in row["reason"]


def test_device_rows_are_refused_and_never_widen_image_roots(tmp_path: Path) -> None:
    make_images(tmp_path / "cat" / "photos", 1)
    csv = tmp_path / "cat" / "m.csv"
    csv.write_text("sku,img\na,photos/img0000.jpg\nb,/dev/zero\nc,/etc/passwd\n")
    summary = build([csv], tmp_path / "idx", encoder=ENC, options=CSV_OPTS)
    assert (summary.indexed, summary.skipped) == (1, 2)
    report = _report(tmp_path / "idx", summary)
    assert "not a regular file (a character device)" in report["b"]["reason"]
    assert report["c"]["stage"] == "decode"
    # /etc/passwd was not indexed, so /etc is no image root.
    assert read_current(tmp_path / "idx").image_roots == (str((tmp_path / "cat").resolve()),)


def test_indexed_image_outside_the_manifest_folder_still_adds_its_folder(tmp_path: Path) -> None:
    make_images(tmp_path / "elsewhere", 1)
    csv = tmp_path / "cat" / "m.csv"
    csv.parent.mkdir()
    csv.write_text(f"sku,img\na,{tmp_path / 'elsewhere' / 'img0000.jpg'}\n")
    build([csv], tmp_path / "idx", encoder=ENC, options=CSV_OPTS)
    roots = read_current(tmp_path / "idx").image_roots
    assert roots == tuple(sorted({str((tmp_path / d).resolve()) for d in ("cat", "elsewhere")}))


def test_size_cap_is_checked_before_reading(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "photos", 2)
    big = paths[0].stat().st_size
    (tmp_path / "photos" / "huge.jpg").write_bytes(paths[0].read_bytes() + b"\0" * 4096)
    opts = BuildOptions(max_image_bytes=big + 100)
    summary = build([tmp_path / "photos"], tmp_path / "idx", encoder=ENC, options=opts)
    assert (summary.indexed, summary.skipped) == (2, 1)
    assert "over the limit" in _report(tmp_path / "idx", summary)["huge.jpg"]["reason"]


def test_every_format_pillow_decodes_is_taken_others_are_counted(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    make_images(folder, 2)
    im = Image.new("RGB", (20, 20), (200, 30, 30))
    im.save(folder / "a.tga")
    im.save(folder / "b.ico")
    im.save(folder / "c.pcx")
    (folder / "notes.xyz").write_text("not an image")
    (folder / "README").write_text("hello")
    (folder / "d.pdf").write_bytes(b"%PDF-1.4")  # Pillow writes PDFs but cannot read them
    assert {".tga", ".ico", ".pcx", ".mpo", ".jpg"} <= set(decodable_extensions())
    assert ".pdf" not in decodable_extensions()
    summary = build([folder], tmp_path / "idx", encoder=ENC)
    assert (summary.indexed, summary.skipped) == (5, 0)
    assert summary.not_considered == {".xyz": 1, "(none)": 1, ".pdf": 1}
    # The user narrows the list: the others are counted by extension, not dropped silently.
    narrow = BuildOptions(sources=SourceOptions(extensions=(".jpg",)))
    summary = build([folder], tmp_path / "idx2", encoder=ENC, options=narrow)
    assert summary.indexed == 2
    assert summary.not_considered[".tga"] == 1 and sum(summary.not_considered.values()) == 6


def test_unsupported_url_schemes_get_a_per_row_reason(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text(
        'sku,img\na,s3://bucket/a.jpg\nb,ftp://host/b.jpg\nc,"data:image/png;base64,xx"\n'
        "d,x.jpg,extra\n"
    )
    scan = scan_sources([csv], SourceOptions(image_col="img", id_col="sku"))
    reasons = {p.doc_id: p.reason for p in scan.problems}
    assert "unsupported image URL scheme 's3'" in reasons["a"]
    assert "unsupported image URL scheme 'ftp'" in reasons["b"]
    assert "data: URLs are not supported" in reasons["c"]
    assert any("more fields than the header" in p.reason for p in scan.problems)
    assert scan.items == []


def test_summary_names_top_reasons(tmp_path: Path) -> None:
    make_images(tmp_path / "photos", 2)
    for i in range(3):
        (tmp_path / "photos" / f"bad{i}.png").write_text("not a png")
    os.mkfifo(tmp_path / "photos" / "pipe.jpg")
    summary = build([tmp_path / "photos"], tmp_path / "idx", encoder=ENC)
    assert summary.top_reasons[0][0] == "decode" and summary.top_reasons[0][2] == 3
    assert summary.top_reasons[1][:1] == ("read",) and summary.top_reasons[1][2] == 1
    assert summary.to_dict()["top_reasons"][0]["items"] == 3


@pytest.mark.parametrize("bad", [-1, 1.5, 0.0, True, "3"])
def test_max_errors_validated(bad: object) -> None:
    from clipsearch.retrieval.errors import ConfigError

    with pytest.raises(ConfigError, match="max_errors"):
        BuildOptions(max_errors=bad)  # type: ignore[arg-type]


def test_max_errors_fails_the_build_and_commits_nothing(tmp_path: Path) -> None:
    from clipsearch.indexer.build import TooManyErrorsError

    make_images(tmp_path / "photos", 6)
    idx = tmp_path / "idx"
    build([tmp_path / "photos"], idx, encoder=ENC)
    before = snapshot_rows(idx)
    for i in range(2):
        (tmp_path / "photos" / f"bad{i}.png").write_text("not a png")
    for limit in (1, 0.2):  # 2 of 8 items fail: more than 1, and 25% > 20%
        with pytest.raises(TooManyErrorsError, match="nothing was committed") as e:
            build([tmp_path / "photos"], idx, encoder=ENC, options=BuildOptions(max_errors=limit))
        assert "decode" in str(e.value) and "2 of 8" in str(e.value)
        assert read_current(idx).version == 1
        assert snapshot_rows(idx)[0] == before[0]
    summary = build([tmp_path / "photos"], idx, encoder=ENC, options=BuildOptions(max_errors=2))
    assert (summary.skipped, summary.version) == (2, 2)
    assert summary.items_resumed == 8  # the failed attempts kept their embeddings
    summary = build([tmp_path / "photos"], idx, encoder=ENC, options=BuildOptions(max_errors=0.25))
    assert (summary.skipped, summary.version) == (2, 3)
