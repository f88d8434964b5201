"""Attacks on credit purchases and wallet auth (issue 12, items 8-10), each played on the local
network (the localnet's real SPL Token program, or py-evm for the EVM rail) against the real
gateway, asserting the refusal and that balances, payments and ledger transactions are unchanged.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from gateway.auth import sign_request
from gateway.payments import payer
from gateway.payments.book import PaymentBook
from tests.support.evm_chain import PAY_TO, PAYER, EvmChain, authorization, post, state, submit_as
from tests.support.payments import Pay


async def everything(p: Pay, *owners: Any) -> dict[str, Any]:
    """USDC of each owner and the pay-to wallet, the fee payer's SOL, payment records, and each
    owner's ledger account with its transactions."""
    out = await p.snapshot(*owners)
    fee_payer = p.service.fee_payer.pubkey()
    out["fee_payer_sol"] = (await p.chain.rpc.get_balance(fee_payer)).value
    for o in owners:
        acct = await p.ledger.get_account("solana", str(o))
        out[f"txs:{o}"] = (
            []
            if acct is None
            else [
                (t.kind, t.amount, t.reference) for t in await p.ledger.list_transactions(acct.id)
            ]
        )
    return out


async def test_priority_fee_above_the_caps_is_refused(pay: Pay) -> None:
    """A payer asks the gateway's fee payer for a huge priority fee (price or limit above the
    caps): refused before anything is signed; no SOL or USDC moves."""
    key = await pay.wallet()
    s = pay.config.payments.solana
    for build, reason in (
        (
            {"cu_price": s.max_compute_unit_price_microlamports + 1},
            "compute_price_instruction_too_high",
        ),
        # 0.001 SOL of priority fee, which the old caps (5 lamports/CU,
        # 200,000 CU) allowed: more than a $0.10 purchase at some SOL prices.
        ({"cu_price": 5_000_000, "cu_limit": 200_000}, "compute_limit_instruction_too_high"),
        ({"cu_price": 5_000_000}, "compute_price_instruction_too_high"),
        ({"cu_limit": s.max_compute_unit_limit + 1}, "compute_limit_instruction_too_high"),
    ):
        before = await everything(pay, key.pubkey())
        status, body, _ = await pay.pay(key, **build)
        assert status == 402 and reason in body["error"], body
        assert await everything(pay, key.pubkey()) == before


async def test_402_signature_replayed_with_another_body_is_refused(pay: Pay) -> None:
    """A victim's signed purchase is answered 402, which gives its signature back. An attacker who
    saw the headers sends them with another body (its own wallet, its own payment): 401, and
    nothing is created. The victim's own retry, with the identical body, still goes through."""
    victim, attacker = await pay.wallet(), await pay.wallet()
    victim_auth = pay.auth(victim)
    victim_body = {
        "wallet_address": str(victim.pubkey()),
        "wallet_chain": "solana",
        "amount_usd": 0.25,
    }
    status, _, headers = await pay.post(victim, body=victim_body, auth=victim_auth)
    assert status == 402
    _, (req,) = payer.requirements_from_402(headers, {})
    attacker_tx = await payer.svm_transaction(attacker, req, pay.net.url)
    name, value = payer.payment_header(2, req, {"transaction": attacker_tx})
    before = await everything(pay, victim.pubkey(), attacker.pubkey())
    status, body, _ = await pay.post(
        attacker,
        body={
            "wallet_address": str(attacker.pubkey()),
            "wallet_chain": "solana",
            "amount_usd": 0.25,
        },
        auth=victim_auth,
        headers={name: value},
    )
    assert status == 401 and "answered 402 for another body" in body["error"], body
    assert await everything(pay, victim.pubkey(), attacker.pubkey()) == before
    assert await PaymentBook(pay.ledger).count_by_status() == {}
    victim_tx = await payer.svm_transaction(victim, req, pay.net.url)
    name, value = payer.payment_header(2, req, {"transaction": victim_tx})
    status, body, _ = await pay.post(
        victim, body=victim_body, auth=victim_auth, headers={name: value}
    )
    assert status == 200, body


async def test_repeated_signed_post_is_refused(pay: Pay) -> None:
    """The same signed purchase sent twice within its second (identical headers and body): the
    copy is refused as a replay; the first purchase's effects are all there is."""
    key = await pay.wallet()
    req = await pay.requirement(key)
    tx = await payer.svm_transaction(key, req, pay.net.url)
    name, value = payer.payment_header(2, req, {"transaction": tx})
    auth = pay.auth(key)
    status, body, first = await pay.post(key, auth=auth, headers={name: value})
    assert status == 200, body
    settled = json.loads(base64.b64decode(first["PAYMENT-RESPONSE"]))["transaction"]
    after_first = await everything(pay, key.pubkey())
    status, body, _ = await pay.post(key, auth=auth, headers={name: value})
    assert status == 401 and "replayed signature" in body["error"], body
    assert await everything(pay, key.pubkey()) == after_first
    assert after_first[f"txs:{key.pubkey()}"] == [("purchase", 250_000, settled)]


async def test_repeated_signed_get_within_its_second_is_answered(pay: Pay) -> None:
    """A client written from the reference signs whole seconds, so two reads in one second carry
    identical headers: both are answered, and reading changes nothing."""
    key = await pay.wallet()
    status, body, _ = await pay.pay(key)
    assert status == 200, body
    before = await everything(pay, key.pubkey())
    headers = sign_request("GET", "/v1/account", key)
    answers = []
    for _ in range(2):
        async with pay.http.get(pay.url + "/v1/account", headers=headers) as r:
            answers.append((r.status, await r.json()))
    assert answers[0] == answers[1] and answers[0][0] == 200, answers
    assert int(answers[0][1]["credit_balance"]) == before[f"ledger:{key.pubkey()}"][0] == 250_000
    assert await everything(pay, key.pubkey()) == before


async def test_evm_front_run_cannot_fail_a_paid_purchase(evm_gw: Pay, evm_chain: EvmChain) -> None:
    """A mempool watcher lands the payer's authorization ahead of the gateway, whose own
    transaction reverts. The purchase is credited exactly once; the watcher gains nothing; a
    replay of the payment afterwards moves nothing."""
    watcher = evm_chain.t.get_accounts()[2]
    payload, header = await authorization(evm_gw, evm_chain)
    evm_chain.front_run = submit_as(evm_chain, payload)
    status, body = await post(evm_gw, header)
    assert status == 200, body
    after = await state(evm_gw, evm_chain)
    assert after == {
        "payer": 7_500_000,
        "pay_to": 2_500_000,
        "payments": {"credited": 1},
        "credits": (2_500_000, 2_500_000),
    }
    assert evm_chain.balance(watcher) == 0
    status, body = await post(evm_gw, header)
    assert status == 402 and "replayed payment" in body["error"], body
    assert await state(evm_gw, evm_chain) == after
    assert evm_chain.balance(PAY_TO) == 2_500_000 and evm_chain.balance(PAYER) == 7_500_000
