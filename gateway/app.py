"""The gateway's HTTP API (aiohttp): parse, authenticate, delegate, answer in the spec's shapes.

Routes follow ``spec/gateway-api.md``. Wallet-signed routes get ``request["wallet"]`` from the
auth middleware; node routes (``/internal/events``, ``/v1/webhooks/sfu``) must carry a JWT signed by
a node key that is registered and active on chain, bound to the body by its ``sha256`` claim.
Errors are ``{"error": "..."}`` with 400/401/402/404/429/503 as the spec lists them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from solders.keypair import Keypair

from common.settings import format_validation_error
from common.tasks import stop_tasks
from gateway import schemas
from gateway.auth import MemoryReplayGuard, wallet_auth_middleware
from gateway.bodies import bad_request, error, http_error, json_object, parse_body, validated
from gateway.config import GatewayConfig
from gateway.context import GATEWAY_KEY, ROUTES_KEY, Gateway, gw
from gateway.geo import InvalidClientIP, Location, Locator, client_address
from gateway.ledger import (
    ConcurrencyLimit,
    InsufficientCredits,
    Ledger,
    NotSessionNode,
    SessionClosed,
    SessionRecord,
    UnknownSession,
    pricing,
)
from gateway.ledger.signatures import LedgerReplayGuard
from gateway.liveness import LoadBoard, Relay, open_endpoint, open_relay
from gateway.openapi import openapi_handler
from gateway.payments.routes import PAYMENT_ROUTES
from gateway.payments.wiring import setup_payments
from gateway.ratelimit import RateLimiter
from gateway.routes import Handler, Route, unsigned_paths
from gateway.routing import DirectoryUnavailable, NoCapacity, NodeDirectory
from gateway.sessions import NoAccount, NotFound, SessionService, billable_units, iso
from registry.program import NodeStatus
from registry.tokens import TokenError, verify_body

log = logging.getLogger("gateway")
RELAY_KEY = web.AppKey("relay", Relay)


def _bad(message: str) -> web.HTTPError:
    return bad_request(message)


def _unauthorized(message: str) -> web.HTTPError:
    return http_error(web.HTTPUnauthorized, message)


def wallet_of(request: web.Request) -> tuple[str, str]:
    wallet = request["wallet"]
    return wallet.chain, wallet.address


def client_ip(request: web.Request, explicit: str | None = None) -> str:
    try:
        return client_address(
            request, explicit, trust_forwarded_for=gw(request).config.trust_forwarded_for
        )
    except InvalidClientIP as exc:
        raise _bad(str(exc)) from None


# ---------------------------------------------------------------- middleware


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map domain errors to the spec's status codes, once, for every route."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except NoAccount as exc:
        return error(402, str(exc))
    except InsufficientCredits as exc:
        return error(
            402, f"insufficient credits: need {exc.needed} microcredits, {exc.available} available"
        )
    except ConcurrencyLimit as exc:
        return error(429, f"concurrent session limit reached ({exc.limit} active sessions)")
    except (NotFound, UnknownSession) as exc:
        return error(404, str(exc))
    except SessionClosed as exc:
        return error(400, f"session {exc.session_id} is {exc.status}; create a new one")
    except NoCapacity as exc:
        return error(503, f"no servers available: {exc}")
    except DirectoryUnavailable as exc:
        return error(503, f"no servers available: registry unreachable ({exc})")


def rate_limit_middleware(limiter: RateLimiter) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        wallet = request.get("wallet")
        if wallet is not None:
            try:
                rate = (
                    await gw(request).sessions.account(wallet.chain, wallet.address)
                ).max_api_rate
            except NoAccount:
                rate = gw(request).config.default_max_api_rate
            if not limiter.allow(f"{wallet.chain}:{wallet.address.lower()}", rate):
                return error(429, f"rate limit exceeded: at most {rate} requests per second")
        return await handler(request)

    return middleware


# ---------------------------------------------------------------- public


async def pricing_handler(request: web.Request) -> web.Response:
    return web.json_response(
        {**pricing.pricing_document(), "minimum_purchase_usd": float(pricing.MIN_PURCHASE_USD)}
    )


async def liveness_handler(request: web.Request) -> web.Response:
    """Where and how often a node sends its signed load reports (registry/loadreport.py), and
    the key this gateway signs tokens with (so a node knows which tokens' usage comes here)."""
    gateway = gw(request)
    if gateway.load_reports is None:
        return error(503, "load reports are not being received yet; retry in a moment")
    config = gateway.config
    return web.json_response(
        {
            "udp_port": gateway.load_reports.port,
            "interval_seconds": config.load_report_interval_seconds,
            "ttl_seconds": config.load_report_ttl_seconds,
            "issuer": str(gateway.sessions.issuer.pubkey()),
        }
    )


async def servers_status(request: web.Request) -> web.Response:
    counts = await gw(request).directory.counts()
    services = {s: {**c, "available": c["healthy"] > 0} for s, c in counts.items()}
    return web.json_response({"services": services, "updated_at": iso(datetime.now(UTC))})


async def nodes_handler(request: web.Request) -> web.Response:
    """Every registered node as the gateway last read the registry, with its live load as it last
    reported it, for maps and dashboards: public facts only (all of them are on chain or sent in
    clear anyway), so no wallet signature, and readable by a page of any origin (the network map
    is served by the demo app, not the gateway)."""
    directory = gw(request).directory
    now = time.time()
    nodes = []
    for n in await directory.nodes():
        live = directory.live(n)
        last = directory.board.last(bytes(n.owner))
        reason = directory.reason(n)
        nodes.append(
            {
                "key": str(n.owner),
                "role": n.role.label,
                "url": n.url,
                "lat": n.lat,
                "lon": n.lon,
                "country": n.country,
                "load": live.load if live else 0,
                "capacity": min(live.capacity, n.capacity) if live else n.capacity,
                "version": n.version,
                "status": n.status.label,
                "live": directory.serving(n) is not None,
                "routable": reason is None,
                "reason": reason,
                "presence_age_seconds": max(0, round(now - n.last_heartbeat)),
                "report_age_seconds": None if last is None else round(directory.board.age(last)),
            }
        )
    return web.json_response(
        {"nodes": nodes, "updated_at": iso(datetime.now(UTC))},
        headers={"Access-Control-Allow-Origin": "*"},
    )


async def health(request: web.Request) -> web.Response:
    """Up; ``pid`` says which process answered (one of ``--workers N``, to an operator)."""
    return web.json_response({"status": "ok", "pid": os.getpid()})


# ---------------------------------------------------------------- account


def _micro(value: int) -> str:
    return str(value)


async def account_handler(request: web.Request) -> web.Response:
    chain, address = wallet_of(request)
    account = await gw(request).ledger.get_account(chain, address)
    if account is None:
        return error(
            404, f"no account for {chain} wallet {address}: purchase or be granted credits"
        )
    return web.json_response(
        {
            "id": account.id,
            "wallet_address": account.wallet_address,
            "wallet_chain": account.wallet_chain,
            "credit_balance": _micro(account.credit_balance),
            "available_balance": _micro(account.available_balance),
            "max_concurrent_sessions": account.max_concurrent_sessions,
            "max_api_rate": account.max_api_rate,
            "created_at": iso(account.created_at),
        }
    )


def _page(request: web.Request, with_status: bool) -> schemas.Page:
    query = dict(request.query)
    if not with_status and "status" in query:
        raise _bad("status is not a filter of this list")
    try:
        return schemas.Page.model_validate(query)
    except ValidationError as exc:
        raise _bad(format_validation_error(exc)) from None


async def _account_id(request: web.Request) -> str:
    chain, address = wallet_of(request)
    account = await gw(request).ledger.get_account(chain, address)
    if account is None:
        raise http_error(web.HTTPNotFound, f"no account for {chain} wallet {address}")
    return account.id


async def transactions_handler(request: web.Request) -> web.Response:
    page = _page(request, with_status=False)
    rows = await gw(request).ledger.list_transactions(
        await _account_id(request), page.limit, page.offset
    )
    return web.json_response(
        {
            "transactions": [
                {
                    "id": t.id,
                    "type": t.kind,
                    "amount_microcredits": _micro(t.amount),
                    "hold_microcredits": _micro(t.hold),
                    "balance_after": _micro(t.balance_after),
                    "available_after": _micro(t.available_after),
                    "session_id": t.session_id,
                    "reference": t.reference,
                    "memo": t.memo,
                    "created_at": iso(t.created_at),
                }
                for t in rows
            ],
            "limit": page.limit,
            "offset": page.offset,
        }
    )


async def sessions_handler(request: web.Request) -> web.Response:
    page = _page(request, with_status=True)
    rows = await gw(request).ledger.list_sessions(
        await _account_id(request), page.limit, page.offset, status=page.status
    )
    out = []
    for r in rows:
        item = r.public()
        for key in ("reserved_microcredits", "charged_microcredits"):
            item[key] = _micro(item[key])
        for key in ("token_expires_at", "started_at", "ended_at"):
            item[key] = iso(item[key])
        out.append(item)
    return web.json_response({"sessions": out, "limit": page.limit, "offset": page.offset})


# ---------------------------------------------------------------- sessions


async def webrtc_token(request: web.Request) -> web.Response:
    body = await parse_body(request, schemas.WebrtcTokenRequest)
    out = await gw(request).sessions.webrtc_token(
        *wallet_of(request), body, client_ip(request, body.client_ip)
    )
    return web.json_response(out)


def session_route(
    path: str,
    call: Callable[..., Awaitable[dict[str, Any]]],
    model: type[schemas.Body],
    summary: str,
    located: bool = False,
) -> Route:
    """A route whose whole work is one ``SessionService`` call with the caller's wallet and the
    parsed body (and, for a new session routed by distance, the client's IP); the body's model is
    named once, for the handler and for the route table's readers."""

    async def handler(request: web.Request) -> web.Response:
        body = await parse_body(request, model)
        where = (client_ip(request),) if located else ()
        return web.json_response(
            await call(gw(request).sessions, *wallet_of(request), body, *where)
        )

    handler.__name__ = call.__name__
    return Route("POST", path, handler, summary, model=model)


async def agent_session(request: web.Request) -> web.Response:
    body = await parse_body(request, schemas.AgentSessionRequest)
    agent_ip = client_ip(request)
    user_ip = client_ip(request, body.client_ip) if body.client_ip else agent_ip
    out = await gw(request).sessions.agent_session(*wallet_of(request), body, agent_ip, user_ip)
    return web.json_response(out)


# ---------------------------------------------------------------- from nodes


async def node_signed_body(request: web.Request) -> tuple[str, bytes]:
    """The body and the key of the active, registered node that signed it; 401 otherwise."""
    body = await request.read()
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("missing Authorization: Bearer <JWT signed by the node key>")
    try:
        signer = verify_body(token.strip(), body)
    except TokenError as exc:
        raise _unauthorized(f"node signature refused: {exc}") from None
    node = await gw(request).directory.find(signer)
    if node is None:
        raise _unauthorized(f"{signer} is not a node registered on the registry")
    if node.status is not NodeStatus.ACTIVE:
        raise _unauthorized(f"node {signer} is {node.status.label}")
    return signer, body


async def _report(
    request: web.Request,
    node: str,
    record: SessionRecord,
    units: int,
    final: bool,
    event_id: str | None = None,
) -> dict[str, Any]:
    """Apply a node's usage report, capped by what could physically have happened."""
    units = billable_units(record, units)
    try:
        result = await gw(request).ledger.record_usage(
            record.session_id, node, units, final=final, event_id=event_id
        )
    except NotSessionNode:
        raise _unauthorized(f"session {record.session_id} was not routed to node {node}") from None
    return {
        "session_id": record.session_id,
        "status": result.status,
        "charged_microcredits": _micro(result.charged_microcredits),
        "refunded_microcredits": _micro(result.refunded_microcredits),
    }


async def internal_events(request: web.Request) -> web.Response:
    node, raw = await node_signed_body(request)
    event = validated(raw, schemas.UsageEvent)
    record = await gw(request).ledger.get_session(event.session_id)
    if record is None:
        return error(404, f"unknown session {event.session_id}")
    if record.service == "tts":
        units = event.usage.used_characters
    else:
        seconds = event.usage.duration_seconds
        units = None if seconds is None else int(-(-seconds // 1))
    if units is None:
        field = "used_characters" if record.service == "tts" else "duration_seconds"
        raise _bad(f"usage.{field} is required for a {record.service} session")
    return web.json_response(await _report(request, node, record, units, event.event == "complete"))


async def sfu_webhook(request: web.Request) -> web.Response:
    """LiveKit-style WebhookEvent JSON from an SFU node: bills participant time.

    ``participant_left`` settles the participant's own session: its usage is the time between
    the participant's ``joinedAt`` and the event's ``createdAt`` (not a sum of deltas, so a
    retried or replayed event cannot add it twice; its ``id`` is also applied once), and the SFU
    is told to refuse the token from then on. ``room_finished`` bills nothing: a session that
    never joined settles when its token expires, and its token stays good until then.
    """
    node, raw = await node_signed_body(request)
    data = json_object(raw)
    if not isinstance(data.get("event"), str):
        raise _bad("webhook body must be a WebhookEvent object with an 'event' field")
    event = data["event"]
    if event == "participant_left":
        participant = data.get("participant")
        participant = participant if isinstance(participant, dict) else {}
        attributes = participant.get("attributes")
        session_id = attributes.get("session_id") if isinstance(attributes, dict) else None
        joined, left, event_id = participant.get("joinedAt"), data.get("createdAt"), data.get("id")
        if not isinstance(session_id, str) or not _ints(joined, left):
            raise _bad(
                "participant_left needs participant.attributes.session_id, "
                "participant.joinedAt and createdAt (unix seconds)"
            )
        if event_id is not None and not (isinstance(event_id, str) and 0 < len(event_id) <= 128):
            raise _bad("webhook id must be a string of 1..128 characters")
        if int(left) < int(joined):
            raise _bad(f"participant_left: createdAt {left} is before joinedAt {joined}")
        record = await gw(request).ledger.get_session(session_id)
        if record is None:
            return error(404, f"unknown session {session_id}")
        report = await _report(
            request, node, record, int(left) - int(joined), final=True, event_id=event_id
        )
        gw(request).sessions.push_revoke(record)
        return web.json_response(report)
    # room_started, room_finished, participant_joined, track_published: nothing to bill.
    log.debug("sfu webhook %s from %s", event, node)
    return web.json_response({"ok": True})


def _ints(*values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


# ---------------------------------------------------------------- assembly


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/pricing", pricing_handler, "Current pricing and limits", auth="public"),
    Route(
        "GET",
        "/v1/servers/status",
        servers_status,
        "Healthy nodes and capacity by service",
        auth="public",
    ),
    Route("GET", "/v1/account", account_handler, "Account details and balances"),
    Route(
        "GET",
        "/v1/account/transactions",
        transactions_handler,
        "Credit transaction history",
        paged=True,
    ),
    Route(
        "GET",
        "/v1/account/sessions",
        sessions_handler,
        "Sessions, optionally by status",
        paged=True,
    ),
    Route(
        "POST",
        "/v1/webrtc/token",
        webrtc_token,
        "Create a WebRTC session",
        model=schemas.WebrtcTokenRequest,
    ),
    session_route(
        "/v1/webrtc/token/extend",
        SessionService.webrtc_extend,
        schemas.SessionExtend,
        "Extend a WebRTC session",
    ),
    session_route(
        "/v1/stt/session",
        SessionService.stt_session,
        schemas.SttSessionRequest,
        "Create a speech-to-text session",
        located=True,
    ),
    session_route(
        "/v1/stt/session/extend",
        SessionService.stt_extend,
        schemas.SessionExtend,
        "Extend a speech-to-text session",
    ),
    session_route(
        "/v1/tts/session",
        SessionService.tts_session,
        schemas.TtsSessionRequest,
        "Create a text-to-speech session",
        located=True,
    ),
    session_route(
        "/v1/tts/session/extend",
        SessionService.tts_extend,
        schemas.TtsExtend,
        "Extend a text-to-speech session",
    ),
    Route(
        "POST",
        "/v1/agent-session",
        agent_session,
        "Create a WebRTC + STT + TTS bundle",
        model=schemas.AgentSessionRequest,
    ),
    session_route(
        "/v1/agent-session/extend",
        SessionService.agent_extend,
        schemas.AgentExtend,
        "Extend an agent session bundle",
    ),
    Route(
        "POST", "/v1/webhooks/sfu", sfu_webhook, "SFU lifecycle webhooks (node-signed)", auth="node"
    ),
    Route(
        "POST",
        "/internal/events",
        internal_events,
        "Usage events from STT/TTS nodes (node-signed)",
        auth="node",
        model=schemas.UsageEvent,
    ),
    Route(
        "GET",
        "/v1/nodes",
        nodes_handler,
        "Every registered node: role, URL, location, live load, status, report and presence age",
        auth="public",
    ),
    Route(
        "GET",
        "/v1/liveness",
        liveness_handler,
        "Where nodes send their signed load reports (UDP port), how often, and the TTL",
        auth="public",
    ),
    Route("GET", "/internal/health", health, "Health check", auth="public"),
    # Credit purchases (x402 and the other rails) live in gateway.payments.
    *PAYMENT_ROUTES,
)


async def _sweeper(app: web.Application) -> Any:
    gateway = app[GATEWAY_KEY]

    async def loop() -> None:
        while True:
            await asyncio.sleep(gateway.config.sweep_interval_seconds)
            try:
                settled = await gateway.ledger.sweep(
                    grace=timedelta(seconds=gateway.config.settle_grace_seconds)
                )
                if settled:
                    log.info("sweeper settled %d expired session(s)", len(settled))
                await gateway.replay.prune()
            except Exception:  # noqa: BLE001 - the sweeper must outlive a database blip
                log.exception("sweeper failed; retrying")

    task = asyncio.create_task(loop())
    yield
    await stop_tasks(task)


async def _lifecycle(app: web.Application) -> Any:
    gateway = app[GATEWAY_KEY]
    await gateway.ledger.migrate()
    await gateway.directory.start()
    config = gateway.config
    relay = app.get(RELAY_KEY)
    if relay is not None:  # a worker: its supervisor checks the reports and relays them here
        gateway.load_reports = await open_relay(gateway.directory.board, relay)
    else:
        gateway.load_reports = await open_endpoint(
            gateway.directory.board,
            gateway.directory.by_key,
            config.listen_host,
            config.report_port(),
        )
        log.info("load reports: udp %s:%d", config.listen_host, gateway.load_reports.port)
    yield
    gateway.load_reports.close()
    await gateway.sessions.close()
    await gateway.directory.close()
    await gateway.ledger.close()
    gateway.locator.close()


def create_app(
    config: GatewayConfig,
    issuer: Keypair,
    list_nodes: Any,
    ledger: Ledger | None = None,
    relay: Relay | None = None,
) -> web.Application:
    """The gateway app. ``list_nodes`` is the registry read (``RegistryClient.list_nodes``);
    ``relay``: this app is one of ``gateway serve --workers N``, taking the load reports its
    supervisor relays instead of binding the UDP port itself."""
    ledger = ledger or Ledger(config.database_url, pool_size=config.database_pool_size)
    directory = NodeDirectory(
        list_nodes,
        config.registry_refresh_seconds,
        board=LoadBoard(config.load_report_ttl_seconds),
    )
    loc = config.default_location
    locator = Locator(Location(loc.lat, loc.lon, loc.country), config.geoip_mmdb)
    limiter = RateLimiter()
    replay = (
        LedgerReplayGuard(ledger.db)
        if config.shared_replay_guard(ledger.db.is_postgres)
        else MemoryReplayGuard(time.time)
    )
    service = SessionService(
        ledger,
        directory,
        locator,
        issuer,
        config.tts_session_minutes,
        config.refresh_sfu_tokens,
        config.account_cache_seconds,
    )
    # Outermost first: auth must see the final status (a 402 gives the signature back), so the
    # domain-error mapping runs inside it.
    app = web.Application(
        middlewares=[
            wallet_auth_middleware(
                replay,
                unsigned_paths(ROUTES),
                max_skew=config.auth_window_seconds,
            ),
            rate_limit_middleware(limiter),
            errors_middleware,
        ],
        client_max_size=64 * 1024,
    )
    app[GATEWAY_KEY] = Gateway(config, ledger, directory, locator, service, limiter, replay)
    app[ROUTES_KEY] = ROUTES
    if relay is not None:
        app[RELAY_KEY] = relay
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    app.router.add_get("/openapi.json", openapi_handler)
    app.cleanup_ctx.append(_lifecycle)
    app.cleanup_ctx.append(_sweeper)
    setup_payments(app)
    return app


__all__ = ["create_app", "ROUTES"]
