"""Encode workers: the pipelined MicroBatcher encodes up to N micro-batches at once.

The fake ``prepare`` functions block on a barrier or an event, so a batcher that runs
fewer than N encode calls at once (or more) fails the test instead of passing slowly.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from service_fixtures import later, until
from typer.testing import CliRunner

from clipsearch.retrieval.errors import ConfigError
from clipsearch.retrieval.service import config as config_module
from clipsearch.retrieval.service import state as state_module
from clipsearch.retrieval.service.batching import DeadlineExceededError, MicroBatcher
from clipsearch.retrieval.service.config import ServiceConfig

WORKERS = 3


async def _yield(times: int = 20) -> None:
    """Give the dispatcher turns (it would start a batch here if it had room)."""
    for _ in range(times):
        await asyncio.sleep(0)


class BlockingPrepare:
    """The first ``WORKERS`` calls meet at a barrier (only N concurrent calls get past
    it), then wait for ``release``; later calls run at once. Records what it saw."""

    def __init__(self, batcher_ref: list[MicroBatcher[int, int]]) -> None:
        self.barrier = threading.Barrier(WORKERS)
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.calls = 0
        self.active = 0
        self.peak_active = 0
        self.peak_preparing = 0
        self.met = 0
        self.batches: list[list[int]] = []
        self._batcher = batcher_ref

    def __call__(self, payloads: Sequence[int]) -> list[int]:
        with self.lock:
            self.calls += 1
            call = self.calls
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
            self.peak_preparing = max(self.peak_preparing, self._batcher[0].preparing)
            self.batches.append(list(payloads))
        try:
            if call <= WORKERS:
                self.barrier.wait(timeout=10)  # BrokenBarrierError: fewer than N at once
                with self.lock:
                    self.met += 1
                assert self.release.wait(10), "the test never released the workers"
            return [p * 10 for p in payloads]
        finally:
            with self.lock:
                self.active -= 1


def _search(prepared: list[int]) -> list[int | BaseException]:
    return [x + 1 for x in prepared]


async def _fill_workers(
    batcher: MicroBatcher[int, int], prepare: BlockingPrepare
) -> list[asyncio.Future[int]]:
    """Submit jobs 0..N-1 one at a time (an idle batcher starts each at once: N batches
    of one) and wait until all N encode calls have met at the barrier."""
    futures = []
    for i in range(WORKERS):
        futures.append(asyncio.ensure_future(batcher.submit(i, deadline=later(20))))
        await until(lambda i=i: prepare.calls == i + 1)
    await until(lambda: prepare.met == WORKERS)
    return futures


def _batcher(prepare: Any, ref: list[MicroBatcher[int, int]]) -> MicroBatcher[int, int]:
    batcher: MicroBatcher[int, int] = MicroBatcher(
        _search, prepare=prepare, prepare_workers=WORKERS, max_batch_size=16, max_wait_s=0.0
    )
    ref.append(batcher)
    return batcher


def test_n_batches_encode_at_once_and_never_more() -> None:
    ref: list[MicroBatcher[int, int]] = []
    prepare = BlockingPrepare(ref)

    async def main() -> list[int]:
        batcher = _batcher(prepare, ref)
        batcher.start()
        try:
            first = await _fill_workers(batcher, prepare)
            # Every worker is busy: these queue one by one, and must wait.
            rest = []
            for i in range(WORKERS, WORKERS + 6):
                rest.append(asyncio.ensure_future(batcher.submit(i, deadline=later(20))))
                await _yield()
            assert prepare.calls == WORKERS and batcher.preparing == WORKERS
            prepare.release.set()
            return [await f for f in first + rest]
        finally:
            prepare.release.set()
            await batcher.stop()

    answers = asyncio.run(main())
    assert answers == [i * 10 + 1 for i in range(WORKERS + 6)]
    assert prepare.peak_active == WORKERS and prepare.peak_preparing == WORKERS
    # What queued while the workers were busy went into one batch.
    assert prepare.batches[WORKERS:] == [list(range(WORKERS, WORKERS + 6))]


def test_each_job_gets_its_own_result_when_batches_finish_out_of_order() -> None:
    """Batch A's encode waits until batch B has been searched, so B is answered first;
    every future still gets the answer to its own payload. One worker could not encode
    B while A waits (A times out and fails)."""
    b_searched = threading.Event()
    searched: list[list[int]] = []

    def prepare(payloads: Sequence[int]) -> list[int]:
        if payloads[0] == 0:
            assert b_searched.wait(10), "batch B was not encoded and searched while A was"
        return [p * 10 for p in payloads]

    def search(prepared: list[int]) -> list[int | BaseException]:
        searched.append(prepared)
        if prepared[0] == 1000:
            b_searched.set()
        return [ValueError(f"bad {x}") if x == 1010 else x + 1 for x in prepared]

    async def main() -> list[object]:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            search, prepare=prepare, prepare_workers=2, max_batch_size=16, max_wait_s=0.0
        )
        batcher.start()
        try:
            a = asyncio.ensure_future(batcher.submit(0, deadline=later(20)))
            await until(lambda: batcher.preparing == 1)
            b = [
                asyncio.ensure_future(batcher.submit(p, deadline=later(20)))
                for p in (100, 101, 102)
            ]
            return list(await asyncio.gather(a, *b, return_exceptions=True))
        finally:
            await batcher.stop()

    a, b100, b101, b102 = asyncio.run(main())
    assert (a, b100, b102) == (1, 1001, 1021)
    assert isinstance(b101, ValueError) and str(b101) == "bad 1010"
    assert searched[0] == [1000, 1010, 1020] and searched[1] == [0]  # B before A


def test_jobs_whose_deadline_passes_while_workers_are_busy_are_never_encoded() -> None:
    ref: list[MicroBatcher[int, int]] = []
    prepare = BlockingPrepare(ref)

    async def main() -> tuple[list[int], int]:
        batcher = _batcher(prepare, ref)
        batcher.start()
        try:
            first = await _fill_workers(batcher, prepare)
            with pytest.raises(DeadlineExceededError):
                await batcher.submit(99, deadline=later(0.05))
            alive = asyncio.ensure_future(batcher.submit(7, deadline=later(20)))
            await _yield()
            prepare.release.set()
            return [await f for f in first], await alive
        finally:
            prepare.release.set()
            await batcher.stop()

    first, alive = asyncio.run(main())
    assert sorted(first) == [i * 10 + 1 for i in range(WORKERS)] and alive == 71
    encoded = [p for batch in prepare.batches for p in batch]
    assert 99 not in encoded and 7 in encoded


def test_stop_drains_batches_in_flight_and_cancels_the_rest() -> None:
    ref: list[MicroBatcher[int, int]] = []
    prepare = BlockingPrepare(ref)

    async def main() -> tuple[list[object], object, int]:
        batcher = _batcher(prepare, ref)
        batcher.start()
        first = await _fill_workers(batcher, prepare)
        queued = asyncio.ensure_future(batcher.submit(50, deadline=later(20)))
        await _yield()
        stopping = asyncio.ensure_future(batcher.stop())
        await _yield()
        assert not stopping.done()  # waits for the batches being encoded
        prepare.release.set()
        await stopping
        results = list(await asyncio.gather(*first, return_exceptions=True))
        queued_result = (await asyncio.gather(queued, return_exceptions=True))[0]
        return results, queued_result, batcher.preparing

    results, queued_result, preparing = asyncio.run(main())
    assert sorted(results) == [i * 10 + 1 for i in range(WORKERS)]  # type: ignore[type-var]
    assert isinstance(queued_result, asyncio.CancelledError)
    assert preparing == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("clipsearch-prepare")]
    assert 50 not in [p for batch in prepare.batches for p in batch]


def test_prepare_workers_can_only_go_down_once_started() -> None:
    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            _search, prepare=lambda xs: [x * 10 for x in xs], prepare_workers=2
        )
        batcher.start()
        try:
            with pytest.raises(ValueError, match="only go down"):
                batcher.prepare_workers = 3
            batcher.prepare_workers = 1
            assert await batcher.submit(4, deadline=later(10)) == 41
        finally:
            await batcher.stop()

    asyncio.run(main())
    with pytest.raises(ValueError, match="prepare_workers"):
        MicroBatcher(_search, prepare=lambda xs: xs, prepare_workers=0)


# ---------------------------------------------------------------- service wiring


@pytest.mark.parametrize("bad", [0, -1, 65, True, 2.0])
def test_encode_workers_config_is_validated(bad: object) -> None:
    with pytest.raises(ConfigError, match="encode_workers"):
        ServiceConfig(encode_workers=bad)  # type: ignore[arg-type]


class _Encoder:
    def __init__(self, device: str) -> None:
        self.device = device


def test_default_workers_follow_the_cores_and_one_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(config_module, "usable_cores", lambda: 8)
    monkeypatch.setattr(state_module, "usable_cores", lambda: 8)
    cpu = state_module.ServiceState(tmp_path, ServiceConfig())
    assert cpu.batcher.prepare_workers == config_module.MAX_AUTO_ENCODE_WORKERS == 4
    # 4 workers x 2 threads per call = the 8 cores, queries (<= 4 items) on 1 thread.
    assert cpu._encoder_threads() == (2, 1)
    three = state_module.ServiceState(tmp_path, ServiceConfig(encode_workers=3, query_threads=4))
    assert three._encoder_threads() == (2, 2)  # query threads capped at the per-call share
    one = state_module.ServiceState(tmp_path, ServiceConfig(encode_workers=1, query_threads=2))
    assert one.batcher.prepare_workers == 1 and one._encoder_threads() == (None, 2)
    gpu = state_module.ServiceState(tmp_path, ServiceConfig(), encoder=_Encoder("cuda:0"))
    assert gpu.batcher.prepare_workers == 1
    forced = state_module.ServiceState(
        tmp_path, ServiceConfig(encode_workers=2), encoder=_Encoder("cuda")
    )
    assert forced.batcher.prepare_workers == 2


def test_serve_cli_passes_encode_workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from clipsearch.cli.app import app
    from clipsearch.retrieval.service import server

    seen: list[ServiceConfig] = []
    monkeypatch.setattr(server, "serve", lambda index, config, **kw: seen.append(config))
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--encode-workers", "2"])
    assert result.exit_code == 0, result.output
    assert seen[0].encode_workers == 2
    result = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert seen[1].encode_workers is None
    bad = CliRunner().invoke(app, ["serve", str(tmp_path), "--encode-workers", "0"])
    assert bad.exit_code != 0 and "encode" in bad.output
