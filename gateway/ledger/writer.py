"""The SQLite ledger's one writer thread, committing queued transactions in groups.

Why a group commit: SQLite allows one writer per file, so every write transaction of the process
queues for that thread anyway; when requests arrive faster than one ``BEGIN IMMEDIATE ...
COMMIT`` each, the thread takes everything queued and runs it in one SQLite transaction.

A job that raises gets its exception and must leave nothing behind. The ledger's bodies check
before they write (a refused reservation writes nothing), so the common failure changed no row
(``total_changes``) and the group goes on. A job that raises after writing cannot be undone alone:
the whole group is rolled back and each of its jobs runs again in a transaction of its own (they
are plain functions of the connection, so running one again is the same as running it later).
Every job's future resolves only after the COMMIT that holds it has returned, so a caller sees
"committed" or an exception, never anything in between; a failed BEGIN or COMMIT fails every job
of the group (none of them is stored).

Checkpoints: the ledger's connections turn SQLite's automatic checkpoint off, and a second thread
copies the WAL back into the database every ``CHECKPOINT_SECONDS`` (``PASSIVE``: it never blocks
the writer). Otherwise the COMMIT that crosses the WAL's size limit does that copy itself, on the
write path, holding the write lock. A crash loses nothing either way: the WAL is replayed on open.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

log = logging.getLogger("gateway.ledger")

MAX_GROUP = 128  # jobs per SQLite transaction: bounds the latency one group adds to the next
CHECKPOINT_SECONDS = 1.0


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    alone: bool  # runs as a transaction of its own (schema migrations)
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()


_STOP = object()


class _WroteThenFailed(Exception):
    """A job of a group raised after changing rows: the group is rolled back and run job by job."""


class GroupWriter:
    """``submit(fn, args)`` -> a future of ``fn(conn, *args)`` once committed.

    ``engine`` must begin write transactions with ``BEGIN IMMEDIATE`` (the ledger's connect and
    begin hooks) so a group holds the write lock from its first statement.
    """

    def __init__(self, engine: sa.Engine, name: str = "ledger-sqlite-writer") -> None:
        self._engine = engine
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # lists of jobs, then _STOP
        self._batch: list[_Job] | None = None  # jobs submitted in this turn of the event loop
        self._lock = threading.Lock()
        self._closed = False
        self.jobs = 0  # jobs run, and SQLite transactions they took (replays included)
        self.transactions = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._checkpointer = threading.Thread(
            target=self._checkpoints, name=f"{name}-checkpoint", daemon=True
        )
        self._thread.start()
        self._checkpointer.start()

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], *, alone: bool = False
    ) -> asyncio.Future[Any]:
        job = _Job(fn, args, alone, asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                raise RuntimeError("the ledger is closed")
            if self._batch is None:
                # One hand-over per turn of the event loop, not one per job: the writer wakes
                # once for everything the turn's requests submitted, and they commit together.
                self._batch = []
                job.loop.call_soon(self._hand_over)
            self._batch.append(job)
        return job.future

    def _hand_over(self) -> None:
        with self._lock:
            batch, self._batch = self._batch, None
        if batch:
            self._queue.put(batch)

    def close(self) -> None:
        """Finish every job submitted so far, then stop the thread."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._batch:
                    self._queue.put(self._batch)
                self._batch = None
                self._queue.put(_STOP)
        self._thread.join()
        self._stop.set()
        self._checkpointer.join()
        self.checkpoint()

    def checkpoint(self) -> None:
        """Copy the WAL into the database file as far as readers allow (never waits for them)."""
        conn = self._engine.raw_connection()
        try:
            conn.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)")  # type: ignore[union-attr]
        finally:
            conn.close()

    def _checkpoints(self) -> None:
        while not self._stop.wait(CHECKPOINT_SECONDS):
            try:
                self.checkpoint()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("ledger WAL checkpoint failed (will retry): %s", exc)

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        pending: collections.deque[_Job] = collections.deque()
        stopping = False
        while pending or not stopping:
            if not pending:
                item = self._queue.get()
                if item is _STOP:
                    return
                pending.extend(item)
            while not stopping and len(pending) < MAX_GROUP:  # whatever else is waiting
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                else:
                    pending.extend(item)
            if pending[0].alone:
                group = [pending.popleft()]
            else:
                group = []
                while pending and not pending[0].alone and len(group) < MAX_GROUP:
                    group.append(pending.popleft())
            self._settle(group, self._commit(group))

    def _commit(self, group: list[_Job]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        self.transactions += 1
        self.jobs += len(group)
        try:
            with self._engine.begin() as conn:
                if len(group) == 1:  # its own transaction: an exception rolls it all back
                    outcomes.append((True, group[0].fn(conn, *group[0].args)))
                else:
                    raw = conn.connection.driver_connection
                    assert raw is not None
                    for job in group:
                        before = raw.total_changes
                        try:
                            outcomes.append((True, job.fn(conn, *job.args)))
                        except Exception as exc:  # noqa: BLE001 - handed to the job's caller
                            if raw.total_changes != before:
                                raise _WroteThenFailed from exc
                            outcomes.append((False, exc))
        except _WroteThenFailed:
            return [self._commit([job])[0] for job in group]
        except Exception as exc:  # noqa: BLE001 - BEGIN, COMMIT, or the single job failed
            if len(group) > 1:
                log.error("ledger group commit of %d transactions failed: %s", len(group), exc)
            return [(False, exc)] * len(group)
        return outcomes

    @staticmethod
    def _settle(group: list[_Job], outcomes: list[tuple[bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, bool, Any]]] = {}
        for job, (ok, value) in zip(group, outcomes, strict=True):
            by_loop.setdefault(job.loop, []).append((job, ok, value))
        for loop, done in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, done)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass


def _resolve(done: list[tuple[_Job, bool, Any]]) -> None:
    for job, ok, value in done:
        if job.future.cancelled():
            continue
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)
