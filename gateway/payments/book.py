"""Payment records: what the gateway sent to a chain, and whether it has been credited (the
payment state machine; ``service.py`` drives it). The records live in the ledger's database and
a credit is written in the same transaction as the ledger's ``purchase`` row (``post_credit``).

One row per on-chain payment in ``payments`` (revision 0002), keyed by its chain reference
(``signature``: the Solana transaction signature, or the EVM authorization's identity), unique.
States::

    pending    recorded before the transaction is sent (so a crash after sending is recoverable)
    confirmed  the chain confirmed it; not credited yet
    credited   credited, in the same database transaction that set this status and wrote the
               ``purchase`` row whose reference is the same signature (so: exactly once)
    failed     the chain says it failed, or it expired without landing: nothing is credited

A payment the chain refused outright (preflight, nothing landed) is deleted again rather than
kept as failed, so the payer may submit it once more. Rows move only forward, and each move is
conditional on the status it moves from, so the request that settles a payment and the
reconciler that recovers it after a crash can race without crediting twice.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from gateway.ledger import DuplicatePayment, Ledger, LedgerError, Transaction
from gateway.ledger.ledger import wallet
from gateway.ledger.models import payments
from gateway.ledger.prepared import Prepared
from gateway.ledger.records import Credit, from_row

PENDING, CONFIRMED, CREDITED, FAILED = "pending", "confirmed", "credited", "failed"
UNSETTLED = (PENDING, CONFIRMED)


class PaymentStateError(LedgerError):
    """A payment is not in a state that allows the requested move (e.g. credit a failed one)."""

    http_status = 409

    def __init__(self, signature: str, status: str, wanted: str) -> None:
        super().__init__(f"payment {signature} is {status}; cannot mark it {wanted}")
        self.signature = signature
        self.status = status


@dataclass(frozen=True)
class PaymentRecord:
    """One row of ``payments``: a wallet's transfer as the chain and the ledger last saw it, kept
    from first sight so that a crash between settling and crediting loses nothing."""

    id: str
    chain: str
    signature: str
    status: str
    amount_microcredits: int
    wallet_address: str
    account_id: str | None
    detail: dict[str, Any]
    created_at: datetime
    updated_at: datetime


def _record(row: Any) -> PaymentRecord:
    return from_row(PaymentRecord, row, detail=dict(row["detail"] or {}))


_BY_SIGNATURE = Prepared(
    sa.select(payments).where(payments.c.signature == sa.bindparam("signature"))
)


class PaymentBook:
    """Payment records on a ``Ledger``'s database (same engine, same locking rules)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def get(self, signature: str) -> PaymentRecord | None:
        row = await self.ledger.db.first(_BY_SIGNATURE, {"signature": signature})
        return _record(row) if row else None

    async def record_pending(
        self,
        chain: str,
        signature: str,
        microcredits: int,
        wallet_address: str,
        detail: dict[str, Any],
    ) -> PaymentRecord:
        """Claim ``signature`` before sending it; DuplicatePayment if it was ever claimed."""
        chain, address = wallet(chain, wallet_address)
        if isinstance(microcredits, bool) or not isinstance(microcredits, int) or microcredits <= 0:
            raise ValueError(f"microcredits must be a positive int, got {microcredits!r}")
        now = self.ledger.now()

        def body(conn: sa.Connection) -> Any:
            return (
                conn.execute(
                    sa.insert(payments)
                    .values(
                        id=str(uuid.uuid4()),
                        chain=chain,
                        signature=signature,
                        status=PENDING,
                        amount_microcredits=microcredits,
                        wallet_address=address,
                        account_id=None,
                        detail=detail,
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(*payments.c)
                )
                .mappings()
                .one()
            )

        try:
            row = await self.ledger.db.write(body)
        except IntegrityError:
            raise DuplicatePayment(signature) from None
        return _record(row)

    async def _move(
        self, signature: str, to: str, from_: tuple[str, ...], detail: dict[str, Any] | None = None
    ) -> PaymentRecord | None:
        now = self.ledger.now()

        def body(conn: sa.Connection) -> Any:
            row = _BY_SIGNATURE.first(conn, {"signature": signature})
            if row is None or row["status"] not in from_:
                return None
            values: dict[str, Any] = {"status": to, "updated_at": now}
            if detail:
                values["detail"] = {**(row["detail"] or {}), **detail}
            return (
                conn.execute(
                    sa.update(payments)
                    .where(payments.c.id == row["id"], payments.c.status == row["status"])
                    .values(**values)
                    .returning(*payments.c)
                )
                .mappings()
                .first()
            )

        new = await self.ledger.db.write(body)
        return _record(new) if new else None

    async def mark_confirmed(self, signature: str, **detail: Any) -> PaymentRecord | None:
        """pending -> confirmed; None if it was not pending."""
        return await self._move(signature, CONFIRMED, (PENDING,), detail)

    async def annotate(self, signature: str, **detail: Any) -> PaymentRecord | None:
        """Add to an unsettled record's detail (e.g. the EVM transaction hash once sent)."""
        rec = await self.get(signature)
        if rec is None or rec.status not in UNSETTLED:
            return None
        return await self._move(signature, rec.status, (rec.status,), detail)

    async def mark_failed(self, signature: str, error: str) -> PaymentRecord | None:
        """pending/confirmed -> failed (never a credited one); None if not unsettled."""
        return await self._move(signature, FAILED, UNSETTLED, {"error": error})

    async def forget(self, signature: str) -> bool:
        """Delete a pending record whose transaction never reached the chain."""

        def body(conn: sa.Connection) -> int:
            return conn.execute(
                sa.delete(payments).where(
                    payments.c.signature == signature, payments.c.status == PENDING
                )
            ).rowcount

        return bool(await self.ledger.db.write(body))

    async def credit(
        self, signature: str, memo: str | None = None
    ) -> tuple[PaymentRecord, Transaction]:
        """Credit a confirmed (or pending, when the caller saw the confirmation) payment to the
        wallet that paid: one database transaction writes the ``purchase`` row (reference = the
        signature), the balance and the status ``credited``. DuplicatePayment if it was credited
        already; PaymentStateError if it failed."""
        now = self.ledger.now()
        ledger = self.ledger

        def body(conn: sa.Connection) -> tuple[PaymentRecord, Transaction]:
            stmt = sa.select(payments).where(payments.c.signature == signature)
            row = conn.execute(ledger.db.for_update(stmt)).mappings().first()
            if row is None:
                raise PaymentStateError(signature, "unknown", CREDITED)
            if row["status"] == CREDITED:
                raise DuplicatePayment(signature)
            if row["status"] not in UNSETTLED:
                raise PaymentStateError(signature, row["status"], CREDITED)
            credit = Credit(
                "purchase",
                row["chain"],
                row["wallet_address"],
                row["amount_microcredits"],
                signature,
                memo,
            )
            tx = ledger.post_credit(conn, credit, now)
            new = (
                conn.execute(
                    sa.update(payments)
                    .where(payments.c.id == row["id"])
                    .values(status=CREDITED, account_id=tx.account_id, updated_at=now)
                    .returning(*payments.c)
                )
                .mappings()
                .one()
            )
            return _record(new), tx

        return await ledger.write_credit(body, signature)

    async def unsettled(
        self, older_than: timedelta | None = None, limit: int = 500
    ) -> list[PaymentRecord]:
        """Pending and confirmed payments (oldest first), optionally only those not touched for
        ``older_than`` (a live request is still working on younger ones)."""
        stmt = sa.select(payments).where(payments.c.status.in_(UNSETTLED))
        if older_than is not None:
            stmt = stmt.where(payments.c.updated_at <= self.ledger.now() - older_than)
        rows = await self.ledger.db.all(stmt.order_by(payments.c.created_at).limit(limit))
        return [_record(r) for r in rows]

    async def count_by_status(self) -> dict[str, int]:
        rows = await self.ledger.db.all(
            sa.select(payments.c.status, sa.func.count().label("n")).group_by(payments.c.status)
        )
        return {r["status"]: int(r["n"]) for r in rows}
