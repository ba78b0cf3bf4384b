"""Micro-batching: gather concurrent queries into one encoder call and one search call.

A CPU text tower encodes ~90 texts/s in batches but takes ~18 ms for one text alone, so
under concurrency the service is much faster answering 16 queries together than one by
one. :class:`MicroBatcher` keeps a bounded queue of pending jobs; a dispatcher task
takes up to ``max_batch_size`` of them once the oldest has waited ``max_wait_s`` (or at
once when a full batch is waiting), runs them in one dedicated worker thread, and
resolves each job's future with its own result.

The queue bound is the service's admission control: when it is full, :meth:`submit`
raises :class:`QueueFullError` at once (the HTTP layer turns it into a fast 429), and a
job whose deadline passed before its batch started is dropped without being run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")


class QueueFullError(RuntimeError):
    """The batcher already holds ``max_queue`` unanswered jobs."""


class DeadlineExceededError(TimeoutError):
    """A job's deadline passed before it was answered; its work was abandoned."""


@dataclass(eq=False)
class _Job(Generic[P, R]):
    payload: P
    future: asyncio.Future[R]
    # time.monotonic() after which nobody waits for the answer.
    deadline: float
    enqueued_at: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[P, R]):
    """Bounded queue + dispatcher running ``run_batch`` on batches in one worker thread."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[P]], Sequence[R | BaseException]],
        *,
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int = 64,
        max_queue_delay_s: float | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """
        Args:
            run_batch: payloads -> per-payload result or exception (same length, same order).
            max_batch_size: most jobs per ``run_batch`` call.
            max_wait_s: how long the oldest pending job may wait for company.
            max_queue: most unanswered jobs (pending + running); more raise QueueFullError.
            max_queue_delay_s: also refuse new jobs while the oldest waiting job has
                waited longer than this (None = no limit). A count bound alone lets the
                queue hold seconds of work when queries are slow; this bounds the wait
                itself, so admitted requests stay fast and the rest get a fast 429.
            on_batch: called with the size of every batch run (metrics).
        """
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_queue_delay_s = max_queue_delay_s
        self._on_batch = on_batch
        self._pending: collections.deque[_Job[P, R]] = collections.deque()
        self._running = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batches_run = 0
        self.jobs_run = 0

    @property
    def depth(self) -> int:
        """Jobs admitted and not yet answered (waiting + in the running batch)."""
        return len(self._pending) + self._running

    def start(self) -> None:
        """Start the dispatcher on the running event loop (idempotent)."""
        if self._task is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="clipsearch-batch"
            )
            self._task = asyncio.get_running_loop().create_task(self._dispatch())

    async def stop(self) -> None:
        """Stop the dispatcher; pending jobs fail with CancelledError."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, payload: P, *, deadline: float) -> R:
        """Queue ``payload`` and wait for its result until ``deadline`` (time.monotonic()).

        Raises QueueFullError at once when the queue is full, DeadlineExceededError when
        the deadline passes first (the job is then dropped if it has not started), or
        whatever ``run_batch`` returned as this job's exception.
        """
        if self._task is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if self.depth >= self.max_queue:
            raise QueueFullError(
                f"{self.depth} queries are already queued (limit {self.max_queue})"
            )
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()  # abandoned (deadline, disconnect): not waiting any more
        if self.max_queue_delay_s is not None and self._pending:
            waited = time.monotonic() - self._pending[0].enqueued_at
            if waited > self.max_queue_delay_s:
                raise QueueFullError(
                    f"queued queries wait {waited * 1000:.0f} ms "
                    f"(limit {self.max_queue_delay_s * 1000:.0f} ms)"
                )
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(payload, future, deadline))
        self._wakeup.set()
        remaining = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=max(remaining, 0.0))
        except TimeoutError as e:
            future.cancel()  # a batch that has not started yet skips it
            raise DeadlineExceededError(
                f"no answer within the request deadline ({remaining:.1f} s)"
            ) from e
        except asyncio.CancelledError:
            future.cancel()  # the client went away: drop the work if not started
            raise

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Let the oldest job wait up to max_wait_s for company, unless a full batch
            # is already there (then waiting would only add latency).
            oldest = self._pending[0]
            wait = oldest.enqueued_at + self.max_wait_s - time.monotonic()
            while len(self._pending) < self.max_batch_size and wait > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
                except TimeoutError:
                    break
                wait = oldest.enqueued_at + self.max_wait_s - time.monotonic()
            batch = self._take_batch()
            del oldest
            if batch:
                await self._run(loop, batch)
            # Drop the batch before waiting for the next one: its payloads (decoded
            # query images, tens of MB each) must not outlive their requests.
            del batch

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Job[P, R]]) -> None:
        self._running = len(batch)
        try:
            results = await loop.run_in_executor(
                self._executor, self._run_batch, [j.payload for j in batch]
            )
            if len(results) != len(batch):
                raise RuntimeError(
                    f"run_batch returned {len(results)} results for {len(batch)} jobs"
                )
        except Exception as e:  # a bug in run_batch fails this batch, not the service
            log.exception("batch of %d failed", len(batch))
            results = [e] * len(batch)
        finally:
            self._running = 0
        self.batches_run += 1
        self.jobs_run += len(batch)
        if self._on_batch is not None:
            self._on_batch(len(batch))
        for job, result in zip(batch, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _take_batch(self) -> list[_Job[P, R]]:
        """Pop up to max_batch_size live jobs; expired or abandoned ones are dropped."""
        batch: list[_Job[P, R]] = []
        now = time.monotonic()
        while self._pending and len(batch) < self.max_batch_size:
            job = self._pending.popleft()
            if job.future.done():
                continue  # cancelled by its request (deadline or disconnect)
            if job.deadline <= now:
                job.future.set_exception(DeadlineExceededError("deadline passed while queued"))
                continue
            batch.append(job)
        return batch
