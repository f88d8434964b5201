"""Agent SDK: an async client for the gateway that signs every request with the agent's wallet.

    async with GatewayClient("http://127.0.0.1:8402", keypair) as gw:
        session = await gw.create_agent_session("room-1", "agent", duration_minutes=5,
                                                client_identity="user-42")
        session.webrtc.client.token, session.stt.server_url, ...

Errors are typed (``InsufficientCredits``, ``ConcurrencyLimit``, ``RateLimit``, ``NoCapacity``,
``NotFound``, ``AuthenticationError``, ``BadRequest``), each carrying the gateway's message.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import aiohttp
from solders.keypair import Keypair

from common.closing import AsyncClosing
from gateway.auth import sign_request
from registry.keys import load_keypair

# Timestamps the SDK may use around the current second: well inside the gateway's +-30 s window.
SKEW_MARGIN = 20
# Timestamps each wallet has signed, per "METHOD PATH": shared by every client of one wallet in
# this process (an agent and its session manager often hold two), so none reuses a signature.
_SIGNED: dict[tuple[str, str], dict[str, set[int]]] = {}
DEFAULT_PAYMENT_RPC = "http://127.0.0.1:8899"  # where purchase_credits reads blockhash and mint


class GatewayError(Exception):
    def __init__(self, status: int, message: str, body: Any = None) -> None:
        self.status = status
        self.message = message
        self.body = body
        super().__init__(f"{status}: {message}")


class BadRequest(GatewayError):
    pass


class AuthenticationError(GatewayError):
    pass


class InsufficientCredits(GatewayError):
    """402: buy credits (or, for a purchase, the x402 payment requirements are in ``body``)."""


class NotFound(GatewayError):
    pass


class RateLimit(GatewayError):
    pass


class ConcurrencyLimit(GatewayError):
    pass


class NoCapacity(GatewayError):
    pass


def load_wallet(path: str) -> Keypair:
    """The wallet that signs requests, from a Solana keypair file (the JSON array of 64 bytes
    ``solana-keygen`` and ``registry keygen`` write): what an agent needs of the chain layer."""
    return load_keypair(path)


def error_for(status: int, message: str, body: Any) -> GatewayError:
    if status == 429:
        cls: type[GatewayError] = ConcurrencyLimit if "concurrent" in message else RateLimit
    else:
        cls = {
            400: BadRequest,
            401: AuthenticationError,
            402: InsufficientCredits,
            404: NotFound,
            503: NoCapacity,
        }.get(status, GatewayError)
    return cls(status, message, body)


@dataclass(frozen=True)
class SessionGrant:
    """What the gateway hands out for one session: connect to ``url`` with ``token``. The API
    names the URL per service (``URL_KEY``); each subclass keeps that name as a property."""

    URL_KEY: ClassVar[str] = "url"

    session_id: str
    token: str
    url: str
    expires_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, d: dict[str, Any]) -> Self:
        return cls(
            d.get("session_id", ""),
            d["token"],
            d.get(cls.URL_KEY, ""),
            d.get("expires_at") or d.get("new_expires_at"),
            d,
        )


class WebrtcSession(SessionGrant):
    """A WebRTC session: join the SFU at ``ws_url`` with ``token``."""

    URL_KEY = "ws_url"

    @property
    def ws_url(self) -> str:
        return self.url


class ServiceSession(SessionGrant):
    """An STT or TTS session: connect to ``server_url`` with ``token`` as the session key."""

    URL_KEY = "server_url"

    @property
    def server_url(self) -> str:
        return self.url


@dataclass(frozen=True)
class DualWebrtc:
    agent: WebrtcSession
    client: WebrtcSession


@dataclass(frozen=True)
class AgentSession:
    bundle_id: str
    webrtc: WebrtcSession | DualWebrtc
    stt: ServiceSession
    tts: ServiceSession
    expires_at: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, d: dict[str, Any], bundle_id: str = "") -> AgentSession:
        rtc = d["webrtc"]
        webrtc: WebrtcSession | DualWebrtc = (
            DualWebrtc(WebrtcSession.of(rtc["agent"]), WebrtcSession.of(rtc["client"]))
            if "agent" in rtc
            else WebrtcSession.of(rtc)
        )
        return cls(
            d.get("bundle_id", bundle_id),
            webrtc,
            ServiceSession.of(d["stt"]),
            ServiceSession.of(d["tts"]),
            d.get("expires_at"),
            d,
        )


@dataclass(frozen=True)
class AccountInfo:
    id: str
    wallet_address: str
    wallet_chain: str
    credit_balance: int
    available_balance: int
    max_concurrent_sessions: int
    max_api_rate: int
    created_at: str

    @classmethod
    def of(cls, d: dict[str, Any]) -> AccountInfo:
        return cls(
            d["id"],
            d["wallet_address"],
            d["wallet_chain"],
            int(d["credit_balance"]),
            int(d["available_balance"]),
            d["max_concurrent_sessions"],
            d["max_api_rate"],
            d["created_at"],
        )


class GatewayClient(AsyncClosing):
    """``key`` is a solders ``Keypair`` (chain ``solana``) or an EVM private key (chain ``evm``)."""

    def __init__(
        self,
        base_url: str,
        key: Keypair | str | bytes,
        chain: str = "solana",
        timeout: float = 30.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.chain = chain
        self._used = _SIGNED.setdefault((chain, self.address.lower()), {})
        self._own_session = session is None
        self._session = session or aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout)
        )

    async def _fresh_timestamp(self, method: str, path: str) -> int:
        """A timestamp this wallet has not signed ``METHOD PATH`` with yet.

        The signed message has one-second resolution and the gateway refuses a signature it has
        answered before, so two identical calls in the same second need different timestamps:
        take the current second if unused, else the nearest unused one within the gateway's
        window (kept inside +-SKEW_MARGIN s), waiting only when all of them are taken.
        """
        key = f"{method.upper()} {path}"
        while True:
            now = int(time.time())
            used = self._used.setdefault(key, set())
            used.difference_update({t for t in used if t < now - SKEW_MARGIN})
            for offset in range(SKEW_MARGIN + 1):
                for ts in (now - offset, now + offset) if offset else (now,):
                    if ts not in used:
                        used.add(ts)
                        return ts
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        if self._own_session:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        signed: bool = True,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One call; raises the typed error for any non-2xx answer."""
        all_headers = dict(headers or {})
        if signed:
            all_headers.update(
                sign_request(
                    method,
                    path,
                    self.key,
                    self.chain,
                    now=await self._fresh_timestamp(method, path),
                )
            )
        query = {k: v for k, v in (params or {}).items() if v is not None}
        async with self._session.request(
            method, self.base_url + path, json=body, params=query, headers=all_headers
        ) as resp:
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                data = {"error": (await resp.text())[:500]}
            if resp.status >= 400:
                message = data.get("error", "") if isinstance(data, dict) else str(data)
                raise error_for(resp.status, message or resp.reason or "", data)
            return data

    # ------------------------------------------------------------ public

    async def pricing(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/pricing", signed=False)

    async def servers_status(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/servers/status", signed=False)

    # ------------------------------------------------------------ account

    async def account(self) -> AccountInfo:
        return AccountInfo.of(await self.request("GET", "/v1/account"))

    async def transactions(self, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        data = await self.request(
            "GET", "/v1/account/transactions", params={"limit": limit, "offset": offset}
        )
        return data["transactions"]

    async def sessions(
        self, limit: int = 50, offset: int = 0, status: str | None = None
    ) -> list[dict[str, Any]]:
        data = await self.request(
            "GET",
            "/v1/account/sessions",
            params={"limit": limit, "offset": offset, "status": status},
        )
        return data["sessions"]

    # ------------------------------------------------------------ sessions

    async def _post(self, path: str, **fields: Any) -> dict[str, Any]:
        """A signed POST of ``fields`` (those that are None left out)."""
        body = {k: v for k, v in fields.items() if v is not None}
        return await self.request("POST", path, body)

    async def create_webrtc_token(
        self,
        room_name: str,
        participant_identity: str,
        duration_minutes: float,
        metadata: str | None = None,
        client_ip: str | None = None,
    ) -> WebrtcSession:
        data = await self._post(
            "/v1/webrtc/token",
            room_name=room_name,
            participant_identity=participant_identity,
            duration_minutes=duration_minutes,
            metadata=metadata,
            client_ip=client_ip,
        )
        return WebrtcSession.of(data)

    async def extend_webrtc_token(
        self, session_id: str, additional_minutes: float
    ) -> WebrtcSession:
        data = await self._post(
            "/v1/webrtc/token/extend", session_id=session_id, additional_minutes=additional_minutes
        )
        return WebrtcSession.of(data)

    async def create_stt_session(
        self, duration_minutes: float, language: str | None = None
    ) -> ServiceSession:
        data = await self._post(
            "/v1/stt/session", duration_minutes=duration_minutes, language=language
        )
        return ServiceSession.of(data)

    async def extend_stt_session(
        self, session_id: str, additional_minutes: float
    ) -> ServiceSession:
        data = await self._post(
            "/v1/stt/session/extend", session_id=session_id, additional_minutes=additional_minutes
        )
        return ServiceSession.of(data)

    async def create_tts_session(
        self, max_characters: int, language: str | None = None
    ) -> ServiceSession:
        data = await self._post("/v1/tts/session", max_characters=max_characters, language=language)
        return ServiceSession.of(data)

    async def extend_tts_session(
        self, session_id: str, additional_characters: int
    ) -> ServiceSession:
        data = await self._post(
            "/v1/tts/session/extend",
            session_id=session_id,
            additional_characters=additional_characters,
        )
        return ServiceSession.of(data)

    async def create_agent_session(
        self,
        room_name: str,
        participant_identity: str,
        duration_minutes: float,
        language: str | None = None,
        tts_max_characters: int | None = None,
        metadata: str | None = None,
        client_ip: str | None = None,
        client_identity: str | None = None,
    ) -> AgentSession:
        data = await self._post(
            "/v1/agent-session",
            room_name=room_name,
            participant_identity=participant_identity,
            duration_minutes=duration_minutes,
            language=language,
            tts_max_characters=tts_max_characters,
            metadata=metadata,
            client_ip=client_ip,
            client_identity=client_identity,
        )
        return AgentSession.of(data)

    async def extend_agent_session(
        self,
        bundle_id: str,
        additional_minutes: float,
        additional_tts_characters: int | None = None,
    ) -> AgentSession:
        data = await self._post(
            "/v1/agent-session/extend",
            bundle_id=bundle_id,
            additional_minutes=additional_minutes,
            additional_tts_characters=additional_tts_characters,
        )
        return AgentSession.of(data, bundle_id)

    # ------------------------------------------------------------ credits (x402)

    @property
    def address(self) -> str:
        if isinstance(self.key, Keypair):
            return str(self.key.pubkey())
        from eth_account import Account

        return Account.from_key(self.key).address

    async def purchase_credits(
        self, amount_usd: float, *, rpc_url: str | None = None, evm_chain_id: int = 8453
    ) -> dict[str, Any]:
        """Buy credits with an x402 payment from this client's wallet, automatically.

        ``POST /v1/credits/purchase`` answers 402 with the payment requirements; this builds the
        payment with the caller's key for its own chain (Solana: a TransferChecked transaction,
        partially signed, the fee payer slot left for the gateway, blockhash and mint read from
        ``rpc_url``; EVM: an EIP-3009 authorization) and retries the same signed request with it.
        Returns ``{account_id, credited_microcredits, amount_usd}`` plus ``payment_response``
        (the decoded settlement header). Raises the typed errors (InsufficientCredits carries
        the 402 body when the payment is refused)."""
        import base64
        import json

        from gateway.payments import payer

        path = "/v1/credits/purchase"
        body = {
            "wallet_address": self.address,
            "wallet_chain": self.chain,
            "amount_usd": amount_usd,
        }
        # Signed once: the gateway gives a signature back on 402, so the paid retry reuses it.
        auth = sign_request(
            "POST", path, self.key, self.chain, now=await self._fresh_timestamp("POST", path)
        )
        async with self._session.post(self.base_url + path, json=body, headers=auth) as resp:
            data = await self._json(resp)
            if resp.status != 402:
                self._raise_for(resp.status, data, resp.reason)
                return data
            version, accepts = payer.requirements_from_402(resp.headers, data)
        offer = payer.pick_offer(accepts, self.chain)
        if offer is None:
            raise InsufficientCredits(
                402, f"the gateway offers no x402 payment on {self.chain}", data
            )
        payload = await payer.payment_payload(
            self.key, offer, rpc_url or DEFAULT_PAYMENT_RPC, evm_chain_id
        )
        name, value = payer.payment_header(version, offer, payload, self.base_url + path)
        async with self._session.post(
            self.base_url + path, json=body, headers={**auth, name: value}
        ) as resp:
            data = await self._json(resp)
            self._raise_for(resp.status, data, resp.reason)
            settle = resp.headers.get("PAYMENT-RESPONSE") or resp.headers.get("X-PAYMENT-RESPONSE")
        if settle:
            data["payment_response"] = json.loads(base64.b64decode(settle))
        return data

    async def ensure_credits(
        self, min_available_microcredits: int, top_up_usd: float, *, rpc_url: str | None = None
    ) -> dict[str, Any] | None:
        """Top up: buy ``top_up_usd`` of credits when ``available_balance`` is below
        ``min_available_microcredits`` (or the wallet has no account yet). Returns the purchase,
        or None when the balance was enough."""
        try:
            available = (await self.account()).available_balance
        except NotFound:
            available = 0
        if available >= min_available_microcredits:
            return None
        return await self.purchase_credits(top_up_usd, rpc_url=rpc_url)

    @staticmethod
    async def _json(resp: aiohttp.ClientResponse) -> Any:
        try:
            return await resp.json(content_type=None)
        except ValueError:
            return {"error": (await resp.text())[:500]}

    @staticmethod
    def _raise_for(status: int, data: Any, reason: str | None) -> None:
        if status >= 400:
            message = data.get("error", "") if isinstance(data, dict) else str(data)
            raise error_for(status, message or reason or "", data)
