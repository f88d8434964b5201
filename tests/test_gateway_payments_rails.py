"""The other rails: EVM (x402 exact, EIP-3009) verified end to end through the route; MPP and
TRON challenges and their refusals. Here the EVM RPC is unreachable ("nothing was used and nothing
credited", 503); settlement on a real EVM, front-running included, is in
test_gateway_payments_evm.py.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from gateway.config import GatewayConfig
from gateway.payments import evm, payer
from gateway.payments.book import PaymentBook
from gateway.payments.challenges import MppChallenges
from gateway.payments.config import EvmPayments, MppPayments, PaymentsConfig, SolanaPayments
from gateway.payments.x402 import PaymentInvalid
from tests.conftest import free_port
from tests.support.payments import Pay

PAY_TO = "0x" + "ab" * 20
USDC_BASE = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
KEY = "0x" + "42" * 32
ADDRESS = Account.from_key(KEY).address


@pytest.fixture
async def evm_pay(pay: Pay) -> AsyncIterator[Pay]:
    """The same gateway with EVM enabled against an RPC port where nothing listens."""
    s = pay.config.payments.solana
    pay.config = pay.config.model_copy(
        update={
            "payments": PaymentsConfig(
                solana=s,
                evm=EvmPayments(
                    enabled=True,
                    chain_id=8453,
                    pay_to=PAY_TO,
                    rpc_url=f"http://127.0.0.1:{free_port()}",
                    relayer_key_file=pay.tmp / "relayer.hex",
                ),
            )
        }
    )
    (pay.tmp / "relayer.hex").write_text("0x" + "07" * 32)
    await pay.restart()
    yield pay


async def post(
    pay: Pay,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    path: str = "/v1/credits/purchase",
    key: str = KEY,
) -> tuple[int, Any, Any]:
    auth = pay.auth(key, path, "evm")
    async with pay.http.post(pay.url + path, json=body, headers={**auth, **(headers or {})}) as r:
        return r.status, await r.json(content_type=None), r.headers


BODY = {"wallet_address": ADDRESS, "wallet_chain": "evm", "amount_usd": 2.5}


async def evm_requirement(pay: Pay, version: int = 2) -> dict[str, Any]:
    status, body, headers = await post(pay, BODY)
    assert status == 402
    _, accepts = payer.requirements_from_402(headers if version == 2 else {}, body)
    assert accepts[0]["network"] == ("eip155:8453" if version == 2 else "base")  # own chain first
    return accepts[0]


async def test_evm_offer_is_advertised(evm_pay: Pay) -> None:
    req = await evm_requirement(evm_pay)
    assert req == {
        "scheme": "exact",
        "network": "eip155:8453",
        "amount": "2500000",
        "asset": USDC_BASE,
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 300,
        "extra": {"name": "USD Coin", "version": "2"},
    }
    v1 = await evm_requirement(evm_pay, version=1)
    assert v1["maxAmountRequired"] == "2500000" and v1["asset"] == USDC_BASE


@pytest.mark.parametrize(
    "override,needle",
    [
        ({"value": 2_499_999}, "amount_mismatch"),
        ({"to": "0x" + "cd" * 20}, "recipient_mismatch"),
        # Seconds from the test's own run (a clock read at collection goes stale in a long run).
        ({"valid_before": -1}, "valid_before"),
        ({"valid_after": 600}, "valid_after"),
        ({"token_name": "Not USDC"}, "signed by"),  # wrong EIP-712 domain: another signer recovers
    ],
)
async def test_evm_verification_refusals(
    evm_pay: Pay, override: dict[str, Any], needle: str
) -> None:
    req = await evm_requirement(evm_pay)
    now = int(time.time())
    override = {k: now + v if k.startswith("valid_") else v for k, v in override.items()}
    payload = payer.evm_authorization(KEY, req, 8453, **override)
    name, value = payer.payment_header(2, req, payload)
    status, body, _ = await post(evm_pay, BODY, {name: value})
    assert status == 402 and needle in body["error"], body
    assert await PaymentBook(evm_pay.ledger).count_by_status() == {}
    assert await evm_pay.ledger.get_account("evm", ADDRESS) is None


async def test_evm_wrong_chain_and_tampered_signature(evm_pay: Pay) -> None:
    req = await evm_requirement(evm_pay)
    other_chain = payer.evm_authorization(KEY, req, 84532)  # signed for Base Sepolia
    name, value = payer.payment_header(2, req, other_chain)
    status, body, _ = await post(evm_pay, BODY, {name: value})
    assert status == 402 and "signed by" in body["error"]
    good = payer.evm_authorization(KEY, req, 8453)
    sig = bytearray(bytes.fromhex(good["signature"][2:]))
    sig[10] ^= 1
    name, value = payer.payment_header(2, req, {**good, "signature": "0x" + sig.hex()})
    status, body, _ = await post(evm_pay, BODY, {name: value})
    assert status == 402 and "signature" in body["error"]
    someone = Account.create().address  # a valid authorization, but for another wallet's body
    name, value = payer.payment_header(2, req, good)
    status, body, _ = await post(evm_pay, {**BODY, "wallet_address": someone}, {name: value})
    assert status == 402 and "payer_mismatch" in body["error"]


async def test_evm_valid_payment_verifies_then_settlement_is_unavailable(evm_pay: Pay) -> None:
    """Verification passes; the relayer cannot reach the (absent) chain: 503, nothing used, nothing
    recorded, nothing credited, and the same authorization may be submitted again."""
    for version in (2, 1):
        req = await evm_requirement(evm_pay, version)
        payload = payer.evm_authorization(KEY, req, 8453)
        name, value = payer.payment_header(version, req, payload)
        for _ in range(2):
            status, body, _ = await post(evm_pay, BODY, {name: value})
            assert status == 503 and "cannot reach the EVM RPC" in body["error"], body
            assert "nothing was credited" in body["error"]
        assert await PaymentBook(evm_pay.ledger).count_by_status() == {}
        assert await evm_pay.ledger.get_account("evm", ADDRESS) is None


def test_evm_verify_unit_and_calldata() -> None:
    rules = evm.EvmRules(8453, USDC_BASE, "USD Coin", "2", PAY_TO, 1_000_000)
    req = {
        "payTo": PAY_TO,
        "asset": USDC_BASE,
        "amount": "1000000",
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USD Coin", "version": "2"},
    }
    p = evm.verify(payer.evm_authorization(KEY, req, 8453), rules)
    assert p.payer == ADDRESS and p.value == 1_000_000
    data = evm.transfer_calldata(p)
    # transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,
    # bytes32), the v/r/s variant FiatToken v2 exposes: selector 0xe3ee160e, nine 32-byte words.
    assert data[:4].hex() == "e3ee160e" and len(data) == 4 + 9 * 32
    assert p.reference(8453, USDC_BASE).startswith(f"evm:8453:{USDC_BASE.lower()}:")
    with pytest.raises(PaymentInvalid, match="65 bytes"):
        evm.verify({**payer.evm_authorization(KEY, req, 8453), "signature": "0x1234"}, rules)


@pytest.mark.fast
def test_a_wallet_picks_the_exact_offer_on_its_own_chain() -> None:
    """The SDK's payer reads networks as x402 v2 names them (CAIP-2) and as v1 does."""
    solana_v2 = {"scheme": "exact", "network": "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"}
    base_v2 = {"scheme": "exact", "network": "eip155:8453"}
    base_v1 = {"scheme": "exact", "network": "base"}
    other_scheme = {"scheme": "upto", "network": "eip155:8453"}
    assert payer.pick_offer([base_v2, solana_v2], "solana") is solana_v2
    assert payer.pick_offer([solana_v2, other_scheme, base_v1], "evm") is base_v1
    assert payer.pick_offer([{"scheme": "exact", "network": "solana-devnet"}], "solana")
    assert payer.pick_offer([other_scheme, solana_v2], "evm") is None
    assert payer.pick_offer([], "solana") is None


@pytest.mark.fast
async def test_a_malformed_402_or_offer_is_a_clear_error_for_the_payer() -> None:
    """What a broken or hostile gateway answers reaches the SDK's caller as a ValueError that
    says what is wrong, not as a decoding error from deep inside."""
    with pytest.raises(ValueError, match="not base64 JSON"):
        payer.requirements_from_402({"PAYMENT-REQUIRED": "%%%"}, None)
    not_object = base64.b64encode(b"[1, 2]").decode()
    with pytest.raises(ValueError, match="not a JSON object"):
        payer.requirements_from_402({"PAYMENT-REQUIRED": not_object}, None)
    with pytest.raises(ValueError, match="'accepts' is str, not a list"):
        payer.requirements_from_402({}, {"x402Version": 1, "accepts": "exact"})
    mixed = {"x402Version": 1, "accepts": ["exact", 7, {"scheme": "exact", "network": "base"}]}
    assert payer.requirements_from_402({}, mixed) == (1, [{"scheme": "exact", "network": "base"}])
    offer = {"scheme": "exact", "network": "eip155:base", "payTo": PAY_TO, "asset": USDC_BASE}
    with pytest.raises(ValueError, match="eip155:<decimal chain id>"):
        await payer.payment_payload(KEY, offer, "http://127.0.0.1:9")


# ---------------------------------------------------------------- MPP


async def test_mpp_challenge_and_refusals(pay: Pay) -> None:
    path = "/v1/credits/purchase/mpp"
    body = {"wallet_address": ADDRESS, "wallet_chain": "evm", "amount_usd": 1}
    status, data, headers = await post(pay, body, path=path)
    assert status == 402 and data["type"].endswith("/payment-required") and data["error"]
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith("Payment ")
    params = dict(part.split("=", 1) for part in challenge[len("Payment ") :].split(", "))
    params = {k: v.strip('"') for k, v in params.items()}
    assert (params["method"], params["intent"], params["header"]) == (
        "tempo",
        "charge",
        "Payment-Authorization",
    )
    request = json.loads(base64.urlsafe_b64decode(params["request"] + "=="))
    assert request["amount"] == "1000000" and request["methodDetails"]["chainId"] == 4217

    def credential(ch: dict[str, str]) -> str:
        raw = json.dumps(
            {
                "challenge": ch,
                "payload": {"type": "hash", "hash": "0x" + "00" * 32},
                "source": f"did:pkh:eip155:4217:{ADDRESS}",
            }
        ).encode()
        return "Payment " + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    cases = [
        ("Payment %%%", "malformed-credential"),
        (credential({**params, "request": params["request"] + "x"}), "invalid-challenge"),
        (credential(params), "verification-failed"),
    ]
    for value, kind in cases:
        status, data, headers = await post(pay, body, {"Payment-Authorization": value}, path=path)
        assert status == 402 and data["type"].endswith(kind), data
        assert headers["WWW-Authenticate"].startswith("Payment ")  # a fresh challenge
    assert "cannot be verified" in data["error"]
    assert await pay.ledger.get_account("evm", ADDRESS) is None


def test_mpp_expired_challenge() -> None:
    mpp = MppChallenges(MppPayments(challenge_ttl_seconds=30))
    headers, _ = mpp.challenge(1_000_000, now=time.time() - 3600)
    params = {
        k: v.strip('"')
        for k, v in (p.split("=", 1) for p in headers["WWW-Authenticate"][8:].split(", "))
    }
    raw = json.dumps({"challenge": params, "payload": {}}).encode()
    kind, _ = mpp.check_credential("Payment " + base64.urlsafe_b64encode(raw).decode())
    assert kind == "payment-expired"


# ---------------------------------------------------------------- TRON


async def test_tron_challenge_and_refusal(pay: Pay) -> None:
    path = "/v1/credits/purchase/tron"
    status, data, headers = await post(pay, {"amount_usd": 0.5}, path=path)
    assert status == 402
    v2 = json.loads(base64.b64decode(headers["PAYMENT-REQUIRED"]))
    (offer,) = v2["accepts"]
    assert (offer["scheme"], offer["network"], offer["asset"], offer["amount"]) == (
        "exact_permit",
        "tron:mainnet",
        "TR7NHqjeKQxGTCi8q8ZY4pL8otSzgjLj6t",
        "500000",
    )
    assert data["accepts"] == v2["accepts"]
    signed = base64.b64encode(
        json.dumps({"x402Version": 2, "accepted": offer, "payload": {"signature": "0x00"}}).encode()
    ).decode()
    for value, needle in [("***", "malformed"), (signed, "nothing was credited")]:
        status, data, _ = await post(
            pay, {"amount_usd": 0.5}, {"PAYMENT-SIGNATURE": value}, path=path
        )
        assert status == 402 and needle in data["error"], data
    status, data, _ = await post(pay, {"amount_usd": 0.01}, path=path)
    assert status == 400


def test_default_config_parses_and_yaml_section(tmp_path: Path) -> None:
    from gateway.config import load_gateway_config

    root = Path(__file__).resolve().parent.parent
    cfg = load_gateway_config(root / "configs" / "gateway.yaml")
    assert cfg.payments.solana.network == "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"
    assert cfg.payments.solana.max_compute_unit_price_microlamports == 50_000
    assert cfg.payments.solana.max_compute_unit_limit == 40_000
    assert GatewayConfig().payments == cfg.payments
    with pytest.raises(ValueError, match="less than or equal to 5000000"):
        SolanaPayments(max_compute_unit_price_microlamports=5_000_001)


async def test_no_rail_is_503_and_recovers_once_the_mint_exists(pay: Pay) -> None:
    """Started before `make up` made the mint: purchases answer 503 naming why, and work as soon
    as the asset exists (no gateway restart)."""
    from solders.keypair import Keypair

    from registry import usdc

    missing = pay.tmp / "keys" / "later-mint.json"
    s = pay.config.payments.solana.model_copy(update={"asset_keypair": missing})
    pay.config = pay.config.model_copy(update={"payments": PaymentsConfig(solana=s)})
    await pay.restart()
    key = Keypair()
    status, body, _ = await pay.post(key)
    assert status == 503 and "later-mint.json" in body["error"]
    mint, _ = await usdc.ensure_test_usdc(pay.chain, missing, pay.tmp / "keys" / "later-auth.json")
    pay.service._last_start = 0.0  # skip the 5 s retry spacing
    status, body, headers = await pay.post(key)
    assert status == 402 and body["accepts"][0]["asset"] == str(mint)
