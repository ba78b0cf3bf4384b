"""Query threads: the torch encoder pins its own intra-op threads per call (issue 11).

Calls of up to ``QUERY_BATCH`` items (queries) run on ``query_threads`` threads, larger
ones (indexing) on ``threads``, whatever the calling thread had; the caller's count is
restored afterwards. Observed as ``torch.get_num_threads()`` inside the model's forward.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipsearch.retrieval.encoders import QUERY_BATCH, encoder_from_fingerprint, load_encoder
from clipsearch.retrieval.errors import ConfigError
from tests.conftest import TinyCheckpoints, TinyOnnx

torch = pytest.importorskip("torch")
from clipsearch.retrieval.encoders.openclip import OpenClipEncoder  # noqa: E402

# Counts that differ from each other and from what the caller holds (CALLER).
QUERY, BULK, CALLER = 1, 2, 3


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def enc(tiny_checkpoints: TinyCheckpoints) -> OpenClipEncoder:
    return OpenClipEncoder(
        tiny_checkpoints.arch,
        pretrained=str(tiny_checkpoints.safetensors),
        precision="fp32",
        batch_size=4,  # so a 5-item call is two forward passes, both on `threads`
        threads=BULK,
        query_threads=QUERY,
    )


def _record(
    monkeypatch: pytest.MonkeyPatch,
    encoder: OpenClipEncoder,
    inside: Callable[[], None] = lambda: None,
) -> list[tuple[str, str, int]]:
    """Wrap both towers: each forward pass appends (tower, thread name, torch threads)."""
    seen: list[tuple[str, str, int]] = []
    for tower in ("encode_image", "encode_text"):
        real = getattr(encoder.model, tower)

        def forward(x: Any, _real: Any = real, _tower: str = tower) -> Any:
            seen.append((_tower, threading.current_thread().name, torch.get_num_threads()))
            inside()
            return _real(x)

        monkeypatch.setattr(encoder.model, tower, forward)
    return seen


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _calls(encoder: OpenClipEncoder) -> None:
    """One query and one indexing call per tower; asserts the caller's count survives each."""
    for n in (1, QUERY_BATCH, QUERY_BATCH + 1):
        encoder.encode_prepared(_images(n))
        assert torch.get_num_threads() == CALLER
        encoder.encode_texts([f"text {i}" for i in range(n)])
        assert torch.get_num_threads() == CALLER


# Per call size: one forward pass per batch_size (4) items.
EXPECTED_COUNTS = [QUERY, QUERY, BULK, BULK]


def test_query_and_indexing_calls_run_on_their_own_threads(
    enc: OpenClipEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _record(monkeypatch, enc)
    torch.set_num_threads(CALLER)
    _calls(enc)
    for tower in ("encode_image", "encode_text"):
        assert [n for t, _, n in seen if t == tower] == EXPECTED_COUNTS
    assert (enc.threads_for(1), enc.threads_for(QUERY_BATCH + 1)) == (QUERY, BULK)


def test_a_worker_thread_gets_the_same_counts_and_keeps_its_own(
    enc: OpenClipEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service encodes on a worker thread: torch's count is per OS thread there."""
    seen = _record(monkeypatch, enc)
    torch.set_num_threads(QUERY)  # the main thread's own count, left alone by the worker
    errors: list[BaseException] = []

    def work() -> None:
        try:
            torch.set_num_threads(CALLER)
            _calls(enc)
        except BaseException as e:  # re-raised in the test thread
            errors.append(e)

    worker = threading.Thread(target=work, name="encode-worker")
    worker.start()
    worker.join()
    assert not errors, errors[0]
    assert {name for _, name, _ in seen} == {"encode-worker"}
    for tower in ("encode_image", "encode_text"):
        assert [n for t, _, n in seen if t == tower] == EXPECTED_COUNTS
    assert torch.get_num_threads() == QUERY


def test_concurrent_query_and_indexing_calls_do_not_mix_counts(
    enc: OpenClipEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both calls are inside their forward pass at once (a barrier holds them there)."""
    both_inside = threading.Barrier(2, timeout=60)
    seen = _record(monkeypatch, enc, inside=lambda: both_inside.wait())
    results: dict[str, int] = {}
    errors: list[BaseException] = []

    def run(name: str, n: int) -> None:
        try:
            # This thread's first torch op copies the process-wide count (which the other
            # thread may be switching); the caller's own count is set after it, as a
            # thread that uses torch does (OpenClipEncoder._threads: "Not guaranteed").
            torch.get_num_threads()
            torch.set_num_threads(CALLER)
            enc.encode_texts([f"text {i}" for i in range(n)])
            results[name] = torch.get_num_threads()
        except BaseException as e:  # re-raised in the test thread
            errors.append(e)

    monkeypatch.setattr(enc, "batch_size", 8)  # one forward pass per call: one barrier round
    threads = [
        threading.Thread(target=run, args=("query", 1), name="query"),
        threading.Thread(target=run, args=("index", QUERY_BATCH + 1), name="index"),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert sorted((name, n) for _, name, n in seen) == [("index", BULK), ("query", QUERY)]
    assert results == {"query": CALLER, "index": CALLER}


def test_query_threads_none_runs_queries_on_threads(tiny_checkpoints: TinyCheckpoints) -> None:
    enc = OpenClipEncoder(
        tiny_checkpoints.arch,
        pretrained=str(tiny_checkpoints.safetensors),
        precision="fp32",
        threads=BULK,
        query_threads=None,
    )
    assert enc.threads_for(1) == BULK


def test_threads_default_to_torchs_count_at_load(tiny_checkpoints: TinyCheckpoints) -> None:
    torch.set_num_threads(CALLER)
    enc = OpenClipEncoder(
        tiny_checkpoints.arch, pretrained=str(tiny_checkpoints.safetensors), precision="fp32"
    )
    torch.set_num_threads(QUERY)  # a later change on the caller's thread does not move it
    assert (enc.threads_for(1), enc.threads_for(QUERY_BATCH + 1)) == (1, CALLER)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query_threads": 0}, "query_threads must be >= 1"),
        ({"threads": -1}, "threads must be >= 0"),
    ],
)
def test_bad_thread_counts_are_clear_errors(
    tiny_checkpoints: TinyCheckpoints, kwargs: dict[str, int], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        OpenClipEncoder(
            tiny_checkpoints.arch, pretrained=str(tiny_checkpoints.safetensors), **kwargs
        )


def test_load_encoder_and_encoder_from_fingerprint_pass_threads_to_torch(
    tiny_checkpoints: TinyCheckpoints,
) -> None:
    weights = str(tiny_checkpoints.safetensors)
    kw: dict[str, Any] = {"precision": "fp32", "threads": BULK, "query_threads": CALLER}
    loaded = load_encoder(tiny_checkpoints.arch, weights, backend="torch", **kw)
    assert isinstance(loaded, OpenClipEncoder)
    assert (loaded.threads_for(1), loaded.threads_for(QUERY_BATCH + 1)) == (CALLER, BULK)
    again = encoder_from_fingerprint(loaded.fingerprint, backend="torch", **kw)
    assert isinstance(again, OpenClipEncoder)
    assert (again.threads_for(1), again.threads_for(QUERY_BATCH + 1)) == (CALLER, BULK)
    default = load_encoder(tiny_checkpoints.arch, weights, backend="torch", precision="fp32")
    assert isinstance(default, OpenClipEncoder) and default.threads_for(1) == 1


def test_load_encoder_and_encoder_from_fingerprint_pass_query_threads_to_onnx(
    tiny_onnx: TinyOnnx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from clipsearch.retrieval.encoders.onnx import OnnxEncoder, cache_dir_for

    def query_session_threads(encoder: Any) -> int:
        assert isinstance(encoder, OnnxEncoder)
        encoder.encode_texts(["one query"])
        (key,) = [k for k in encoder._sessions if k.startswith("text/")]
        options = encoder._sessions[key].get_session_options()
        return int(options.intra_op_num_threads)

    loaded = load_encoder(str(tiny_onnx.folder), query_threads=BULK)
    assert query_session_threads(loaded) == BULK
    assert query_session_threads(load_encoder(str(tiny_onnx.folder))) == 1
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path))  # the export, found by fingerprint
    fp = tiny_onnx.torch_encoder.fingerprint  # type: ignore[attr-defined]
    shutil.copytree(tiny_onnx.folder, cache_dir_for(fp))
    from_index = encoder_from_fingerprint(fp, backend="onnx", query_threads=BULK)
    assert query_session_threads(from_index) == BULK


def test_engine_cli_and_service_hand_their_thread_counts_to_the_index_encoder(
    built_index: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from clipsearch.cli.app import app
    from clipsearch.retrieval import engine as engine_module
    from clipsearch.retrieval.engine import SearchEngine
    from clipsearch.retrieval.service.config import ServiceConfig

    seen: list[dict[str, Any]] = []

    def spy(fp: Any, **kw: Any) -> Any:
        seen.append(kw)
        return encoder_from_fingerprint(fp, **kw)

    monkeypatch.setattr(engine_module, "encoder_from_fingerprint", spy)
    root = built_index("flat")
    with SearchEngine.open(root):
        pass
    with SearchEngine.open(root, threads=BULK, query_threads=CALLER):
        pass
    assert [(kw["threads"], kw["query_threads"]) for kw in seen] == [(None, 1), (BULK, CALLER)]
    # The CLI's --query-threads reaches the engine; 0 is refused before anything loads.
    seen.clear()
    ok = CliRunner().invoke(app, ["search", str(root), "--text", "dress", "--query-threads", "2"])
    assert ok.exit_code == 0, ok.output
    assert [kw["query_threads"] for kw in seen] == [2]
    bad = CliRunner().invoke(app, ["search", str(root), "--text", "dress", "--query-threads", "0"])
    assert bad.exit_code == 2 and "query-threads" in bad.output
    with pytest.raises(ConfigError, match="query_threads must be an integer >= 1"):
        ServiceConfig(query_threads=0)
