"""The credits ledger on SQLite (a temp file) and PostgreSQL (a throwaway server,
tests/support/pg.py).

Every requirement of the ledger is a test here; concurrency tests run their calls concurrently
(asyncio.gather) over several Ledger instances, i.e. separate engines and connections, as several
gateway processes would.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa

from gateway.ledger import (
    Account,
    AccountNotFound,
    ConcurrencyLimit,
    DuplicatePayment,
    Extension,
    InsufficientCredits,
    Ledger,
    NotSessionNode,
    SessionClosed,
    SessionRecord,
    SessionSpec,
    UnknownSession,
    pricing,
)
from gateway.ledger.ids import uuid7
from gateway.ledger.models import UTCDateTime, accounts
from gateway.ledger.records import PUBLIC_SESSION_FIELDS
from tests.conftest import asyncpg_dsn

NODE = "NodeA1111111111111111111111111111111111111"
OTHER_NODE = "NodeB2222222222222222222222222222222222222"
STT_MINUTE = 6_000
HEAD = "0005"  # the newest migration


def now() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture
async def ledger(db_url: str) -> AsyncIterator[Ledger]:
    lg = Ledger(db_url)
    await lg.migrate()
    yield lg
    await lg.close()


@pytest.fixture
async def ledgers(db_url: str) -> AsyncIterator[list[Ledger]]:
    """Three Ledger instances on one database (three engines: as three gateway processes)."""
    lgs = [Ledger(db_url) for _ in range(3)]
    await lgs[0].migrate()
    yield lgs
    for lg in lgs:
        await lg.close()


async def funded(lg: Ledger, microcredits: int, chain: str = "solana") -> str:
    tx = await lg.grant(chain, f"wallet-{uuid.uuid4().hex}", microcredits, memo="test")
    return tx.account_id


async def open_session(
    lg: Ledger,
    account_id: str,
    *,
    service: str = "stt",
    minutes: int = 1,
    expires_in: timedelta = timedelta(minutes=5),
    node: str = NODE,
    bundle_id: str | None = None,
):
    spec = SessionSpec(
        service,
        pricing.reservation_for_minutes(service, minutes),
        minutes * 60,
        now() + expires_in,
        node,
        "https://node.example",
        room_name="room",
        participant_identity="agent",
    )
    return await lg.open_session(account_id, spec, bundle_id)


def _missing() -> Account:
    raise AssertionError("missing account")


async def acct(lg: Ledger, account_id: str) -> Account:
    a = await lg.get_account_by_id(account_id)
    assert a is not None, account_id
    return a


async def sess(lg: Ledger, session_id: str) -> SessionRecord:
    s = await lg.get_session(session_id)
    assert s is not None, session_id
    return s


async def check_invariants(lg: Ledger, account_id: str) -> None:
    audit = await lg.audit(account_id)
    assert audit.ok, audit
    txs = await lg.list_transactions(account_id, limit=10_000)
    account = await lg.get_account_by_id(account_id)
    assert account is not None
    assert account.credit_balance == sum(t.amount for t in txs)
    assert account.held_microcredits == sum(t.hold for t in txs)
    assert 0 <= account.available_balance <= account.credit_balance
    if txs:  # the newest row carries the current balances
        assert (txs[0].balance_after, txs[0].available_after) == (
            account.credit_balance,
            account.available_balance,
        )


# ------------------------------------------------------------------------------------ pricing


@pytest.mark.fast
def test_pricing_document_matches_the_spec() -> None:
    assert pricing.pricing_document() == {
        "microcredits_per_usd": 1_000_000,
        "rates": {
            "webrtc": {"unit": "per_minute", "microcredits": 1000, "usd": 0.001},
            "stt": {"unit": "per_minute", "microcredits": 6000, "usd": 0.006},
            "tts": {"unit": "per_1k_characters", "microcredits": 8000, "usd": 0.008},
        },
    }


@pytest.mark.fast
def test_cost_is_integer_and_rounds_up() -> None:
    assert pricing.cost("webrtc", 0) == 0
    assert pricing.cost("webrtc", 1) == 17  # 1000/60 = 16.67
    assert pricing.cost("webrtc", 61) == 1017
    assert pricing.cost("stt", 1) == 100
    assert pricing.cost("stt", 90) == 9000
    assert pricing.cost("tts", 1) == 8
    assert pricing.cost("tts", 1001) == 8008
    assert pricing.cost("tts", 10_000) == 80_000
    assert isinstance(pricing.cost("webrtc", 10**15), int)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            pricing.cost("stt", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pricing.cost("video", 1)


@pytest.mark.fast
def test_reservation_for_whole_minutes_is_exact() -> None:
    for service, rate in (("webrtc", 1000), ("stt", 6000)):
        for n in range(1, 241):
            assert pricing.reservation_for_minutes(service, n) == n * rate
            assert pricing.cost(service, pricing.seconds_for_minutes(n)) == n * rate
    assert pricing.reservation_for_minutes("stt", 0.5) == 3000
    assert pricing.seconds_for_minutes("0.01") == 1
    with pytest.raises(ValueError):
        pricing.reservation_for_minutes("tts", 1)
    with pytest.raises(ValueError):
        pricing.seconds_for_minutes(0)


@pytest.mark.fast
def test_usd_to_microcredits() -> None:
    assert pricing.usd_to_microcredits(0.1) == 100_000
    assert pricing.usd_to_microcredits(0.1 + 0.2) == 300_000  # never more than paid
    assert pricing.usd_to_microcredits("1.2345678") == 1_234_567
    assert pricing.usd_to_microcredits(5) == 5_000_000


# ------------------------------------------------------------------------------------ schema


async def test_migrate_creates_the_models_schema_and_is_idempotent(ledger: Ledger) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from gateway.ledger.models import VERSION_TABLE, metadata

    await ledger.migrate()  # again: a no-op
    assert await ledger.schema_revision() == HEAD

    def diff(conn: sa.Connection) -> list:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return compare_metadata(ctx, metadata)

    async with ledger.db.engine.connect() as conn:
        assert await conn.run_sync(diff) == []


async def test_several_processes_migrate_at_once(db_url: str) -> None:
    lgs = [Ledger(db_url) for _ in range(3)]
    try:
        await asyncio.gather(*(lg.migrate() for lg in lgs))
        assert {await lg.schema_revision() for lg in lgs} == {HEAD}
        await funded(lgs[1], 1000)
    finally:
        for lg in lgs:
            await lg.close()


@pytest.mark.fast
async def test_sqlite_new_file_opened_by_several_ledgers_at_once(tmp_path: Path) -> None:
    """Switching a new file to WAL takes an exclusive lock that SQLite refuses at once (no busy
    wait) to all but one of several connections doing it together: they must try again, not fail
    with "database is locked". Twenty new files, three ledgers each."""
    for i in range(20):
        lgs = [Ledger(f"sqlite:///{tmp_path}/ledger-{i}.db") for _ in range(3)]
        try:
            await asyncio.gather(*(lg.migrate() for lg in lgs))
            assert {await lg.schema_revision() for lg in lgs} == {HEAD}
        finally:
            for lg in lgs:
                await lg.close()


async def test_upgrade_from_revision_1_keeps_data(db_url: str) -> None:
    """A database written at revision 0001 (no held_microcredits column, no payments table)
    upgrades to head: the held amount is backfilled from active sessions and the ledger works."""
    lg = Ledger(db_url)
    try:
        await lg.migrate("0001")
        assert await lg.schema_revision() == "0001"
        md = sa.MetaData()
        acc = sa.Table(
            "accounts",
            md,
            sa.Column("id", sa.String),
            sa.Column("wallet_chain", sa.String),
            sa.Column("wallet_address", sa.String),
            sa.Column("credit_balance", sa.BigInteger),
            sa.Column("created_at", UTCDateTime),
        )
        ses = sa.Table(
            "sessions",
            md,
            *(
                sa.Column(c, sa.String)
                for c in ("id", "account_id", "service", "status", "server_url", "node_pubkey")
            ),
            *(
                sa.Column(c, sa.BigInteger)
                for c in (
                    "reserved_microcredits",
                    "charged_microcredits",
                    "usage_units",
                    "limit_units",
                )
            ),
            *(sa.Column(c, UTCDateTime) for c in ("token_expires_at", "started_at", "ended_at")),
        )
        txs = sa.Table(
            "transactions",
            md,
            *(sa.Column(c, sa.String) for c in ("account_id", "kind", "session_id", "reference")),
            *(
                sa.Column(c, sa.BigInteger)
                for c in ("amount", "hold", "balance_after", "available_after")
            ),
            sa.Column("created_at", UTCDateTime),
        )
        t0 = now() - timedelta(minutes=10)
        aid, done, live = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
        async with lg.db.engine.begin() as conn:
            # purchase 100000; a completed stt session (reserved 6000, charged 3000);
            # an active one (reserved 12000)
            await conn.execute(
                acc.insert().values(
                    id=aid,
                    wallet_chain="solana",
                    wallet_address="OldWallet",
                    credit_balance=97_000,
                    created_at=t0,
                )
            )
            await conn.execute(
                ses.insert(),
                [
                    dict(
                        id=done,
                        account_id=aid,
                        service="stt",
                        status="completed",
                        server_url="https://n",
                        node_pubkey=NODE,
                        reserved_microcredits=6000,
                        charged_microcredits=3000,
                        usage_units=30,
                        limit_units=60,
                        token_expires_at=t0,
                        started_at=t0,
                        ended_at=t0,
                    ),
                    dict(
                        id=live,
                        account_id=aid,
                        service="stt",
                        status="active",
                        server_url="https://n",
                        node_pubkey=NODE,
                        reserved_microcredits=12_000,
                        charged_microcredits=0,
                        usage_units=0,
                        limit_units=120,
                        token_expires_at=now() + timedelta(minutes=2),
                        started_at=t0,
                        ended_at=None,
                    ),
                ],
            )

            def tx(
                kind: str,
                amount: int,
                hold: int,
                after: int,
                avail: int,
                session_id: str | None = None,
                reference: str | None = None,
            ) -> dict:
                return dict(
                    account_id=aid,
                    kind=kind,
                    amount=amount,
                    hold=hold,
                    balance_after=after,
                    available_after=avail,
                    session_id=session_id,
                    reference=reference,
                    created_at=t0,
                )

            await conn.execute(
                txs.insert(),
                [
                    tx("purchase", 100_000, 0, 100_000, 100_000, reference="sig-1"),
                    tx("reserve", 0, 6000, 100_000, 94_000, done),
                    tx("reserve", 0, 12_000, 100_000, 82_000, live),
                    tx("charge", -3000, -3000, 97_000, 82_000, done),
                    tx("refund", 0, -3000, 97_000, 85_000, done),
                ],
            )
    finally:
        await lg.close()

    lg = Ledger(db_url)
    try:
        await lg.migrate()
        assert await lg.schema_revision() == HEAD
        view = await lg.get_account("solana", "OldWallet")
        assert view is not None and view.id == aid
        assert (view.credit_balance, view.available_balance) == (97_000, 85_000)
        await check_invariants(lg, aid)
        with pytest.raises(DuplicatePayment):
            await lg.credit_purchase("solana", "OldWallet", 100_000, "sig-1")
        settled = await lg.record_usage(live, NODE, 90, final=True)
        assert (settled.charged_microcredits, settled.refunded_microcredits) == (9000, 3000)
        assert (await acct(lg, aid)).available_balance == 88_000
        await check_invariants(lg, aid)
        async with lg.db.engine.begin() as conn:  # the new table is there
            await conn.execute(
                sa.text(
                    "INSERT INTO payments (id, chain, signature, status, amount_microcredits, "
                    "wallet_address, created_at, updated_at) VALUES "
                    "('p1', 'solana', 'sig-2', 'pending', 100000, 'OldWallet', :t, :t)"
                ),
                {"t": now().replace(tzinfo=None) if lg.backend == "sqlite" else now()},
            )
    finally:
        await lg.close()


async def test_postgresql_connections_closed_by_the_server_are_replaced(pg_db_url: str) -> None:
    """The server drops every connection (a restart, an admin's pg_terminate_backend): the
    ledger's next calls open new ones and succeed, and a write cut off mid-transaction leaves
    nothing behind."""
    lg = Ledger(pg_db_url, pool_size=4)
    await lg.migrate()
    try:
        aid = await funded(lg, 100_000)
        await asyncio.gather(*(open_session(lg, aid) for _ in range(4)))  # four pooled conns
        admin = await asyncpg.connect(asyncpg_dsn(pg_db_url))
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        assert killed >= 4
        await asyncio.sleep(0.2)  # the ledger's pooled connections see the server hang up
        await asyncio.gather(*(open_session(lg, aid) for _ in range(4)))  # writes
        assert (await acct(lg, aid)).available_balance == 100_000 - 8 * STT_MINUTE  # a read
        assert len(await lg.list_sessions(aid, status="active")) == 8
        await check_invariants(lg, aid)
    finally:
        await lg.close()


async def test_postgresql_a_transaction_left_idle_gives_its_locks_back(pg_db_url: str) -> None:
    """One of the ledger's connections left idle inside a transaction that locked an account
    (a bug, or a process stopped mid-way) would make every later write to that account wait for
    ever. The server ends that session after ``idle_transaction_timeout``: the waiting write
    goes through, and the pool replaces the dead connection."""
    lg = Ledger(pg_db_url, pool_size=2, idle_transaction_timeout=1.0)
    await lg.migrate()
    try:
        aid = await funded(lg, 100_000)
        pooled = await lg.db.engine.raw_connection()
        try:
            stuck = pooled.driver_connection
            await stuck.execute("BEGIN")
            await stuck.execute(f"SELECT 1 FROM accounts WHERE id = '{aid}' FOR UPDATE")
            started = asyncio.get_running_loop().time()
            await asyncio.wait_for(open_session(lg, aid), 30)
            assert asyncio.get_running_loop().time() - started >= 0.5, "it waited for the lock"
            for _ in range(50):  # the client hears the server hang up on its next read
                if stuck.is_closed():
                    break
                await asyncio.sleep(0.1)
            assert stuck.is_closed(), "the server ended the idle transaction's session"
        finally:
            pooled.invalidate()
        await asyncio.gather(*(open_session(lg, aid) for _ in range(3)))
        assert len(await lg.list_sessions(aid, status="active")) == 4
        await check_invariants(lg, aid)
    finally:
        await lg.close()


async def test_postgresql_open_refused_then_waits_for_the_account_and_sees_its_commit(
    pg_db_url: str,
) -> None:
    """The balance does not cover a session when the open starts, but another transaction holds
    the account's row lock with a grant not yet committed: the open waits for that lock and then
    reserves against the committed balance (refused by its snapshot, read again under the lock)
    instead of refusing on a stale read."""
    lg = Ledger(pg_db_url)
    await lg.migrate()
    admin = await asyncpg.connect(asyncpg_dsn(pg_db_url))
    try:
        aid = await funded(lg, 1000)  # less than one STT minute
        tr = admin.transaction()
        await tr.start()
        await admin.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", aid)
        await admin.execute(
            "UPDATE accounts SET credit_balance = credit_balance + 10000 WHERE id = $1", aid
        )
        await admin.execute(
            "INSERT INTO transactions (account_id, kind, amount, hold, balance_after, "
            "available_after, memo, created_at) VALUES ($1, 'grant', 10000, 0, 11000, 11000, "
            "'test', now())",
            aid,
        )
        opening = asyncio.create_task(open_session(lg, aid))
        await asyncio.sleep(0.5)
        assert not opening.done()  # waiting for the account's lock
        await tr.commit()
        session = await asyncio.wait_for(opening, 10)
        assert session.reserved_microcredits == STT_MINUTE
        assert (await acct(lg, aid)).available_balance == 11_000 - STT_MINUTE
        await check_invariants(lg, aid)
    finally:
        await admin.close()
        await lg.close()


@pytest.mark.fast
async def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    lg = Ledger(f"sqlite:///{tmp_path}/sub/dir/ledger.db")  # parent directories are created
    try:
        await lg.migrate()
        async with lg.db.engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        await lg.close()
    with pytest.raises(ValueError):
        Ledger("sqlite:///:memory:")
    with pytest.raises(ValueError):
        Ledger("mysql://x/y")


@pytest.mark.fast
@pytest.mark.parametrize("fails", ["before writing", "after writing"])
async def test_sqlite_group_commit_keeps_a_failing_job_out(tmp_path: Path, fails: str) -> None:
    """Write transactions queued together share one COMMIT (writer.py): a job that raises gets
    its exception and leaves no row, whether it failed before or after writing; the others are
    stored, and fewer SQLite transactions than jobs ran."""
    lg = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    await lg.migrate()
    created = now()

    def body(conn: sa.Connection, i: int) -> int:
        if i % 3 == 0 and fails == "before writing":
            raise ValueError(f"job {i} refuses")
        conn.execute(
            sa.insert(accounts).values(
                id=f"acct-{i}",
                wallet_chain="solana",
                wallet_address=f"wallet-{i}",
                credit_balance=0,
                held_microcredits=0,
                created_at=created,
            )
        )
        if i % 3 == 0:
            raise ValueError(f"job {i} refuses")
        return i

    try:
        assert lg.db.writer is not None
        jobs, transactions = lg.db.writer.jobs, lg.db.writer.transactions
        results = await asyncio.gather(
            *(lg.db.write(body, i) for i in range(60)), return_exceptions=True
        )
        for i, result in enumerate(results):
            if i % 3 == 0:
                assert isinstance(result, ValueError) and str(result) == f"job {i} refuses"
            else:
                assert result == i
        stored = {a.id for a in await lg.list_accounts(limit=100)}
        assert stored == {f"acct-{i}" for i in range(60) if i % 3}
        ran = lg.db.writer.jobs - jobs
        if fails == "before writing":  # grouped, and no group had to be run again
            assert ran == 60 and lg.db.writer.transactions - transactions < 60
        else:  # groups with a job that wrote and failed were run again job by job
            assert ran > 60
    finally:
        await lg.close()


@pytest.mark.fast
async def test_sqlite_close_commits_everything_already_submitted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    lg = Ledger(url)
    await lg.migrate()
    account_id = await funded(lg, 10**9)
    opening = [asyncio.ensure_future(open_session(lg, account_id)) for _ in range(5)]
    await asyncio.sleep(0)  # each has handed its transaction to the ledger, none is committed
    await lg.close()
    ids = {(await task).session_id for task in opening}
    async with Ledger(url) as again:
        assert {s.session_id for s in await again.list_sessions(account_id)} == ids
        assert (await again.audit(account_id)).ok


@pytest.mark.fast
async def test_sqlite_wal_is_checkpointed_off_the_write_path(tmp_path: Path) -> None:
    """The writer's COMMITs never checkpoint (wal_autocheckpoint=0); a background thread copies
    the WAL into the database file, so the file grows while the WAL is reused."""
    db = tmp_path / "ledger.db"
    lg = Ledger(f"sqlite:///{db}")
    await lg.migrate()
    try:
        async with lg.db.engine.connect() as conn:  # the tools' engine keeps SQLite's default
            assert (await conn.exec_driver_sql("PRAGMA wal_autocheckpoint")).scalar() == 1000
        assert (
            await lg.db.read(lambda c: c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar()) == 0
        )
        size_before = db.stat().st_size
        account_id = await funded(lg, 10**12)
        await lg.set_limits(account_id, max_concurrent_sessions=10**6)
        await asyncio.gather(*(open_session(lg, account_id) for _ in range(400)))
        for _ in range(50):  # CHECKPOINT_SECONDS is 1
            if db.stat().st_size > size_before:
                break
            await asyncio.sleep(0.1)
        assert db.stat().st_size > size_before
        assert len(await lg.list_sessions(account_id, limit=500)) == 400
    finally:
        await lg.close()


@pytest.mark.fast
def test_session_ids_are_time_ordered_uuid7() -> None:
    ids = []
    for _ in range(3):
        ids.append(uuid7())
        time.sleep(0.002)
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert ids == sorted(ids) and len(set(ids)) == 3  # later ids sort after earlier ones
    stamp_ms = int(ids[0].replace("-", "")[:12], 16)
    assert abs(stamp_ms / 1000 - time.time()) < 5
    assert len({uuid7() for _ in range(10_000)}) == 10_000  # random bits within a millisecond


# ------------------------------------------------------------------------------------ accounts


async def test_unknown_wallet_has_no_account(ledger: Ledger) -> None:
    assert await ledger.get_account("solana", "nobody") is None
    assert await ledger.get_account("evm", "0xnobody") is None
    with pytest.raises(AccountNotFound):
        await open_session(ledger, str(uuid.uuid4()))


async def test_grant_creates_the_account_and_the_view(ledger: Ledger) -> None:
    tx = await ledger.grant("evm", "0xAbCdEf", 250_000, memo="welcome")
    assert (tx.kind, tx.amount, tx.hold, tx.balance_after, tx.memo) == (
        "grant",
        250_000,
        0,
        250_000,
        "welcome",
    )
    again = await ledger.grant("evm", "0xabcdef", 50_000)  # EVM addresses ignore case
    assert again.account_id == tx.account_id
    view = await ledger.get_account("evm", "0xABCDEF")
    assert view is not None
    assert (view.id, view.wallet_address, view.wallet_chain) == (tx.account_id, "0xabcdef", "evm")
    assert (view.credit_balance, view.available_balance) == (300_000, 300_000)
    assert (view.max_concurrent_sessions, view.max_api_rate) == (10, 50)
    assert view.created_at.tzinfo is not None and view.created_at.utcoffset() == timedelta(0)
    assert await ledger.get_account("solana", "0xabcdef") is None  # other chain, other account
    with pytest.raises(ValueError):
        await ledger.grant("evm", "0xabc", 0)
    with pytest.raises(ValueError):
        await ledger.grant("bitcoin", "1abc", 10)
    await check_invariants(ledger, tx.account_id)


async def test_purchase_is_idempotent_by_reference(ledger: Ledger) -> None:
    tx = await ledger.credit_purchase("solana", "Buyer", 100_000, reference="sig-abc")
    assert (tx.kind, tx.amount, tx.reference) == ("purchase", 100_000, "sig-abc")
    with pytest.raises(DuplicatePayment) as e:
        await ledger.credit_purchase("solana", "Buyer", 100_000, reference="sig-abc")
    assert e.value.reference == "sig-abc"
    with pytest.raises(DuplicatePayment):  # the same payment claimed for another wallet
        await ledger.credit_purchase("solana", "Thief", 100_000, reference="sig-abc")
    assert (await ledger.get_account("solana", "Buyer") or _missing()).credit_balance == 100_000
    assert len(await ledger.list_transactions(tx.account_id)) == 1
    await check_invariants(ledger, tx.account_id)


async def test_concurrent_purchases_with_one_reference_credit_once(
    ledgers: list[Ledger],
) -> None:
    calls = [
        ledgers[i % 3].credit_purchase("solana", f"W{i % 4}", 100_000, reference="sig-race")
        for i in range(12)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert len(ok) == 1
    assert all(isinstance(r, DuplicatePayment) for r in results if r not in ok)
    total = 0
    for i in range(4):
        a = await ledgers[0].get_account("solana", f"W{i}")
        total += a.credit_balance if a else 0
    assert total == 100_000


async def test_set_limits(ledger: Ledger) -> None:
    aid = await funded(ledger, 10)
    a = await ledger.set_limits(aid, max_concurrent_sessions=3, max_api_rate=7)
    assert (a.max_concurrent_sessions, a.max_api_rate) == (3, 7)
    with pytest.raises(AccountNotFound):
        await ledger.set_limits(str(uuid.uuid4()), max_api_rate=1)


# ------------------------------------------------------------------------------------ sessions


async def test_open_session_holds_the_reservation(ledger: Ledger) -> None:
    aid = await funded(ledger, 100_000)
    s = await open_session(ledger, aid, minutes=2)
    assert (s.status, s.reserved_microcredits, s.charged_microcredits, s.limit_units) == (
        "active",
        12_000,
        0,
        120,
    )
    a = await acct(ledger, aid)
    assert (a.credit_balance, a.held_microcredits, a.available_balance) == (100_000, 12_000, 88_000)
    reserve = (await ledger.list_transactions(aid))[0]
    assert (reserve.kind, reserve.amount, reserve.hold, reserve.session_id) == (
        "reserve",
        0,
        12_000,
        s.session_id,
    )
    assert (reserve.balance_after, reserve.available_after) == (100_000, 88_000)
    assert await ledger.get_session(s.session_id) == s
    assert await ledger.get_session(str(uuid.uuid4())) is None
    await check_invariants(ledger, aid)


async def test_insufficient_credits_changes_nothing(ledger: Ledger) -> None:
    aid = await funded(ledger, 10_000)
    await open_session(ledger, aid, minutes=1)  # 6000 held, 4000 available
    with pytest.raises(InsufficientCredits) as e:
        await open_session(ledger, aid, minutes=1)
    assert (e.value.needed, e.value.available) == (6000, 4000)
    assert len(await ledger.list_sessions(aid)) == 1
    assert len(await ledger.list_transactions(aid)) == 2
    await check_invariants(ledger, aid)


async def test_session_arguments_are_validated(ledger: Ledger) -> None:
    aid = await funded(ledger, 100_000)
    exp = now() + timedelta(minutes=1)
    with pytest.raises(ValueError):
        await ledger.open_session(aid, SessionSpec("video", 1000, 60, exp, NODE, "https://n"))
    with pytest.raises(ValueError):
        await ledger.open_session(aid, SessionSpec("stt", 0, 60, exp, NODE, "https://n"))
    with pytest.raises(ValueError):  # naive datetime
        await ledger.open_session(
            aid, SessionSpec("stt", 6000, 60, datetime.now(), NODE, "https://n")
        )


async def test_timestamps_are_timezone_aware_utc(ledger: Ledger) -> None:
    aid = await funded(ledger, 100_000)
    plus2 = timezone(timedelta(hours=2))
    expires = datetime(2031, 5, 6, 12, 30, 15, 123456, tzinfo=plus2)
    s = await ledger.open_session(
        aid,
        SessionSpec("tts", 8000, 1000, expires, NODE, "https://n", metadata={"voice": "af_heart"}),
    )
    got = await ledger.get_session(s.session_id)
    assert got is not None
    assert got.token_expires_at == expires and got.token_expires_at.tzinfo == UTC
    assert got.token_expires_at.hour == 10
    assert got.started_at.tzinfo == UTC
    assert got.metadata == {"voice": "af_heart"}


async def test_usage_is_cumulative_monotonic_and_capped(ledger: Ledger) -> None:
    aid = await funded(ledger, 100_000)
    s = await open_session(ledger, aid, minutes=1)  # 60 s, 6000 reserved
    r = await ledger.record_usage(s.session_id, NODE, 30)
    assert (r.changed, r.usage_units, r.charged_microcredits, r.settled) == (True, 30, 3000, False)
    r = await ledger.record_usage(s.session_id, NODE, 20)  # lower total: ignored, no refund
    assert (r.changed, r.usage_units, r.charged_microcredits) == (False, 30, 3000)
    r = await ledger.record_usage(s.session_id, NODE, 90)  # beyond what was bought
    assert (r.usage_units, r.charged_microcredits) == (90, 6000)
    assert (r.overage_units, r.overage_microcredits) == (30, 3000)
    # no money moves before settlement: the whole reservation stays held
    a = await acct(ledger, aid)
    assert (a.credit_balance, a.available_balance) == (100_000, 94_000)
    r = await ledger.record_usage(s.session_id, NODE, 90, final=True)
    assert (r.status, r.charged_microcredits, r.refunded_microcredits) == ("completed", 6000, 0)
    a = await acct(ledger, aid)
    assert (a.credit_balance, a.available_balance) == (94_000, 94_000)
    kinds = [t.kind for t in await ledger.list_transactions(aid)]
    assert kinds == ["charge", "reserve", "grant"]  # nothing left to refund: no refund row
    await check_invariants(ledger, aid)


@pytest.mark.parametrize(
    "service,minutes_or_chars,used,charge",
    [
        ("stt", 2, 35, 3500),
        ("webrtc", 3, 61, 1017),
        ("tts", 10_000, 1234, 9872),
    ],
)
async def test_final_report_settles_exactly_once(
    ledger: Ledger, service: str, minutes_or_chars: int, used: int, charge: int
) -> None:
    aid = await funded(ledger, 1_000_000)
    if service == "tts":
        reserve, limit = pricing.cost("tts", minutes_or_chars), minutes_or_chars
    else:
        reserve = pricing.reservation_for_minutes(service, minutes_or_chars)
        limit = minutes_or_chars * 60
    s = await ledger.open_session(
        aid, SessionSpec(service, reserve, limit, now() + timedelta(minutes=5), NODE, "https://n")
    )
    r = await ledger.record_usage(s.session_id, NODE, used, final=True)
    assert (r.settled, r.changed, r.status) == (True, True, "completed")
    assert (r.charged_microcredits, r.refunded_microcredits) == (charge, reserve - charge)
    settled = await ledger.get_session(s.session_id)
    assert settled is not None and settled.ended_at is not None
    assert settled.usage_units == used
    again = await ledger.record_usage(s.session_id, NODE, used * 2, final=True)
    assert again.changed is False
    assert (again.charged_microcredits, again.refunded_microcredits, again.status) == (
        charge,
        reserve - charge,
        "completed",
    )
    late = await ledger.record_usage(s.session_id, NODE, used * 3)
    assert late.changed is False and late.charged_microcredits == charge
    txs = await ledger.list_transactions(aid)
    assert [(t.kind, t.amount, t.hold) for t in txs[:2]] == [
        ("refund", 0, -(reserve - charge)),
        ("charge", -charge, -charge),
    ]
    a = await acct(ledger, aid)
    assert (a.credit_balance, a.available_balance) == (1_000_000 - charge, 1_000_000 - charge)
    await check_invariants(ledger, aid)


async def test_concurrent_final_reports_settle_once(ledgers: list[Ledger]) -> None:
    aid = await funded(ledgers[0], 100_000)
    s = await open_session(ledgers[0], aid, minutes=2)
    results = await asyncio.gather(
        *(ledgers[i % 3].record_usage(s.session_id, NODE, 30 + i, final=True) for i in range(15))
    )
    assert sum(r.changed for r in results) == 1
    winner = next(r for r in results if r.changed)
    assert all(r.charged_microcredits == winner.charged_microcredits for r in results)
    txs = await ledgers[0].list_transactions(aid)
    assert [t.kind for t in txs].count("charge") == 1
    assert [t.kind for t in txs].count("refund") == 1
    await check_invariants(ledgers[0], aid)


async def test_only_the_sessions_node_may_report(ledger: Ledger) -> None:
    aid = await funded(ledger, 100_000)
    s = await open_session(ledger, aid)
    with pytest.raises(NotSessionNode):
        await ledger.record_usage(s.session_id, OTHER_NODE, 10, final=True)
    with pytest.raises(UnknownSession):
        await ledger.record_usage(str(uuid.uuid4()), NODE, 10)
    assert (await sess(ledger, s.session_id)).status == "active"
    with pytest.raises(ValueError):
        await ledger.record_usage(s.session_id, NODE, -1)


async def test_extend(ledger: Ledger) -> None:
    aid = await funded(ledger, 20_000)
    s = await open_session(ledger, aid, minutes=1)
    new_exp = s.token_expires_at + timedelta(minutes=1)
    e = await ledger.extend(s.session_id, 60, token_expires_at=new_exp)
    assert (e.reserved_microcredits, e.limit_units, e.token_expires_at) == (12_000, 120, new_exp)
    assert (await acct(ledger, aid)).available_balance == 8_000
    tx = (await ledger.list_transactions(aid))[0]
    assert (tx.kind, tx.amount, tx.hold, tx.session_id) == ("reserve", 0, 6000, s.session_id)
    with pytest.raises(InsufficientCredits) as err:
        await ledger.extend(s.session_id, 120)  # 12000 > 8000
    assert (err.value.needed, err.value.available) == (12_000, 8_000)
    same = await ledger.get_session(s.session_id)
    assert same is not None and same.reserved_microcredits == 12_000
    # usage across the extension is charged against the whole reservation
    r = await ledger.record_usage(s.session_id, NODE, 100, final=True)
    assert (r.charged_microcredits, r.refunded_microcredits) == (10_000, 2_000)
    with pytest.raises(SessionClosed):
        await ledger.extend(s.session_id, 60)
    with pytest.raises(UnknownSession):
        await ledger.extend(str(uuid.uuid4()), 60)
    await check_invariants(ledger, aid)


async def test_sweep_settles_expired_sessions(ledger: Ledger) -> None:
    aid = await funded(ledger, 100_000)
    t = now()
    expired = await open_session(ledger, aid, minutes=2, expires_in=timedelta(seconds=-90))
    recent = await open_session(ledger, aid, minutes=1, expires_in=timedelta(seconds=-10))
    live = await open_session(ledger, aid, minutes=1, expires_in=timedelta(minutes=5))
    await ledger.record_usage(expired.session_id, NODE, 50)
    done = await ledger.sweep(t, grace=timedelta(seconds=30))
    assert [r.session_id for r in done] == [expired.session_id]
    r = done[0]
    assert (r.status, r.charged_microcredits, r.refunded_microcredits) == ("expired", 5000, 7000)
    got = await ledger.get_session(expired.session_id)
    assert got is not None and got.status == "expired" and got.ended_at is not None
    assert await ledger.sweep(t, grace=timedelta(seconds=30)) == []  # idempotent
    # the recent one is settled once its grace has passed; the live one is left alone
    later = await ledger.sweep(t + timedelta(seconds=30), grace=timedelta(seconds=30))
    assert [r.session_id for r in later] == [recent.session_id]
    assert later[0].charged_microcredits == 0 and later[0].refunded_microcredits == 6000
    assert (await sess(ledger, live.session_id)).status == "active"
    # a final report after the sweep changes nothing
    late = await ledger.record_usage(expired.session_id, NODE, 100, final=True)
    assert late.changed is False and late.status == "expired"
    a = await acct(ledger, aid)
    assert (a.credit_balance, a.available_balance) == (95_000, 89_000)
    await check_invariants(ledger, aid)


async def test_sweep_skips_a_session_extended_past_its_expiry(ledger: Ledger) -> None:
    aid = await funded(ledger, 100_000)
    s = await open_session(ledger, aid, expires_in=timedelta(seconds=-120))
    await ledger.extend(s.session_id, 60, token_expires_at=now() + timedelta(minutes=1))
    assert await ledger.sweep(grace=timedelta(0)) == []


async def test_concurrent_sweepers_settle_each_session_once(ledgers: list[Ledger]) -> None:
    accounts = [await funded(ledgers[0], 1_000_000) for _ in range(4)]
    sessions = []
    for i in range(24):
        s = await open_session(ledgers[0], accounts[i % 4], expires_in=timedelta(seconds=-120))
        await ledgers[0].record_usage(s.session_id, NODE, i)
        sessions.append(s.session_id)
    t = now()
    rounds = await asyncio.gather(
        *(lg.sweep(t, grace=timedelta(seconds=60)) for lg in ledgers for _ in range(2))
    )
    settled = [r.session_id for results in rounds for r in results]
    assert len(settled) == len(set(settled))
    settled += [r.session_id for r in await ledgers[0].sweep(t, grace=timedelta(seconds=60))]
    assert sorted(settled) == sorted(sessions)
    for aid in accounts:
        txs = await ledgers[0].list_transactions(aid, limit=1000)
        assert [t.kind for t in txs].count("refund") == 6
        await check_invariants(ledgers[0], aid)


# ------------------------------------------------------------------------------------ concurrency


async def test_50_concurrent_sessions_against_a_balance_for_10(ledgers: list[Ledger]) -> None:
    aid = await funded(ledgers[0], 10 * STT_MINUTE)
    await ledgers[0].set_limits(aid, max_concurrent_sessions=1000)
    results = await asyncio.gather(
        *(open_session(ledgers[i % 3], aid, minutes=1) for i in range(50)),
        return_exceptions=True,
    )
    created = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(created) == 10
    assert all(isinstance(e, InsufficientCredits) for e in failed), failed[:3]
    a = await acct(ledgers[1], aid)
    assert (a.credit_balance, a.available_balance) == (60_000, 0)
    assert len(await ledgers[2].list_sessions(aid, status="active")) == 10
    await check_invariants(ledgers[0], aid)


async def test_concurrent_session_limit_holds_under_concurrency(ledgers: list[Ledger]) -> None:
    aid = await funded(ledgers[0], 100 * STT_MINUTE)
    results = await asyncio.gather(
        *(open_session(ledgers[i % 3], aid) for i in range(50)), return_exceptions=True
    )
    created = [r for r in results if not isinstance(r, BaseException)]
    assert len(created) == 10  # the default limit
    limits = [r for r in results if isinstance(r, ConcurrencyLimit)]
    assert len(limits) == 40 and limits[0].limit == 10
    # settling one frees a slot
    await ledgers[0].record_usage(created[0].session_id, NODE, 5, final=True)
    await open_session(ledgers[1], aid)
    with pytest.raises(ConcurrencyLimit):
        await open_session(ledgers[2], aid)
    await check_invariants(ledgers[0], aid)


# ------------------------------------------------------------------------------------ bundles


def bundle_specs(minutes: int = 5, chars: int = 10_000, dual: bool = True) -> list[SessionSpec]:
    exp = now() + timedelta(minutes=minutes)
    specs = [
        SessionSpec(
            "webrtc",
            pricing.reservation_for_minutes("webrtc", minutes),
            minutes * 60,
            exp,
            NODE,
            "wss://sfu",
            room_name="room",
            participant_identity="agent",
        ),
        SessionSpec(
            "stt",
            pricing.reservation_for_minutes("stt", minutes),
            minutes * 60,
            exp,
            NODE,
            "https://stt",
        ),
        SessionSpec("tts", pricing.cost("tts", chars), chars, exp, OTHER_NODE, "https://tts"),
    ]
    if dual:
        specs.insert(
            1,
            SessionSpec(
                "webrtc",
                pricing.reservation_for_minutes("webrtc", minutes),
                minutes * 60,
                exp,
                OTHER_NODE,
                "wss://sfu2",
                room_name="room",
                participant_identity="user-42",
            ),
        )
    return specs


async def test_bundle_is_created_all_or_nothing(ledger: Ledger) -> None:
    cost = 5 * 1000 * 2 + 5 * 6000 + 80_000  # 120000: two webrtc, stt, tts
    aid = await funded(ledger, cost + 100)
    b = await ledger.create_bundle(aid, bundle_specs())
    assert len(b.sessions) == 4 and {s.bundle_id for s in b.sessions} == {b.bundle_id}
    listed = await ledger.list_bundle(b.bundle_id)
    assert sorted(s.session_id for s in listed) == sorted(s.session_id for s in b.sessions)
    assert (await acct(ledger, aid)).available_balance == 100
    before = await ledger.list_transactions(aid, limit=100)
    with pytest.raises(InsufficientCredits):
        await ledger.create_bundle(aid, bundle_specs(minutes=1, chars=0 + 1))
    assert len(await ledger.list_sessions(aid, limit=100)) == 4
    assert await ledger.list_transactions(aid, limit=100) == before
    assert await ledger.list_bundle(str(uuid.uuid4())) == []
    await check_invariants(ledger, aid)


async def test_extend_bundle_is_all_or_nothing(ledger: Ledger) -> None:
    aid = await funded(ledger, 200_000)
    b = await ledger.create_bundle(aid, bundle_specs(dual=False))  # 5000 + 30000 + 80000
    web, stt, tts = b.sessions
    exp = web.token_expires_at + timedelta(minutes=2)
    exts = [
        Extension(web.session_id, 120, exp),
        Extension(stt.session_id, 120, exp),
        Extension(tts.session_id, 0, exp),
    ]
    out = await ledger.extend_bundle(b.bundle_id, exts)
    assert [s.reserved_microcredits for s in out] == [7000, 42_000, 80_000]
    assert all(s.token_expires_at == exp for s in out)
    assert (await acct(ledger, aid)).available_balance == 71_000
    too_much = [Extension(stt.session_id, 60), Extension(tts.session_id, 10_000)]  # 6000+80000
    with pytest.raises(InsufficientCredits):
        await ledger.extend_bundle(b.bundle_id, too_much)
    assert (await sess(ledger, stt.session_id)).reserved_microcredits == 42_000
    other = await open_session(ledger, aid)
    with pytest.raises(UnknownSession):  # not a session of this bundle
        await ledger.extend_bundle(b.bundle_id, [Extension(other.session_id, 60)])
    await check_invariants(ledger, aid)


async def test_a_bundle_counts_once_toward_the_session_limit(ledger: Ledger) -> None:
    aid = await funded(ledger, 1_000_000)
    await ledger.set_limits(aid, max_concurrent_sessions=2)
    await ledger.create_bundle(aid, bundle_specs())
    await ledger.create_bundle(aid, bundle_specs())
    with pytest.raises(ConcurrencyLimit):
        await ledger.create_bundle(aid, bundle_specs())
    with pytest.raises(ConcurrencyLimit):
        await open_session(ledger, aid)


async def test_a_session_joining_an_open_bundle_takes_no_new_slot(ledger: Ledger) -> None:
    aid = await funded(ledger, 1_000_000)
    await ledger.set_limits(aid, max_concurrent_sessions=1)
    b = await ledger.create_bundle(aid, bundle_specs(dual=False))
    joined = await open_session(ledger, aid, bundle_id=b.bundle_id)  # the bundle's one slot
    assert joined.bundle_id == b.bundle_id
    with pytest.raises(ConcurrencyLimit):  # a bundle of its own needs a second slot
        await ledger.create_bundle(aid, bundle_specs(dual=False), bundle_id=str(uuid.uuid4()))
    with pytest.raises(ConcurrencyLimit):
        await open_session(ledger, aid)
    for s in [*b.sessions, joined]:
        await ledger.record_usage(s.session_id, s.node_pubkey, 1, final=True)
    await check_invariants(ledger, aid)
    assert (await ledger.audit(aid)).active_sessions == 0
    await open_session(ledger, aid)


async def test_a_bundle_frees_its_slot_when_its_last_session_settles(ledger: Ledger) -> None:
    """The account's counter of active sessions follows settlement: a bundle stays one active
    session until its last member is settled (by a final report or by the sweeper)."""
    aid = await funded(ledger, 1_000_000)
    await ledger.set_limits(aid, max_concurrent_sessions=2)
    first = await ledger.create_bundle(aid, bundle_specs(dual=False))
    single = await open_session(ledger, aid, expires_in=timedelta(hours=1))  # not swept below
    with pytest.raises(ConcurrencyLimit):
        await open_session(ledger, aid)
    webrtc, stt, tts = first.sessions
    await ledger.record_usage(webrtc.session_id, NODE, 30, final=True)
    await ledger.record_usage(tts.session_id, OTHER_NODE, 500, final=True)
    with pytest.raises(ConcurrencyLimit):  # the bundle's stt session is still active
        await open_session(ledger, aid)
    await check_invariants(ledger, aid)
    swept = await ledger.sweep(stt.token_expires_at + timedelta(minutes=2))
    assert [r.session_id for r in swept] == [stt.session_id]
    await check_invariants(ledger, aid)
    replacement = await open_session(ledger, aid)  # the bundle's slot is free again
    with pytest.raises(ConcurrencyLimit):
        await open_session(ledger, aid)
    await ledger.record_usage(single.session_id, NODE, 10, final=True)
    await ledger.record_usage(single.session_id, NODE, 10, final=True)  # a repeat counts nothing
    await open_session(ledger, aid)
    await check_invariants(ledger, aid)
    assert (await ledger.audit(aid)).active_sessions == 2 and replacement.status == "active"


# ------------------------------------------------------------------------------------ reads


async def test_listing_and_pagination(ledger: Ledger) -> None:
    aid = await funded(ledger, 100_000)
    made = [
        await open_session(ledger, aid, service=svc) for svc in ("stt", "webrtc", "stt", "webrtc")
    ]
    await ledger.record_usage(made[0].session_id, NODE, 10, final=True)
    txs = await ledger.list_transactions(aid, limit=3)
    assert [t.kind for t in txs] == ["refund", "charge", "reserve"]
    assert [t.id for t in txs] == sorted((t.id for t in txs), reverse=True)
    rest = await ledger.list_transactions(aid, limit=50, offset=3)
    assert [t.kind for t in rest] == ["reserve", "reserve", "reserve", "grant"]
    assert len(await ledger.list_sessions(aid, status="active")) == 3
    completed = await ledger.list_sessions(aid, status="completed")
    assert [s.session_id for s in completed] == [made[0].session_id]
    page = await ledger.list_sessions(aid, limit=2, offset=1)
    assert len(page) == 2
    assert (
        set(completed[0].public())
        == set(PUBLIC_SESSION_FIELDS)
        == {
            "session_id",
            "service",
            "bundle_id",
            "status",
            "room_name",
            "server_url",
            "reserved_microcredits",
            "charged_microcredits",
            "token_expires_at",
            "started_at",
            "ended_at",
        }
    )
    assert await ledger.list_transactions(str(uuid.uuid4())) == []
    with pytest.raises(ValueError):
        await ledger.list_sessions(aid, status="paused")
    with pytest.raises(ValueError):
        await ledger.list_transactions(aid, limit=0)


# ------------------------------------------------------------------------------------ invariant


async def test_random_operations_keep_the_balance_equal_to_its_transactions(
    ledgers: list[Ledger],
) -> None:
    """A seeded random mix of every operation, partly concurrent, then the invariants."""
    rng = random.Random(1234)
    lg = ledgers[0]
    accounts = [await funded(lg, rng.randrange(1, 60_000)) for _ in range(3)]
    for aid in accounts:
        await lg.set_limits(aid, max_concurrent_sessions=6)
    active: list[tuple[str, str]] = []  # (session id, account id)
    expected = (InsufficientCredits, ConcurrencyLimit, SessionClosed)

    async def step(i: int) -> None:
        db = ledgers[i % 3]
        op = rng.random()
        aid = rng.choice(accounts)
        try:
            if op < 0.1:
                await db.grant(
                    "solana", (await acct(db, aid)).wallet_address, rng.randrange(1, 20_000)
                )
            elif op < 0.45:
                s = await open_session(
                    db,
                    aid,
                    service=rng.choice(("stt", "webrtc")),
                    minutes=rng.randrange(1, 4),
                    expires_in=timedelta(seconds=rng.randrange(-100, 100)),
                )
                active.append((s.session_id, aid))
            elif op < 0.6 and active:
                sid, _ = rng.choice(active)
                await db.extend(sid, rng.randrange(0, 120))
            elif op < 0.85 and active:
                sid, _ = rng.choice(active)
                await db.record_usage(sid, NODE, rng.randrange(0, 300), final=rng.random() < 0.5)
            else:
                await db.sweep(grace=timedelta(seconds=rng.randrange(0, 60)))
        except expected:
            pass

    for batch in range(8):
        await asyncio.gather(*(step(batch * 10 + j) for j in range(10)))
        for aid in accounts:
            await check_invariants(lg, aid)
    await lg.sweep(now() + timedelta(hours=1))
    for aid in accounts:
        a = await lg.get_account_by_id(aid)
        assert a is not None and a.held_microcredits == 0
        await check_invariants(lg, aid)
