"""Session tokens: EdDSA (Ed25519) JWTs minted by a gateway, verified by nodes.

A node trusts no shared secret: a token is good only if its ``kid``/``iss`` is an issuer listed on
the registry program, the signature verifies with that very key, the time lies inside nbf..exp,
and the grant is for the node's service. The issuer list is read from chain through a short cache,
so removing an issuer on chain revokes its tokens everywhere once the cache expires.

A token carries the key of the node the gateway routed it to (``aud``); a node that verifies with
its own key as ``audience`` refuses tokens routed elsewhere (``wrong_node``), so one session's
token cannot be spent on several nodes of the role at once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from common.errors import CodedError

ALGORITHM = "EdDSA"
SERVICES = ("webrtc", "stt", "tts")
DEFAULT_LEEWAY_SECONDS = 5


class TokenError(CodedError):
    """A token was refused; ``code`` is the machine-readable reason the nodes send back."""


@dataclass(frozen=True)
class Grant:
    """What a token allows.

    ``video`` follows LiveKit's camelCase grant so LiveKit tooling reads it.
    """

    service: str
    room: str | None = None
    can_publish: bool = True
    can_subscribe: bool = True
    can_publish_data: bool = True
    room_admin: bool = False
    limit: int | None = None  # seconds for stt, characters for tts

    def claims(self, session_id: str) -> dict[str, Any]:
        if self.service == "webrtc":
            if not self.room:
                raise ValueError("a webrtc grant needs a room name")
            video: dict[str, Any] = {
                "roomJoin": True,
                "room": self.room,
                "canPublish": self.can_publish,
                "canSubscribe": self.can_subscribe,
                "canPublishData": self.can_publish_data,
            }
            if self.room_admin:
                video["roomAdmin"] = True
            return {"video": video}
        if self.service == "stt":
            return {"stt": {"session_id": session_id, "limit_seconds": self._limit()}}
        if self.service == "tts":
            return {"tts": {"session_id": session_id, "limit_characters": self._limit()}}
        raise ValueError(f"unknown service {self.service!r}: expected one of {', '.join(SERVICES)}")

    def _limit(self) -> int:
        if self.limit is None or self.limit <= 0:
            raise ValueError(f"a {self.service} grant needs a positive limit, got {self.limit!r}")
        return int(self.limit)


@dataclass(frozen=True)
class Claims:
    """A verified token."""

    issuer: str
    identity: str
    session_id: str
    service: str
    not_before: int
    expires_at: int
    grant: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)

    @property
    def limit(self) -> int | None:
        key = {"stt": "limit_seconds", "tts": "limit_characters"}.get(self.service)
        return int(self.grant[key]) if key else None

    @property
    def room(self) -> str | None:
        return self.grant.get("room") if self.service == "webrtc" else None


def _private_key(keypair: Keypair) -> Ed25519PrivateKey:
    return _private_key_from_seed(bytes(keypair)[:32])


def _key_id(keypair: Keypair) -> str:
    return _key_id_from_secret(bytes(keypair))


@lru_cache(maxsize=64)
def _key_id_from_secret(secret: bytes) -> str:
    # Keypair.pubkey() derives the public key again on every call (~35 us, a third of a mint)
    return str(Keypair.from_bytes(secret).pubkey())


@lru_cache(maxsize=64)
def _private_key_from_seed(seed: bytes) -> Ed25519PrivateKey:
    # A gateway signs every token with the same key: build the key object once, not per token.
    return Ed25519PrivateKey.from_private_bytes(seed)


@lru_cache(maxsize=4096)
def _public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def _public_key(pubkey: Pubkey) -> Ed25519PublicKey:
    return _public_key_from_bytes(bytes(pubkey))


def mint_token(
    issuer: Keypair,
    identity: str,
    grant: Grant,
    ttl_seconds: int,
    session_id: str | None = None,
    now: float | None = None,
    extra: dict[str, Any] | None = None,
    audience: str | None = None,
) -> str:
    """Sign a token for one session; ``jti`` is the session id the node reports usage against.

    ``audience`` is the key (base58) of the node the gateway routed the session to: it becomes
    the ``aud`` claim, and nodes refuse a token whose ``aud`` is not their own key. It is optional
    only so that a token minted by hand for testing (``registry token mint``) still works on
    nodes that verify without an audience."""
    if ttl_seconds <= 0:
        raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
    if not identity:
        raise ValueError("identity must not be empty")
    issued = int(now if now is not None else time.time())
    sid = session_id or str(uuid.uuid4())
    issuer_key = _key_id(issuer)
    claims: dict[str, Any] = {
        "iss": issuer_key,
        "sub": identity,
        "nbf": issued,
        "iat": issued,
        "exp": issued + int(ttl_seconds),
        "jti": sid,
        **(extra or {}),
        **grant.claims(sid),
    }
    if audience is not None:
        if not audience:
            raise ValueError("audience must be a node key (base58), not empty")
        claims["aud"] = audience
    return _encode(claims, issuer)


def _b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


@lru_cache(maxsize=64)
def _header_segment(kid: str) -> bytes:
    header = {"alg": ALGORITHM, "kid": kid, "typ": "JWT"}
    return _b64url(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())


def _encode(claims: dict[str, Any], signer: Keypair) -> str:
    """The compact JWS (RFC 7515) of ``claims``, EdDSA-signed, ``kid`` = the signer's key.

    Not ``jwt.encode``: it rebuilds and re-serializes the same header and re-checks claims we
    built ourselves on every call, about a third of a token's cost at the gateway's request rate.
    PyJWT still verifies every token (``verify_token``), and the tests decode minted tokens
    with PyJWT and the LiveKit SDK."""
    signing_input = (
        _header_segment(_key_id(signer))
        + b"."
        + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    return (signing_input + b"." + _b64url(_private_key(signer).sign(signing_input))).decode()


def service_of(claims: dict[str, Any]) -> str | None:
    for service, key in (("webrtc", "video"), ("stt", "stt"), ("tts", "tts")):
        if isinstance(claims.get(key), dict):
            return service
    return None


def verify_token(
    token: str,
    trusted_issuers: Iterable[str],
    service: str,
    now: float | None = None,
    leeway: int = DEFAULT_LEEWAY_SECONDS,
    audience: str | None = None,
) -> Claims:
    """Check a token against a set of issuer keys (base58); raise TokenError naming the failed
    check.

    With ``audience`` (the verifying node's own key) the token's ``aud`` must be exactly that key:
    a token without ``aud``, or routed to another node, is refused with ``wrong_node``."""
    if not isinstance(token, str) or token.count(".") != 2:
        raise TokenError("invalid_token", "token is not a JWT (three base64url parts)")
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise TokenError("invalid_token", f"token cannot be decoded: {exc}") from None
    if header.get("alg") != ALGORITHM:
        raise TokenError("invalid_token", f"token algorithm {header.get('alg')!r} is not EdDSA")
    issuer = unverified.get("iss")
    if not isinstance(issuer, str) or header.get("kid", issuer) != issuer:
        raise TokenError("invalid_token", "token kid and iss must name the same issuer key")
    if issuer not in set(trusted_issuers):
        raise TokenError("untrusted_issuer", f"issuer {issuer} is not listed on the registry")
    try:
        key = _public_key(Pubkey.from_string(issuer))
    except ValueError:
        raise TokenError(
            "invalid_token", f"issuer {issuer!r} is not an Ed25519 public key"
        ) from None
    current = time.time() if now is None else now
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            leeway=leeway,
            # ``aud`` is checked below, so that a wrong one is ``wrong_node`` and not a PyJWT error
            options={
                "require": ["exp", "nbf", "iss", "sub", "jti"],
                "verify_exp": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_nbf": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise TokenError("invalid_signature", "token signature does not verify") from None
    except jwt.PyJWTError as exc:
        raise TokenError("invalid_token", f"token rejected: {exc}") from None
    # Time checks by hand so that tests and nodes can pass their own clock.
    if current > claims["exp"] + leeway:
        raise TokenError("token_expired", f"token expired at {claims['exp']}")
    if current < claims["nbf"] - leeway:
        raise TokenError("token_not_yet_valid", f"token not valid before {claims['nbf']}")
    actual = service_of(claims)
    if actual != service:
        raise TokenError("wrong_service", f"token grants {actual!r}, this node serves {service!r}")
    if audience is not None:
        _check_audience(claims.get("aud"), audience)
    grant_key = "video" if service == "webrtc" else service
    return Claims(
        issuer=issuer,
        identity=str(claims["sub"]),
        session_id=str(claims["jti"]),
        service=service,
        not_before=int(claims["nbf"]),
        expires_at=int(claims["exp"]),
        grant=dict(claims[grant_key]),
        raw=claims,
    )


def _check_audience(aud: Any, audience: str) -> None:
    if aud is None:
        raise TokenError(
            "wrong_node",
            f"token names no node (no aud claim); this node is {audience}: "
            "ask the gateway for a session routed to this node",
        )
    if aud != audience:
        raise TokenError(
            "wrong_node",
            f"token was routed to node {aud}, this node is {audience}: "
            "use the node the gateway answered with",
        )


IssuerSource = Callable[[], Awaitable[Iterable[str]]]


class TokenVerifier:
    """Verifies tokens against the issuers on chain, re-reading the list at most every
    ``cache_ttl`` s.

    An unknown issuer forces one early refresh (rate limited), so a gateway added on chain a moment
    ago is trusted without waiting out the cache; a removed one stays trusted at most ``cache_ttl``.
    """

    def __init__(
        self,
        issuers: IssuerSource,
        service: str,
        cache_ttl: float = 10.0,
        leeway: int = DEFAULT_LEEWAY_SECONDS,
        audience: str | None = None,
    ) -> None:
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}: expected one of {', '.join(SERVICES)}")
        self._source = issuers
        self.service = service
        self.cache_ttl = cache_ttl
        self.leeway = leeway
        self.audience = audience  # the node's own key: tokens routed elsewhere are refused
        self._issuers: frozenset[str] = frozenset()
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def trusted_issuers(self, force: bool = False) -> frozenset[str]:
        async with self._lock:
            age = time.monotonic() - self._fetched_at
            if age > self.cache_ttl or (force and age > 1.0):
                self._issuers = frozenset(await self._source())
                self._fetched_at = time.monotonic()
            return self._issuers

    async def verify(
        self, token: str, now: float | None = None, audience: str | None = None
    ) -> Claims:
        """``audience`` (else the verifier's own) is the key a token's ``aud`` must name."""
        aud = audience if audience is not None else self.audience
        issuers = await self.trusted_issuers()
        try:
            return verify_token(
                token, issuers, self.service, now=now, leeway=self.leeway, audience=aud
            )
        except TokenError as exc:
            if exc.code != "untrusted_issuer":
                raise
        issuers = await self.trusted_issuers(force=True)
        return verify_token(token, issuers, self.service, now=now, leeway=self.leeway, audience=aud)


# ---------------------------------------------------------------- signed bodies (node -> gateway)

BODY_TOKEN_TTL_SECONDS = 300
BODY_SIGNATURE_HEADER = "Authorization"


def body_digest(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(body).digest()).decode()


def sign_body(
    signer: Keypair,
    body: bytes,
    now: float | None = None,
    ttl_seconds: int = BODY_TOKEN_TTL_SECONDS,
) -> str:
    """A JWT by a node's own key that binds one request body (LiveKit's webhook scheme).

    The ``sha256`` claim is base64(SHA-256(body)); ``iss``/``kid`` is the node key. Sent as
    ``Authorization: Bearer <jwt>`` with usage events and SFU webhooks.
    """
    issued = int(now if now is not None else time.time())
    key = _key_id(signer)
    claims = {
        "iss": key,
        "nbf": issued,
        "iat": issued,
        "exp": issued + ttl_seconds,
        "sha256": body_digest(body),
    }
    return _encode(claims, signer)


def verify_body(
    token: str, body: bytes, now: float | None = None, leeway: int = DEFAULT_LEEWAY_SECONDS
) -> str:
    """Check a body token's signature, time and digest; return the signer's key (base58).

    Whether that key may post is the caller's question (a registered, active node on chain).
    """
    if not isinstance(token, str) or token.count(".") != 2:
        raise TokenError("invalid_token", "request signature is not a JWT")
    try:
        header = jwt.get_unverified_header(token)
        issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
        if header.get("alg") != ALGORITHM or not isinstance(issuer, str):
            raise TokenError("invalid_token", "request signature must be EdDSA with an iss claim")
        key = _public_key(Pubkey.from_string(issuer))
        claims = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            options={
                "require": ["exp", "iss", "sha256"],
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise TokenError("invalid_signature", "request signature does not verify") from None
    except (jwt.PyJWTError, ValueError) as exc:
        raise TokenError("invalid_token", f"request signature rejected: {exc}") from None
    current = time.time() if now is None else now
    if current > claims["exp"] + leeway:
        raise TokenError("token_expired", "request signature expired")
    if claims["sha256"] != body_digest(body):
        raise TokenError("body_mismatch", "request body does not match the signed sha256 claim")
    return issuer
