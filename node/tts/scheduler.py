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
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common.tasks import stop_tasks
from node.capacity import usable_cores


class Scheduler:
    def __init__(self, workers: int = 0) -> None:
        """``workers``: inferences at once; 0 = one per core this process may use."""
        self.workers = workers or usable_cores()
        self._heap: list[tuple[float, int, Callable[[int | None], Any], asyncio.Future[Any]]] = []
        self._seq = itertools.count()
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="tts-synth")
        self.busy_seconds = 0.0
        self.jobs = 0
        self.running = 0
        self.wide_jobs = 0  # jobs that ran alone on every core

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

    async def run(self, fn: Callable[[int | None], Any], deadline: float) -> Any:
        """Run blocking ``fn(threads)`` on a worker thread; more urgent (earlier) deadlines go
        first. ``threads`` is None when the job runs alone (use every core), else 1.

        Cancelling the caller drops a queued job; a job already running finishes on its thread and
        its result is discarded.
        """
        assert self._wake is not None, "scheduler not started"
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (deadline, next(self._seq), fn, fut))
        self._wake.set()
        return await fut

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            while not self._heap:
                self._wake.clear()
                await self._wake.wait()
            _, _, fn, fut = heapq.heappop(self._heap)
            if fut.cancelled():
                continue
            t0 = time.monotonic()
            alone = self.running == 0 and not self._heap
            threads = None if alone or self.workers == 1 else 1
            self.wide_jobs += threads is None
            self.running += 1
            try:
                result = await loop.run_in_executor(self._pool, fn, threads)
            except Exception as exc:  # handed to the stream that asked
                if not fut.done():
                    fut.set_exception(exc)
            else:
                if not fut.done():
                    fut.set_result(result)
            finally:
                self.running -= 1
                self.busy_seconds += time.monotonic() - t0
                self.jobs += 1
