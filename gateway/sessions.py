"""Selling sessions: price, reserve, route, sign. The HTTP layer (``gateway.app``) only parses.

A session is one token for one node: a WebRTC participant, an STT stream, or a TTS stream. Creating
one reserves its price in the ledger, picks a node near the client from the registry, and signs a
token with the gateway's issuer key (which nodes trust because it is listed on chain). The node
later reports usage; the ledger charges it and refunds the rest once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from solders.keypair import Keypair

from gateway import schemas
from gateway.geo import Location, Locator
from gateway.ledger import Ledger, pricing, uuid7
from gateway.ledger.records import Account, Extension, SessionRecord, SessionSpec
from gateway.routing import SERVICE_ROLES, NodeDirectory
from registry.nodeurl import node_url_problem
from registry.program import NodeAccount
from registry.tokens import Grant, mint_token, sign_body

log = logging.getLogger("gateway.sessions")

DEFAULT_TTS_CHARACTERS = 10_000


class NotFound(Exception):
    """A session or bundle that does not exist or belongs to another wallet (answered 404)."""


class NoAccount(Exception):
    """The wallet has never bought or been granted credits (answered 402: buy some)."""


def iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def ws_url(url: str) -> str:
    """LiveKit clients connect with ws(s)://; nodes register their http(s) URL."""
    if url.startswith("https://"):
        return "wss://" + url[len("https://") :]
    if url.startswith("http://"):
        return "ws://" + url[len("http://") :]
    return url


def minutes_to_seconds(minutes: float) -> int:
    return max(1, math.ceil(minutes * 60))


ROOM_DIGEST_CHARS = 20  # base32: 100 bits of SHA-256


def sfu_room(account_id: str, room_name: str) -> str:
    """The SFU's name for an account's room: the caller's name and a digest of (account, name).

    A room belongs to the account that created it. Two wallets asking for ``tutor-room`` get two
    SFU rooms, so one wallet's token can never land in another's conversation; the caller's
    name stays readable at the front for operators. Names cannot collide across accounts: the
    fixed-length digest at the end covers the whole name and the account."""
    digest = hashlib.sha256(f"{account_id}\x00{room_name}".encode()).digest()
    tag = base64.b32encode(digest).decode().lower()[:ROOM_DIGEST_CHARS]
    return f"{room_name}~{tag}"


# A node's clock and ours may disagree by a rounding and a report in flight.
USAGE_SLACK_SECONDS = 2


def billable_units(record: SessionRecord, reported: int, now: datetime | None = None) -> int:
    """What a node may bill: its report capped by what could physically have happened.

    A session cannot have streamed for longer than it has existed (seconds for WebRTC and STT,
    counted from its creation, before any connection) nor spoken more characters than it was
    sold, so even an admitted node that lies bills at most the real time that passed."""
    if record.service == "tts":
        return min(reported, record.limit_units)
    now = now or datetime.now(UTC)
    elapsed = math.ceil(max(0.0, (now - record.started_at).total_seconds()))
    return min(reported, elapsed + USAGE_SLACK_SECONDS)


@dataclass(frozen=True)
class Placement:
    """Where one session goes and what it costs."""

    service: str
    node: NodeAccount
    units: int
    expires_at: datetime

    @property
    def reserve(self) -> int:
        return pricing.cost(self.service, self.units)


class SessionService:
    def __init__(
        self,
        ledger: Ledger,
        directory: NodeDirectory,
        locator: Locator,
        issuer: Keypair,
        tts_session_minutes: int = 60,
        refresh_sfu_tokens: bool = True,
        account_cache_seconds: float = 10.0,
    ) -> None:
        self.ledger = ledger
        self.directory = directory
        self.locator = locator
        self.issuer = issuer
        self.tts_session_minutes = tts_session_minutes
        self._accounts: dict[tuple[str, str], tuple[Account, float]] = {}
        self.account_cache_seconds = account_cache_seconds
        self.refresh_sfu_tokens = refresh_sfu_tokens
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: Any = None  # aiohttp.ClientSession, made on the first push

    # ------------------------------------------------------------ helpers

    async def account(self, chain: str, address: str) -> Account:
        """The caller's account, from a short cache: ids and limits rarely change, and every
        balance check happens again inside the ledger's write transaction anyway."""
        key = (chain, address.lower() if chain == "evm" else address)
        hit = self._accounts.get(key)
        if hit is not None and time.monotonic() - hit[1] < self.account_cache_seconds:
            return hit[0]
        account = await self.ledger.get_account(chain, address)
        if account is not None:
            if len(self._accounts) > 100_000:
                self._accounts.clear()
            self._accounts[key] = (account, time.monotonic())
        if account is None:
            raise NoAccount(
                f"no credits for {chain} wallet {address}: purchase credits first "
                "(POST /v1/credits/purchase)"
            )
        return account

    async def place(
        self, service: str, client_ip: str, units: int, expires_at: datetime
    ) -> Placement:
        location: Location = self.locator.locate(client_ip)
        node = await self.directory.choose(SERVICE_ROLES[service], location)
        return Placement(service, node, units, expires_at)

    def _token(
        self,
        record: SessionRecord,
        identity: str,
        grant: Grant,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """A token only the node the session was routed to accepts (``aud``), extensions too."""
        ttl = int((record.token_expires_at - datetime.now(UTC)).total_seconds())
        return mint_token(
            self.issuer,
            identity,
            grant,
            max(ttl, 1),
            session_id=record.session_id,
            extra=extra,
            audience=record.node_pubkey,
        )

    def token_for(self, record: SessionRecord) -> str:
        """A token for the session as it stands (after create or extend: the new expiry/limit)."""
        if record.service == "webrtc":
            meta = record.metadata or {}
            extra = {"name": record.participant_identity}
            if meta.get("metadata") is not None:
                extra["metadata"] = meta["metadata"]
            room = sfu_room(record.account_id, record.room_name or "")
            return self._token(
                record,
                record.participant_identity or "participant",
                Grant("webrtc", room=room),
                extra,
            )
        identity = (record.metadata or {}).get("identity") or record.account_id
        return self._token(record, identity, Grant(record.service, limit=record.limit_units))

    async def owned(self, account: Account, session_id: str, service: str) -> SessionRecord:
        record = await self.ledger.get_session(session_id)
        if record is None or record.account_id != account.id or record.service != service:
            raise NotFound(f"no {service} session {session_id} for this wallet")
        return record

    @staticmethod
    def _spec(p: Placement, **fields: Any) -> SessionSpec:
        return SessionSpec(
            service=p.service,
            reserve_microcredits=p.reserve,
            limit_units=p.units,
            token_expires_at=p.expires_at,
            node_pubkey=str(p.node.owner),
            server_url=p.node.url,
            session_id=uuid7(),
            **fields,
        )

    # ------------------------------------------------------------ pushes to the SFU

    def push_refresh(self, record: SessionRecord, token: str) -> None:
        """Hand an extended WebRTC token to the SFU holding the participant (``POST /rtc/refresh``,
        authenticated by the token itself) so it is not disconnected at the old expiry. Best
        effort, in the background: the client holds the new token too and can present it."""
        if self.refresh_sfu_tokens:
            self._push(record, "/rtc/refresh", b"", f"Bearer {token}")

    def push_revoke(self, record: SessionRecord) -> None:
        """Tell the SFU a settled session's token is dead (``POST /rtc/revoke``, a body signed
        by this gateway's issuer key), so it refuses the token at join and drops a participant
        still connected with it. Best effort: the token also dies at its expiry."""
        if self.refresh_sfu_tokens:
            body = json.dumps({"session_ids": [record.session_id]}).encode()
            self._push(record, "/rtc/revoke", body, f"Bearer {sign_body(self.issuer, body)}")

    def _push(self, record: SessionRecord, path: str, body: bytes, auth: str) -> None:
        problem = node_url_problem(record.server_url)
        if problem:  # never send a token or a signed body over plain http off loopback
            log.warning("not pushing %s of session %s: %s", path, record.session_id, problem)
            return
        url = record.server_url.rstrip("/") + path
        task = asyncio.create_task(self._post(url, body, auth, record.session_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, url: str, body: bytes, auth: str, session_id: str) -> None:
        if self._http is None:  # one pooled client for every push, not one per extend
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        headers = {"Authorization": auth, "Content-Type": "application/json"}
        try:
            async with self._http.post(url, data=body, headers=headers) as resp:
                log.debug("push for session %s to %s: HTTP %d", session_id, url, resp.status)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.info("could not push to %s for session %s: %s", url, session_id, exc)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._http is not None:
            await self._http.close()

    # ------------------------------------------------------------ WebRTC

    async def webrtc_token(
        self, chain: str, address: str, body: schemas.WebrtcTokenRequest, client_ip: str
    ) -> dict[str, Any]:
        account = await self.account(chain, address)
        seconds = minutes_to_seconds(body.duration_minutes)
        expires = datetime.now(UTC) + timedelta(seconds=seconds)
        placement = await self.place("webrtc", client_ip, seconds, expires)
        record = await self.ledger.open_session(
            account.id,
            self._spec(
                placement,
                room_name=body.room_name,
                participant_identity=body.participant_identity,
                metadata={"metadata": body.metadata},
            ),
        )
        return {
            "session_id": record.session_id,
            "token": self.token_for(record),
            "ws_url": ws_url(record.server_url),
            "expires_at": iso(record.token_expires_at),
        }

    async def _extend_time(
        self, chain: str, address: str, body: schemas.SessionExtend, service: str
    ) -> SessionRecord:
        """A timed session (WebRTC or STT) the caller owns, extended by ``additional_minutes``:
        from now where its token has already expired, so the time bought is time usable."""
        account = await self.account(chain, address)
        record = await self.owned(account, body.session_id, service)
        seconds = minutes_to_seconds(body.additional_minutes)
        return await self.ledger.extend(
            record.session_id,
            seconds,
            token_expires_at=max(record.token_expires_at, datetime.now(UTC))
            + timedelta(seconds=seconds),
        )

    async def webrtc_extend(
        self, chain: str, address: str, body: schemas.SessionExtend
    ) -> dict[str, Any]:
        record = await self._extend_time(chain, address, body, "webrtc")
        token = self.token_for(record)
        self.push_refresh(record, token)
        return {
            "session_id": record.session_id,
            "token": token,
            "ws_url": ws_url(record.server_url),
            "expires_at": iso(record.token_expires_at),
            "new_expires_at": iso(record.token_expires_at),
        }

    # ------------------------------------------------------------ STT and TTS

    async def stt_session(
        self, chain: str, address: str, body: schemas.SttSessionRequest, client_ip: str
    ) -> dict[str, Any]:
        account = await self.account(chain, address)
        seconds = minutes_to_seconds(body.duration_minutes)
        placement = await self.place(
            "stt", client_ip, seconds, datetime.now(UTC) + timedelta(seconds=seconds)
        )
        record = await self.ledger.open_session(
            account.id,
            self._spec(placement, metadata={"language": body.language, "identity": address}),
        )
        return self._service_view(record)

    async def stt_extend(
        self, chain: str, address: str, body: schemas.SessionExtend
    ) -> dict[str, Any]:
        record = await self._extend_time(chain, address, body, "stt")
        return {**self._service_view(record), "new_expires_at": iso(record.token_expires_at)}

    def _tts_expiry(self) -> datetime:
        return datetime.now(UTC) + timedelta(minutes=self.tts_session_minutes)

    async def tts_session(
        self, chain: str, address: str, body: schemas.TtsSessionRequest, client_ip: str
    ) -> dict[str, Any]:
        account = await self.account(chain, address)
        placement = await self.place("tts", client_ip, body.max_characters, self._tts_expiry())
        record = await self.ledger.open_session(
            account.id,
            self._spec(placement, metadata={"language": body.language, "identity": address}),
        )
        return self._service_view(record)

    async def tts_extend(self, chain: str, address: str, body: schemas.TtsExtend) -> dict[str, Any]:
        account = await self.account(chain, address)
        record = await self.owned(account, body.session_id, "tts")
        record = await self.ledger.extend(
            record.session_id,
            body.additional_characters,
            token_expires_at=max(record.token_expires_at, self._tts_expiry()),
        )
        return {**self._service_view(record), "new_expires_at": iso(record.token_expires_at)}

    def _service_view(self, record: SessionRecord) -> dict[str, Any]:
        return {
            "session_id": record.session_id,
            "token": self.token_for(record),
            "server_url": record.server_url,
            "expires_at": iso(record.token_expires_at),
        }

    # ------------------------------------------------------------ agent bundle

    async def agent_session(
        self,
        chain: str,
        address: str,
        body: schemas.AgentSessionRequest,
        agent_ip: str,
        client_ip: str,
    ) -> dict[str, Any]:
        """WebRTC (one or two participants) + STT + TTS, reserved and created all or nothing."""
        account = await self.account(chain, address)
        seconds = minutes_to_seconds(body.duration_minutes)
        expires = datetime.now(UTC) + timedelta(seconds=seconds)
        agent_rtc = await self.place("webrtc", agent_ip, seconds, expires)
        specs = [
            self._spec(
                agent_rtc,
                room_name=body.room_name,
                participant_identity=body.participant_identity,
                metadata={"metadata": body.metadata, "role": "agent"},
            )
        ]
        if body.client_identity:
            client_rtc = await self.place("webrtc", client_ip, seconds, expires)
            specs.append(
                self._spec(
                    client_rtc,
                    room_name=body.room_name,
                    participant_identity=body.client_identity,
                    metadata={"metadata": body.metadata, "role": "client"},
                )
            )
        stt = await self.place("stt", agent_ip, seconds, expires)
        tts = await self.place("tts", agent_ip, body.tts_max_characters, expires)
        specs.append(
            self._spec(
                stt, metadata={"language": body.language, "identity": body.participant_identity}
            )
        )
        specs.append(
            self._spec(
                tts, metadata={"language": body.language, "identity": body.participant_identity}
            )
        )
        bundle = await self.ledger.create_bundle(account.id, specs)
        return {
            "bundle_id": bundle.bundle_id,
            **self._bundle_view(bundle.sessions, extended=False),
            "expires_at": iso(expires),
        }

    def _bundle_view(self, records: list[SessionRecord], extended: bool) -> dict[str, Any]:
        rtc = [r for r in records if r.service == "webrtc"]
        by_service = {r.service: r for r in records if r.service != "webrtc"}

        def rtc_view(r: SessionRecord) -> dict[str, Any]:
            view = {
                "session_id": r.session_id,
                "token": self.token_for(r),
                "ws_url": ws_url(r.server_url),
            }
            if extended:
                view["new_expires_at"] = iso(r.token_expires_at)
                self.push_refresh(r, view["token"])
            return view

        def service_view(r: SessionRecord) -> dict[str, Any]:
            if extended:
                return {"token": self.token_for(r), "new_expires_at": iso(r.token_expires_at)}
            return {
                "session_id": r.session_id,
                "token": self.token_for(r),
                "server_url": r.server_url,
            }

        if len(rtc) == 2:
            agent = next(r for r in rtc if (r.metadata or {}).get("role") == "agent")
            client = next(r for r in rtc if r is not agent)
            webrtc: dict[str, Any] = {"agent": rtc_view(agent), "client": rtc_view(client)}
        else:
            webrtc = rtc_view(rtc[0])
            if extended:
                webrtc = {"token": webrtc["token"], "new_expires_at": webrtc["new_expires_at"]}
        return {
            "webrtc": webrtc,
            "stt": service_view(by_service["stt"]),
            "tts": service_view(by_service["tts"]),
        }

    async def agent_extend(
        self, chain: str, address: str, body: schemas.AgentExtend
    ) -> dict[str, Any]:
        account = await self.account(chain, address)
        records = await self.ledger.list_bundle(body.bundle_id)
        if not records or records[0].account_id != account.id:
            raise NotFound(f"no agent session bundle {body.bundle_id} for this wallet")
        seconds = minutes_to_seconds(body.additional_minutes)
        extensions = []
        for r in records:
            new_expiry = max(r.token_expires_at, datetime.now(UTC)) + timedelta(seconds=seconds)
            units = (body.additional_tts_characters or 0) if r.service == "tts" else seconds
            extensions.append(Extension(r.session_id, units, token_expires_at=new_expiry))
        updated = await self.ledger.extend_bundle(body.bundle_id, extensions)
        return self._bundle_view(updated, extended=True)
