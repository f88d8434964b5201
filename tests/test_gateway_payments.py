"""x402 credit purchases on the localnet: real SPL Token transfers, the real ledger, the real app.

Each test gets its own in-process localnet (the real Agave SVM over LiteSVM, with the SPL Token
program) whose clock the test can move (to expire blockhashes without waiting), a test-USDC mint,
funded payers, and the gateway app on loopback. Every refusal checks that nothing moved: the
payer's and the pay-to wallet's USDC, the ledger's account and its payment records. The official
``x402`` client pays in ``test_gateway_payments_x402.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from decimal import Decimal
from typing import Any

import pytest
from solders.instruction import AccountMeta
from solders.keypair import Keypair
from solders.transaction import VersionedTransaction

from gateway.auth import sign_request
from gateway.client import GatewayClient, InsufficientCredits
from gateway.ledger import pricing
from gateway.payments import payer
from gateway.payments.book import PaymentBook
from gateway.payments.config import SolanaPayments
from gateway.payments.solana import cosign
from registry import usdc
from tests.support.payments import DEVNET, PATH, Pay


async def refused(p: Pay, key: Keypair, status: int, needle: str, **build: Any) -> Any:
    """Pay with a hostile variant; assert the refusal and that nothing moved anywhere."""
    before = await p.snapshot(key.pubkey())
    got, body, _ = await p.pay(key, **build)
    assert got == status, body
    assert needle in body["error"], body["error"]
    assert await p.snapshot(key.pubkey()) == before
    return body


# ---------------------------------------------------------------- the happy path, both versions


@pytest.mark.parametrize("version", [2, 1])
async def test_purchase_credits_and_moves_exactly_the_amount(pay: Pay, version: int) -> None:
    key = await pay.wallet("5")
    before_payer, before_to = await pay.usdc_of(key.pubkey()), await pay.usdc_of(pay.pay_to)
    fee_payer = pay.service.fee_payer.pubkey()
    fee_before = (await pay.chain.rpc.get_balance(fee_payer)).value
    status, body, headers = await pay.pay(key, amount=0.25, version=version)
    assert status == 200, body
    assert body["credited_microcredits"] == "250000" and body["amount_usd"] == 0.25
    settle = json.loads(base64.b64decode(headers["PAYMENT-RESPONSE"]))
    assert settle["success"] is True and settle["payer"] == str(key.pubkey())
    assert settle["network"] == (DEVNET if version == 2 else "solana-devnet")
    assert headers["X-PAYMENT-RESPONSE"] == headers["PAYMENT-RESPONSE"]
    assert await pay.usdc_of(pay.pay_to) == before_to + 250_000
    assert await pay.usdc_of(key.pubkey()) == before_payer - 250_000
    # The fee payer paid only the fee (two signatures at 5000 lamports + a 1-micro-lamport tip).
    assert fee_before - (await pay.chain.rpc.get_balance(fee_payer)).value <= 10_001
    acct = await pay.ledger.get_account("solana", str(key.pubkey()))
    assert acct is not None and acct.id == body["account_id"]
    assert (acct.credit_balance, acct.available_balance) == (250_000, 250_000)
    txs = await pay.ledger.list_transactions(acct.id)
    assert [(t.kind, t.amount, t.reference) for t in txs] == [
        ("purchase", 250_000, settle["transaction"])
    ]
    assert (await pay.ledger.audit(acct.id)).ok
    rec = await PaymentBook(pay.ledger).get(settle["transaction"])
    assert rec is not None and rec.status == "credited" and rec.account_id == acct.id


async def test_402_advertises_both_versions(pay: Pay) -> None:
    key = await pay.wallet(None)
    status, body, headers = await pay.post(key, amount=1.5)
    assert status == 402
    assert body["x402Version"] == 1 and "payment required" in body["error"]
    (v1,) = body["accepts"]
    fee_payer = str(pay.service.fee_payer.pubkey())
    assert v1 == {
        "scheme": "exact",
        "network": "solana-devnet",
        "maxAmountRequired": "1500000",
        "resource": pay.url + PATH,
        "description": v1["description"],
        "mimeType": "application/json",
        "payTo": str(pay.pay_to),
        "maxTimeoutSeconds": 60,
        "asset": str(pay.mint),
        "extra": {"feePayer": fee_payer},
    }
    v2 = json.loads(base64.b64decode(headers["PAYMENT-REQUIRED"]))
    assert v2["x402Version"] == 2 and v2["resource"]["url"] == pay.url + PATH
    assert v2["accepts"] == [
        {
            "scheme": "exact",
            "network": DEVNET,
            "amount": "1500000",
            "asset": str(pay.mint),
            "payTo": str(pay.pay_to),
            "maxTimeoutSeconds": 60,
            "extra": {"feePayer": fee_payer},
        }
    ]
    # The pay-to wallet's token account exists (the gateway made it at startup).
    assert (await pay.chain.rpc.get_account_info(usdc.ata(pay.pay_to, pay.mint))).value


@pytest.mark.parametrize("amount", [0.09, 1000.01, 0.1234567, -1])
async def test_amount_out_of_range_is_400(pay: Pay, amount: float) -> None:
    key = Keypair()
    status, body, _ = await pay.post(key, amount=amount)
    assert status == 400 and "amount_usd" in body["error"]


# ---------------------------------------------------------------- refusals: nothing moves


async def test_wrong_amount_refused(pay: Pay) -> None:
    key = await pay.wallet()
    await refused(pay, key, 402, "amount_mismatch", tx_amount=249_999)
    await refused(pay, key, 402, "amount_mismatch", tx_amount=250_001)


async def test_wrong_recipient_refused(pay: Pay) -> None:
    key = await pay.wallet()
    thief = await pay.wallet("0.000001")  # has a token account: the transfer itself would land
    body = await refused(pay, key, 402, "recipient_mismatch", pay_to=thief.pubkey())
    assert str(pay.pay_to) in body["error"]


async def test_wrong_mint_refused(pay: Pay) -> None:
    key = await pay.wallet()
    other_keys = pay.tmp / "other"
    other, _ = await usdc.ensure_test_usdc(pay.chain, other_keys / "m.json", other_keys / "a.json")
    await usdc.mint_test_usdc(
        pay.chain, key.pubkey(), "5", other_keys / "m.json", other_keys / "a.json"
    )
    await refused(pay, key, 402, "mint_mismatch", mint=other)


async def test_fee_payer_inside_an_instruction_refused(pay: Pay) -> None:
    key = await pay.wallet()
    fee_payer = pay.service.fee_payer.pubkey()
    # As an account of the memo (a signer there would let our signature authorise it) ...
    await refused(
        pay, key, 402, "fee_payer_included", memo_accounts=[AccountMeta(fee_payer, True, False)]
    )
    # ... or as the transfer authority: our own tokens would pay.
    await refused(pay, key, 402, "fee_payer_included", authority=fee_payer)


async def test_compute_unit_price_and_limit_caps(pay: Pay) -> None:
    key = await pay.wallet()
    s = pay.config.payments.solana
    price, limit = s.max_compute_unit_price_microlamports, s.max_compute_unit_limit
    await refused(pay, key, 402, "compute_price_instruction_too_high", cu_price=price + 1)
    await refused(pay, key, 402, "compute_limit_instruction_too_high", cu_limit=limit + 1)
    fee_payer = pay.service.fee_payer.pubkey()
    fee_before = (await pay.chain.rpc.get_balance(fee_payer)).value
    status, body, _ = await pay.pay(key, cu_price=price, cu_limit=limit)  # exactly the caps
    assert status == 200, body
    # The fee payer paid at most the documented worst case. (The localnet's LiteSVM charges the
    # base fee only, 5,000 lamports a signature, so the priority part shows on a real cluster.)
    spent = fee_before - (await pay.chain.rpc.get_balance(fee_payer)).value
    assert 0 < spent <= s.worst_case_fee_lamports()


def test_default_caps_keep_the_fee_a_small_known_share() -> None:
    """The arithmetic the config documents: at most 0.000012 SOL a purchase, which at SOL = $500
    is 6% of the smallest purchase, 1% of it being priority fee the payer chose."""
    s = SolanaPayments()
    assert s.worst_case_fee_lamports() == 12_000
    sol_usd, lamports = Decimal(500), Decimal(1_000_000_000)
    smallest = pricing.MIN_PURCHASE_USD
    assert s.worst_case_fee_lamports() / lamports * sol_usd / smallest == Decimal("0.06")
    assert (s.worst_case_fee_lamports() - 10_000) / lamports * sol_usd / smallest == Decimal("0.01")


async def test_replayed_transaction_refused(pay: Pay) -> None:
    key = await pay.wallet()
    req = await pay.requirement(key)
    tx = await payer.svm_transaction(key, req, pay.net.url)
    name, value = payer.payment_header(2, req, {"transaction": tx})
    status, body, _ = await pay.post(key, headers={name: value})
    assert status == 200, body
    after_first = await pay.snapshot(key.pubkey())
    # Again (a new auth signature, the same payment), as v2 and spelled as v1: refused.
    status, body, _ = await pay.post(key, headers={name: value})
    assert status == 402 and "replayed payment" in body["error"]
    v1_name, v1_value = payer.payment_header(
        1, {**req, "network": "solana-devnet"}, {"transaction": tx}
    )
    status, body, _ = await pay.post(key, headers={v1_name: v1_value})
    assert status == 402 and "replayed payment" in body["error"]
    assert await pay.snapshot(key.pubkey()) == after_first
    assert after_first[f"ledger:{key.pubkey()}"] == (250_000, 250_000)


async def test_expired_blockhash_refused(pay: Pay) -> None:
    key = await pay.wallet()
    req = await pay.requirement(key)
    tx = await payer.svm_transaction(key, req, pay.net.url)
    name, value = payer.payment_header(2, req, {"transaction": tx})
    pay.clock.offset += 90  # 225 slots later: past the 150-slot blockhash window
    before = await pay.snapshot(key.pubkey())
    status, body, _ = await pay.post(key, headers={name: value})
    assert status == 402 and "Blockhash not found" in body["error"], body
    assert await pay.snapshot(key.pubkey()) == before


async def test_payer_without_funds_refused(pay: Pay) -> None:
    broke = await pay.wallet("0.1")  # less than the 0.25 asked
    body = await refused(pay, broke, 402, "refused the transaction")
    assert "insufficient" in body["error"].lower()
    no_account = Keypair()  # no token account at all
    await refused(pay, no_account, 402, "refused the transaction")


@pytest.mark.parametrize(
    "header,value,needle",
    [
        ("PAYMENT-SIGNATURE", "%%%not-base64%%%", "not base64-encoded JSON"),
        ("PAYMENT-SIGNATURE", base64.b64encode(b"[1,2]").decode(), "not a JSON object"),
        ("PAYMENT-SIGNATURE", base64.b64encode(b'{"x402Version": 2}').decode(), "no 'payload'"),
        (
            "X-PAYMENT",
            base64.b64encode(b'{"x402Version": 3, "payload": {}}').decode(),
            "unsupported x402Version",
        ),
        (
            "X-PAYMENT",
            base64.b64encode(
                json.dumps(
                    {
                        "x402Version": 1,
                        "scheme": "exact",
                        "network": "solana-devnet",
                        "payload": {"transaction": base64.b64encode(b"\x01" * 80).decode()},
                    }
                ).encode()
            ).decode(),
            "could_not_be_decoded",
        ),
        (
            "X-PAYMENT",
            base64.b64encode(
                json.dumps(
                    {"x402Version": 1, "scheme": "exact", "network": "base", "payload": {}}
                ).encode()
            ).decode(),
            "unsupported_scheme",
        ),
        ("PAYMENT-SIGNATURE", "", "empty"),
    ],
)
async def test_malformed_header_refused(pay: Pay, header: str, value: str, needle: str) -> None:
    key = await pay.wallet()
    before = await pay.snapshot(key.pubkey())
    status, body, headers = await pay.post(key, headers={header: value})
    assert status == 402 and needle in body["error"], body
    assert "PAYMENT-REQUIRED" in headers and body["accepts"]  # a fresh challenge comes back
    assert await pay.snapshot(key.pubkey()) == before


async def test_v2_accepted_must_match_the_requirements(pay: Pay) -> None:
    key = await pay.wallet()
    req = await pay.requirement(key)
    tx = await payer.svm_transaction(key, req, pay.net.url)
    name, value = payer.payment_header(2, {**req, "amount": "1"}, {"transaction": tx})
    before = await pay.snapshot(key.pubkey())
    status, body, _ = await pay.post(key, headers={name: value})
    assert status == 402 and "requirements_mismatch" in body["error"]
    assert await pay.snapshot(key.pubkey()) == before


async def test_credits_go_to_the_payer_only(pay: Pay) -> None:
    key, other = await pay.wallet(), Keypair()
    req = await pay.requirement(key)
    tx = await payer.svm_transaction(key, req, pay.net.url)
    name, value = payer.payment_header(2, req, {"transaction": tx})
    before = await pay.snapshot(key.pubkey(), other.pubkey())
    status, body, _ = await pay.post(
        key,
        body={"wallet_address": str(other.pubkey()), "wallet_chain": "solana", "amount_usd": 0.25},
        headers={name: value},
    )
    assert status == 402 and "payer_mismatch" in body["error"]
    assert await pay.snapshot(key.pubkey(), other.pubkey()) == before


async def test_signature_must_verify(pay: Pay) -> None:
    key = await pay.wallet()
    req = await pay.requirement(key)
    raw = bytearray(base64.b64decode(await payer.svm_transaction(key, req, pay.net.url)))
    raw[1 + 64 + 5] ^= 1  # flip a bit of the payer's signature (slot 1)
    name, value = payer.payment_header(2, req, {"transaction": base64.b64encode(raw).decode()})
    before = await pay.snapshot(key.pubkey())
    status, body, _ = await pay.post(key, headers={name: value})
    assert status == 402 and "does not verify" in body["error"]
    assert await pay.snapshot(key.pubkey()) == before


# ---------------------------------------------------------------- exactly once


async def test_two_identical_payments_racing_are_credited_once(pay: Pay) -> None:
    key = await pay.wallet()
    req = await pay.requirement(key)
    tx = await payer.svm_transaction(key, req, pay.net.url)
    name, value = payer.payment_header(2, req, {"transaction": tx})
    to_before = await pay.usdc_of(pay.pay_to)
    auths = [sign_request("POST", PATH, key, now=time.time() - i) for i in range(4)]
    results = await asyncio.gather(*(pay.post(key, headers={name: value}, auth=a) for a in auths))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 402, 402, 402], [r[1] for r in results]
    assert all("replayed payment" in r[1]["error"] for r in results if r[0] == 402)
    assert await pay.usdc_of(pay.pay_to) == to_before + 250_000
    acct = await pay.ledger.get_account("solana", str(key.pubkey()))
    assert acct is not None and acct.credit_balance == 250_000
    assert (await pay.ledger.audit(acct.id)).ok


async def test_crash_between_confirmation_and_credit_recovers_at_restart(pay: Pay) -> None:
    key = await pay.wallet()
    to_before = await pay.usdc_of(pay.pay_to)

    async def crash(sig: str) -> None:
        raise RuntimeError("simulated crash after confirmation")

    pay.service.after_confirm = crash
    status, _, _ = await pay.pay(key)
    assert status == 500
    # The money moved on chain; the ledger has not credited it.
    assert await pay.usdc_of(pay.pay_to) == to_before + 250_000
    assert await pay.ledger.get_account("solana", str(key.pubkey())) is None
    assert (await PaymentBook(pay.ledger).count_by_status()) == {"confirmed": 1}
    await pay.restart()  # the new process reconciles at startup: the chain is the truth
    acct = await pay.ledger.get_account("solana", str(key.pubkey()))
    assert acct is not None and acct.credit_balance == 250_000
    assert (await PaymentBook(pay.ledger).count_by_status()) == {"credited": 1}
    assert await pay.service.reconcile() == {"credited": 0, "failed": 0, "resent": 0, "waiting": 0}
    await pay.restart()
    assert (await pay.ledger.get_account("solana", str(key.pubkey()))).credit_balance == 250_000


async def test_reconcile_pending_sent_failed_and_expired(pay: Pay) -> None:
    """Recorded-but-unsent (crash before send) lands on resend and is credited; one that landed
    failed on chain is marked failed; one whose blockhash expired unsent is marked failed."""
    service, book, fee_payer = pay.service, PaymentBook(pay.ledger), pay.service.fee_payer

    async def record(key: Keypair) -> tuple[str, VersionedTransaction]:
        req = await pay.requirement(key)
        tx = VersionedTransaction.from_bytes(
            base64.b64decode(await payer.svm_transaction(key, req, pay.net.url))
        )
        full = cosign(tx, fee_payer)
        sig = str(full.signatures[0])
        await book.record_pending(
            "solana",
            sig,
            250_000,
            str(key.pubkey()),
            {"tx": base64.b64encode(bytes(full)).decode()},
        )
        return sig, full

    unsent_key, broke_key = await pay.wallet(), await pay.wallet("0.1")
    late_key = await pay.wallet()
    unsent, _ = await record(unsent_key)
    failed, failed_tx = await record(broke_key)
    # It lands as a failed transaction (fee charged, no tokens moved), as with skipPreflight.
    await pay.chain.rpc.send_raw_transaction(
        bytes(failed_tx),
        opts=__import__("solana.rpc.types", fromlist=["TxOpts"]).TxOpts(skip_preflight=True),
    )
    assert await service.reconcile() == {"credited": 0, "failed": 1, "resent": 1, "waiting": 0}
    assert await service.reconcile() == {"credited": 1, "failed": 0, "resent": 0, "waiting": 0}
    assert (await book.get(unsent)).status == "credited"
    assert (await book.get(failed)).status == "failed"
    assert await pay.ledger.get_account("solana", str(broke_key.pubkey())) is None
    late, _ = await record(late_key)
    pay.clock.offset += 90
    assert await service.reconcile() == {"credited": 0, "failed": 1, "resent": 0, "waiting": 0}
    assert (await book.get(late)).detail["error"].startswith("expired")
    assert await pay.usdc_of(late_key.pubkey()) == 10_000_000


# ---------------------------------------------------------------- the agent SDK


async def test_sdk_purchase_credits_and_top_up(pay: Pay) -> None:
    key = await pay.wallet("3")
    async with GatewayClient(pay.url, key) as gw:
        out = await gw.purchase_credits(0.5, rpc_url=pay.net.url)
        assert out["credited_microcredits"] == "500000"
        assert out["payment_response"]["payer"] == str(key.pubkey())
        assert (await gw.account()).available_balance == 500_000
        assert await gw.ensure_credits(400_000, 1.0, rpc_url=pay.net.url) is None
        topped = await gw.ensure_credits(600_000, 1.0, rpc_url=pay.net.url)
        assert topped is not None and topped["credited_microcredits"] == "1000000"
        assert (await gw.account()).available_balance == 1_500_000
        with pytest.raises(InsufficientCredits) as exc:  # 3 - 1.5 = 1.5 USDC left
            await gw.purchase_credits(2, rpc_url=pay.net.url)
        assert "insufficient" in exc.value.message.lower() and exc.value.body["accepts"]
    assert await pay.usdc_of(key.pubkey()) == 1_500_000
