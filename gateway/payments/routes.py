"""``POST /v1/credits/purchase`` (x402), ``/purchase/mpp`` and ``/purchase/tron``.

All three sit behind wallet auth; a 402 gives the request's signature back (gateway/auth.py), so
a client retries the same signed request with its payment attached.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, Literal

from aiohttp import web
from pydantic import Field, field_validator

from gateway.bodies import parse_body
from gateway.ledger import pricing
from gateway.routes import Route
from gateway.schemas import Body

from .challenges import H_PAYMENT_AUTHORIZATION, problem, tron_offer, tron_refusal, tron_required
from .service import SettlementPending, SettlementUnavailable
from .wiring import payments_of
from .x402 import (
    H_PAYMENT_SIGNATURE,
    H_X_PAYMENT,
    PaymentInvalid,
    decode_header,
    match_offer,
    parse_payment,
    payment_required,
    settle_headers,
)

MAX_PURCHASE_USD = Decimal("1000")
DESCRIPTION = "voicenet credits: {usd} USD = {micro} microcredits"


def _amount(v: float) -> float:
    d = Decimal(str(v))
    if d < pricing.MIN_PURCHASE_USD or d > MAX_PURCHASE_USD:
        raise ValueError(
            f"amount_usd must be between {pricing.MIN_PURCHASE_USD} and {MAX_PURCHASE_USD}, got {v}"
        )
    if d != d.quantize(Decimal("0.000001")):
        raise ValueError(f"amount_usd has at most 6 decimal places (1 microcredit), got {v}")
    return v


class PurchaseRequest(Body):
    wallet_address: str = Field(min_length=1, max_length=128)
    wallet_chain: Literal["solana", "evm"]
    amount_usd: float

    _amount = field_validator("amount_usd")(_amount)


class MppPurchaseRequest(Body):
    wallet_address: str = Field(min_length=1, max_length=128)
    wallet_chain: Literal["evm", "tempo"]
    amount_usd: float

    _amount = field_validator("amount_usd")(_amount)


class TronPurchaseRequest(Body):
    amount_usd: float

    _amount = field_validator("amount_usd")(_amount)


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )


async def purchase(request: web.Request) -> web.Response:
    body: PurchaseRequest = await parse_body(request, PurchaseRequest)
    svc = await payments_of(request)
    await svc.ensure_ready()
    usd = Decimal(str(body.amount_usd))
    micro = pricing.usd_to_microcredits(usd)
    offers = svc.offers(usd, body.wallet_chain)
    if not offers:
        return _json(503, {"error": f"no payment rail is available: {svc.unavailable_reason()}"})
    resource = str(request.url)
    description = DESCRIPTION.format(usd=usd, micro=micro)

    def required(error: str) -> web.Response:
        data, headers = payment_required(offers, resource, description, error)
        return _json(402, data, headers)

    name = H_PAYMENT_SIGNATURE if H_PAYMENT_SIGNATURE in request.headers else H_X_PAYMENT
    value = request.headers.get(name)
    if value is None:
        return required(
            f"payment required: {usd} USD buys {micro} microcredits; pay with x402 "
            f"({H_X_PAYMENT} or {H_PAYMENT_SIGNATURE})"
        )
    try:
        p = parse_payment(decode_header(value, name), name)
        offer = match_offer(p, offers)
        result = await svc.settle(body.wallet_chain, body.wallet_address, usd, p, offer)
    except PaymentInvalid as exc:
        return required(f"payment refused ({exc.reason}): {exc.message}")
    except SettlementUnavailable as exc:
        return _json(503, {"error": str(exc)})
    except SettlementPending as exc:
        return _json(504, {"error": str(exc), "transaction": exc.reference})
    return _json(
        200,
        {
            "account_id": result.account_id,
            "credited_microcredits": str(result.credited_microcredits),
            "amount_usd": float(result.amount_usd),
        },
        settle_headers(result.transaction, result.network, result.payer, result.amount_atomic),
    )


async def purchase_mpp(request: web.Request) -> web.Response:
    body: MppPurchaseRequest = await parse_body(request, MppPurchaseRequest)
    svc = await payments_of(request)
    usd = Decimal(str(body.amount_usd))
    mpp = svc.mpp
    headers, _ = mpp.challenge(int(usd * 1_000_000))
    credential = request.headers.get(H_PAYMENT_AUTHORIZATION)
    if credential is None:
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("payment "):
            credential = auth
    if credential is None:
        return _json(
            402,
            problem(
                "payment-required",
                f"payment required: {usd} USD via MPP (Tempo); send the "
                f"credential in {H_PAYMENT_AUTHORIZATION}",
            ),
            headers,
        )
    kind, detail = mpp.check_credential(credential)
    return _json(402, problem(kind, detail), headers)


async def purchase_tron(request: web.Request) -> web.Response:
    body: TronPurchaseRequest = await parse_body(request, TronPurchaseRequest)
    svc = await payments_of(request)
    usd = Decimal(str(body.amount_usd))
    resource = str(request.url)
    offer = tron_offer(svc.cfg.tron, pricing.usd_to_microcredits(usd), resource)
    value = request.headers.get(H_PAYMENT_SIGNATURE)
    if value is None:
        data, headers = tron_required(
            offer,
            resource,
            f"payment required: {usd} USD in USDT on TRON "
            f"({H_PAYMENT_SIGNATURE}, scheme exact_permit)",
        )
        return _json(402, data, headers)
    try:
        raise tron_refusal(decode_header(value, H_PAYMENT_SIGNATURE), svc.cfg.tron.facilitator_url)
    except PaymentInvalid as exc:
        data, headers = tron_required(
            offer, resource, f"payment refused ({exc.reason}): {exc.message}"
        )
        return _json(402, data, headers)


PAYMENT_ROUTES = (
    Route(
        "POST",
        "/v1/credits/purchase",
        purchase,
        "Purchase credits with an x402 payment",
        model=PurchaseRequest,
    ),
    Route(
        "POST",
        "/v1/credits/purchase/mpp",
        purchase_mpp,
        "Purchase credits via MPP (challenge)",
        model=MppPurchaseRequest,
    ),
    Route(
        "POST",
        "/v1/credits/purchase/tron",
        purchase_tron,
        "Purchase credits via TRON (challenge)",
        model=TronPurchaseRequest,
    ),
)
