"""The demo model's shipped ONNX export: small, picked by default, torch-free queries."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipsearch.indexer.demo.generate import generate_catalog
from clipsearch.retrieval.models import MODELS_DIR

pytest.importorskip("onnxruntime")


def test_shipped_onnx_export_is_small_and_picked_by_auto() -> None:
    from clipsearch.retrieval.encoders import load_encoder
    from clipsearch.retrieval.encoders.onnx import shipped_export

    folder = shipped_export("clipsearch-demo")
    assert folder is not None and folder.parent == MODELS_DIR
    # The export reads the token embedding (34,277 x 384) from the bundled safetensors
    # instead of keeping a second 26 MB copy; what stays is the image tower and the six
    # BERT layers in fp16 (~25 MB in all). A duplicated embedding would make it ~51 MB.
    assert sum(p.stat().st_size for p in folder.iterdir()) < 28 * 2**20
    enc = load_encoder("clipsearch-demo")
    assert enc.fingerprint.backend == "onnx"
    assert load_encoder("clipsearch-demo", backend="torch").fingerprint.backend == "torch"


def test_shipped_onnx_export_matches_torch_on_demo_products() -> None:

    from clipsearch.indexer.demo.catalog import make_product
    from clipsearch.indexer.demo.render import render_photo
    from clipsearch.retrieval.encoders import load_encoder

    onnx_enc = load_encoder("clipsearch-demo", backend="onnx")
    torch_enc = load_encoder("clipsearch-demo", backend="torch", precision="fp32")
    photos = [render_photo(make_product(i, 0), "front", i, 0) for i in range(6)]
    texts = ["a red striped t-shirt", "black boot", "红色连衣裙", "blue " * 40]
    for a, b in (
        (onnx_enc.encode_images(photos), torch_enc.encode_images(photos)),
        (onnx_enc.encode_texts(texts), torch_enc.encode_texts(texts)),
    ):
        assert (a * b).sum(axis=1).min() >= 0.999


def test_a_stale_shipped_export_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped export reads tensors from the bundled weights: new weights without a
    re-export must not silently mix two models."""
    import shutil

    import clipsearch.retrieval.models as models
    from clipsearch.retrieval.encoders.onnx import shipped_export

    shutil.copytree(MODELS_DIR / "clipsearch-demo-onnx", tmp_path / "clipsearch-demo-onnx")
    retrained = bytearray((MODELS_DIR / "clipsearch-demo.safetensors").read_bytes())
    retrained[-1] ^= 0xFF
    (tmp_path / "clipsearch-demo.safetensors").write_bytes(bytes(retrained))
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    assert shipped_export("clipsearch-demo") is None
    (tmp_path / "clipsearch-demo.safetensors").write_bytes(
        (MODELS_DIR / "clipsearch-demo.safetensors").read_bytes()
    )
    assert shipped_export("clipsearch-demo") == tmp_path / "clipsearch-demo-onnx"


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clipsearch.indexer.demo.run import build_demo_index
    from clipsearch.retrieval.encoders import load_encoder

    tmp = tmp_path_factory.mktemp("demo")
    generate_catalog(tmp / "catalog", products=12, seed=5)
    build_demo_index(tmp / "catalog", tmp / "index", load_encoder("clipsearch-demo"))
    return tmp / "index"


WATCHED = ("torch", "open_clip", "torchvision", "pandas", "ftfy")


def _cli_search(index: Path, text: str) -> tuple[list[str], list[dict[str, object]]]:
    """Run `clipsearch search INDEX --text TEXT --json` in a fresh interpreter: which
    WATCHED modules it imported, and its hits."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from clipsearch.cli.app import app\n"
        f"argv = ['search', {str(index)!r}, '--text', {text!r}, '--json']\n"
        "try:\n"
        "    app(argv)\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        f"loaded = sorted(m for m in {WATCHED!r} if m in sys.modules)\n"
        "print(json.dumps(loaded), file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stderr.strip().splitlines()[-1])
    return loaded, json.loads(out.stdout)["hits"]


def test_demo_text_search_imports_neither_torch_nor_open_clip(demo_index: Path) -> None:
    loaded, hits = _cli_search(demo_index, "red dress")
    assert not {"torch", "open_clip", "torchvision"} & set(loaded)
    assert hits and all(str(h["doc_id"]).startswith("SKU-") for h in hits)
    # An ASCII query needs no ftfy (cleaning is the identity there); Chinese does.
    assert "ftfy" not in loaded
    assert "ftfy" in _cli_search(demo_index, "红色连衣裙")[0]


def test_demo_text_search_does_not_import_pandas(demo_index: Path) -> None:
    pytest.importorskip("pandas")  # a lean install has none to avoid
    loaded, hits = _cli_search(demo_index, "red dress")
    assert hits and "pandas" not in loaded
