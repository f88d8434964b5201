"""The gateway's HTTP API end to end: a real localnet with real node entries, a real ledger, the
real aiohttp app on loopback, and the SDK as the client. Nodes here are registry entries with
their keys (the routing and the node-signed callbacks only need those); the roles have their own
tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from solders.keypair import Keypair

from gateway.app import ROUTES
from gateway.auth import sign_request
from gateway.client import (
    BadRequest,
    ConcurrencyLimit,
    DualWebrtc,
    InsufficientCredits,
    NoCapacity,
    NotFound,
    RateLimit,
)
from gateway.sessions import sfu_room
from registry import program as p
from registry.client import RegistryClient
from registry.tokens import sign_body, verify_token
from tests.support.gateway_net import (
    SG_IP,
    US_IP,
    Gw,
    Net,
    audit_ok,
    serve_gateway,
)
from tests.support.ledger import backdate

# ---------------------------------------------------------------- public routes


async def test_pricing_and_servers_status_are_public(gw: Gw) -> None:
    async with gw.http.get(gw.url + "/v1/pricing") as r:
        body = await r.json()
    assert body["microcredits_per_usd"] == 1_000_000
    assert body["rates"]["webrtc"] == {"unit": "per_minute", "microcredits": 1000, "usd": 0.001}
    assert body["rates"]["stt"]["microcredits"] == 6000
    assert body["rates"]["tts"] == {"unit": "per_1k_characters", "microcredits": 8000, "usd": 0.008}
    status = await gw.client().servers_status()
    assert status["services"]["webrtc"]["healthy"] == 3
    assert status["services"]["stt"]["healthy"] == 2
    assert status["services"]["tts"] == {
        "total": 1,
        "healthy": 1,
        "capacity": 100,
        "load": 0,
        "available": True,
    }
    async with gw.http.get(gw.url + "/internal/health") as r:
        assert await r.json() == {"status": "ok", "pid": os.getpid()}  # served in this process


async def test_openapi_describes_every_route(gw: Gw) -> None:
    async with gw.http.get(gw.url + "/openapi.json") as r:
        doc = await r.json()
    served = {(r.method.lower(), r.path) for r in ROUTES}
    described = {(m, path) for path, ops in doc["paths"].items() for m in ops}
    assert served == described
    assert doc["paths"]["/v1/webrtc/token"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]["required"] == ["duration_minutes", "room_name", "participant_identity"]


# ---------------------------------------------------------------- accounts


async def test_unknown_wallet_is_404_then_402(gw: Gw) -> None:
    client = gw.client()
    with pytest.raises(NotFound):
        await client.account()
    with pytest.raises(InsufficientCredits, match="purchase credits"):
        await client.create_stt_session(duration_minutes=1)


async def test_account_shape_and_grant(gw: Gw) -> None:
    client = await gw.funded(0.5)
    account = await client.account()
    raw = await client.request("GET", "/v1/account")
    assert set(raw) == {
        "id",
        "wallet_address",
        "wallet_chain",
        "credit_balance",
        "available_balance",
        "max_concurrent_sessions",
        "max_api_rate",
        "created_at",
    }
    assert raw["credit_balance"] == "500000" and raw["available_balance"] == "500000"
    assert account.wallet_chain == "solana" and account.wallet_address == str(client.key.pubkey())
    [tx] = await client.transactions()
    assert tx["type"] == "grant" and tx["amount_microcredits"] == "500000"


async def test_evm_wallet_works_end_to_end(gw: Gw) -> None:
    client = await gw.funded(0.1, chain="evm")
    await client.create_webrtc_token("evm-room", "evm-agent", 2)
    assert (await client.account()).available_balance == 100_000 - 2_000


# ---------------------------------------------------------------- sessions and money


async def test_webrtc_reserve_extend_usage_refund(gw: Gw) -> None:
    client = await gw.funded(1.0)
    session = await client.create_webrtc_token(
        "room-1", "agent-7", duration_minutes=10, metadata="hello"
    )
    claims = verify_token(session.token, {str(gw.net.issuer.pubkey())}, "webrtc")
    account = await client.account()
    # The SFU room is the account's own: its name, then a digest of (account, name).
    assert (claims.identity, claims.room, claims.session_id) == (
        "agent-7",
        sfu_room(account.id, "room-1"),
        session.session_id,
    )
    assert claims.room.startswith("room-1~")
    assert claims.raw["metadata"] == "hello"
    assert 590 <= claims.expires_at - time.time() <= 601
    assert session.ws_url == "wss://sfu-de.test"  # loopback client -> default location (DE)
    account = await client.account()
    assert (account.credit_balance, account.available_balance) == (1_000_000, 990_000)

    extended = await client.extend_webrtc_token(session.session_id, 5)
    new_claims = verify_token(extended.token, {str(gw.net.issuer.pubkey())}, "webrtc")
    assert new_claims.expires_at >= claims.expires_at + 299
    assert (await client.account()).available_balance == 985_000

    # The participant leaves after 90 s in the room: its session settles, charge 1,500, refund
    # the rest. The room finishing afterwards bills nothing more.
    record = await gw.ledger.get_session(session.session_id)
    await backdate(gw.ledger, session.session_id, 90)  # the session is 90 s old
    left = {
        "event": "participant_left",
        "id": "EV_1",
        "createdAt": 1_000_090,
        "room": {"name": claims.room},
        "participant": {
            "identity": "agent-7",
            "joinedAt": 1_000_000,
            "attributes": {"session_id": session.session_id},
        },
    }
    node = next(n for n, k in gw.net.nodes.items() if str(k.pubkey()) == record.node_pubkey)
    r = await gw.post_signed("/v1/webhooks/sfu", json.dumps(left).encode(), node)
    assert r.status == 200, await r.text()
    settled = await r.json()
    assert (settled["status"], settled["charged_microcredits"]) == ("completed", "1500")
    finished = {
        "event": "room_finished",
        "id": "EV_2",
        "createdAt": 1_000_100,
        "room": {"name": claims.room},
    }
    r = await gw.post_signed("/v1/webhooks/sfu", json.dumps(finished).encode(), node)
    assert r.status == 200 and await r.json() == {"ok": True}
    account = await client.account()
    assert (account.credit_balance, account.available_balance) == (998_500, 998_500)
    kinds = [t["type"] for t in await client.transactions()]
    assert sorted(kinds) == ["charge", "grant", "refund", "reserve", "reserve"]
    [listed] = await client.sessions(status="completed")
    assert listed["charged_microcredits"] == "1500" and listed["reserved_microcredits"] == "15000"
    assert set(listed) == {
        "session_id",
        "service",
        "bundle_id",
        "status",
        "room_name",
        "server_url",
        "reserved_microcredits",
        "charged_microcredits",
        "token_expires_at",
        "started_at",
        "ended_at",
    }
    await audit_ok(gw, client)


async def test_geo_routing_by_client_ip_and_forwarded_for(gw: Gw) -> None:
    client = await gw.funded(1.0)
    us = await client.create_webrtc_token("geo", "a", 1, client_ip=US_IP)
    sg = await client.create_webrtc_token("geo", "b", 1, client_ip=SG_IP)
    assert (us.ws_url, sg.ws_url) == ("wss://sfu-us.test", "wss://sfu-sg.test")
    body = json.dumps({"duration_minutes": 1}).encode()
    headers = {
        **sign_request("POST", "/v1/stt/session", client.key),
        "X-Forwarded-For": US_IP,
        "Content-Type": "application/json",
    }
    async with gw.http.post(gw.url + "/v1/stt/session", data=body, headers=headers) as r:
        assert (await r.json())["server_url"] == "https://stt-us.test"


async def test_stt_and_tts_sessions_usage_and_limits(gw: Gw) -> None:
    client = await gw.funded(1.0)
    stt = await client.create_stt_session(duration_minutes=2, language="en")
    trusted = {str(gw.net.issuer.pubkey())}
    assert verify_token(stt.token, trusted, "stt").limit == 120
    assert stt.server_url == "https://stt-de.test"
    stt2 = await client.extend_stt_session(stt.session_id, 1)
    assert verify_token(stt2.token, trusted, "stt").limit == 180

    tts = await client.create_tts_session(max_characters=2000)
    assert verify_token(tts.token, trusted, "tts").limit == 2000
    tts2 = await client.extend_tts_session(tts.session_id, 500)
    assert verify_token(tts2.token, trusted, "tts").limit == 2500
    # reserved: stt 3 min = 18,000; tts 2,500 chars = 20,000
    assert (await client.account()).available_balance == 1_000_000 - 18_000 - 20_000

    # The STT node reports 61.2 s (billed as 62 s = 6,200), then completes.
    await backdate(gw.ledger, stt.session_id, 62)
    for event, seconds in (("usage", 30), ("complete", 61.2)):
        body = json.dumps(
            {"session_id": stt.session_id, "event": event, "usage": {"duration_seconds": seconds}}
        ).encode()
        r = await gw.post_signed("/internal/events", body, "stt-de")
        assert r.status == 200, await r.text()
    body = json.dumps(
        {"session_id": tts.session_id, "event": "complete", "usage": {"used_characters": 1234}}
    ).encode()
    r = await gw.post_signed("/internal/events", body, "tts-de")
    assert r.status == 200
    account = await client.account()
    assert account.credit_balance == 1_000_000 - 6_200 - 9_872
    assert account.available_balance == account.credit_balance
    # A second completion changes nothing.
    r = await gw.post_signed("/internal/events", body, "tts-de")
    assert r.status == 200
    assert (await client.account()).credit_balance == account.credit_balance
    await audit_ok(gw, client)


async def test_agent_session_dual_and_single(gw: Gw) -> None:
    client = await gw.funded(1.0)
    trusted = {str(gw.net.issuer.pubkey())}
    dual = await client.create_agent_session(
        "tutor", "agent", 5, language="en", client_identity="user-42", client_ip=SG_IP
    )
    assert isinstance(dual.webrtc, DualWebrtc)
    assert dual.webrtc.agent.ws_url == "wss://sfu-de.test"  # the server's own (loopback) address
    assert dual.webrtc.client.ws_url == "wss://sfu-sg.test"  # the end user's client_ip
    assert verify_token(dual.webrtc.client.token, trusted, "webrtc").identity == "user-42"
    assert verify_token(dual.tts.token, trusted, "tts").limit == 10_000
    # 2 x 5 min webrtc (10,000) + 5 min stt (30,000) + 10,000 chars tts (80,000)
    assert (await client.account()).available_balance == 1_000_000 - 120_000

    ext = await client.extend_agent_session(dual.bundle_id, 1, additional_tts_characters=1000)
    assert isinstance(ext.webrtc, DualWebrtc) and ext.webrtc.client.expires_at
    assert verify_token(ext.tts.token, trusted, "tts").limit == 11_000
    assert (await client.account()).available_balance == 1_000_000 - 120_000 - 2_000 - 6_000 - 8_000

    single = await client.create_agent_session("solo", "agent", 1)
    assert not isinstance(single.webrtc, DualWebrtc) and single.webrtc.ws_url
    raw = await client.request(
        "POST", "/v1/agent-session/extend", {"bundle_id": single.bundle_id, "additional_minutes": 1}
    )
    assert set(raw["webrtc"]) == {"token", "new_expires_at"}
    assert set(raw["stt"]) == {"token", "new_expires_at"}
    sessions = await client.sessions(limit=10)
    assert {s["bundle_id"] for s in sessions} == {dual.bundle_id, single.bundle_id}
    await audit_ok(gw, client)


async def test_sweeper_settles_expired_sessions(gw: Gw) -> None:
    client = await gw.funded(0.1)
    session = await client.create_stt_session(duration_minutes=0.02)  # 2 s
    body = json.dumps(
        {"session_id": session.session_id, "event": "usage", "usage": {"duration_seconds": 1}}
    ).encode()
    assert (await gw.post_signed("/internal/events", body, "stt-de")).status == 200
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        [s] = await client.sessions()
        if s["status"] == "expired":
            break
        await asyncio.sleep(0.3)
    assert s["status"] == "expired" and s["charged_microcredits"] == "100"
    account = await client.account()
    assert (account.credit_balance, account.available_balance) == (99_900, 99_900)
    await audit_ok(gw, client)


# ---------------------------------------------------------------- refusals


async def test_errors_are_the_documented_codes(gw: Gw) -> None:
    client = await gw.funded(0.01)  # 10,000 microcredits
    with pytest.raises(InsufficientCredits, match="insufficient credits"):
        await client.create_stt_session(duration_minutes=2)  # 12,000
    for body, field in [
        ({"duration_minutes": -1}, "duration_minutes"),
        ({"duration_minutes": 1, "langauge": "en"}, "langauge"),
        ({}, "duration_minutes"),
    ]:
        with pytest.raises(BadRequest, match=field):
            await client.request("POST", "/v1/stt/session", body)
    with pytest.raises(BadRequest, match="client_ip"):
        await client.create_webrtc_token("r", "i", 1, client_ip="not-an-ip")
    with pytest.raises(BadRequest, match="UUID"):
        await client.extend_stt_session("nope", 1)
    with pytest.raises(NotFound):
        await client.extend_stt_session("00000000-0000-0000-0000-000000000000", 1)
    # A second the SDK has not signed in (its 402 above gave that signature back for its body).
    headers = {
        **sign_request("POST", "/v1/stt/session", client.key, now=time.time() + 20),
        "Content-Type": "application/json",
    }
    async with gw.http.post(gw.url + "/v1/stt/session", data=b"{nope", headers=headers) as r:
        assert r.status == 400 and "not valid JSON" in (await r.json())["error"]
    # Someone else's session is not found (and not extended).
    mine = await client.create_webrtc_token("r", "i", 1)
    other = await gw.funded(0.1)
    with pytest.raises(NotFound):
        await other.extend_webrtc_token(mine.session_id, 1)
    assert (await client.account()).available_balance == 9_000


async def test_auth_failures_and_replay(gw: Gw) -> None:
    client = await gw.funded(0.1)
    async with gw.http.get(gw.url + "/v1/account") as r:
        assert r.status == 401 and "missing header" in (await r.json())["error"]
    headers = sign_request("GET", "/v1/account", client.key)
    async with gw.http.get(gw.url + "/v1/account", headers=headers) as r:
        assert r.status == 200
    async with gw.http.get(gw.url + "/v1/account", headers=headers) as r:
        assert r.status == 200, "an identical signed GET within its second is answered again"
    spend = {
        **sign_request("POST", "/v1/stt/session", client.key),
        "Content-Type": "application/json",
    }
    body = json.dumps({"duration_minutes": 1}).encode()
    async with gw.http.post(gw.url + "/v1/stt/session", data=body, headers=spend) as r:
        assert r.status == 200
    async with gw.http.post(gw.url + "/v1/stt/session", data=body, headers=spend) as r:
        assert r.status == 401 and "replayed" in (await r.json())["error"]
    stale = sign_request("GET", "/v1/account", client.key, now=time.time() - 120)
    async with gw.http.get(gw.url + "/v1/account", headers=stale) as r:
        assert r.status == 401 and "skew" in (await r.json())["error"]
    wrong_path = sign_request("GET", "/v1/account/sessions", client.key)
    async with gw.http.get(gw.url + "/v1/account", headers=wrong_path) as r:
        assert r.status == 401
    # A 402 does not use the signature up: the same signed request may be retried.
    poor = gw.client()
    headers = {
        **sign_request("POST", "/v1/tts/session", poor.key),
        "Content-Type": "application/json",
    }
    body = json.dumps({"max_characters": 10}).encode()
    for _ in range(2):
        async with gw.http.post(gw.url + "/v1/tts/session", data=body, headers=headers) as r:
            assert r.status == 402


async def test_concurrency_and_rate_limits(gw: Gw) -> None:
    client = await gw.funded(1.0)
    account = await client.account()
    await gw.ledger.set_limits(account.id, max_concurrent_sessions=2)
    await client.create_stt_session(1)
    await client.create_stt_session(1)
    with pytest.raises(ConcurrencyLimit, match="concurrent"):
        await client.create_stt_session(1)
    await gw.ledger.set_limits(account.id, max_api_rate=3, max_concurrent_sessions=10)
    await asyncio.sleep(2.1)  # the gateway caches an account's limits (2 s in these tests)
    results = await asyncio.gather(*(client.account() for _ in range(10)), return_exceptions=True)
    assert any(isinstance(r, RateLimit) for r in results)
    assert any(not isinstance(r, Exception) for r in results)


async def test_no_healthy_node_is_503(gw: Gw) -> None:
    client = await gw.funded(1.0)
    tts = gw.net.nodes["tts-de"]
    await gw.registry.set_node_status(gw.net.authority, tts.pubkey(), p.NodeStatus.SUSPENDED)
    try:
        await asyncio.sleep(0.5)  # the directory refreshes every 0.2 s here
        with pytest.raises(NoCapacity, match="no servers available"):
            await client.create_tts_session(100)
        assert (await client.account()).available_balance == 1_000_000  # nothing reserved
        status = await client.servers_status()
        assert status["services"]["tts"]["available"] is False
    finally:
        await gw.registry.set_node_status(gw.net.authority, tts.pubkey(), p.NodeStatus.ACTIVE)


async def test_a_node_at_its_measured_capacity_gets_no_session(gw: Gw) -> None:
    """Nodes report the capacity they measured and a load of at most that (node/liveness.py): a
    full node is passed over for the next nearest, and with none left the answer is 503 and
    nothing is reserved."""
    client = await gw.funded(1.0)
    gw.loads["stt-de"] = (2, 2)  # measured 2 streams, both in use
    gw.loads["tts-de"] = (1, 1)
    try:
        await asyncio.sleep(0.5)  # the nodes report every 0.2 s here
        stt = await client.create_stt_session(1)
        assert stt.server_url == "https://stt-us.test"  # the nearest with headroom
        spent = 1_000_000 - (await client.account()).available_balance
        with pytest.raises(NoCapacity, match="no servers available"):
            await client.create_tts_session(100)
        assert 1_000_000 - (await client.account()).available_balance == spent
        gw.loads["stt-de"] = (1, 2)  # one stream ended: headroom again
        await asyncio.sleep(0.5)
        assert (await client.create_stt_session(1)).server_url == "https://stt-de.test"
    finally:
        gw.loads["stt-de"] = gw.loads["tts-de"] = (0, 100)


async def test_only_the_routed_registered_node_may_post_usage(gw: Gw) -> None:
    client = await gw.funded(0.1)
    session = await client.create_stt_session(1)
    body = json.dumps(
        {"session_id": session.session_id, "event": "complete", "usage": {"duration_seconds": 60}}
    ).encode()
    stranger = Keypair()  # not registered
    r = await gw.http.post(
        gw.url + "/internal/events",
        data=body,
        headers={"Authorization": f"Bearer {sign_body(stranger, body)}"},
    )
    assert r.status == 401 and "not a node registered" in (await r.json())["error"]
    r = await gw.post_signed("/internal/events", body, "stt-us")  # registered, not routed
    assert r.status == 401 and "not routed" in (await r.json())["error"]
    r = await gw.http.post(gw.url + "/internal/events", data=body)
    assert r.status == 401
    # Signed for other bytes than those sent.
    token = sign_body(gw.net.nodes["stt-de"], body)
    r = await gw.http.post(
        gw.url + "/internal/events",
        data=body.replace(b"60", b"6"),
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status == 401 and "sha256" in (await r.json())["error"]
    [s] = await client.sessions()
    assert s["status"] == "active" and s["charged_microcredits"] == "0"
    r = await gw.post_signed("/internal/events", body, "stt-de")
    assert r.status == 200


async def test_fifty_concurrent_creations_against_ten(
    gateway_net: Net, tmp_path: Path, db_url: str
) -> None:
    async with serve_gateway(gateway_net, tmp_path, db_url) as g:
        client = await g.funded(0.01)  # 10,000 = ten 1-minute WebRTC participants
        account = await client.account()
        await g.ledger.set_limits(account.id, max_concurrent_sessions=100, max_api_rate=100)
        results = await asyncio.gather(
            *(client.create_webrtc_token("crowd", f"p{i}", 1) for i in range(50)),
            return_exceptions=True,
        )
        ok = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, InsufficientCredits)]
        assert (len(ok), len(refused)) == (10, 40), [
            r
            for r in results
            if isinstance(r, Exception) and not isinstance(r, InsufficientCredits)
        ]
        account = await client.account()
        assert (account.credit_balance, account.available_balance) == (10_000, 0)
        assert len(await client.sessions(limit=100)) == 10
        await audit_ok(g, client)


async def test_extend_pushes_the_new_token_to_the_sfu(gateway_net: Net, tmp_path: Path) -> None:
    """The SFU holding a participant gets the extended token (POST /rtc/refresh, bearer = token),
    so the participant is not cut off at the old expiry (the SFU's side is in
    tests/test_node_sfu.py)."""
    received: list[str] = []

    async def refresh(request: web.Request) -> web.Response:
        received.append(request.headers["Authorization"].removeprefix("Bearer "))
        return web.json_response({"ok": True})

    sfu = web.Application()
    sfu.router.add_post("/rtc/refresh", refresh)
    server = TestServer(sfu, host="127.0.0.1")
    await server.start_server()
    node = Keypair()
    async with RegistryClient(gateway_net.url) as registry:
        await registry.ensure_funded(node)
        await registry.register_node(
            node,
            p.Role.SFU,
            p.NodeFields(str(server.make_url("")).rstrip("/"), -33.9, 151.2, "AU", 10, "0.1.0"),
        )
        try:
            with_au = replace(gateway_net, nodes={**gateway_net.nodes, "sfu-au": node})
            async with serve_gateway(
                with_au,
                tmp_path,
                f"sqlite+aiosqlite:///{tmp_path}/r.db",
                refresh_sfu_tokens=True,
            ) as g:
                client = await g.funded(0.1)
                session = await client.create_webrtc_token("far", "p", 1, client_ip="1.1.1.1")
                assert session.ws_url.startswith("ws://127.0.0.1:")
                extended = await client.extend_webrtc_token(session.session_id, 2)
                for _ in range(50):
                    if received:
                        break
                    await asyncio.sleep(0.05)
                assert received == [extended.token]
        finally:
            await registry.deregister_node(node)
            await server.close()


async def test_two_clients_of_one_wallet_never_repeat_a_signature(gw: Gw) -> None:
    """An agent often holds two clients of its wallet (its session manager and itself): the same
    signed request from both within one second must not be refused as a replay."""
    first = await gw.funded(1.0)
    second = gw.client(first.key)
    sessions = await asyncio.gather(*(c.create_stt_session(1) for c in (first, second, first)))
    assert len({s.session_id for s in sessions}) == 3
