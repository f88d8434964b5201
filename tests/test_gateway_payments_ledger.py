"""Payment records on both databases (SQLite and PostgreSQL): a payment is claimed once and
credited once, even when several gateway processes (separate engines) race on it."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.ledger import DuplicatePayment, Ledger
from gateway.payments.book import PaymentBook, PaymentStateError


async def test_claim_and_credit_exactly_once_across_processes(db_url: str) -> None:
    lgs = [Ledger(db_url) for _ in range(3)]
    try:
        await lgs[0].migrate()
        books = [PaymentBook(lg) for lg in lgs]
        sig, wallet = f"sig-{uuid.uuid4().hex}", f"wallet-{uuid.uuid4().hex}"
        claims = await asyncio.gather(
            *(
                b.record_pending("solana", sig, 500_000, wallet, {"n": i})
                for i, b in enumerate(books)
            ),
            return_exceptions=True,
        )
        assert sum(not isinstance(c, Exception) for c in claims) == 1
        assert sum(isinstance(c, DuplicatePayment) for c in claims) == 2
        assert (await books[1].mark_confirmed(sig, slot=7)).status == "confirmed"
        credits = await asyncio.gather(
            *(b.credit(sig, memo="t") for b in books), return_exceptions=True
        )
        ok = [c for c in credits if not isinstance(c, Exception)]
        assert len(ok) == 1 and sum(isinstance(c, DuplicatePayment) for c in credits) == 2
        rec, tx = ok[0]
        assert rec.status == "credited" and rec.detail["slot"] == 7
        assert (tx.kind, tx.amount, tx.reference) == ("purchase", 500_000, sig)
        account = await lgs[2].get_account("solana", wallet)
        assert account is not None and account.credit_balance == 500_000
        assert (await lgs[0].audit(account.id)).ok
        # A credited payment never moves back, nor fails; the ledger's own guard agrees.
        assert await books[0].mark_failed(sig, "late") is None
        assert not await books[0].forget(sig)
        with pytest.raises(DuplicatePayment):
            await lgs[0].credit_purchase("solana", wallet, 500_000, sig)
    finally:
        for lg in lgs:
            await lg.close()


async def test_failed_and_forgotten_payments_credit_nothing(db_url: str) -> None:
    async with Ledger(db_url) as lg:
        await lg.migrate()
        book = PaymentBook(lg)
        await book.record_pending("evm", "ref-1", 100_000, "0xABCDEF", {})
        assert (await book.mark_failed("ref-1", "reverted")).detail["error"] == "reverted"
        with pytest.raises(PaymentStateError):
            await book.credit("ref-1")
        await book.record_pending("solana", "ref-2", 100_000, "W", {})
        assert await book.forget("ref-2") and await book.get("ref-2") is None
        await book.record_pending("solana", "ref-2", 100_000, "W", {})  # may be submitted again
        assert [r.signature for r in await book.unsettled()] == ["ref-2"]
        assert await lg.get_account("evm", "0xabcdef") is None
        assert await book.count_by_status() == {"failed": 1, "pending": 1}
