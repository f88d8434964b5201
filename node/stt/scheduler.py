"""Inference off the event loop: one bounded pool of worker threads per engine.

``run(fn, interim=...)`` executes a blocking call on the engine's threads. Finals wait for a free
worker, but at most ``queue_size`` of them across all clients: past that ``QueueFull`` (the
client gets ``server_full``). Interim results are opportunistic: they run only when a worker is
free, nothing waits, and the engine was busy less than ``interim_max_utilization`` of the last
few seconds, so under load the CPU goes to finals.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    pass


class InferencePool:
    def __init__(
        self,
        name: str,
        workers: int,
        queue_size: int,
        interim_max_utilization: float = 0.5,
        window_s: float = 5.0,
    ) -> None:
        self.name = name
        self.interim_max_utilization = interim_max_utilization
        self.window_s = window_s
        self._spans: deque[tuple[float, float]] = deque()  # (start, end) of finished calls
        self._started: dict[int, float] = {}
        self.workers = workers
        self.queue_size = queue_size
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix=f"stt-{name}")
        self._slots = asyncio.Semaphore(workers)
        self.running = 0
        self.waiting = 0
        self.done = 0
        self.skipped = 0

    @property
    def busy(self) -> bool:
        return self.running + self.waiting >= self.workers

    def utilization(self, now: float | None = None) -> float:
        """Share of worker time spent inferring over the last ``window_s`` seconds."""
        now = time.monotonic() if now is None else now
        since = now - self.window_s
        while self._spans and self._spans[0][1] < since:
            self._spans.popleft()
        used = sum(e - max(s, since) for s, e in self._spans)
        used += sum(now - max(s, since) for s in self._started.values())
        return used / (self.window_s * self.workers)

    def interim_ok(self) -> bool:
        return not self.busy and self.utilization() < self.interim_max_utilization

    async def run(self, fn: Callable[..., T], *args: Any, interim: bool = False) -> T | None:
        if interim and not self.interim_ok():
            self.skipped += 1
            return None
        if not interim and self.waiting >= self.queue_size:
            raise QueueFull(f"{self.waiting} inferences already waiting on {self.name}")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        token = object()
        self._started[id(token)] = time.monotonic()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self._spans.append((self._started.pop(id(token)), time.monotonic()))
            self.running -= 1
            self.done += 1
            self._slots.release()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
