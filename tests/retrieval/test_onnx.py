"""The ONNX backend: export round trip, fingerprints across backends, errors, quantisation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.retrieval.encoders import EncoderFingerprint, encoder_from_fingerprint, load_encoder
from clipsearch.retrieval.errors import ConfigError, ModelNotFoundError
from tests.conftest import TinyCheckpoints, TinyOnnx

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from clipsearch.retrieval.encoders import onnx_export
from clipsearch.retrieval.encoders.onnx import MANIFEST_NAME, OnnxEncoder


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in
           ((32, 32), (90, 17), (3, 200), (1, 1), (640, 480))]  # fmt: skip
    return [*out, Image.new("RGB", (50, 40), "red"), Image.new("L", (33, 45), 128)]


TEXTS = ["a red shirt", "", "红色连衣裙", "Crème brûlée &amp; café", "shirt " * 40, "x"]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_export_round_trip_every_vector_matches_torch(tiny_onnx: TinyOnnx) -> None:
    torch_enc = tiny_onnx.torch_encoder
    onnx_enc = OnnxEncoder(tiny_onnx.folder, device="cpu")
    images = _images()
    # Any batch size works (dynamic batch axis; the export used 2): 7 images, 6 texts, 1.
    assert _cos(torch_enc.encode_images(images), onnx_enc.encode_images(images)).min() >= 0.999
    assert _cos(torch_enc.encode_texts(TEXTS), onnx_enc.encode_texts(TEXTS)).min() >= 0.999
    one = onnx_enc.encode_texts(["a red shirt"])
    assert one.shape == (1, 32) and np.allclose(np.linalg.norm(one, axis=1), 1, atol=1e-5)
    manifest = json.loads((tiny_onnx.folder / MANIFEST_NAME).read_text())
    assert manifest["check"]["text_min_cosine"] >= 0.999
    assert manifest["check"]["image_min_cosine"] >= 0.999
    assert manifest["tokenizer"] == {
        "kind": "clip-bpe",
        "vocab": "bpe_merges.txt",
        "context_length": 16,
        "clean": "lower",
    }
    assert {p.name for p in tiny_onnx.folder.iterdir()} >= {"image.onnx", "text.onnx"}


def test_truncation_is_reported_like_torch(tiny_onnx: TinyOnnx) -> None:
    a = tiny_onnx.torch_encoder.encode_texts_detailed(TEXTS)
    b = OnnxEncoder(tiny_onnx.folder).encode_texts_detailed(TEXTS)
    assert a.truncated.tolist() == b.truncated.tolist()
    assert a.n_tokens.tolist() == b.n_tokens.tolist()
    # "shirt " * 40 needs 42 tokens; the Chinese text's bytes need more than 16 too.
    assert b.truncated.tolist() == [False, False, True, False, True, False]
    assert b.n_tokens[4] == 42


def test_fingerprint_records_the_backend_but_stays_compatible(tiny_onnx: TinyOnnx) -> None:
    torch_fp = tiny_onnx.torch_encoder.fingerprint
    onnx_fp = OnnxEncoder(tiny_onnx.folder).fingerprint
    assert (torch_fp.backend, onnx_fp.backend) == ("torch", "onnx")
    assert onnx_fp == torch_fp and onnx_fp.diff(torch_fp) == {}
    assert onnx_fp.to_dict()["backend"] == "onnx"
    # Manifests written before backends were recorded read back as torch.
    old = {k: v for k, v in torch_fp.to_dict().items() if k != "backend"}
    assert EncoderFingerprint.from_dict(old).backend == "torch"
    # Other weights are still a mismatch, whichever backend.
    other = EncoderFingerprint.from_dict({**onnx_fp.to_dict(), "weights_sha256": "0" * 64})
    assert list(onnx_fp.diff(other)) == ["weights_sha256"]


def test_index_built_with_torch_answers_onnx_queries(tiny_onnx: TinyOnnx, tmp_path: Path) -> None:
    from clipsearch.indexer.build import BuildOptions, build
    from clipsearch.retrieval.engine import SearchEngine

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(_images()):
        im.convert("RGB").save(folder / f"im{i}.png")
    build([folder], tmp_path / "index", encoder=tiny_onnx.torch_encoder,
          options=BuildOptions(workers=1))  # fmt: skip
    onnx_enc = OnnxEncoder(tiny_onnx.folder)
    with SearchEngine.open(tmp_path / "index", encoder=tiny_onnx.torch_encoder) as engine:
        want = engine.search(Path(folder / "im1.png"))
    with SearchEngine.open(tmp_path / "index", encoder=onnx_enc) as engine:
        got = engine.search(Path(folder / "im1.png"))
    assert [h.doc_id for h in got][:3] == [h.doc_id for h in want][:3]
    assert got[0].score == pytest.approx(want[0].score, abs=2e-3)


def test_auto_backend_uses_a_cached_export_and_onnx_requires_one(
    tiny_checkpoints: TinyCheckpoints,
    tiny_arch: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path / "cache"))
    weights = str(tiny_checkpoints.safetensors)
    torch_enc = load_encoder(tiny_arch, weights, precision="fp32")
    assert torch_enc.fingerprint.backend == "torch"  # no export yet: auto is torch
    with pytest.raises(ModelNotFoundError, match="clipsearch models export"):
        load_encoder(tiny_arch, weights, backend="onnx")
    with pytest.raises(ModelNotFoundError, match="no ONNX export"):
        encoder_from_fingerprint(torch_enc.fingerprint, backend="onnx")
    report = onnx_export.export_onnx(tiny_arch, weights)  # default --out: the cache
    assert report.out_dir.parent == tmp_path / "cache" / "onnx"
    assert load_encoder(tiny_arch, weights).fingerprint.backend == "onnx"
    assert encoder_from_fingerprint(torch_enc.fingerprint).fingerprint.backend == "onnx"
    forced = encoder_from_fingerprint(torch_enc.fingerprint, backend="torch")
    assert forced.fingerprint.backend == "torch"
    # An export folder is a model name of its own.
    assert load_encoder(str(report.out_dir)).fingerprint.backend == "onnx"
    with pytest.raises(ConfigError, match="unknown backend"):
        load_encoder(tiny_arch, weights, backend="tensorrt")


def test_export_refuses_to_overwrite_and_writes_nothing_on_a_failed_check(
    tiny_checkpoints: TinyCheckpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arch, weights = tiny_checkpoints.arch, str(tiny_checkpoints.safetensors)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    with pytest.raises(ConfigError, match="--overwrite"):
        onnx_export.export_onnx(arch, weights, out_dir=tmp_path / "taken")
    assert (tmp_path / "taken" / "x").read_text() == "mine"
    monkeypatch.setattr(onnx_export, "_min_cosine", lambda a, b: 0.9)
    with pytest.raises(onnx_export.ExportCheckError, match=r"cosine 0.90000 < 0.999"):
        onnx_export.export_onnx(arch, weights, out_dir=tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no partial folder left


def test_int8_export_is_smaller_and_close(tiny_onnx: TinyOnnx, tmp_path: Path) -> None:
    fp = tiny_onnx.torch_encoder.fingerprint
    report = onnx_export.export_onnx(
        fp.arch, fp.pretrained, out_dir=tmp_path / "int8", quantize="int8"
    )
    q = OnnxEncoder(report.out_dir)
    assert q.precision == "int8" and report.quantized == "int8-dynamic"
    assert (report.out_dir / "text.onnx").stat().st_size < (
        tiny_onnx.folder / "text.onnx"
    ).stat().st_size
    assert _cos(tiny_onnx.torch_encoder.encode_texts(TEXTS), q.encode_texts(TEXTS)).min() >= 0.98


def test_missing_onnxruntime_is_a_clear_error(tiny_onnx: TinyOnnx) -> None:
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"  # makes `import onnxruntime` fail
        "from clipsearch.retrieval.encoders import load_encoder\n"
        "from clipsearch.retrieval.errors import ConfigError\n"
        "try:\n"
        f"    load_encoder({str(tiny_onnx.folder)!r})\n"
        "except ConfigError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ERR the ONNX backend needs onnxruntime" in out.stdout
    assert "pip install 'clipsearch[onnx]'" in out.stdout and "--backend torch" in out.stdout


def test_query_threads_run_small_batches_on_their_own_session(tiny_onnx: TinyOnnx) -> None:
    enc = OnnxEncoder(tiny_onnx.folder, threads=2, query_threads=1)
    enc.encode_texts(["one query"])
    assert set(enc._sessions) == {"text/1"}
    enc.encode_texts(["t"] * 10)
    assert set(enc._sessions) == {"text/1", "text/2"}
    with pytest.raises(ConfigError, match="query_threads"):
        OnnxEncoder(tiny_onnx.folder, query_threads=0)


def test_random_weights_are_refused_unless_asked_for(tiny_arch: str) -> None:
    with pytest.raises(ConfigError, match="--random-weights"):
        load_encoder(tiny_arch)
    enc = load_encoder(tiny_arch, allow_random=True, precision="fp32")
    assert enc.fingerprint.pretrained == "" and enc.fingerprint.weights_sha256 is None
    # An index built from random weights on purpose still re-opens.
    assert encoder_from_fingerprint(enc.fingerprint).fingerprint == enc.fingerprint


@pytest.mark.parametrize(("torch_s", "onnx_s", "want"), [(2.0, 1.0, "onnx"), (1.0, 2.0, "torch")])
def test_builds_take_the_backend_measured_faster_queries_take_onnx(
    tiny_onnx: TinyOnnx,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    torch_s: float,
    onnx_s: float,
    want: str,
) -> None:
    import shutil

    from clipsearch.retrieval.encoders import precision
    from clipsearch.retrieval.encoders.onnx import cache_dir_for

    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path))
    fp = tiny_onnx.torch_encoder.fingerprint
    shutil.copytree(tiny_onnx.folder, cache_dir_for(fp))
    timings = iter([torch_s, onnx_s] * 5)
    monkeypatch.setattr(precision, "_seconds", lambda fn: next(timings))
    args = (fp.arch, fp.pretrained)
    build_enc = load_encoder(*args, purpose="build", precision="fp32")
    assert build_enc.fingerprint.backend == want
    # Measured once per machine and model: the cached choice needs no timing.
    monkeypatch.setattr(precision, "_seconds", lambda fn: pytest.fail("probed twice"))
    assert load_encoder(*args, purpose="build", precision="fp32").fingerprint.backend == want
    from_index = encoder_from_fingerprint(fp, purpose="build", precision="fp32")
    assert from_index.fingerprint.backend == want
    assert load_encoder(*args).fingerprint.backend == "onnx"  # queries: always ONNX
    with pytest.raises(ConfigError, match="unknown purpose"):
        load_encoder(*args, purpose="train")


def test_ascii_texts_skip_ftfy_and_clean_exactly_like_open_clip() -> None:
    """Printable ASCII without `&` passes through ftfy unchanged, so it is not imported
    for it; every other ASCII character still goes through ftfy, as open_clip does."""
    import random

    from open_clip.tokenizer import get_clean_fn

    from clipsearch.retrieval.encoders.bpe import CLEANERS

    rng = random.Random(7)
    ascii_chars = [chr(i) for i in range(128)]
    texts = ascii_chars + [f" a{c}b {c}&amp;{c}\r\n" for c in ascii_chars]
    texts += [
        "".join(rng.choice(ascii_chars) for _ in range(rng.randint(0, 20))) for _ in range(3000)
    ]
    texts += ["Crème brûlée", "caf\u00c3\u00a9", "\x1b[31mred\x1b[0m dress", "a&lt;b", "ｔ-shirt"]
    for mode, clean in CLEANERS.items():
        reference = get_clean_fn(mode)
        assert [clean(t) for t in texts] == [reference(t) for t in texts], mode
    code = (
        "import sys\n"
        "from clipsearch.retrieval.encoders.bpe import CLEANERS\n"
        "CLEANERS['whitespace']('red striped t-shirt, size 10\\tcotton\\n')\n"
        "before = 'ftfy' in sys.modules\n"
        "CLEANERS['whitespace']('Crème brûlée')\n"
        "print(before, 'ftfy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def _optimized(cache: Path) -> list[Path]:
    root = cache / "onnx" / "optimized"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_optimised_graphs_are_cached_checked_and_rebuilt(
    tiny_onnx: TinyOnnx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(cache))
    export_files = sorted(p.name for p in tiny_onnx.folder.iterdir())
    expected = OnnxEncoder(tiny_onnx.folder, cache_graphs=False).encode_texts(TEXTS)
    assert _optimized(cache) == []

    # First use saves the optimised text graph (and only that tower) beside the cache.
    np.testing.assert_allclose(
        OnnxEncoder(tiny_onnx.folder).encode_texts(TEXTS), expected, atol=1e-5
    )
    (folder,) = _optimized(cache)
    assert "-text-" in folder.name and (folder / "model.data").stat().st_size > 0
    assert sorted(p.name for p in tiny_onnx.folder.iterdir()) == export_files

    # Later processes load it: the export is not even opened.
    create = OnnxEncoder._create

    def refuse(self: OnnxEncoder, tower: str, path: Path, opts: object) -> object:
        raise AssertionError(f"the {tower} session was made from the export")

    monkeypatch.setattr(OnnxEncoder, "_create", refuse)
    np.testing.assert_allclose(
        OnnxEncoder(tiny_onnx.folder).encode_texts(TEXTS), expected, atol=1e-5
    )

    # Damaged weights (same size) or a truncated file: the probe or onnxruntime notices,
    # the session is made from the export and the folder is saved again.
    monkeypatch.setattr(OnnxEncoder, "_create", create)
    data = folder / "model.data"
    for damage in ("zeros", "truncate"):
        raw = data.read_bytes()
        if damage == "zeros":
            data.write_bytes(bytes(len(raw) // 2) + raw[len(raw) // 2 :])
        else:
            data.write_bytes(raw[: len(raw) // 3])
        np.testing.assert_allclose(
            OnnxEncoder(tiny_onnx.folder).encode_texts(TEXTS), expected, atol=1e-5
        )
        assert _optimized(cache) == [folder] and data.read_bytes() == raw

    # A changed export (another graph file) never reads the old folder.
    other = tmp_path / "export-copy"
    shutil.copytree(tiny_onnx.folder, other)
    import onnx

    graph = onnx.load(str(other / "text.onnx"))
    graph.doc_string = "re-exported"  # same computation, another file
    onnx.save(graph, str(other / "text.onnx"))
    OnnxEncoder(other).encode_texts(["x"])
    assert len(_optimized(cache)) == 2


def test_graph_cache_can_be_turned_off(
    tiny_onnx: TinyOnnx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CLIPSEARCH_ONNX_GRAPH_CACHE", "0")
    OnnxEncoder(tiny_onnx.folder).encode_texts(["a red shirt"])
    assert _optimized(tmp_path) == []


def test_weights_hash_is_remembered_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib
    import os

    from clipsearch.retrieval.encoders import weights
    from clipsearch.retrieval.encoders.onnx_cache import cached_sha256

    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    assert cached_sha256(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    weights._sha_cache.clear()  # what a new process starts with
    hashed: list[Path] = []
    real = weights.file_sha256
    monkeypatch.setattr(weights, "file_sha256", lambda p: hashed.append(p) or real(p))
    assert cached_sha256(f) == hashlib.sha256(b"a" * 1000).hexdigest() and hashed == []
    st = f.stat()
    f.write_bytes(b"b" * 1000)  # same size, mtime put back: ctime still moves
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    weights._sha_cache.clear()
    assert cached_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest() and hashed == [f]


def test_a_broken_export_leaves_no_half_written_cache(
    tiny_onnx: TinyOnnx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_onnx.folder, broken)
    (broken / "text.onnx").write_bytes(b"not a graph")
    with pytest.raises(ConfigError, match="cannot load the ONNX text model"):
        OnnxEncoder(broken).encode_texts(["a red shirt"])
    root = tmp_path / "cache" / "onnx" / "optimized"
    assert not root.exists() or list(root.iterdir()) == []
