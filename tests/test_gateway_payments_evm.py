"""EVM (x402 exact, EIP-3009) settlement on a real EVM (py-evm with an EIP-3009 token:
tests/support/evm_chain.py).

The gateway pays gas from its relayer key exactly as it would on Base. Front-running is played out
for real: a third account submits the payer's authorization first (``EvmChain.front_run`` puts its
transaction ahead of the gateway's, as a higher-paying mempool watcher would), so the gateway's own
transaction reverts on chain.
"""

from __future__ import annotations

from typing import Any

from eth_account import Account

from gateway.client import GatewayClient
from gateway.payments import evm, payer
from gateway.payments.book import PaymentBook
from tests.support.evm_chain import (
    PAYER,
    PAYER_KEY,
    EvmChain,
    authorization,
    post,
    state,
    submit_as,
)
from tests.support.payments import Pay


async def test_evm_purchase_settles_on_chain(evm_gw: Pay, evm_chain: EvmChain) -> None:
    payload, header = await authorization(evm_gw, evm_chain)
    status, body = await post(evm_gw, header)
    assert status == 200, body
    assert body["credited_microcredits"] == "2500000"
    assert await state(evm_gw, evm_chain) == {
        "payer": 7_500_000,
        "pay_to": 2_500_000,
        "payments": {"credited": 1},
        "credits": (2_500_000, 2_500_000),
    }
    nonce = bytes.fromhex(payload["authorization"]["nonce"][2:])
    assert evm_chain.used(PAYER, nonce)
    # The same authorization again: a replayed payment, nothing moves.
    before = await state(evm_gw, evm_chain)
    status, body = await post(evm_gw, header)
    assert status == 402 and "replayed payment" in body["error"], body
    assert await state(evm_gw, evm_chain) == before


async def test_the_sdk_buys_credits_with_an_evm_wallet(evm_gw: Pay, evm_chain: EvmChain) -> None:
    """``GatewayClient.purchase_credits`` with an EVM key: it picks the offer on its chain (the
    v2 header's ``eip155:<id>``), signs the authorization for that chain id, and is credited."""
    async with GatewayClient(evm_gw.url, PAYER_KEY, chain="evm", session=evm_gw.http) as gw:
        out = await gw.purchase_credits(1.5)
        assert out["credited_microcredits"] == "1500000"
        assert out["payment_response"]["payer"].lower() == PAYER.lower()
        assert (await gw.account()).available_balance == 1_500_000
    assert await state(evm_gw, evm_chain) == {
        "payer": 8_500_000,
        "pay_to": 1_500_000,
        "payments": {"credited": 1},
        "credits": (1_500_000, 1_500_000),
    }


async def test_front_run_in_the_mempool_is_still_credited(evm_gw: Pay, evm_chain: EvmChain) -> None:
    """Someone lands the authorization ahead of the gateway's transaction, which reverts: the
    authorization paid us all the same, so the purchase is credited, once."""
    payload, header = await authorization(evm_gw, evm_chain)
    evm_chain.front_run = submit_as(evm_chain, payload)
    status, body = await post(evm_gw, header)
    assert status == 200, body
    rec = await PaymentBook(evm_gw.ledger).get(
        evm.EvmPayment.from_record(payload["authorization"], payload["signature"]).reference(
            evm_chain.chain_id, evm_chain.token
        )
    )
    assert rec is not None and rec.status == "credited"
    own = evm_chain.t.get_transaction_receipt(rec.detail["tx_hash"])
    assert own["status"] == 0  # the gateway's own submission really reverted on chain
    assert rec.detail["used_by"] != rec.detail["tx_hash"]
    assert await state(evm_gw, evm_chain) == {
        "payer": 7_500_000,
        "pay_to": 2_500_000,
        "payments": {"credited": 1},
        "credits": (2_500_000, 2_500_000),
    }


async def test_nonce_used_to_pay_someone_else_is_not_credited(
    evm_gw: Pay, evm_chain: EvmChain
) -> None:
    """The payer signs a second authorization with the same nonce, paying itself another way, and
    lands it first: the nonce is used, but not to pay us. Nothing is credited."""
    payload, header = await authorization(evm_gw, evm_chain)
    elsewhere = Account.create().address
    twin = payer.evm_authorization(
        PAYER_KEY,
        {
            "payTo": elsewhere,
            "asset": evm_chain.token,
            "amount": "2500000",
            "maxTimeoutSeconds": 300,
            "extra": {"name": "USD Coin", "version": "2"},
        },
        evm_chain.chain_id,
    )
    twin["authorization"]["nonce"] = payload["authorization"]["nonce"]
    twin = {**twin, "signature": _resign(twin["authorization"], evm_chain)}
    evm_chain.front_run = submit_as(evm_chain, twin)
    status, body = await post(evm_gw, header)
    assert status == 402 and "transaction_failed" in body["error"], body
    assert "nothing was credited" in body["error"]
    assert evm_chain.balance(elsewhere) == 2_500_000
    assert await state(evm_gw, evm_chain) == {
        "payer": 7_500_000,
        "pay_to": 0,
        "payments": {"failed": 1},
        "credits": None,
    }


def _resign(auth: dict[str, Any], chain: EvmChain) -> str:
    """The payer's signature over ``auth`` as it stands (its nonce replaced)."""
    from eth_account.messages import encode_typed_data

    rules = evm.EvmRules(chain.chain_id, chain.token, "USD Coin", "2", auth["to"], 0)
    message = {
        "from": auth["from"],
        "to": auth["to"],
        "value": int(auth["value"]),
        "validAfter": int(auth["validAfter"]),
        "validBefore": int(auth["validBefore"]),
        "nonce": bytes.fromhex(auth["nonce"][2:]),
    }
    signed = Account.from_key(PAYER_KEY).sign_message(
        encode_typed_data(full_message=evm.typed_data(rules, message))
    )
    return "0x" + bytes(signed.signature).hex()
