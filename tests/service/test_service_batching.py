"""MicroBatcher: batching, fan-out of results and errors, queue bound, deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest
from service_fixtures import later, until

from clipsearch.retrieval.service.batching import (
    DeadlineExceededError,
    MicroBatcher,
    QueueFullError,
)


def test_concurrent_jobs_share_batches_and_get_their_own_answers() -> None:
    sizes: list[int] = []

    def square(batch: Sequence[int]) -> list[int | BaseException]:
        sizes.append(len(batch))
        time.sleep(0.01)  # like an encoder call: others queue up meanwhile
        return [x * x for x in batch]

    async def main() -> list[int]:
        batcher: MicroBatcher[int, int] = MicroBatcher(square, max_batch_size=8, max_wait_s=0.02)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i, deadline=later(5)) for i in range(40)))
        finally:
            await batcher.stop()

    answers = asyncio.run(main())
    assert answers == [i * i for i in range(40)]
    assert sum(sizes) == 40
    assert len(sizes) < 40 and max(sizes) <= 8


def test_an_exception_goes_to_its_own_job_only() -> None:
    def picky(batch: Sequence[int]) -> list[int | BaseException]:
        return [ValueError(f"odd {x}") if x % 2 else x for x in batch]

    async def main() -> list[object]:
        batcher: MicroBatcher[int, int] = MicroBatcher(picky, max_wait_s=0.01)
        batcher.start()
        try:
            return await asyncio.gather(
                *(batcher.submit(i, deadline=later(5)) for i in range(4)), return_exceptions=True
            )
        finally:
            await batcher.stop()

    out = asyncio.run(main())
    assert out[0] == 0 and out[2] == 2
    assert isinstance(out[1], ValueError) and "odd 1" in str(out[1])
    assert isinstance(out[3], ValueError)


def test_full_queue_refuses_at_once_and_expired_jobs_are_never_run() -> None:
    release = threading.Event()
    ran: list[int] = []

    def blocking(batch: Sequence[int]) -> list[int | BaseException]:
        ran.extend(batch)
        release.wait(5)
        return list(batch)

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            blocking, max_batch_size=1, max_wait_s=0.0, max_queue=2
        )
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(1, deadline=later(5)))
            await until(lambda: ran == [1])  # job 1 is running and blocks the worker
            doomed = asyncio.ensure_future(batcher.submit(2, deadline=later(0.1)))
            await until(lambda: batcher.depth == 2)
            with pytest.raises(QueueFullError):
                await batcher.submit(3, deadline=later(5))
            assert not first.done()  # refused while the worker was still blocked
            with pytest.raises(DeadlineExceededError):
                await doomed
            release.set()
            assert await first == 1
            # The queue has room again once answers went out.
            assert await batcher.submit(4, deadline=later(5)) == 4
        finally:
            release.set()
            await batcher.stop()

    asyncio.run(main())
    assert ran == [1, 4]  # job 2 timed out while queued: its work was dropped


def test_a_crashing_batch_function_fails_that_batch_not_the_batcher() -> None:
    calls = {"n": 0}

    def flaky(batch: Sequence[int]) -> list[int | BaseException]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("encoder blew up")
        return list(batch)

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(flaky, max_wait_s=0.0)
        batcher.start()
        try:
            with pytest.raises(RuntimeError, match="blew up"):
                await batcher.submit(1, deadline=later(5))
            assert await batcher.submit(2, deadline=later(5)) == 2
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_queue_delay_bound_refuses_while_the_oldest_job_has_waited_too_long() -> None:
    release = threading.Event()

    started: list[int] = []

    def blocking(batch: Sequence[int]) -> list[int | BaseException]:
        started.extend(batch)
        release.wait(5)
        return list(batch)

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            blocking, max_batch_size=1, max_wait_s=0.0, max_queue=100, max_queue_delay_s=0.05
        )
        batcher.start()
        try:
            running = asyncio.ensure_future(batcher.submit(1, deadline=later(5)))
            await until(lambda: started == [1])  # job 1 is running and blocks the worker
            waiting = asyncio.ensure_future(batcher.submit(2, deadline=later(5)))
            await until(lambda: batcher.depth == 2)
            # Job 2 has just arrived (its queue time is set, not slept): a newcomer is admitted.
            batcher._pending[0].enqueued_at = time.monotonic()
            third = asyncio.ensure_future(batcher.submit(3, deadline=later(5)))
            await until(lambda: batcher.depth == 3)
            batcher._pending[0].enqueued_at -= 1.0  # now job 2 has waited a second
            with pytest.raises(QueueFullError, match="limit 50 ms"):
                await batcher.submit(4, deadline=later(5))
            release.set()
            assert (await running, await waiting, await third) == (1, 2, 3)
            assert await batcher.submit(5, deadline=later(5)) == 5  # drained: admitted again
        finally:
            release.set()
            await batcher.stop()

    asyncio.run(main())


def test_pipelined_batches_encode_the_next_batch_while_one_is_searched() -> None:
    """Stage 2 of batch 1 waits until stage 1 of batch 2 has run: only a pipeline gets
    past it (one worker doing both stages would wait forever, here 5 s, and fail)."""
    second_prepared = threading.Event()
    searching = threading.Event()
    prepared_sizes: list[int] = []

    def prepare(batch: Sequence[int]) -> list[int]:
        prepared_sizes.append(len(batch))
        if len(prepared_sizes) == 2:
            second_prepared.set()
        return [x * 10 for x in batch]

    def search(prepared: list[int]) -> list[int | BaseException]:
        searching.set()
        if not second_prepared.is_set():
            assert second_prepared.wait(5), "the next batch was not encoded meanwhile"
        return [x + 1 for x in prepared]

    async def main() -> list[int]:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            search, prepare=prepare, max_batch_size=16, max_wait_s=0.0
        )
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(0, deadline=later(10)))
            await until(searching.is_set)
            # Queued while batch 1 is searched: they form batch 2 together.
            rest = [
                asyncio.ensure_future(batcher.submit(i, deadline=later(10))) for i in range(1, 11)
            ]
            return [await first, *[await r for r in rest]]
        finally:
            await batcher.stop()

    answers = asyncio.run(main())
    assert answers == [i * 10 + 1 for i in range(11)]
    # The batch grew with the queue: the ten waiting jobs went in one batch.
    assert prepared_sizes[0] == 1 and max(prepared_sizes[1:]) >= 5


def test_an_idle_pipelined_batcher_does_not_wait_for_company() -> None:
    """max_wait_s applies only while an earlier batch is in flight: a lone job on an idle
    batcher starts at once (here the wait, 60 s, is past the job's deadline, 10 s: a
    batcher that waited would fail it with DeadlineExceededError)."""

    async def main() -> int:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            lambda xs: [x + 1 for x in xs], prepare=lambda xs: list(xs), max_wait_s=60.0
        )
        batcher.start()
        try:
            return await batcher.submit(41, deadline=later(10))
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == 42
