"""Wallet-signature authentication: who is calling, proven by a signature, with no accounts or keys.

Every ``/v1/*`` call (except the public ones) carries four headers::

    Authorization:    <chain>:<signature>        e.g. solana:<base64>, evm:0x<130 hex>
    X-Wallet-Address: <address>                  base58 (solana) or 0x-hex (evm)
    X-Wallet-Chain:   solana | evm
    X-Timestamp:      <unix seconds>

over the message ``METHOD\\nPATH\\nTIMESTAMP`` (path without the query string). Solana wallets sign
it with Ed25519 (signature in base64, standard or URL-safe alphabet, padding optional); EVM wallets
sign it with EIP-191 ``personal_sign`` and the signer is recovered from the signature.

Replay: a signed request that spends or changes anything (every method but GET and HEAD) is good
for one answer. The guard is keyed on *what was signed by whom* (chain, signer, message), not on
the signature text, because the same authorisation has many spellings: base64 with or without
padding or in the URL-safe alphabet, hex in either case, EVM ``v`` as 27/28 or 0/1, and an ECDSA
signature ``(r, s)`` is equally valid as ``(r, n - s)``. Both schemes are deterministic, so an
honest client never produces two different signatures for one message anyway. A refused copy gets
401 ``replayed signature: ...``.

Two exceptions, both narrow:

* 402. The x402 flow answers 402 and the client retries *the same* signed request with a payment
  attached, so a 402 gives the signature back, bound to the SHA-256 of the body it answered: the
  message signs no body, so without that binding the returned signature would authorise any body
  (another wallet, another amount). A retry with another body is refused as a replay.
* Reads. A client written from the reference signs ``X-Timestamp`` in whole seconds, so two
  identical GETs within one second carry identical headers. A read spends nothing and shows only
  the signer's own data, so copies of a signed GET (or HEAD) are answered for
  ``SAFE_REPEAT_SECONDS`` after its first answer (its second, plus a second of network delay);
  later copies are refused as replays.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import logging
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from aiohttp import web
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature

from common.errors import CodedError

log = logging.getLogger(__name__)

CHAINS = ("solana", "evm")
DEFAULT_MAX_SKEW = 30
# Reads: copies of one signed GET/HEAD are answered this long after its first answer (clients sign
# whole seconds, so an honest repeat comes within one second; one more covers network delay).
SAFE_METHODS = frozenset({"GET", "HEAD"})
SAFE_REPEAT_SECONDS = 2.0
DEFAULT_EXEMPT_PATHS: tuple[str, ...] = (
    "/v1/pricing",
    "/v1/servers/status",
    "/openapi.json",
    "/internal/*",
    "/v1/webhooks/*",
)

H_AUTH = "Authorization"
H_ADDRESS = "X-Wallet-Address"
H_CHAIN = "X-Wallet-Chain"
H_TIMESTAMP = "X-Timestamp"


class AuthError(CodedError):
    """Authentication failed. ``code`` names the check; the message says what was wrong."""


@dataclass(frozen=True)
class Wallet:
    """The verified caller. ``address`` is canonical: base58 for Solana, EIP-55 checksum for EVM."""

    address: str
    chain: str
    # Replay identity of the signed request and the moment its timestamp falls out of the window.
    signature_id: str = field(default="", compare=False, repr=False)
    expires_at: float = field(default=0.0, compare=False, repr=False)


def signed_message(method: str, path: str, timestamp: str | int) -> bytes:
    """The bytes a wallet signs: ``METHOD\\nPATH\\nTIMESTAMP``, the path stripped of its query."""
    return f"{method.upper()}\n{path.split('?', 1)[0]}\n{timestamp}".encode()


# ---------------------------------------------------------------- verification


def verify_request(
    method: str,
    path: str,
    headers: Mapping[str, str],
    now: float | None = None,
    *,
    max_skew: float = DEFAULT_MAX_SKEW,
) -> Wallet:
    """Check the four auth headers of one request; return the caller or raise ``AuthError``.

    Stateless: the replay check needs a ``ReplayGuard`` and is done by the middleware (or by the
    caller) with ``Wallet.signature_id``.
    """
    now = time.time() if now is None else now
    h = {k.lower(): v for k, v in reversed(list(headers.items()))}  # first value wins

    def need(name: str) -> str:
        value = h.get(name.lower(), "").strip()
        if not value:
            raise AuthError("missing_header", f"missing header {name}")
        return value

    auth, address, chain, ts_text = need(H_AUTH), need(H_ADDRESS), need(H_CHAIN), need(H_TIMESTAMP)

    chain = chain.lower()
    if chain not in CHAINS:
        raise AuthError(
            "bad_chain", f"unknown chain {chain!r} in {H_CHAIN}: expected solana or evm"
        )
    auth_chain, sep, sig_text = auth.partition(":")
    if not sep or not sig_text.strip():
        raise AuthError(
            "bad_authorization",
            f"bad {H_AUTH} header {auth[:40]!r}: expected '<chain>:<signature>'",
        )
    auth_chain, sig_text = auth_chain.strip().lower(), sig_text.strip()
    if auth_chain != chain:
        raise AuthError(
            "chain_mismatch",
            f"chain mismatch: {H_AUTH} says {auth_chain!r} but {H_CHAIN} says {chain!r}",
        )

    if not ts_text.isascii() or not ts_text.isdigit():
        raise AuthError(
            "bad_timestamp", f"bad {H_TIMESTAMP} {ts_text[:20]!r}: expected unix seconds"
        )
    ts = int(ts_text)
    if abs(now - ts) > max_skew:
        direction = "ahead of" if ts > now else "behind"
        raise AuthError(
            "timestamp_skew",
            f"timestamp skew: {H_TIMESTAMP} {ts} is {abs(now - ts):.0f} s {direction} server time "
            f"(limit ±{max_skew:g} s)",
        )

    message = signed_message(method, path, ts_text)
    if chain == "solana":
        signer = _verify_solana(address, sig_text, message)
    else:
        signer = _verify_evm(address, sig_text, message)
    sig_id = hashlib.sha256(
        b"%s\0%s\0%s" % (chain.encode(), signer.lower().encode(), message)
    ).hexdigest()
    return Wallet(address=signer, chain=chain, signature_id=sig_id, expires_at=ts + max_skew)


def _decode_base64(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional; anything else is refused (no silent skips)."""
    t = text.replace("-", "+").replace("_", "/")
    t += "=" * (-len(t) % 4)
    try:
        return base64.b64decode(t, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AuthError(
            "bad_signature_encoding",
            f"bad signature encoding: {text[:24]!r}... is not base64 ({exc})",
        ) from None


def _verify_solana(address: str, sig_text: str, message: bytes) -> str:
    try:
        pubkey = Pubkey.from_string(address)
    except ValueError:
        raise AuthError(
            "bad_address", f"bad {H_ADDRESS} {address[:60]!r}: not a base58 Solana public key"
        ) from None
    raw = _decode_base64(sig_text)
    if len(raw) != 64:
        raise AuthError(
            "bad_signature_encoding",
            f"bad signature encoding: Ed25519 signature is 64 bytes, got {len(raw)}",
        )
    # solders (ed25519-dalek) rejects non-canonical S and small-order forgeries; checked.
    if not Signature(raw).verify(pubkey, message):
        raise AuthError(
            "signature_mismatch",
            f"signature mismatch: not a signature by {address} over {_show(message)}",
        )
    return str(pubkey)


def _verify_evm(address: str, sig_text: str, message: bytes) -> str:
    from eth_account import Account
    from eth_account.messages import encode_defunct
    from eth_utils import is_hex_address, to_checksum_address

    if not is_hex_address(address):
        raise AuthError(
            "bad_address",
            f"bad {H_ADDRESS} {address[:60]!r}: not a 0x-prefixed 20-byte hex address",
        )
    if not sig_text.lower().startswith("0x"):
        raise AuthError(
            "bad_signature_encoding",
            f"bad signature encoding: EVM signature must be 0x-hex, got {sig_text[:12]!r}",
        )
    try:
        raw = bytes.fromhex(sig_text[2:])
    except ValueError:
        raise AuthError(
            "bad_signature_encoding", f"bad signature encoding: {sig_text[:24]!r}... is not hex"
        ) from None
    if len(raw) != 65:
        raise AuthError(
            "bad_signature_encoding",
            f"bad signature encoding: EVM signature is 65 bytes (r, s, v), got {len(raw)}",
        )
    if raw[64] not in (0, 1, 27, 28):
        raise AuthError(
            "bad_signature_encoding",
            f"bad signature encoding: v must be 27/28 (or 0/1), got {raw[64]}",
        )
    try:
        recovered = Account.recover_message(encode_defunct(primitive=message), signature=raw)
    except Exception as exc:  # eth_keys raises several types for r/s out of range
        raise AuthError(
            "signature_mismatch", f"signature mismatch: no signer recoverable ({exc})"
        ) from None
    if recovered.lower() != address.lower():
        raise AuthError(
            "signature_mismatch",
            f"signature mismatch: signed by {recovered}, not {address}, over {_show(message)}",
        )
    return to_checksum_address(recovered)


def _show(message: bytes) -> str:
    return repr(message.decode(errors="replace"))


# ---------------------------------------------------------------- replay guard


class Claim(Enum):
    """What a ``ReplayGuard`` says about a signed request: answer it, or why not."""

    GRANTED = "granted"
    REPLAYED = "replayed"  # already answered (or being answered)
    OTHER_BODY = "other_body"  # given back by a 402 for another body


@dataclass
class _Entry:
    expires_at: float
    # Set while the signature is given back after a 402: the SHA-256 of the body it answered.
    offered_body: str | None = None
    # A read (GET/HEAD): identical copies are answered until then.
    repeat_until: float = 0.0


class ReplayGuard(Protocol):
    """Where used signatures are remembered. Async so a database can back it.

    ``claim`` must be atomic (test-and-set), so two concurrent copies of one request cannot both
    pass. ``release`` gives an id back after a 402, for a retry with the same body only.
    """

    async def is_used(self, signature_id: str) -> bool: ...

    async def claim(
        self, signature_id: str, expires_at: float, body_hash: str, repeat_for: float = 0.0
    ) -> Claim: ...

    async def release(self, signature_id: str, body_hash: str) -> None: ...

    async def prune(self) -> int:
        """Forget the ids whose window has passed (the sweeper calls it); how many."""
        ...


class MemoryReplayGuard:
    """In-process guard. Memory stays bounded: an entry is dropped once its timestamp is out of the
    window (the skew check refuses the request from then on), so it holds at most the signatures of
    the last ``2 * max_skew`` seconds."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._expiry: list[tuple[float, str]] = []

    def __len__(self) -> int:
        self._prune()
        return len(self._entries)

    def _prune(self) -> int:
        now, pruned = self._clock(), 0
        while self._expiry and self._expiry[0][0] < now:
            expires_at, sig = heapq.heappop(self._expiry)
            entry = self._entries.get(sig)
            if entry is not None and entry.expires_at == expires_at:
                del self._entries[sig]
                pruned += 1
        return pruned

    async def prune(self) -> int:
        return self._prune()

    async def is_used(self, signature_id: str) -> bool:
        self._prune()
        entry = self._entries.get(signature_id)
        return entry is not None and entry.offered_body is None

    async def claim(
        self, signature_id: str, expires_at: float, body_hash: str, repeat_for: float = 0.0
    ) -> Claim:
        """Test-and-set in one step (no await inside): GRANTED marks the id used."""
        self._prune()
        now = self._clock()
        entry = self._entries.get(signature_id)
        if entry is None:
            self._entries[signature_id] = _Entry(expires_at, repeat_until=now + repeat_for)
            heapq.heappush(self._expiry, (expires_at, signature_id))
            return Claim.GRANTED
        if entry.offered_body is not None:
            if entry.offered_body != body_hash:
                return Claim.OTHER_BODY
            entry.offered_body = None
            return Claim.GRANTED
        return Claim.GRANTED if now < entry.repeat_until else Claim.REPLAYED

    async def release(self, signature_id: str, body_hash: str) -> None:
        entry = self._entries.get(signature_id)
        if entry is not None:
            entry.offered_body = body_hash


# ---------------------------------------------------------------- aiohttp middleware


def is_exempt(path: str, exempt_paths: Iterable[str]) -> bool:
    """Exact paths, or prefixes written ``/prefix/*``. A path with ``.``/``..`` segments is never
    exempt: a proxy in front may resolve ``/v1/webhooks/../account`` to a guarded route."""
    if any(seg in (".", "..") for seg in path.split("/")):
        return False
    for pattern in exempt_paths:
        if pattern.endswith("/*"):
            if path.startswith(pattern[:-1]) or path == pattern[:-2]:
                return True
        elif path == pattern:
            return True
    return False


def _set_wallet(request: web.Request, wallet: Wallet) -> None:
    """``request["wallet"]``, the name handlers use. aiohttp 3.14 warns on str keys (it prefers
    ``web.RequestKey``, which older 3.x lack); the key is deliberate, so silence just this store."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        request["wallet"] = wallet


def _unauthorized(message: str) -> web.Response:
    return web.json_response({"error": message}, status=401)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def wallet_auth_middleware(
    guard: ReplayGuard | None = None,
    exempt_paths: Iterable[str] = DEFAULT_EXEMPT_PATHS,
    clock: Callable[[], float] = time.time,
    *,
    max_skew: float = DEFAULT_MAX_SKEW,
) -> Any:
    """Authenticate ``/v1/*`` requests; put the ``Wallet`` on ``request["wallet"]``.

    Failures answer 401 ``{"error": "<which check failed>"}``. The signature is claimed before the
    handler runs (so a concurrent copy is refused) and given back, bound to the body's hash, if the
    answer is 402.
    """
    guard = guard if guard is not None else MemoryReplayGuard(clock)
    exempt = tuple(exempt_paths)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if not path.startswith("/v1/") or is_exempt(path, exempt):
            return await handler(request)
        try:
            wallet = verify_request(
                request.method,
                request.rel_url.raw_path,
                request.headers,
                clock(),
                max_skew=max_skew,
            )
        except AuthError as exc:
            log.info("auth refused %s %s: %s", request.method, path, exc)
            return _unauthorized(str(exc))
        safe = request.method in SAFE_METHODS
        # aiohttp keeps the bytes read, so the handler reads the same body again.
        body_hash = "" if safe else hashlib.sha256(await request.read()).hexdigest()
        claim = await guard.claim(
            wallet.signature_id,
            wallet.expires_at,
            body_hash,
            repeat_for=SAFE_REPEAT_SECONDS if safe else 0.0,
        )
        if claim is not Claim.GRANTED:
            log.info(
                "auth refused %s %s: %s signature from %s",
                request.method,
                path,
                claim.value,
                wallet.address,
            )
            return _unauthorized(_replay_message(request, claim))
        _set_wallet(request, wallet)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status == 402:
                await guard.release(wallet.signature_id, body_hash)
            raise
        if response.status == 402:
            await guard.release(wallet.signature_id, body_hash)
        return response

    return middleware


def _replay_message(request: web.Request, claim: Claim) -> str:
    """The 401 text for a refused copy: what was replayed and what to do instead."""
    signed = f"this signed request (X-Timestamp {request.headers.get(H_TIMESTAMP)})"
    if claim is Claim.OTHER_BODY:
        return (
            f"replayed signature: {signed} was answered 402 for another body; a signature given "
            "back by a 402 may be retried only with the identical body; sign a new request"
        )
    return f"replayed signature: {signed} was already answered; sign a new one"


# ---------------------------------------------------------------- client side


def sign_request(
    method: str,
    path: str,
    key: Keypair | str | bytes,
    chain: str = "solana",
    now: float | None = None,
) -> dict[str, str]:
    """Auth headers for one request: ``key`` is a solders ``Keypair`` (solana) or an EVM private key
    (hex string or 32 bytes). The SDK signs every call with this; the gateway's tests do too."""
    chain = chain.lower()
    ts = str(int(time.time() if now is None else now))
    message = signed_message(method, path, ts)
    if chain == "solana":
        if not isinstance(key, Keypair):
            raise TypeError(f"chain 'solana' needs a solders Keypair, got {type(key).__name__}")
        sig = base64.b64encode(bytes(key.sign_message(message))).decode()
        address = str(key.pubkey())
    elif chain == "evm":
        from eth_account import Account
        from eth_account.messages import encode_defunct

        if isinstance(key, Keypair):
            raise TypeError("chain 'evm' needs a hex private key, got a Solana Keypair")
        account = Account.from_key(key)
        signed = account.sign_message(encode_defunct(primitive=message))
        sig = "0x" + bytes(signed.signature).hex()
        address = account.address
    else:
        raise ValueError(f"unknown chain {chain!r}: expected solana or evm")
    return {H_AUTH: f"{chain}:{sig}", H_ADDRESS: address, H_CHAIN: chain, H_TIMESTAMP: ts}
