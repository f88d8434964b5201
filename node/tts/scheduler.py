"""Shared synthesis workers, earliest deadline first.

Every stream on the node asks for its next segment with the time its listener's audio runs out;
the workers take the most urgent job first, so a new stream's first clause overtakes a long text
that is already seconds ahead, and no stream starves while another is comfortably buffered.

There is one worker per core, and each job is told how many threads to use: a job that runs
alone (nothing else queued or running) gets every core (``threads=None``: the lowest latency,
e.g. the first clause of the only stream), a job that shares the node gets one thread
(``threads=1``), so under load every core runs its own inference: on 2 cores that gave more
audio per core-second than both cores on each inference in turn, which is what lets two streams
play without gaps.

A stream that is seconds ahead can wait; a listener who hears nothing yet cannot. Each job comes
with its deadline and what it costs on one thread (the planner's estimate); its *spare* time is
what is left of the time to its deadline once it ran. A job with no more than ``PREEMPT_SLACK``
seconds to spare that finds the cores held (every worker busy, or one job on every core) stops
the running job with the most to spare, if that is more than ``PREEMPT_SLACK``; the stopped job
runs again later, from the start (its spare time counts its whole cost again, so a long segment
that could not be redone in time is left to finish). While one job runs on every core, jobs that
can spare that long do wait, so the urgent one keeps every core. A call that starts while another
stream is far enough ahead then gets its first clause as fast as if it were alone; one that
starts within seconds of another still shares the cores (node/tts/README.md).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from common.tasks import stop_tasks
from node.capacity import usable_cores

# seconds a job must have to spare (time to its deadline less its one-thread cost) to be stopped
# or held back for a more urgent one: about what a new stream's first clause takes on one thread
PREEMPT_SLACK = 1.5


class Stopped(Exception):
    """The scheduler stopped this job for a more urgent one; it runs again later."""


class Stop:
    """How the scheduler asks a running job to stop: the job's engine registers what stopping
    means for it (onnxruntime: ``RunOptions.terminate``) and raises :class:`Stopped`."""

    def __init__(self) -> None:
        self.stopped = False
        self._hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def on_stop(self, hook: Callable[[], None]) -> None:
        with self._lock:
            if not self.stopped:
                self._hooks.append(hook)
                return
        hook()

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()


@dataclass(frozen=True)
class Run:
    """The scheduler's terms for one call of a job, handed on to the engine: ``threads`` None
    runs it on every core (it runs alone), 1 on one thread (it shares the node); ``stop``, when
    set, is how the scheduler may stop it for a more urgent job."""

    threads: int | None = None
    stop: Stop | None = None


ALONE = Run()  # a call outside the scheduler: every core, never stopped
ONE_THREAD = Run(threads=1)  # as under load, never stopped (calibration, tests)

Job = Callable[[Run], Any]


@dataclass(order=True)
class _Queued:
    """A job in the heap: earliest deadline first, then first come."""

    deadline: float
    seq: int
    # the latest start that still meets the deadline (deadline less its one-thread cost): what
    # is left of the time to it is the job's time to spare
    start_by: float = field(compare=False)
    fn: Job = field(compare=False)
    fut: asyncio.Future[Any] = field(compare=False)

    def can_wait(self, now: float) -> bool:
        return self.start_by - now > PREEMPT_SLACK


class _Running:
    def __init__(self, queued: _Queued, threads: int | None, wide: bool) -> None:
        self.queued, self.wide, self.stop = queued, wide, Stop()
        self.run = Run(threads, self.stop)


class Scheduler:
    def __init__(self, workers: int = 0) -> None:
        """``workers``: inferences at once; 0 = one per core this process may use."""
        self.workers = workers or usable_cores()
        self._heap: list[_Queued] = []
        self._seq = itertools.count()
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="tts-synth")
        self._running: list[_Running] = []
        self.busy_seconds = 0.0
        self.jobs = 0
        self.running = 0
        self.wide_jobs = 0  # jobs that ran alone on every core
        self.preempted = 0  # jobs stopped for a more urgent one (and run again)

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]

    async def stop(self) -> None:
        await stop_tasks(*self._tasks)
        self._tasks = []
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def idle(self) -> None:
        """Wait until no job is queued or running (for benchmarks)."""
        while self.running or self._heap:
            await asyncio.sleep(0.01)

    async def run(self, fn: Job, deadline: float, cost: float = 0.0) -> Any:
        """Run blocking ``fn(run)`` on a worker thread; more urgent (earlier) deadlines go first.
        ``cost``: the seconds it is expected to take on one thread. ``run.threads`` is None when
        the job runs alone (use every core), else 1; ``run.stop`` is how the scheduler may stop
        it for a more urgent job (``fn`` then raises :class:`Stopped` and is called again later).

        Cancelling the caller drops a queued job; a job already running finishes on its thread and
        its result is discarded.
        """
        assert self._wake is not None, "scheduler not started"
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        queued = _Queued(deadline, next(self._seq), deadline - cost, fn, fut)
        heapq.heappush(self._heap, queued)
        self._preempt_for(queued)
        self._wake.set()
        return await fut

    def _preempt_for(self, urgent: _Queued) -> None:
        """Stop the running job with the most to spare if an urgent job finds the cores held."""
        now = time.monotonic()
        if urgent.can_wait(now) or not self._running:
            return
        held = len(self._running) >= self.workers or any(r.wide for r in self._running)
        if not held:
            return
        lazy = max(self._running, key=lambda r: r.queued.start_by)
        if lazy.queued.can_wait(now) and not lazy.stop.stopped:
            lazy.stop.stop()

    async def _next(self) -> _Queued:
        """The most urgent job, once it may start: one that can wait does not start beside a job
        that runs on every core."""
        assert self._wake is not None
        while True:
            if not self._heap:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            first = self._heap[0]
            if any(r.wide for r in self._running) and first.can_wait(now):
                self._wake.clear()
                try:
                    await asyncio.wait_for(
                        self._wake.wait(), first.start_by - now - PREEMPT_SLACK + 0.01
                    )
                except TimeoutError:
                    pass
                continue
            return heapq.heappop(self._heap)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            queued = await self._next()
            if queued.fut.cancelled():
                continue
            t0 = time.monotonic()
            alone = all(r.stop.stopped for r in self._running) and all(
                q.can_wait(t0) for q in self._heap
            )
            threads = None if alone or self.workers == 1 else 1
            self.wide_jobs += threads is None
            job = _Running(queued, threads, wide=threads is None and self.workers > 1)
            self._running.append(job)
            self.running += 1
            try:
                result = await loop.run_in_executor(self._pool, queued.fn, job.run)
            except Stopped:
                self.preempted += 1
                if not queued.fut.done():
                    heapq.heappush(self._heap, queued)
            except Exception as exc:  # handed to the stream that asked
                if not queued.fut.done():
                    queued.fut.set_exception(exc)
            else:
                if not queued.fut.done():
                    queued.fut.set_result(result)
            finally:
                self._running.remove(job)
                self.running -= 1
                self.busy_seconds += time.monotonic() - t0
                self.jobs += 1
                self._wake.set()
