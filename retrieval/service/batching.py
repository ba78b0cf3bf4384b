"""Micro-batching: gather concurrent queries into one encoder call and one search call.

A CPU text tower encodes ~90 texts/s in batches but takes ~18 ms for one text alone, so
under concurrency the service is much faster answering 16 queries together than one by
one. :class:`MicroBatcher` keeps a bounded queue of pending jobs; a dispatcher task
takes up to ``max_batch_size`` of them once the oldest has waited ``max_wait_s`` (or at
once when a full batch is waiting), runs them in one dedicated worker thread, and
resolves each job's future with its own result.

Pipelined (``prepare`` given): a batch runs in two stages, ``prepare`` (encode the
queries) on one of ``prepare_workers`` threads, then ``run_batch`` (search them) on one
search thread. While one batch is searched, the next ones are gathered and encoded, so
the encoder and the index work at the same time, and everything that arrived while the
workers were busy forms the next batch at once (no extra wait): under load, batches grow
with the queue up to ``max_batch_size``. With N prepare workers, up to N batches are
encoded at once (a small batch on one core each, instead of one batch on one core while
the other cores idle), and at most N + 1 batches are in flight (N encoding or waiting
for the search thread, one searched), so memory stays bounded.

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
from typing import Any, Generic, TypeVar

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
    """Bounded queue + dispatcher running ``run_batch`` on batches in one worker thread
    (pipelined: ``prepare`` on ``prepare_workers`` threads first)."""

    def __init__(
        self,
        run_batch: Callable[[Any], Sequence[R | BaseException]],
        *,
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int = 64,
        max_queue_delay_s: float | None = None,
        on_batch: Callable[[int], None] | None = None,
        prepare: Callable[[Sequence[P]], object] | None = None,
        prepare_workers: int = 1,
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
            prepare: first stage (payloads -> anything), run in its own thread; then
                ``run_batch`` receives its output instead of the payloads. An exception
                from it fails the batch's jobs with that exception.
            prepare_workers: most ``prepare`` calls running at once, each on its own
                thread (pipelined only). ``prepare`` must then be safe to call from
                several threads at once.
        """
        if isinstance(prepare_workers, bool) or not (
            isinstance(prepare_workers, int) and prepare_workers >= 1
        ):
            raise ValueError(f"prepare_workers must be an integer >= 1, got {prepare_workers!r}")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_queue_delay_s = max_queue_delay_s
        self._on_batch = on_batch
        self._prepare = prepare
        self._pending: collections.deque[_Job[P, R]] = collections.deque()
        self._prepare_workers = prepare_workers
        self._running = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._prepare_executor: ThreadPoolExecutor | None = None
        # Pipelined: batches in the prepare stage now, and batches in flight (preparing,
        # waiting for the search thread or searched); set when either drops.
        self._preparing = 0
        self._in_flight = 0
        self._stage_freed = asyncio.Event()
        self._in_flight_tasks: set[asyncio.Task[None]] = set()
        self.batches_run = 0
        self.jobs_run = 0

    @property
    def prepare_workers(self) -> int:
        """Most ``prepare`` calls running at once (pipelined)."""
        return self._prepare_workers

    @prepare_workers.setter
    def prepare_workers(self, n: int) -> None:
        """Change the worker count; takes effect for the next batch. Once started, it
        can only go down (the threads were made at :meth:`start`): e.g. to 1 when the
        engine turns out to encode on a GPU, where concurrent calls would only queue."""
        started = self._prepare_executor is not None
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"prepare_workers must be an integer >= 1, got {n!r}")
        if started and n > self._prepare_workers:
            raise ValueError(
                f"prepare_workers can only go down once the batcher has started "
                f"({self._prepare_workers} -> {n}); stop() it first"
            )
        self._prepare_workers = n
        self._stage_freed.set()

    @property
    def preparing(self) -> int:
        """Batches in the prepare (encode) stage now."""
        return self._preparing

    @property
    def depth(self) -> int:
        """Jobs admitted and not yet answered (waiting + in the running batch)."""
        return len(self._pending) + self._running

    def overloaded(self) -> str | None:
        """Why a job submitted now would be refused (QueueFullError), or None: the
        count bound, then the wait bound. Cheap: the HTTP layer asks before it reads a
        request's body."""
        if self.depth >= self.max_queue:
            return f"{self.depth} queries are already queued (limit {self.max_queue})"
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()  # abandoned (deadline, disconnect): not waiting any more
        if self.max_queue_delay_s is not None and self._pending:
            waited = time.monotonic() - self._pending[0].enqueued_at
            if waited > self.max_queue_delay_s:
                return (
                    f"queued queries wait {waited * 1000:.0f} ms "
                    f"(limit {self.max_queue_delay_s * 1000:.0f} ms)"
                )
        return None

    def start(self) -> None:
        """Start the dispatcher on the running event loop (idempotent)."""
        if self._task is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="clipsearch-batch"
            )
            if self._prepare is not None:
                self._prepare_executor = ThreadPoolExecutor(
                    max_workers=self._prepare_workers, thread_name_prefix="clipsearch-prepare"
                )
            self._task = asyncio.get_running_loop().create_task(self._dispatch())

    async def stop(self) -> None:
        """Stop the dispatcher and drain: jobs not yet in a batch fail with
        CancelledError, batches already started run to the end and answer their jobs,
        then the worker threads are joined."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._in_flight_tasks:
            await asyncio.gather(*self._in_flight_tasks, return_exceptions=True)
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.cancel()
        for executor in (self._prepare_executor, self._executor):
            if executor is not None:
                executor.shutdown(wait=True)
        self._executor = self._prepare_executor = None

    async def submit(self, payload: P, *, deadline: float) -> R:
        """Queue ``payload`` and wait for its result until ``deadline`` (time.monotonic()).

        Raises QueueFullError at once when the queue is full, DeadlineExceededError when
        the deadline passes first (the job is then dropped if it has not started), or
        whatever ``run_batch`` returned as this job's exception.
        """
        if self._task is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        reason = self.overloaded()
        if reason is not None:
            raise QueueFullError(reason)
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

    def _stage_room(self) -> bool:
        """A free prepare worker, and room for one more batch in flight (N + 1)."""
        return self._preparing < self._prepare_workers and self._in_flight <= self._prepare_workers

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        pipelined = self._prepare is not None
        while True:
            while pipelined and not self._stage_room():
                # Every worker busy (or N batches wait for the search thread): keep
                # gathering; whatever arrives meanwhile makes the next batch.
                self._stage_freed.clear()
                await self._stage_freed.wait()
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Let the oldest job wait up to max_wait_s for company, unless a full batch
            # is already there (then waiting would only add latency). Pipelined, an idle
            # batcher starts at once: company is only worth waiting for while an earlier
            # batch still occupies the encoder or the index.
            oldest = self._pending[0]
            patience = self.max_wait_s if not pipelined or self._running else 0.0
            wait = oldest.enqueued_at + patience - time.monotonic()
            while len(self._pending) < self.max_batch_size and wait > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
                except TimeoutError:
                    break
                wait = oldest.enqueued_at + patience - time.monotonic()
            batch = self._take_batch()
            del oldest
            if batch and pipelined:
                self._start_pipelined(loop, batch)
            elif batch:
                await self._run(loop, batch)
            # Drop the batch before waiting for the next one: its payloads (decoded
            # query images, tens of MB each) must not outlive their requests.
            del batch

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Job[P, R]]) -> None:
        self._running += len(batch)
        try:
            results = await self._call(loop, self._executor, self._run_batch, batch, None)
        finally:
            self._running -= len(batch)
        self._resolve(batch, results)

    def _start_pipelined(self, loop: asyncio.AbstractEventLoop, batch: list[_Job[P, R]]) -> None:
        """Run both stages of ``batch`` in a task, so the dispatcher gathers (and hands
        to another prepare worker) the next batch meanwhile."""
        self._running += len(batch)
        self._preparing += 1
        self._in_flight += 1
        task = loop.create_task(self._pipeline(loop, batch))
        self._in_flight_tasks.add(task)
        task.add_done_callback(self._in_flight_tasks.discard)

    async def _pipeline(self, loop: asyncio.AbstractEventLoop, batch: list[_Job[P, R]]) -> None:
        assert self._prepare is not None
        try:
            try:
                prepared: object = await loop.run_in_executor(
                    self._prepare_executor, self._prepare, [j.payload for j in batch]
                )
            except Exception as e:
                log.exception("preparing a batch of %d failed", len(batch))
                self._resolve(batch, [e] * len(batch))
                return
            finally:
                self._preparing -= 1
                self._stage_freed.set()
            # Several prepared batches may queue for the one search thread (at most N).
            results = await self._call(loop, self._executor, self._run_batch, batch, prepared)
            del prepared
            self._resolve(batch, results)
        finally:
            self._running -= len(batch)
            self._in_flight -= 1
            self._stage_freed.set()

    async def _call(
        self,
        loop: asyncio.AbstractEventLoop,
        executor: ThreadPoolExecutor | None,
        fn: Callable[[Any], Sequence[R | BaseException]],
        batch: list[_Job[P, R]],
        prepared: object,
    ) -> Sequence[R | BaseException]:
        arg = prepared if self._prepare is not None else [j.payload for j in batch]
        try:
            results = await loop.run_in_executor(executor, fn, arg)
            if len(results) != len(batch):
                raise RuntimeError(
                    f"run_batch returned {len(results)} results for {len(batch)} jobs"
                )
        except Exception as e:  # a bug in run_batch fails this batch, not the service
            log.exception("batch of %d failed", len(batch))
            return [e] * len(batch)
        return results

    def _resolve(self, batch: list[_Job[P, R]], results: Sequence[R | BaseException]) -> None:
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
