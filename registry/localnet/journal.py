"""Durable ledger for the embedded localnet.

LiteSVM keeps everything in memory and transactions cannot be replayed after
a restart (their blockhashes expire), so instead of a transaction log we keep
the *post-state* of every account a transaction changed.  Each landed
transaction (or airdrop) becomes exactly one SQLite transaction containing:

* the new state of every writable account (closed accounts as tombstones),
* the account keys it touched (the account index used by getProgramAccounts),
* the clock (slot / unix timestamp),
* its status record (for getSignatureStatuses / getTransaction).

SQLite in WAL mode with ``synchronous=FULL`` fsyncs the WAL on every commit,
so once ``commit`` returns the change survives a crash or power loss, which is
why the RPC layer only answers after ``commit``.  Transaction records are
bounded (oldest pruned) so the ledger does not grow without limit.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from solders.account import Account
from solders.pubkey import Pubkey

DB_NAME = "localnet.sqlite3"
LOCK_NAME = "localnet.lock"
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    pubkey BLOB PRIMARY KEY,
    lamports INTEGER NOT NULL,
    owner BLOB NOT NULL,
    executable INTEGER NOT NULL,
    rent_epoch TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS known (pubkey BLOB PRIMARY KEY);
CREATE TABLE IF NOT EXISTS txs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    signature TEXT NOT NULL UNIQUE,
    slot INTEGER NOT NULL,
    blockhash_slot INTEGER NOT NULL,
    block_time INTEGER NOT NULL,
    err TEXT,
    raw BLOB NOT NULL,
    meta TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS txs_bh_slot ON txs (blockhash_slot);
"""


class LedgerLockedError(RuntimeError):
    """Another localnet process already uses this ledger directory."""


@dataclass(frozen=True)
class TxRecord:
    """What we remember about one landed transaction.

    ``meta`` is the ready-made JSON-RPC ``meta`` object (fee, balances, logs…);
    ``raw`` is the wire transaction, re-encoded on demand by getTransaction.
    """

    signature: str
    slot: int
    blockhash_slot: int
    block_time: int
    err: Any  # JSON value of the TransactionError, None on success
    raw: bytes
    meta: dict[str, Any]


class Journal:
    """SQLite-backed journal; ``path=None`` gives a throwaway in-memory one."""

    def __init__(self, ledger_dir: Path | None, *, tx_history_limit: int = 50_000) -> None:
        self._lock_fd: int | None = None
        self._tx_history_limit = tx_history_limit
        self._inserts_since_prune = 0
        if ledger_dir is None:
            db = ":memory:"
        else:
            ledger_dir = Path(ledger_dir)
            ledger_dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(ledger_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(self._lock_fd)
                self._lock_fd = None
                raise LedgerLockedError(
                    f"ledger {ledger_dir} is in use by another localnet"
                ) from exc
            db = str(ledger_dir / DB_NAME)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        self._db = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        if self.get_meta("schema") is None:
            self.set_meta({"schema": SCHEMA_VERSION})

    # -- meta -----------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, values: dict[str, str]) -> None:
        with self._txn():
            self._put_meta(values)

    def _put_meta(self, values: dict[str, str]) -> None:
        self._db.executemany(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            list(values.items()),
        )

    # -- reads used at start-up -------------------------------------------------
    def load_accounts(self) -> Iterator[tuple[Pubkey, Account | None]]:
        """Every journaled account; ``None`` for tombstones (closed accounts)."""
        cur = self._db.execute(
            "SELECT pubkey, lamports, owner, executable, rent_epoch, data FROM accounts"
        )
        for pk, lamports, owner, executable, rent_epoch, data in cur:
            key = Pubkey.from_bytes(pk)
            if lamports == 0:
                yield key, None
            else:
                yield (
                    key,
                    Account(
                        lamports=lamports,
                        data=bytes(data),
                        owner=Pubkey.from_bytes(owner),
                        executable=bool(executable),
                        rent_epoch=int(rent_epoch),
                    ),
                )

    def load_known(self) -> list[Pubkey]:
        return [Pubkey.from_bytes(r[0]) for r in self._db.execute("SELECT pubkey FROM known")]

    def recent_signatures(self, min_blockhash_slot: int) -> list[tuple[str, int]]:
        cur = self._db.execute(
            "SELECT signature, blockhash_slot FROM txs WHERE blockhash_slot >= ?",
            (min_blockhash_slot,),
        )
        return [(str(s), int(b)) for s, b in cur]

    def transaction_count(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='tx_count'").fetchone()
        return int(row[0]) if row else 0

    # -- the one durable write ------------------------------------------------
    def commit(
        self,
        accounts: Iterable[tuple[Pubkey, Account | None]],
        known: Iterable[Pubkey] = (),
        meta: dict[str, str] | None = None,
        tx: TxRecord | None = None,
    ) -> None:
        """Atomically and durably record one state transition."""
        rows = []
        for key, acc in accounts:
            if acc is None or acc.lamports == 0:
                rows.append((bytes(key), 0, bytes(Pubkey.default()), 0, "0", b""))
            else:
                rows.append(
                    (
                        bytes(key),
                        acc.lamports,
                        bytes(acc.owner),
                        int(acc.executable),
                        str(acc.rent_epoch),
                        bytes(acc.data),
                    )
                )
        with self._txn():
            self._db.executemany(
                "INSERT INTO accounts(pubkey, lamports, owner, executable, rent_epoch, data) "
                "VALUES(?,?,?,?,?,?) "
                "ON CONFLICT(pubkey) DO UPDATE SET lamports=excluded.lamports, "
                "owner=excluded.owner, "
                "executable=excluded.executable, rent_epoch=excluded.rent_epoch, "
                "data=excluded.data",
                rows,
            )
            self._db.executemany(
                "INSERT OR IGNORE INTO known(pubkey) VALUES(?)", [(bytes(k),) for k in known]
            )
            meta = dict(meta or {})
            if tx is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO txs"
                    "(signature, slot, blockhash_slot, block_time, err, raw, meta) "
                    "VALUES(?,?,?,?,?,?,?)",
                    (
                        tx.signature,
                        tx.slot,
                        tx.blockhash_slot,
                        tx.block_time,
                        None if tx.err is None else json.dumps(tx.err),
                        tx.raw,
                        json.dumps(tx.meta, separators=(",", ":")),
                    ),
                )
                meta["tx_count"] = str(self.transaction_count() + 1)
                self._inserts_since_prune += 1
                if self._inserts_since_prune >= 1000:
                    self._inserts_since_prune = 0
                    self._db.execute(
                        "DELETE FROM txs WHERE seq <= (SELECT MAX(seq) FROM txs) - ?",
                        (self._tx_history_limit,),
                    )
            if meta:
                self._put_meta(meta)

    # -- transaction records ---------------------------------------------------
    def get_tx(self, signature: str) -> TxRecord | None:
        row = self._db.execute(
            "SELECT signature, slot, blockhash_slot, block_time, err, raw, meta "
            "FROM txs WHERE signature=?",
            (signature,),
        ).fetchone()
        if row is None:
            return None
        sig, slot, bh_slot, block_time, err, raw, meta = row
        return TxRecord(
            signature=str(sig),
            slot=int(slot),
            blockhash_slot=int(bh_slot),
            block_time=int(block_time),
            err=None if err is None else json.loads(err),
            raw=bytes(raw),
            meta=json.loads(meta),
        )

    def get_statuses(self, signatures: list[str]) -> dict[str, tuple[int, Any]]:
        """signature -> (slot, err) for the signatures we know."""
        out: dict[str, tuple[int, Any]] = {}
        for i in range(0, len(signatures), 500):
            chunk = signatures[i : i + 500]
            marks = ",".join("?" * len(chunk))
            q = f"SELECT signature, slot, err FROM txs WHERE signature IN ({marks})"
            for sig, slot, err in self._db.execute(q, chunk):
                out[str(sig)] = (int(slot), None if err is None else json.loads(err))
        return out

    # -- plumbing ---------------------------------------------------------------
    def _txn(self) -> _Txn:
        return _Txn(self._db)

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            if self._lock_fd is not None:
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                finally:
                    os.close(self._lock_fd)
                    self._lock_fd = None


class _Txn:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
