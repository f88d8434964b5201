"""x402 on the wire: payment requirements (v1 body, v2 ``PAYMENT-REQUIRED`` header), payment
payloads (``X-PAYMENT`` v1, ``PAYMENT-SIGNATURE`` v2) and settlement responses
(``X-PAYMENT-RESPONSE`` / ``PAYMENT-RESPONSE``).

Shapes follow the official ``x402`` package (checked against x402 2.25.0's pydantic models):
every header is base64 of camelCase JSON; v1 requirements carry ``maxAmountRequired``,
``resource``, ``description``, ``mimeType`` and name networks (``solana-devnet``, ``base``); v2
carries ``amount`` and CAIP-2 ids, with the resource in a top-level ``resource`` object, and the
v2 payload echoes the chosen requirements in ``accepted``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from common import jsonsafe

H_PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
H_PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"
H_PAYMENT_RESPONSE = "PAYMENT-RESPONSE"
H_X_PAYMENT = "X-PAYMENT"
H_X_PAYMENT_RESPONSE = "X-PAYMENT-RESPONSE"
EXPOSE = "Access-Control-Expose-Headers"

MAX_HEADER_CHARS = 16 * 1024  # a Solana transaction is at most 1232 bytes; JSON + base64 around it


class PaymentInvalid(Exception):
    """A payment that cannot be accepted. ``reason`` is an x402-style machine code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Offer:
    """One way to pay for one purchase: an entry of ``accepts``."""

    rail: str  # "solana" | "evm" | "tron"
    scheme: str
    network: str  # CAIP-2 (v2)
    network_v1: str | None  # legacy name (v1), None where v1 has no name for it
    asset: str
    pay_to: str
    amount: int  # atomic units of the asset
    max_timeout_seconds: int
    extra: dict[str, Any] = field(default_factory=dict)

    def v2(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "network": self.network,
            "amount": str(self.amount),
            "asset": self.asset,
            "payTo": self.pay_to,
            "maxTimeoutSeconds": self.max_timeout_seconds,
            "extra": dict(self.extra),
        }

    def v1(self, resource: str, description: str) -> dict[str, Any] | None:
        if self.network_v1 is None:
            return None
        return {
            "scheme": self.scheme,
            "network": self.network_v1,
            "maxAmountRequired": str(self.amount),
            "resource": resource,
            "description": description,
            "mimeType": "application/json",
            "payTo": self.pay_to,
            "maxTimeoutSeconds": self.max_timeout_seconds,
            "asset": self.asset,
            "extra": dict(self.extra),
        }


def b64json(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode()


def payment_required(
    offers: list[Offer], resource: str, description: str, error: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """The 402 answer: v1 JSON body (with our ``error``) and the v2 ``PAYMENT-REQUIRED`` header."""
    body = {
        "x402Version": 1,
        "error": error,
        "accepts": [a for a in (o.v1(resource, description) for o in offers) if a],
    }
    v2 = {
        "x402Version": 2,
        "error": error,
        "resource": {"url": resource, "description": description, "mimeType": "application/json"},
        "accepts": [o.v2() for o in offers],
    }
    return body, {H_PAYMENT_REQUIRED: b64json(v2), EXPOSE: H_PAYMENT_REQUIRED}


def settle_headers(transaction: str, network: str, payer: str, amount: int) -> dict[str, str]:
    value = b64json(
        {
            "success": True,
            "transaction": transaction,
            "network": network,
            "payer": payer,
            "amount": str(amount),
        }
    )
    return {
        H_PAYMENT_RESPONSE: value,
        H_X_PAYMENT_RESPONSE: value,
        EXPOSE: f"{H_PAYMENT_RESPONSE}, {H_X_PAYMENT_RESPONSE}",
    }


def decode_header(value: str, name: str) -> dict[str, Any]:
    """Base64 (standard or URL-safe, padding optional) JSON object, or PaymentInvalid."""
    text = value.strip()
    if not text:
        raise PaymentInvalid("invalid_payload", f"malformed {name} header: empty")
    if len(text) > MAX_HEADER_CHARS:
        raise PaymentInvalid(
            "invalid_payload",
            f"malformed {name} header: {len(text)} characters (max {MAX_HEADER_CHARS})",
        )
    t = text.replace("-", "+").replace("_", "/")
    t += "=" * (-len(t) % 4)
    try:
        raw = base64.b64decode(t, validate=True)
        data = jsonsafe.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise PaymentInvalid(
            "invalid_payload", f"malformed {name} header: not base64-encoded JSON ({exc})"
        ) from None
    if not isinstance(data, dict):
        raise PaymentInvalid("invalid_payload", f"malformed {name} header: not a JSON object")
    return data


@dataclass(frozen=True)
class PaymentPayload:
    version: int
    scheme: str
    network: str  # as the client wrote it (v1 name or v2 CAIP-2)
    payload: dict[str, Any]
    accepted: dict[str, Any] | None  # v2 only


def parse_payment(data: dict[str, Any], header: str) -> PaymentPayload:
    version = data.get("x402Version")
    payload = data.get("payload")
    if not isinstance(payload, dict):
        raise PaymentInvalid("invalid_payload", f"malformed {header}: no 'payload' object")
    if version == 1:
        scheme, network = data.get("scheme"), data.get("network")
        if not isinstance(scheme, str) or not isinstance(network, str):
            raise PaymentInvalid(
                "invalid_payload", f"malformed {header}: x402 v1 needs 'scheme' and 'network'"
            )
        return PaymentPayload(1, scheme, network, payload, None)
    if version == 2:
        accepted = data.get("accepted")
        if (
            not isinstance(accepted, dict)
            or not isinstance(accepted.get("scheme"), str)
            or not isinstance(accepted.get("network"), str)
        ):
            raise PaymentInvalid(
                "invalid_payload",
                f"malformed {header}: x402 v2 needs 'accepted' with scheme and network",
            )
        return PaymentPayload(2, accepted["scheme"], accepted["network"], payload, accepted)
    raise PaymentInvalid(
        "invalid_x402_version", f"unsupported x402Version {version!r} in {header}: expected 1 or 2"
    )


def match_offer(p: PaymentPayload, offers: list[Offer]) -> Offer:
    """The offer this payment answers; the v2 ``accepted`` echo must equal it field for field."""
    for o in offers:
        if p.scheme != o.scheme or p.network not in (o.network, o.network_v1):
            continue
        if p.accepted is not None:
            want = o.v2()
            for key in ("asset", "payTo", "amount"):
                if str(p.accepted.get(key)) != want[key]:
                    raise PaymentInvalid(
                        "requirements_mismatch",
                        f"the payment accepted {key}={p.accepted.get(key)!r} but this purchase "
                        f"requires {key}={want[key]!r}",
                    )
        return o
    offered = ", ".join(f"{o.scheme} on {o.network}" for o in offers) or "nothing"
    raise PaymentInvalid(
        "unsupported_scheme",
        f"no offer for scheme {p.scheme!r} on network {p.network!r} (offered: {offered})",
    )
