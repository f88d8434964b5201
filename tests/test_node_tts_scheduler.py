"""The TTS synthesis scheduler with real worker threads: earliest deadline first, one job on every
core when the others can wait, and an urgent job stopping one whose stream is seconds ahead."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from node.tts.scheduler import PREEMPT_SLACK, Run, Scheduler, Stopped


class Recorder:
    """Jobs that note how they ran; a ``holding`` job blocks until released or stopped (once)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def job(self, name: str, holding: bool = False) -> Any:
        def call(run: Run) -> str:
            self.calls.append((name, run.threads))
            stop = run.stop
            assert stop is not None, "the scheduler can stop every job it runs"
            if holding and len([c for c in self.calls if c[0] == name]) == 1:
                stop.on_stop(self.release.set)
                self.started.set()
                self.release.wait(10)
                if stop.stopped:
                    raise Stopped(name)
            return name

        return call


@contextlib.asynccontextmanager
async def running(workers: int) -> AsyncIterator[Scheduler]:
    sched = Scheduler(workers=workers)
    sched.start()
    try:
        yield sched
    finally:
        await sched.stop()


async def started(event: threading.Event) -> None:
    for _ in range(500):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the job never started")


@pytest.mark.fast
async def test_an_urgent_job_stops_one_that_can_wait_and_gets_every_core() -> None:
    async with running(2) as sched:
        r = Recorder()
        ahead = asyncio.ensure_future(
            sched.run(r.job("ahead", holding=True), time.monotonic() + PREEMPT_SLACK + 5)
        )
        await started(r.started)
        assert await sched.run(r.job("first clause"), time.monotonic()) == "first clause"
        assert await ahead == "ahead"  # stopped, then run again to the end
        assert sched.preempted == 1
        # alone on every core, then the new stream's clause on every core (the stopped job
        # waited instead of taking a core beside it), then the stopped job again, alone
        assert r.calls == [("ahead", None), ("first clause", None), ("ahead", None)]


@pytest.mark.fast
async def test_a_job_that_cannot_wait_is_not_stopped() -> None:
    async with running(2) as sched:
        r = Recorder()
        due = asyncio.ensure_future(sched.run(r.job("due", holding=True), time.monotonic() + 1))
        await started(r.started)
        other = asyncio.ensure_future(sched.run(r.job("other"), time.monotonic()))
        assert await other == "other"  # beside it, on one thread
        r.release.set()
        assert await due == "due"
        assert sched.preempted == 0
        assert r.calls == [("due", None), ("other", 1)]


@pytest.mark.fast
async def test_earliest_deadline_first_and_a_failure_goes_to_its_caller() -> None:
    async with running(1) as sched:
        r = Recorder()
        blocker = asyncio.ensure_future(
            sched.run(r.job("blocker", holding=True), time.monotonic() + 1)
        )
        await started(r.started)
        now = time.monotonic()
        late = asyncio.ensure_future(sched.run(r.job("late"), now + 2.5))
        soon = asyncio.ensure_future(sched.run(r.job("soon"), now + 2))

        def broken(run: Run) -> str:
            raise RuntimeError("model crashed")

        failing = asyncio.ensure_future(sched.run(broken, now + 2.2))
        await asyncio.sleep(0.05)
        r.release.set()
        assert [await blocker, await soon, await late] == ["blocker", "soon", "late"]
        with pytest.raises(RuntimeError, match="model crashed"):
            await failing
        assert [c[0] for c in r.calls] == ["blocker", "soon", "late"]


@pytest.mark.fast
async def test_a_long_job_that_could_not_be_redone_in_time_is_not_stopped() -> None:
    """Due in 8 s, but 7 s of work: stopped for a first clause and run again from the start, it
    would end after its deadline (a 2 s gap once). It finishes; the urgent job takes a core."""
    async with running(2) as sched:
        r = Recorder()
        long = asyncio.ensure_future(
            sched.run(r.job("long", holding=True), time.monotonic() + 8, cost=7)
        )
        await started(r.started)
        assert await sched.run(r.job("first clause"), time.monotonic(), cost=0.5) == "first clause"
        r.release.set()
        assert await long == "long"
        assert sched.preempted == 0
        assert r.calls == [("long", None), ("first clause", 1)]
