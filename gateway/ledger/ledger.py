"""The credits ledger: accounts, reservations, usage charges, refunds.

Balance model (amounts are int microcredits everywhere):

* ``credit_balance`` is the money the account has not spent: purchases + grants - charges.
* ``held_microcredits`` is the part of it reserved by the account's *active* sessions (the sum of
  their ``reserved_microcredits``). ``available_balance = credit_balance - held_microcredits``.
* Every change of either figure is one row in ``transactions`` with two signed columns,
  ``amount`` (change of credit_balance) and ``hold`` (change of the amount held):

  ========  =========  =========  ===========================================================
  kind      amount     hold       when
  ========  =========  =========  ===========================================================
  purchase  +paid      0          a payment is credited (idempotent by ``reference``)
  grant     +granted   0          an operator grants credits
  reserve   0          +R         a session is created or extended (R = what it reserves)
  charge    -C         -C         settlement: C = cost of the reported usage, capped at R total
  refund    0          -(R - C)   settlement: the unused rest of the reservation is released
  ========  =========  =========  ===========================================================

  so at every commit ``credit_balance == sum(amount)`` and ``held == sum(hold)`` == the
  reservations of the active sessions; each row also carries ``balance_after`` and
  ``available_after``. A zero charge or zero refund writes no row.
* A reservation is granted only if it fits the available balance, and a charge never exceeds its
  reservation, so ``0 <= held <= credit_balance``: neither balance can go below zero.
* Usage is reported cumulatively by the node (seconds for webrtc/stt, characters for tts). While
  the session is active each report updates the session's running ``usage_units`` and
  ``charged_microcredits`` (monotonic: a lower total is ignored); money moves once, at settlement
  (``final=True`` -> completed, or the sweeper -> expired): one ``charge`` and one ``refund`` row,
  exactly once, guarded by the session's status change under the account lock. A settled
  session is ``completed`` (final report) or ``expired`` (sweeper); ``ended_at`` is when the
  ledger settled it.
* ``max_concurrent_sessions`` limits the account's active sessions, a bundle's sessions once:
  ``active_sessions`` on the account row counts them (opening adds, settling a key's last active
  session subtracts), so the check needs no query over ``sessions``.

Concurrency: every write transaction locks the account row first (PostgreSQL: ``SELECT ... FOR
UPDATE``, or the conditional ``UPDATE`` that reserves for new sessions, which re-checks the row's
newest version if it waited for the lock; SQLite: ``BEGIN IMMEDIATE`` -- one writer per database
file), then reads and changes that account's sessions. Several gateway processes may share one
PostgreSQL database, or one SQLite file (WAL mode) on one machine.

Execution: each transaction body is a plain function of a sync ``sa.Connection``, run by the
database layer (``db.py``: connections, transactions, the SQLite writer thread, the PostgreSQL
BEGIN/COMMIT and retry, the dialect differences). The hot statements are ``Prepared``
(``prepared.py``). A call returns once its transaction has committed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from common.closing import AsyncClosing

from . import pricing
from .db import Database, Row
from .errors import (
    AccountNotFound,
    ConcurrencyLimit,
    DuplicatePayment,
    InsufficientCredits,
    NotSessionNode,
    SessionClosed,
    UnknownSession,
)
from .ids import uuid7
from .models import accounts, node_events, sessions, transactions
from .prepared import Prepared, PreparedInsert
from .records import (
    Account,
    Audit,
    Bundle,
    Credit,
    Extension,
    SessionRecord,
    SessionSpec,
    Transaction,
    UsageResult,
    from_row,
)

T = TypeVar("T")

WALLET_CHAINS = ("solana", "evm")
SESSION_STATUSES = ("active", "completed", "expired")


def wallet(chain: str, address: str) -> tuple[str, str]:
    """The account key of a wallet, checked: (chain, address), EVM addresses lower-cased."""
    if chain not in WALLET_CHAINS:
        raise ValueError(f"wallet_chain must be one of {WALLET_CHAINS}, got {chain!r}")
    if not isinstance(address, str) or not address:
        raise ValueError("wallet_address is required")
    # EVM addresses are case-insensitive (EIP-55 is only a checksum): one account per wallet.
    return chain, address.lower() if chain == "evm" else address


def _positive(name: str, value: int, *, zero_ok: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        raise ValueError(
            f"{name} must be a {'non-negative' if zero_ok else 'positive'} int, got {value!r}"
        )
    return value


def _aware(name: str, value: datetime) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {value!r}")
    return value.astimezone(UTC)


def _page(limit: int, offset: int) -> tuple[int, int]:
    _positive("limit", limit)
    _positive("offset", offset, zero_ok=True)
    return limit, offset


def _account(row: Row) -> Account:
    return from_row(Account, row)


def _transaction(row: Row) -> Transaction:
    return from_row(Transaction, row)


def _session(row: Row) -> SessionRecord:
    return from_row(SessionRecord, row, session_id=row["id"])


# Hot-path statements, compiled once (``Prepared``: straight to the driver on SQLite).
_ACCOUNT_BY_ID = Prepared(sa.select(accounts).where(accounts.c.id == sa.bindparam("account_id")))
# what a write transaction needs of the account it locks (see _Acct)
_LOCK_ACCOUNT_STMT = sa.select(
    accounts.c.id,
    accounts.c.credit_balance,
    accounts.c.held_microcredits,
    accounts.c.active_sessions,
    accounts.c.max_concurrent_sessions,
).where(accounts.c.id == sa.bindparam("account_id"))
_LOCK_ACCOUNT = Prepared(_LOCK_ACCOUNT_STMT)
_LOCK_ACCOUNT_FOR_UPDATE = {
    skip: Prepared(_LOCK_ACCOUNT_STMT.with_for_update(skip_locked=skip)) for skip in (False, True)
}
_ACCOUNT_BY_WALLET = Prepared(
    sa.select(accounts).where(
        accounts.c.wallet_chain == sa.bindparam("chain"),
        accounts.c.wallet_address == sa.bindparam("address"),
    )
)
_SESSION_BY_ID = Prepared(sa.select(sessions).where(sessions.c.id == sa.bindparam("session_id")))
_BUNDLE_ACTIVE = Prepared(
    sa.select(sessions.c.id)
    .where(
        sessions.c.account_id == sa.bindparam("account_id"),
        sessions.c.bundle_id == sa.bindparam("bundle_id"),
        sessions.c.status == "active",
    )
    .limit(1)
)
# Reserve on the account row only where the reservation fits the available balance and the new
# sessions fit the session limit: check and change in one statement, which on PostgreSQL takes
# the row lock itself and, if it had to wait for it, checks the newest version of the row.
_RESERVE_STMT = (
    sa.update(accounts)
    .where(
        accounts.c.id == sa.bindparam("account_id"),
        accounts.c.credit_balance - accounts.c.held_microcredits
        >= sa.bindparam("reserve", type_=sa.BigInteger),
        accounts.c.active_sessions + sa.bindparam("new", type_=sa.Integer)
        <= accounts.c.max_concurrent_sessions,
    )
    .values(
        held_microcredits=accounts.c.held_microcredits + sa.bindparam("reserve"),
        active_sessions=accounts.c.active_sessions + sa.bindparam("new"),
    )
    .returning(*_LOCK_ACCOUNT_STMT.selected_columns)
)
_RESERVE = Prepared(_RESERVE_STMT)
_INSERT_SESSIONS = PreparedInsert(sessions, [c.key for c in sessions.c])
_INSERT_RESERVES = PreparedInsert(transactions, [c.key for c in transactions.c if c.key != "id"])
_INSERT_TRANSACTION = Prepared(
    sa.insert(transactions)
    .values({c.key: sa.bindparam(c.key, type_=c.type) for c in transactions.c if c.key != "id"})
    .returning(transactions.c.id)
)


def _opening_memo(service: str) -> str:
    return f"{service} session"


def _open_one_statement() -> sa.Select[Any]:
    """PostgreSQL: one session opened in one statement (no BEGIN, no COMMIT: one round trip
    instead of six): ``_RESERVE``, then the session row and its ``reserve`` transaction, each
    inserted only if the reservation was made. Returns the transaction's id, or no row when the
    account refused (``Ledger._open`` then tells why)."""
    reserved = _RESERVE_STMT.cte("reserved")
    opened = (
        sa.insert(sessions)
        .from_select(
            [c.key for c in sessions.c],
            sa.select(
                *(
                    reserved.c.id if c.key == "account_id" else sa.bindparam(c.key, type_=c.type)
                    for c in sessions.c
                )
            ).select_from(reserved),
        )
        .cte("opened")
    )
    t = transactions.c
    posted = (
        sa.insert(transactions)
        .from_select(
            [
                t.account_id,
                t.kind,
                t.amount,
                t.hold,
                t.balance_after,
                t.available_after,
                t.session_id,
                t.memo,
                t.created_at,
            ],
            sa.select(
                reserved.c.id,
                sa.literal("reserve"),
                sa.literal(0, sa.BigInteger),
                sa.bindparam("reserve"),
                reserved.c.credit_balance,
                reserved.c.credit_balance - reserved.c.held_microcredits,
                sa.bindparam("id", type_=t.session_id.type),
                sa.bindparam("memo", type_=t.memo.type),
                sa.bindparam("started_at", type_=t.created_at.type),
            ).select_from(reserved),
        )
        .returning(t.id)
        .cte("posted")
    )
    return sa.select(posted.c.id).add_cte(opened)


_OPEN_ONE = Prepared(_open_one_statement())
_SAVE_ACCOUNT = Prepared(
    sa.update(accounts)
    .where(accounts.c.id == sa.bindparam("acct_id"))
    .values(
        credit_balance=sa.bindparam("acct_credit"),
        held_microcredits=sa.bindparam("acct_held"),
        active_sessions=sa.bindparam("acct_active"),
    )
)


class _Acct:
    """The locked account row while a write transaction changes it."""

    def __init__(self, row: Row) -> None:
        self.id: str = row["id"]
        self.credit: int = row["credit_balance"]
        self.held: int = row["held_microcredits"]
        self.active: int = row["active_sessions"]
        self.max_sessions: int = row["max_concurrent_sessions"]

    @property
    def available(self) -> int:
        return self.credit - self.held


class Ledger(AsyncClosing):
    """``Ledger(url)``; ``await migrate()`` at startup; ``await close()`` at shutdown.

    ``url``: ``sqlite:///path/to/ledger.db`` or ``postgresql://user@host/db`` (see ``db.py``);
    ``db`` is that database, for records kept beside the accounts (payments). ``clock`` returns
    the current aware UTC time.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], datetime] | None = None,
        sqlite_busy_timeout: float = 30.0,
        pool_size: int = 16,
        idle_transaction_timeout: float = 60.0,
        echo: bool = False,
    ) -> None:
        self.db = Database(
            url,
            sqlite_busy_timeout=sqlite_busy_timeout,
            pool_size=pool_size,
            idle_transaction_timeout=idle_transaction_timeout,
            echo=echo,
        )
        self.url = self.db.url
        self.backend = self.db.backend
        self._clock = clock or (lambda: datetime.now(UTC))

    async def close(self) -> None:
        await self.db.close()

    # ---------------------------------------------------------------- schema

    async def migrate(self, revision: str = "head") -> None:
        """Create or upgrade the schema (Alembic, in one transaction; safe from several
        processes at once)."""
        await self.db.migrate(revision)

    async def schema_revision(self) -> str | None:
        return await self.db.schema_revision()

    # ---------------------------------------------------------------- plumbing

    def now(self) -> datetime:
        """The ledger clock's time (aware UTC): every record written carries it."""
        return _aware("clock()", self._clock())

    def _lock_account(
        self, conn: sa.Connection, account_id: str, *, skip_locked: bool = False
    ) -> _Acct | None:
        stmt = _LOCK_ACCOUNT_FOR_UPDATE[skip_locked] if self.db.is_postgres else _LOCK_ACCOUNT
        row = stmt.first(conn, {"account_id": account_id})
        return _Acct(row) if row else None

    def _ensure_account(
        self, conn: sa.Connection, chain: str, address: str, now: datetime
    ) -> _Acct:
        conn.execute(
            self.db.insert(accounts)
            .values(
                id=str(uuid.uuid4()),
                wallet_chain=chain,
                wallet_address=address,
                credit_balance=0,
                held_microcredits=0,
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["wallet_chain", "wallet_address"])
        )
        stmt = sa.select(accounts).where(
            accounts.c.wallet_chain == chain, accounts.c.wallet_address == address
        )
        return _Acct((conn.execute(self.db.for_update(stmt))).mappings().one())

    @staticmethod
    def _post(conn: sa.Connection, movement: Row) -> Transaction:
        """Record one movement already applied to the locked account (``_movement``; the account
        row is written by ``_save``)."""
        movement["id"] = _INSERT_TRANSACTION.one(conn, movement)["id"]
        return _transaction(movement)

    @staticmethod
    def _movement(
        acct: _Acct,
        kind: str,
        now: datetime,
        *,
        amount: int = 0,
        hold: int = 0,
        session_id: str | None = None,
        reference: str | None = None,
        memo: str | None = None,
    ) -> Row:
        """Apply one movement to the account in hand; its ``transactions`` row (without id)."""
        acct.credit += amount
        acct.held += hold
        if not 0 <= acct.held <= acct.credit:  # unreachable unless a caller's check is wrong
            raise AssertionError(
                f"ledger invariant broken on {acct.id}: credit {acct.credit}, held {acct.held}"
            )
        return {
            "account_id": acct.id,
            "kind": kind,
            "amount": amount,
            "hold": hold,
            "balance_after": acct.credit,
            "available_after": acct.available,
            "session_id": session_id,
            "reference": reference,
            "memo": memo,
            "created_at": now,
        }

    def _save(self, conn: sa.Connection, acct: _Acct) -> None:
        if acct.active < 0:  # unreachable unless a settlement counted a session twice
            raise AssertionError(
                f"ledger invariant broken on {acct.id}: {acct.active} active sessions"
            )
        _SAVE_ACCOUNT.rows(
            conn,
            {
                "acct_id": acct.id,
                "acct_credit": acct.credit,
                "acct_held": acct.held,
                "acct_active": acct.active,
            },
        )

    @staticmethod
    def _bundle_open(conn: sa.Connection, account_id: str, bundle_id: str) -> bool:
        return (
            _BUNDLE_ACTIVE.first(conn, {"account_id": account_id, "bundle_id": bundle_id})
            is not None
        )

    def _session_row(self, conn: sa.Connection, session_id: str) -> Row | None:
        return _SESSION_BY_ID.first(conn, {"session_id": session_id})

    # ---------------------------------------------------------------- credits

    async def grant(
        self, wallet_chain: str, wallet_address: str, microcredits: int, memo: str | None = None
    ) -> Transaction:
        """Operator credit; creates the account if needed."""
        return await self._credit(
            Credit("grant", wallet_chain, wallet_address, microcredits, memo=memo)
        )

    async def credit_purchase(
        self,
        wallet_chain: str,
        wallet_address: str,
        microcredits: int,
        reference: str,
        memo: str | None = None,
    ) -> Transaction:
        """Credit a payment once: a second call with the same ``reference`` (the payment's
        signature or hash) raises DuplicatePayment and changes nothing."""
        if not isinstance(reference, str) or not reference:
            raise ValueError("a purchase needs its payment reference")
        credit = Credit("purchase", wallet_chain, wallet_address, microcredits, reference, memo)
        return await self._credit(credit)

    async def _credit(self, credit: Credit) -> Transaction:
        chain, address = wallet(credit.wallet_chain, credit.wallet_address)
        _positive("microcredits", credit.amount)
        credit = replace(credit, wallet_chain=chain, wallet_address=address)
        now = self.now()

        def body(conn: sa.Connection) -> Transaction:
            return self.post_credit(conn, credit, now)

        return await self.write_credit(body, credit.reference)

    async def write_credit(self, body: Callable[[sa.Connection], T], reference: str | None) -> T:
        """``db.write(body)`` for a transaction that posts a credit: a purchase whose
        ``reference`` another transaction credited meanwhile (the unique index refused it) is
        DuplicatePayment, as one credited before is."""
        try:
            return await self.db.write(body)
        except IntegrityError as e:
            if reference is not None and "reference" in str(e.orig).lower():
                raise DuplicatePayment(reference) from None
            raise

    def post_credit(self, conn: sa.Connection, credit: Credit, now: datetime) -> Transaction:
        """Inside a write transaction (``write_credit``): credit the wallet's account (created if
        needed) with a ``grant`` or ``purchase`` row. So that a payment record can change its
        status in the same transaction as the credit it pays for. A purchase whose ``reference``
        was credited before raises DuplicatePayment; the wallet is checked (``wallet``) by the
        caller."""
        reference = credit.reference
        acct = self._ensure_account(conn, credit.wallet_chain, credit.wallet_address, now)
        if reference is not None:
            seen = conn.scalar(
                sa.select(transactions.c.id).where(
                    transactions.c.kind == "purchase", transactions.c.reference == reference
                )
            )
            if seen is not None:
                raise DuplicatePayment(reference)
        movement = self._movement(
            acct, credit.kind, now, amount=credit.amount, reference=reference, memo=credit.memo
        )
        tx = self._post(conn, movement)
        self._save(conn, acct)
        return tx

    async def set_limits(
        self,
        account_id: str,
        *,
        max_concurrent_sessions: int | None = None,
        max_api_rate: int | None = None,
    ) -> Account:
        values: dict[str, int] = {}
        if max_concurrent_sessions is not None:
            values["max_concurrent_sessions"] = _positive(
                "max_concurrent_sessions", max_concurrent_sessions
            )
        if max_api_rate is not None:
            values["max_api_rate"] = _positive("max_api_rate", max_api_rate)

        def body(conn: sa.Connection) -> Account:
            if self._lock_account(conn, account_id) is None:
                raise AccountNotFound(account_id)
            if values:
                conn.execute(
                    sa.update(accounts).where(accounts.c.id == account_id).values(**values)
                )
            row = (
                conn.execute(sa.select(accounts).where(accounts.c.id == account_id))
                .mappings()
                .one()
            )
            return _account(row)

        return await self.db.write(body)

    # ---------------------------------------------------------------- sessions

    async def open_session(
        self, account_id: str, spec: SessionSpec, bundle_id: str | None = None
    ) -> SessionRecord:
        """Reserve the spec's ``reserve_microcredits`` and open an active session (the gateway
        builds one spec per placement; ``create_bundle`` opens several at once).

        Raises InsufficientCredits (reservation above the available balance), ConcurrencyLimit
        (the account's active sessions -- a bundle counts once -- would exceed its limit),
        AccountNotFound."""
        if self.db.is_postgres and bundle_id is None:  # the common case in one round trip
            (row,) = self._session_rows(account_id, [spec], None)
            params = {
                **row,
                "reserve": spec.reserve_microcredits,
                "new": 1,
                "memo": _opening_memo(spec.service),
            }
            if await self.db.statement(_OPEN_ONE, params, reads_only=False):
                return _session(row)
            # refused (or no such account): the general path says why, or opens the session
            # if the account changed in between
        (record,) = await self.db.write(self._open, account_id, [spec], bundle_id, True)
        return record

    async def create_bundle(
        self, account_id: str, specs: Sequence[SessionSpec], bundle_id: str | None = None
    ) -> Bundle:
        """Open several sessions under one ``bundle_id``, all or nothing."""
        if not specs:
            raise ValueError("a bundle needs at least one session")
        named = bundle_id is not None  # a new id needs no check that the bundle is open
        bundle_id = bundle_id or uuid7()
        records = await self.db.write(self._open, account_id, list(specs), bundle_id, named)
        return Bundle(bundle_id, records)

    def _session_rows(
        self, account_id: str, specs: list[SessionSpec], bundle_id: str | None
    ) -> list[Row]:
        """The new sessions' rows, from checked specs."""
        now = self.now()
        rows = []
        for s in specs:
            pricing.rate(s.service)
            _positive("reserve_microcredits", s.reserve_microcredits)
            _positive("limit_units", s.limit_units)
            if not s.node_pubkey or not s.server_url:
                raise ValueError("node_pubkey and server_url are required")
            rows.append(
                {
                    "id": s.session_id or uuid7(),
                    "account_id": account_id,
                    "service": s.service,
                    "bundle_id": bundle_id,
                    "status": "active",
                    "room_name": s.room_name,
                    "participant_identity": s.participant_identity,
                    "server_url": s.server_url,
                    "node_pubkey": s.node_pubkey,
                    "reserved_microcredits": s.reserve_microcredits,
                    "charged_microcredits": 0,
                    "usage_units": 0,
                    "limit_units": s.limit_units,
                    "token_expires_at": _aware("token_expires_at", s.token_expires_at),
                    "started_at": now,
                    "ended_at": None,
                    "metadata": s.metadata,
                }
            )
        return rows

    def _open(
        self,
        conn: sa.Connection,
        account_id: str,
        specs: list[SessionSpec],
        bundle_id: str | None,
        named: bool,
    ) -> list[SessionRecord]:
        """``named``: the caller chose ``bundle_id`` (else the ledger did: a new bundle)."""
        rows = self._session_rows(account_id, specs, bundle_id)
        if bundle_id is None:
            new = len(rows)
        elif not named:
            new = 1
        else:  # a bundle counts once, and not again if it is already open: checked under the
            # account's lock, or two opens of one bundle would both count it
            if self._lock_account(conn, account_id) is None:
                raise AccountNotFound(account_id)
            new = 0 if self._bundle_open(conn, account_id, bundle_id) else 1
        needed = sum(r["reserved_microcredits"] for r in rows)
        params = {"account_id": account_id, "reserve": needed, "new": new}
        while (reserved := _RESERVE.first(conn, params)) is None:
            self._refusal(conn, account_id, needed, new)
        acct = _Acct(reserved)
        acct.held -= needed  # the reserve rows record the holds one by one
        reserves = [
            self._movement(
                acct,
                "reserve",
                row["started_at"],
                hold=row["reserved_microcredits"],
                session_id=row["id"],
                memo=_opening_memo(row["service"]),
            )
            for row in rows
        ]
        _INSERT_SESSIONS.run(conn, rows)
        _INSERT_RESERVES.run(conn, reserves)
        return [_session(row) for row in rows]

    def _refusal(self, conn: sa.Connection, account_id: str, needed: int, new: int) -> None:
        """Why ``_RESERVE`` changed nothing: raises AccountNotFound, ConcurrencyLimit or
        InsufficientCredits. Returns if, read under the lock, the reservation fits after all (on
        PostgreSQL the account may have changed in between): the caller reserves again."""
        acct = self._lock_account(conn, account_id)
        if acct is None:
            raise AccountNotFound(account_id)
        if acct.active + new > acct.max_sessions:
            raise ConcurrencyLimit(acct.max_sessions)
        if needed > acct.available:
            raise InsufficientCredits(needed, acct.available)

    async def extend(
        self,
        session_id: str,
        additional_units: int,
        token_expires_at: datetime | None = None,
        reserve_microcredits: int | None = None,
    ) -> SessionRecord:
        """Reserve more for an active session: ``limit_units += additional_units``, the
        reservation grows by ``reserve_microcredits`` (default: the price of the units), and the
        token expiry moves to ``token_expires_at`` when given. Raises InsufficientCredits,
        SessionClosed (already settled), UnknownSession."""
        (record,) = await self._extend(
            [Extension(session_id, additional_units, token_expires_at, reserve_microcredits)],
            None,
        )
        return record

    async def extend_bundle(
        self, bundle_id: str, extensions: Sequence[Extension]
    ) -> list[SessionRecord]:
        """``extend`` for several sessions of one bundle, all or nothing."""
        if not extensions:
            raise ValueError("nothing to extend")
        return await self._extend(list(extensions), bundle_id)

    async def _extend(self, exts: list[Extension], bundle_id: str | None) -> list[SessionRecord]:
        now = self.now()
        for e in exts:
            _positive("additional_units", e.additional_units, zero_ok=True)
            if e.reserve_microcredits is not None:
                _positive("reserve_microcredits", e.reserve_microcredits, zero_ok=True)

        def body(conn: sa.Connection) -> list[SessionRecord]:
            first = self._session_row(conn, exts[0].session_id)
            if first is None or (bundle_id is not None and first["bundle_id"] != bundle_id):
                raise UnknownSession(exts[0].session_id)
            acct = self._lock_account(conn, first["account_id"])
            assert acct is not None
            plan = []
            for e in exts:
                row = self._session_row(conn, e.session_id)  # current, under the lock
                if (
                    row is None
                    or row["account_id"] != acct.id
                    or (bundle_id is not None and row["bundle_id"] != bundle_id)
                ):
                    raise UnknownSession(e.session_id)
                if row["status"] != "active":
                    raise SessionClosed(e.session_id, row["status"])
                reserve = (
                    e.reserve_microcredits
                    if e.reserve_microcredits is not None
                    else pricing.cost(row["service"], e.additional_units)
                )
                plan.append((e, row, reserve))
            needed = sum(reserve for _, _, reserve in plan)
            if needed > acct.available:
                raise InsufficientCredits(needed, acct.available)
            records = []
            for e, row, reserve in plan:
                values: dict[str, Any] = {
                    "reserved_microcredits": row["reserved_microcredits"] + reserve,
                    "limit_units": row["limit_units"] + e.additional_units,
                }
                if e.token_expires_at is not None:
                    values["token_expires_at"] = _aware("token_expires_at", e.token_expires_at)
                new = (
                    (
                        conn.execute(
                            sa.update(sessions)
                            .where(sessions.c.id == e.session_id)
                            .values(**values)
                            .returning(*sessions.c)
                        )
                    )
                    .mappings()
                    .one()
                )
                if reserve:
                    movement = self._movement(
                        acct,
                        "reserve",
                        now,
                        hold=reserve,
                        session_id=e.session_id,
                        memo=f"{row['service']} extension",
                    )
                    self._post(conn, movement)
                records.append(_session(new))
            self._save(conn, acct)
            return records

        return await self.db.write(body)

    # ---------------------------------------------------------------- usage and settlement

    async def record_usage(
        self,
        session_id: str,
        node_pubkey: str,
        units: int,
        final: bool = False,
        event_id: str | None = None,
    ) -> UsageResult:
        """A node's cumulative usage report (seconds for webrtc/stt, characters for tts).

        The running charge is ``min(cost(max reported units), reserved)``; a lower total than an
        earlier one is ignored. ``final=True`` settles: charge, refund the rest, status
        ``completed``. Reports on a settled session (a repeated final included) change nothing
        and return its settlement. An ``event_id`` is applied once per node: the same id again
        (a retried or replayed webhook) changes nothing. Raises UnknownSession, NotSessionNode."""
        _positive("units", units, zero_ok=True)
        if event_id is not None and not 0 < len(event_id) <= 128:
            raise ValueError(f"event id must be 1..128 characters, got {len(event_id)}")
        now = self.now()

        def body(conn: sa.Connection) -> UsageResult:
            row = self._session_row(conn, session_id)
            if row is None:
                raise UnknownSession(session_id)
            if row["node_pubkey"] != node_pubkey:
                raise NotSessionNode(session_id, node_pubkey)
            acct = self._lock_account(conn, row["account_id"])
            assert acct is not None
            row = self._session_row(conn, session_id)  # current, under the lock
            assert row is not None
            if event_id is not None and not self._first_time(
                conn, node_pubkey, event_id, session_id, now
            ):
                return self._result(
                    row, row["usage_units"], settled=row["status"] != "active", changed=False
                )
            if row["status"] != "active":
                return self._result(row, units, settled=True, changed=False)
            usage = max(row["usage_units"], units)
            if final:
                return self._settle(conn, acct, row, usage, "completed", now)
            if usage == row["usage_units"]:
                return self._result(row, units, settled=False, changed=False)
            charged = min(pricing.cost(row["service"], usage), row["reserved_microcredits"])
            new = (
                (
                    conn.execute(
                        sa.update(sessions)
                        .where(sessions.c.id == session_id)
                        .values(usage_units=usage, charged_microcredits=charged)
                        .returning(*sessions.c)
                    )
                )
                .mappings()
                .one()
            )
            return self._result(new, units, settled=False, changed=True)

        return await self.db.write(body)

    @staticmethod
    def _first_time(
        conn: sa.Connection, node_pubkey: str, event_id: str, session_id: str, now: datetime
    ) -> bool:
        """Record a node's event id; False when it was applied before. Runs under the lock of the
        session's account, so two deliveries of one event cannot both see it as new."""
        seen = conn.execute(
            sa.select(node_events.c.event_id).where(
                node_events.c.node_pubkey == node_pubkey, node_events.c.event_id == event_id
            )
        ).first()
        if seen is not None:
            return False
        conn.execute(
            sa.insert(node_events).values(
                node_pubkey=node_pubkey, event_id=event_id, session_id=session_id, created_at=now
            )
        )
        return True

    def _settle(
        self,
        conn: sa.Connection,
        acct: _Acct,
        row: Row,
        usage: int,
        status: str,
        now: datetime,
    ) -> UsageResult:
        reserved = row["reserved_microcredits"]
        charged = min(pricing.cost(row["service"], usage), reserved)
        refund = reserved - charged
        sid = row["id"]
        new = (
            (
                conn.execute(
                    sa.update(sessions)
                    .where(sessions.c.id == sid, sessions.c.status == "active")
                    .values(
                        status=status, usage_units=usage, charged_microcredits=charged, ended_at=now
                    )
                    .returning(*sessions.c)
                )
            )
            .mappings()
            .one()
        )
        if row["bundle_id"] is None or not self._bundle_open(conn, acct.id, row["bundle_id"]):
            acct.active -= 1  # a bundle's last session closes the bundle
        if charged:
            charge = self._movement(
                acct,
                "charge",
                now,
                amount=-charged,
                hold=-charged,
                session_id=sid,
                memo=f"{row['service']} usage: {usage}",
            )
            self._post(conn, charge)
        if refund:
            back = self._movement(
                acct,
                "refund",
                now,
                hold=-refund,
                session_id=sid,
                memo=f"{row['service']} unused reservation",
            )
            self._post(conn, back)
        self._save(conn, acct)
        return self._result(new, usage, settled=True, changed=True)

    @staticmethod
    def _result(row: Row, reported: int, *, settled: bool, changed: bool) -> UsageResult:
        usage = max(row["usage_units"], reported)
        overage_units = max(0, usage - row["limit_units"])
        full_cost = pricing.cost(row["service"], usage)
        return from_row(
            UsageResult,
            row,
            session_id=row["id"],
            refunded_microcredits=(
                row["reserved_microcredits"] - row["charged_microcredits"] if settled else None
            ),
            overage_units=overage_units,
            overage_microcredits=max(0, full_cost - row["reserved_microcredits"]),
            settled=settled,
            changed=changed,
        )

    async def sweep(
        self,
        now: datetime | None = None,
        grace: timedelta = timedelta(seconds=60),
        limit: int = 1000,
    ) -> list[UsageResult]:
        """Settle active sessions whose token expired more than ``grace`` ago without a final
        report: charge the usage reported so far, refund the rest, status ``expired``. Returns the
        sessions this call settled. Idempotent; safe from several processes at once."""
        now = _aware("now", now) if now is not None else self.now()
        cutoff = now - grace

        def find(conn: sa.Connection) -> list[Any]:
            return list(
                conn.execute(
                    sa.select(sessions.c.id, sessions.c.account_id)
                    .where(sessions.c.status == "active", sessions.c.token_expires_at <= cutoff)
                    .order_by(sessions.c.token_expires_at)
                    .limit(limit)
                ).all()
            )

        def settle(conn: sa.Connection, sid: str, account_id: str) -> UsageResult | None:
            # another sweeper holding this account settles it (or the next sweep does)
            acct = self._lock_account(conn, account_id, skip_locked=True)
            if acct is None:
                return None
            row = self._session_row(conn, sid)
            if (
                row is None or row["status"] != "active" or row["token_expires_at"] > cutoff
            ):  # settled or extended meanwhile
                return None
            return self._settle(conn, acct, row, row["usage_units"], "expired", now)

        settled = []
        for sid, account_id in await self.db.read(find):
            result = await self.db.write(settle, sid, account_id)
            if result is not None:
                settled.append(result)
        return settled

    # ---------------------------------------------------------------- reads

    async def get_account(self, wallet_chain: str, wallet_address: str) -> Account | None:
        """None until the wallet's first purchase or grant."""
        chain, address = wallet(wallet_chain, wallet_address)
        row = await self.db.first(_ACCOUNT_BY_WALLET, {"chain": chain, "address": address})
        return _account(row) if row else None

    async def get_account_by_id(self, account_id: str) -> Account | None:
        row = await self.db.first(_ACCOUNT_BY_ID, {"account_id": account_id})
        return _account(row) if row else None

    async def list_transactions(
        self, account_id: str, limit: int = 50, offset: int = 0
    ) -> list[Transaction]:
        """Newest first."""
        limit, offset = _page(limit, offset)
        rows = await self.db.all(
            sa.select(transactions)
            .where(transactions.c.account_id == account_id)
            .order_by(transactions.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        return [_transaction(r) for r in rows]

    async def list_sessions(
        self, account_id: str, limit: int = 50, offset: int = 0, status: str | None = None
    ) -> list[SessionRecord]:
        """Newest first; ``status`` filters (active, completed, expired)."""
        return await self._sessions_page(
            sa.select(sessions).where(sessions.c.account_id == account_id), limit, offset, status
        )

    async def get_session(self, session_id: str) -> SessionRecord | None:
        row = await self.db.first(_SESSION_BY_ID, {"session_id": session_id})
        return _session(row) if row else None

    async def list_bundle(self, bundle_id: str) -> list[SessionRecord]:
        rows = await self.db.all(
            sa.select(sessions)
            .where(sessions.c.bundle_id == bundle_id)
            .order_by(sessions.c.started_at, sessions.c.id)
        )
        return [_session(r) for r in rows]

    async def list_accounts(self, limit: int = 100, offset: int = 0) -> list[Account]:
        """Operator view: every account, newest first."""
        limit, offset = _page(limit, offset)
        rows = await self.db.all(
            sa.select(accounts)
            .order_by(accounts.c.created_at.desc(), accounts.c.id)
            .limit(limit)
            .offset(offset)
        )
        return [_account(r) for r in rows]

    async def list_all_sessions(
        self, limit: int = 100, offset: int = 0, status: str | None = None
    ) -> list[SessionRecord]:
        """Operator view: sessions of every account, newest first."""
        return await self._sessions_page(sa.select(sessions), limit, offset, status)

    async def _sessions_page(
        self, stmt: sa.Select[Any], limit: int, offset: int, status: str | None
    ) -> list[SessionRecord]:
        """One page of ``stmt``'s sessions, newest first, of one ``status`` if given."""
        limit, offset = _page(limit, offset)
        if status is not None:
            if status not in SESSION_STATUSES:
                raise ValueError(f"status must be one of {SESSION_STATUSES}, got {status!r}")
            stmt = stmt.where(sessions.c.status == status)
        stmt = stmt.order_by(sessions.c.started_at.desc(), sessions.c.id.desc())
        rows = await self.db.all(stmt.limit(limit).offset(offset))
        return [_session(r) for r in rows]

    async def audit(self, account_id: str) -> Audit:
        """The account's invariants, read in one transaction (see ``Audit.ok``)."""
        pg = self.db.is_postgres

        def body(conn: sa.Connection) -> Audit:
            if pg:
                conn.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
            a = (
                conn.execute(sa.select(accounts).where(accounts.c.id == account_id))
                .mappings()
                .first()
            )
            if a is None:
                raise AccountNotFound(account_id)
            t = transactions.c
            sums = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(t.amount), 0),
                    sa.func.coalesce(sa.func.sum(t.hold), 0),
                    sa.func.min(t.balance_after),
                    sa.func.min(t.available_after),
                ).where(t.account_id == account_id)
            ).one()
            s = sessions.c
            active = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(s.reserved_microcredits), 0),
                    sa.func.count(sa.distinct(sa.func.coalesce(s.bundle_id, s.id))),
                ).where(s.account_id == account_id, s.status == "active")
            ).one()
            min_after = None if sums[2] is None else min(int(sums[2]), int(sums[3]))
            return Audit(
                account_id=account_id,
                credit_balance=a["credit_balance"],
                held_microcredits=a["held_microcredits"],
                sum_amount=int(sums[0]),
                sum_hold=int(sums[1]),
                active_reserved=int(active[0]),
                active_sessions=a["active_sessions"],
                active_keys=int(active[1]),
                min_after=min_after,
            )

        return await self.db.read(body)
