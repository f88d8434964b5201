"""The MPP (Tempo) and TRON rails: their 402 challenges, and refusals of what we cannot verify.

Neither rail settles here. The MPP challenge follows the "Payment" HTTP authentication scheme
(draft-httpauth-payment): ``WWW-Authenticate: Payment id=..., realm, method="tempo",
intent="charge", request=<base64url JCS JSON>, expires, header="Payment-Authorization"`` (the
credential goes in ``Payment-Authorization`` because ``Authorization`` carries the wallet
signature), with an HMAC-SHA256 challenge id binding the parameters. A credential is decoded,
its challenge binding and expiry checked, and then refused: verifying a Tempo transaction needs a
Tempo RPC, which this gateway does not have. The TRON challenge is x402 v2 ``exact_permit`` on
``tron:mainnet`` (the Bank of AI facilitator's scheme); a ``PAYMENT-SIGNATURE`` is decoded and
refused because no facilitator is configured to verify it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from datetime import UTC, datetime
from typing import Any

from common import jsonsafe

from .config import MppPayments, TronPayments
from .x402 import EXPOSE, H_PAYMENT_REQUIRED, Offer, PaymentInvalid, b64json

H_WWW_AUTHENTICATE = "WWW-Authenticate"
H_PAYMENT_AUTHORIZATION = "Payment-Authorization"
PROBLEMS = "https://paymentauth.org/problems/"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _jcs(obj: Any) -> str:
    """RFC 8785 for the values we emit (strings, ints, objects): sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class MppChallenges:
    def __init__(self, cfg: MppPayments) -> None:
        self.cfg = cfg
        if cfg.secret_file is not None and cfg.secret_file.exists():
            self._secret = cfg.secret_file.read_bytes().strip()
        else:
            self._secret = os.urandom(32)

    def _id(self, params: dict[str, str]) -> str:
        slots = [
            params["realm"],
            params["method"],
            params["intent"],
            params["request"],
            params.get("expires", ""),
            params.get("digest", ""),
            params.get("opaque", ""),
        ]
        if "header" in params:
            slots.append(params["header"])
        return _b64url(hmac.new(self._secret, "|".join(slots).encode(), hashlib.sha256).digest())

    def challenge(self, amount_atomic: int, now: float | None = None) -> tuple[dict[str, str], str]:
        now = time.time() if now is None else now
        request = {
            "amount": str(amount_atomic),
            "currency": self.cfg.currency,
            "recipient": self.cfg.recipient,
            "methodDetails": {"chainId": self.cfg.chain_id, "feePayer": False},
        }
        expires = datetime.fromtimestamp(int(now) + self.cfg.challenge_ttl_seconds, UTC)
        params = {
            "realm": self.cfg.realm,
            "method": "tempo",
            "intent": "charge",
            "request": _b64url(_jcs(request).encode()),
            "expires": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "header": H_PAYMENT_AUTHORIZATION,
        }
        params = {"id": self._id(params), **params}
        header = "Payment " + ", ".join(f'{k}="{v}"' for k, v in params.items())
        return {H_WWW_AUTHENTICATE: header, EXPOSE: H_WWW_AUTHENTICATE}, params["id"]

    def check_credential(self, value: str, now: float | None = None) -> tuple[str, str]:
        """(problem type, detail) for a credential: always a refusal, the reason as precise as
        can be told (malformed, not our challenge, expired, or unverifiable here)."""
        now = time.time() if now is None else now
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "payment" or not token.strip():
            return "malformed-credential", "expected 'Payment <base64url credential>'"
        try:
            cred = jsonsafe.loads(_unb64url(token.strip()))
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return "malformed-credential", "the credential is not base64url-encoded JSON"
        ch = cred.get("challenge") if isinstance(cred, dict) else None
        if (
            not isinstance(ch, dict)
            or not isinstance(cred.get("payload"), dict)
            or not all(
                isinstance(ch.get(k), str) for k in ("id", "realm", "method", "intent", "request")
            )
        ):
            return (
                "malformed-credential",
                "the credential needs 'challenge' (id, realm, method, "
                "intent, request) and 'payload'",
            )
        params = {
            k: ch[k]
            for k in (
                "realm",
                "method",
                "intent",
                "request",
                "expires",
                "digest",
                "opaque",
                "header",
            )
            if isinstance(ch.get(k), str)
        }
        if not hmac.compare_digest(self._id(params), ch["id"]):
            return (
                "invalid-challenge",
                "the challenge was not issued by this gateway (or was altered)",
            )
        try:
            expires = datetime.strptime(ch.get("expires", ""), "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            return "invalid-challenge", "the challenge has no valid expiry"
        if expires.replace(tzinfo=UTC).timestamp() < now:
            return "payment-expired", f"the challenge expired at {ch['expires']}"
        return (
            "verification-failed",
            "Tempo (MPP) payments cannot be verified by this gateway: it has no Tempo RPC to "
            "check the signed transfer, so the credential was not accepted and nothing was "
            "charged or credited; pay with x402 at /v1/credits/purchase instead",
        )


def problem(kind: str, detail: str) -> dict[str, Any]:
    """RFC 9457 problem details, plus the gateway's own ``error`` field."""
    return {
        "type": PROBLEMS + kind,
        "title": kind.replace("-", " ").capitalize(),
        "status": 402,
        "detail": detail,
        "error": detail,
    }


def tron_offer(cfg: TronPayments, amount_usd_micro: int, resource: str) -> Offer:
    amount = amount_usd_micro * 10**cfg.decimals // 1_000_000
    return Offer(
        "tron",
        "exact_permit",
        cfg.network,
        None,
        cfg.asset,
        cfg.pay_to,
        amount,
        300,
        {"name": "Tether USD", "version": "1", "resource": resource},
    )


def tron_required(offer: Offer, resource: str, error: str) -> tuple[dict[str, Any], dict[str, str]]:
    v2 = {
        "x402Version": 2,
        "error": error,
        "resource": {
            "url": resource,
            "description": "voicenet credits",
            "mimeType": "application/json",
        },
        "accepts": [offer.v2()],
    }
    return {"error": error, **{k: v2[k] for k in ("x402Version", "accepts")}}, {
        H_PAYMENT_REQUIRED: b64json(v2),
        EXPOSE: H_PAYMENT_REQUIRED,
    }


def tron_refusal(data: dict[str, Any], facilitator_url: str | None) -> PaymentInvalid:
    """Why a decoded TRON payment is refused (always: nothing here can verify it)."""
    if data.get("x402Version") != 2 or not isinstance(data.get("payload"), dict):
        return PaymentInvalid(
            "invalid_payload", "malformed PAYMENT-SIGNATURE: expected an x402 v2 payload"
        )
    where = (
        f"the facilitator {facilitator_url} is not reachable from here"
        if facilitator_url
        else "no TRON facilitator is configured"
    )
    return PaymentInvalid(
        "unverifiable_payment",
        f"TRON payments are verified and settled by the Bank of AI facilitator; "
        f"{where}, so the payment was not accepted and nothing was credited",
    )
