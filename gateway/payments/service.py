"""Credit purchases: from a verified payment to credits, exactly once, surviving crashes.

Solana (x402 exact): verify -> co-sign -> record ``pending`` (the signed transaction included) ->
send -> confirm -> ``confirmed`` -> credit (one database transaction with the status
``credited``). The record is written before the transaction is sent, so whatever happens after,
the reconciler can ask the chain (the truth) at the next start or loop: landed and succeeded ->
credit; landed and failed -> ``failed``; not landed and its blockhash expired -> ``failed`` (it
can never land); not landed yet -> send it again (the same signature lands at most once).
A transaction the chain refused at preflight never landed: its record is deleted again.

Replays: the fee payer's signature is deterministic, so the same transaction always gets the same
signature, the record's unique key; a second submission is refused by a read first and, when two
race, by the unique insert. EVM (EIP-3009) follows the same states keyed by (token, from, nonce).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.transaction import VersionedTransaction

from common.tasks import stop_tasks
from gateway.ledger import DuplicatePayment, Ledger, pricing
from registry.client import LAMPORTS_PER_SOL, is_local_rpc
from registry.keys import load_keypair, load_or_create_keypair
from registry.usdc import to_atomic

from . import evm, svm
from .book import CREDITED, FAILED, PaymentBook, PaymentRecord
from .challenges import MppChallenges
from .config import EVM_V1_NAMES, SOLANA_V1_NAMES, PaymentsConfig
from .solana import (
    MintInfo,
    RpcRefused,
    RpcUnavailable,
    SolanaRpc,
    cosign,
    ensure_token_account,
    read_mint,
)
from .x402 import Offer, PaymentInvalid, PaymentPayload

log = logging.getLogger("gateway.payments")


class SettlementUnavailable(Exception):
    """The chain could not be reached before anything was sent: nothing happened (503)."""


class SettlementPending(Exception):
    """Sent, not confirmed in time: it will be credited when the chain confirms it (504)."""

    def __init__(self, message: str, reference: str) -> None:
        super().__init__(message)
        self.reference = reference


@dataclass(frozen=True)
class Purchase:
    """A settled, credited purchase: what the buyer is told (credits, amount, transaction)."""

    account_id: str
    credited_microcredits: int
    amount_usd: Decimal
    transaction: str
    network: str
    payer: str
    amount_atomic: int


@dataclass(frozen=True)
class _Order:
    """One purchase on its way through settlement: who asked for how much, and how they paid."""

    wallet_chain: str
    wallet_address: str
    amount_usd: Decimal
    micro: int  # the credits it buys
    payload: PaymentPayload
    offer: Offer

    def purchase(self, rec: PaymentRecord, transaction: str, payer: str) -> Purchase:
        return Purchase(
            rec.account_id or "",
            rec.amount_microcredits,
            self.amount_usd,
            transaction,
            self.payload.network,
            payer,
            self.offer.amount,
        )


def _replay(rec: PaymentRecord) -> PaymentInvalid:
    state = {CREDITED: "was already credited", FAILED: "already failed"}.get(
        rec.status, "is already being settled"
    )
    return PaymentInvalid(
        "duplicate_settlement",
        f"replayed payment: transaction {rec.signature} {state}; a payment is "
        "credited once (sign a new one to buy more)",
    )


class PaymentService:
    def __init__(self, cfg: PaymentsConfig, gateway_rpc_url: str, ledger: Ledger) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.book = PaymentBook(ledger)
        s = cfg.solana
        self.sol_rpc = SolanaRpc(s.rpc_url or gateway_rpc_url)
        self.fee_payer: Keypair | None = None
        self.pay_to: Pubkey | None = None
        self.mint: MintInfo | None = None
        self.solana_error: str | None = "not started"
        self.evm = evm.EvmSettler(
            cfg.evm.rpc_url,
            cfg.evm.relayer_key_file,
            cfg.evm.chain_id,
            cfg.evm.confirm_timeout_seconds,
        )
        self.mpp = MppChallenges(cfg.mpp)
        self._last_start = 0.0
        self._task: asyncio.Task[None] | None = None
        # Tests only: runs after the chain confirmed a payment and before it is credited.
        self.after_confirm: Callable[[str], Awaitable[None]] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self, background: bool = True) -> None:
        await self.ledger.migrate()
        s = self.cfg.solana
        if s.enabled:
            self._last_start = time.monotonic()
            try:
                await self._start_solana()
                self.solana_error = None
            except (RuntimeError, RpcUnavailable, RpcRefused, OSError, ValueError) as exc:
                self.solana_error = str(exc)
                log.warning("Solana payments unavailable (retried on the next purchase): %s", exc)
        else:
            self.solana_error = "disabled in the config (payments.solana.enabled)"
        try:
            done = await self.reconcile()
            if any(done.values()):
                log.info("reconciled pending payments at startup: %s", done)
        except (RpcUnavailable, OSError) as exc:
            log.warning("could not reconcile pending payments at startup: %s", exc)
        if background:
            self._task = asyncio.create_task(self._loop())

    async def ensure_ready(self, retry_after: float = 5.0) -> None:
        """Retry a Solana start that failed (RPC down at startup, mint not created yet), at most
        once per ``retry_after`` seconds, so the gateway recovers without a restart."""
        if not self.cfg.solana.enabled or self.solana_error is None:
            return
        now = time.monotonic()
        if now - self._last_start < retry_after:
            return
        self._last_start = now
        try:
            await self._start_solana()
            self.solana_error = None
        except (RuntimeError, RpcUnavailable, RpcRefused, OSError, ValueError) as exc:
            self.solana_error = str(exc)

    async def _start_solana(self) -> None:
        s = self.cfg.solana
        self.fee_payer = load_or_create_keypair(s.fee_payer_keypair)
        if s.pay_to:
            self.pay_to = Pubkey.from_string(s.pay_to)
        else:
            self.pay_to = load_or_create_keypair(s.pay_to_keypair).pubkey()
        if s.asset:
            mint = Pubkey.from_string(s.asset)
        elif Path(s.asset_keypair).exists():
            mint = load_keypair(s.asset_keypair).pubkey()
        else:
            raise RuntimeError(
                f"no payment asset: payments.solana.asset is unset and "
                f"{s.asset_keypair} (the localnet test USDC, made by `make up`) "
                "does not exist"
            )
        if (
            is_local_rpc(self.sol_rpc.url)
            and await self.sol_rpc.balance(self.fee_payer.pubkey()) < LAMPORTS_PER_SOL // 2
        ):
            await self.sol_rpc.airdrop(self.fee_payer.pubkey(), 2 * LAMPORTS_PER_SOL)
        self.mint = await read_mint(self.sol_rpc, mint)
        await ensure_token_account(self.sol_rpc, self.fee_payer, self.pay_to, self.mint)
        log.info(
            "Solana payments: %s of %s to %s, fee payer %s, network %s",
            "exact",
            self.mint.mint,
            self.pay_to,
            self.fee_payer.pubkey(),
            s.network,
        )

    async def close(self) -> None:
        await stop_tasks(self._task)
        await self.sol_rpc.close()
        await self.evm.close()

    async def _loop(self) -> None:
        s = self.cfg.solana
        while True:
            await asyncio.sleep(s.reconcile_interval_seconds)
            try:
                await self.reconcile(older_than=timedelta(seconds=s.confirm_timeout_seconds))
            except Exception:  # noqa: BLE001 - the loop must outlive an RPC or database blip
                log.exception("payment reconciliation failed; retrying")

    # ---------------------------------------------------------------- offers

    def offers(self, amount_usd: Decimal, wallet_chain: str) -> list[Offer]:
        out: list[Offer] = []
        s, e = self.cfg.solana, self.cfg.evm
        if self.solana_error is None and self.mint and self.pay_to and self.fee_payer:
            out.append(
                Offer(
                    "solana",
                    "exact",
                    s.network,
                    SOLANA_V1_NAMES.get(s.network),
                    str(self.mint.mint),
                    str(self.pay_to),
                    to_atomic(amount_usd, self.mint.decimals),
                    s.max_timeout_seconds,
                    {"feePayer": str(self.fee_payer.pubkey())},
                )
            )
        if e.enabled and e.pay_to:
            out.append(
                Offer(
                    "evm",
                    "exact",
                    f"eip155:{e.chain_id}",
                    EVM_V1_NAMES.get(e.chain_id),
                    e.asset,
                    e.pay_to,
                    to_atomic(amount_usd, e.decimals),
                    e.max_timeout_seconds,
                    {"name": e.token_name, "version": e.token_version},
                )
            )
        out.sort(key=lambda o: o.rail != wallet_chain)  # the caller's own chain first
        return out

    def unavailable_reason(self) -> str:
        reasons = [f"solana: {self.solana_error}"] if self.solana_error else []
        if not (self.cfg.evm.enabled and self.cfg.evm.pay_to):
            reasons.append("evm: not configured (payments.evm)")
        return "; ".join(reasons)

    # ---------------------------------------------------------------- settlement

    async def settle(
        self,
        wallet_chain: str,
        wallet_address: str,
        amount_usd: Decimal,
        p: PaymentPayload,
        offer: Offer,
    ) -> Purchase:
        micro = pricing.usd_to_microcredits(amount_usd)
        order = _Order(wallet_chain, wallet_address, amount_usd, micro, p, offer)
        if offer.rail == "solana":
            return await self._settle_solana(order)
        return await self._settle_evm(order)

    def _rules(self, offer: Offer) -> svm.SvmRules:
        assert self.fee_payer and self.mint and self.pay_to
        s = self.cfg.solana
        return svm.SvmRules(
            self.fee_payer.pubkey(),
            self.mint.mint,
            self.mint.token_program,
            self.mint.decimals,
            self.pay_to,
            offer.amount,
            s.max_compute_unit_price_microlamports,
            s.max_compute_unit_limit,
        )

    async def _settle_solana(self, order: _Order) -> Purchase:
        assert self.fee_payer is not None
        payment = svm.verify(
            svm.decode_transaction(order.payload.payload.get("transaction")),
            self._rules(order.offer),
        )
        payer = str(payment.payer)
        if order.wallet_chain != "solana" or order.wallet_address != payer:
            raise PaymentInvalid(
                "payer_mismatch",
                f"the payment is signed by solana wallet {payer} but the body "
                f"names {order.wallet_chain} wallet {order.wallet_address}: credits go to "
                "the wallet that paid, so wallet_address must be the payer",
            )
        full = cosign(payment.tx, self.fee_payer)
        sig = str(full.signatures[0])
        await self._claim(
            order,
            sig,
            payer,
            message_hash=payment.message_hash,
            tx=base64.b64encode(bytes(full)).decode(),
        )
        try:
            await self.sol_rpc.send(full)
        except RpcRefused as exc:
            (status,) = await self._statuses_or_none(full)
            if status is None:  # refused at preflight: nothing landed, nothing to remember
                await self.book.forget(sig)
                raise PaymentInvalid(
                    "transaction_simulation_failed",
                    f"the chain refused the transaction: {_explain(exc)}",
                ) from None
        except RpcUnavailable as exc:
            raise SettlementPending(
                f"payment transaction {sig} may have been sent but the RPC "
                f"did not answer ({exc}); it will be credited if it lands",
                sig,
            ) from None
        status = await self.sol_rpc.wait(
            full.signatures[0], self.cfg.solana.confirm_timeout_seconds
        )
        if status is None:
            raise SettlementPending(
                f"payment transaction {sig} was sent but not confirmed within "
                f"{self.cfg.solana.confirm_timeout_seconds:g} s; it will be "
                "credited when the chain confirms it",
                sig,
            )
        if status.err is not None:
            await self.book.mark_failed(sig, f"failed on chain: {status.err}")
            raise PaymentInvalid(
                "transaction_failed",
                f"payment transaction {sig} failed on chain ({status.err}); nothing was credited",
            )
        await self.book.mark_confirmed(sig, slot=status.slot)
        if self.after_confirm is not None:
            await self.after_confirm(sig)
        return order.purchase(await self._credit(sig), sig, payer)

    async def _claim(self, order: _Order, reference: str, payer: str, **rail_detail: Any) -> None:
        """Record the payment as pending before anything is sent; one seen before (or claimed by
        a concurrent request) is a replay, answered with its state."""
        seen = await self.book.get(reference)
        if seen is not None:
            raise _replay(seen)
        offer = order.offer
        detail = {
            "network": offer.network,
            "asset": offer.asset,
            "pay_to": offer.pay_to,
            "amount_atomic": offer.amount,
            "amount_usd": str(order.amount_usd),
            "x402_version": order.payload.version,
            **rail_detail,
        }
        try:
            await self.book.record_pending(offer.rail, reference, order.micro, payer, detail)
        except DuplicatePayment:
            raise _replay(await self.book.get(reference) or _stub(reference)) from None

    async def _statuses_or_none(self, tx: VersionedTransaction) -> list[Any]:
        try:
            return await self.sol_rpc.statuses([tx.signatures[0]])
        except RpcUnavailable:
            return [None]

    async def _credit(self, reference: str) -> PaymentRecord:
        rec = await self.book.get(reference)
        memo = None
        if rec is not None:
            memo = f"x402 {rec.chain} payment {reference} ({rec.detail.get('network', '')})"
        try:
            rec, _tx = await self.book.credit(reference, memo=memo)
        except DuplicatePayment:  # credited meanwhile by the reconciler: the same payment
            rec = await self.book.get(reference)
            assert rec is not None and rec.status == CREDITED
        return rec

    async def _settle_evm(self, order: _Order) -> Purchase:
        e, offer = self.cfg.evm, order.offer
        rules = evm.EvmRules(
            e.chain_id, e.asset, e.token_name, e.token_version, offer.pay_to, offer.amount
        )
        payment = evm.verify(order.payload.payload, rules)
        if order.wallet_chain != "evm" or order.wallet_address.lower() != payment.payer.lower():
            raise PaymentInvalid(
                "payer_mismatch",
                f"the authorization is signed by evm wallet {payment.payer} but "
                f"the body names {order.wallet_chain} wallet {order.wallet_address}: credits "
                "go to the wallet that paid",
            )
        ref = payment.reference(e.chain_id, e.asset)
        try:
            from_block = await self.evm.block_number() - evm.LOOKBACK_BLOCKS
        except evm.EvmUnavailable as exc:
            raise SettlementUnavailable(
                f"EVM settlement unavailable: {exc}; the authorization was not used and "
                "nothing was credited"
            ) from None
        await self._claim(
            order,
            ref,
            payment.payer,
            valid_before=payment.valid_before,
            authorization=order.payload.payload.get("authorization"),
            signature="0x" + payment.signature.hex(),
            from_block=from_block,
        )
        try:
            tx_hash = await self._evm_send(e.asset, payment)
        except evm.EvmUnavailable as exc:
            if not exc.sent:
                await self.book.forget(ref)
                raise SettlementUnavailable(
                    f"EVM settlement unavailable: {exc}; the authorization was not used and "
                    "nothing was credited"
                ) from None
            raise SettlementPending(
                f"the EVM transfer may have been sent ({exc}); it will be credited if it lands", ref
            ) from None
        if tx_hash is not None:
            await self.book.annotate(ref, tx_hash=tx_hash)
            receipt = await self.evm.receipt(tx_hash)
            if receipt is None:
                raise SettlementPending(
                    f"EVM transaction {tx_hash} not confirmed yet; it will be credited when it is",
                    ref,
                )
            if int(receipt.get("status", "0x0"), 16) == 1:
                await self.book.mark_confirmed(ref, block=receipt.get("blockNumber"))
                return order.purchase(await self._credit(ref), tx_hash, payment.payer)
        # Not sent because already used, or reverted: someone may have submitted it first.
        winner = await self.evm.find_use(e.asset, payment, from_block)
        if winner is None:
            what = (
                f"EVM transaction {tx_hash} reverted"
                if tx_hash
                else "the authorization's nonce was already used"
            )
            await self.book.mark_failed(ref, f"{what}; not used to pay {payment.to}")
            raise PaymentInvalid(
                "transaction_failed",
                f"{what} and no transfer of {payment.value} to {payment.to} "
                "used it; nothing was credited",
            )
        log.info("EVM payment %s was submitted by someone else (%s): credited", ref, winner)
        await self.book.mark_confirmed(ref, used_by=winner)
        return order.purchase(await self._credit(ref), winner, payment.payer)

    async def _evm_send(self, asset: str, payment: evm.EvmPayment) -> str | None:
        """Submit the authorization unless its nonce is used already (front-run, or the client
        submitted it itself): the transaction hash, or None when it was not sent for that reason.
        A submission refused at gas estimation is re-checked: a front-runner may have won the
        race between the check and the estimate."""
        if await self.evm.authorization_used(asset, payment):
            return None
        try:
            return await self.evm.submit(asset, payment)
        except evm.EvmUnavailable as exc:
            if not exc.sent and await self.evm.authorization_used(asset, payment):
                return None
            raise

    # ---------------------------------------------------------------- reconciliation

    async def reconcile(self, older_than: timedelta | None = None) -> dict[str, int]:
        """Settle every pending/confirmed payment by what the chain says. Safe to run at any
        time, from several processes: every move is conditional and crediting is idempotent."""
        done = {"credited": 0, "failed": 0, "resent": 0, "waiting": 0}
        for rec in await self.book.unsettled(older_than):
            try:
                if rec.chain == "solana":
                    outcome = await self._reconcile_solana(rec)
                else:
                    outcome = await self._reconcile_evm(rec)
            except (RpcUnavailable, evm.EvmUnavailable) as exc:
                log.warning("cannot reconcile payment %s yet: %s", rec.signature, exc)
                outcome = "waiting"
            done[outcome] += 1
        return done

    async def _reconcile_solana(self, rec: PaymentRecord) -> str:
        tx = VersionedTransaction.from_bytes(base64.b64decode(rec.detail["tx"]))
        # Blockhash first, status second: if the blockhash is already invalid and the status is
        # still unknown, the transaction can never land.
        valid = await self.sol_rpc.blockhash_valid(tx.message)
        (status,) = await self.sol_rpc.statuses([tx.signatures[0]])
        if status is not None:
            if status.err is not None:
                await self.book.mark_failed(rec.signature, f"failed on chain: {status.err}")
                log.info("payment %s failed on chain (%s): not credited", rec.signature, status.err)
                return "failed"
            await self.book.mark_confirmed(rec.signature, slot=status.slot)
            await self._credit(rec.signature)
            log.info(
                "payment %s confirmed on chain: credited %d microcredits to %s",
                rec.signature,
                rec.amount_microcredits,
                rec.wallet_address,
            )
            return "credited"
        if not valid:
            await self.book.mark_failed(rec.signature, "expired: never landed on chain")
            return "failed"
        try:
            await self.sol_rpc.send(tx)
            return "resent"
        except RpcRefused as exc:
            (status,) = await self.sol_rpc.statuses([tx.signatures[0]])
            if status is None:
                await self.book.mark_failed(rec.signature, f"refused on resend: {_explain(exc)}")
                return "failed"
            return "waiting"

    async def _reconcile_evm(self, rec: PaymentRecord) -> str:
        tx_hash = rec.detail.get("tx_hash")
        if tx_hash:
            receipt = await self.evm.receipt(tx_hash, timeout=0)
            if receipt is None:
                return "waiting"
            if int(receipt.get("status", "0x0"), 16) == 1:
                await self.book.mark_confirmed(rec.signature)
                await self._credit(rec.signature)
                return "credited"
        elif int(rec.detail.get("valid_before", 0)) >= time.time():
            return "waiting"
        # Reverted, or expired unsent: credited only if someone else used it to pay us.
        payment = evm.EvmPayment.from_record(rec.detail["authorization"], rec.detail["signature"])
        winner = await self.evm.find_use(
            rec.detail.get("asset") or self.cfg.evm.asset,
            payment,
            int(rec.detail.get("from_block", 0)),
        )
        if winner is not None:
            await self.book.mark_confirmed(rec.signature, used_by=winner)
            await self._credit(rec.signature)
            return "credited"
        why = f"reverted: {tx_hash}" if tx_hash else "authorization expired unsent"
        await self.book.mark_failed(rec.signature, why)
        return "failed"


def _stub(ref: str) -> PaymentRecord:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    return PaymentRecord("", "", ref, "pending", 0, "", None, {}, now, now)


def _explain(exc: RpcRefused) -> str:
    text = exc.message
    for line in exc.logs:
        low = line.lower()
        if "insufficient" in low or "error" in low and "program log" in low:
            return f"{text} ({line.strip()})"
    return text
