"""Attacks on the gateway's sessions and billing (issue 12, items 1-3, 5, 6, 11), each on a real
gateway over a real localnet with the real registry program, asserting the refusal and that the
ledger (balances, sessions, transactions) is exactly as it was.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from typing import Any

import pytest

from gateway.auth import sign_request
from gateway.client import GatewayClient, NotFound
from gateway.ledger import pricing
from gateway.liveness import LiveLoad
from gateway.payments.x402 import PaymentInvalid, decode_header
from gateway.routing import unhealthy_reason
from gateway.sessions import sfu_room
from registry.tokens import TokenError, verify_token
from tests.support.gateway_net import Gw, audit_ok
from tests.support.ledger import backdate
from tests.support.node_entries import node as make_node


async def ledger_state(g: Gw, client: GatewayClient) -> tuple[Any, ...]:
    """Everything an attack on this wallet could move: balances, sessions, transactions."""
    account = await client.account()
    sessions = await g.ledger.list_sessions(account.id, 500, 0)
    transactions = await g.ledger.list_transactions(account.id, 500, 0)
    return (
        (account.credit_balance, account.available_balance),
        [dataclasses.astuple(s) for s in sessions],
        [dataclasses.astuple(t) for t in transactions],
    )


def node_named(g: Gw, pubkey: str) -> str:
    return next(n for n, k in g.net.nodes.items() if str(k.pubkey()) == pubkey)


async def webrtc_session(
    g: Gw, client: GatewayClient, room: str, identity: str = "caller"
) -> tuple[Any, Any, str, str]:
    """A WebRTC session, its ledger record, the name of the node it went to, and its SFU room."""
    session = await client.create_webrtc_token(room, identity, 10)
    record = await g.ledger.get_session(session.session_id)
    return session, record, node_named(g, record.node_pubkey), sfu_room(record.account_id, room)


def participant_left(
    session_id: str, room: str, joined: int, left: int, event_id: str = "EV_left"
) -> bytes:
    return json.dumps(
        {
            "event": "participant_left",
            "id": event_id,
            "createdAt": left,
            "room": {"name": room},
            "participant": {
                "identity": "caller",
                "joinedAt": joined,
                "attributes": {"session_id": session_id},
            },
        }
    ).encode()


# ---------------------------------------------------------------- 1. billing what happened


async def test_an_admitted_node_cannot_bill_more_time_than_passed(gw: Gw) -> None:
    """The routed STT node reports an hour on a session created a moment ago, then completes:
    the gateway charges no more than the seconds the session has existed (and a small slack)."""
    client = await gw.funded(1.0)
    stt = await client.create_stt_session(duration_minutes=60)
    record = await gw.ledger.get_session(stt.session_id)
    before = (await client.account()).credit_balance
    body = json.dumps(
        {"session_id": stt.session_id, "event": "complete", "usage": {"duration_seconds": 3600}}
    ).encode()
    r = await gw.post_signed("/internal/events", body, node_named(gw, record.node_pubkey))
    assert r.status == 200, await r.text()
    settled = await gw.ledger.get_session(stt.session_id)
    assert settled.status == "completed"
    assert settled.usage_units <= 5, "at most the few seconds that passed, not 3600"
    assert settled.charged_microcredits == pricing.cost("stt", settled.usage_units)
    assert (await client.account()).credit_balance == before - settled.charged_microcredits
    await audit_ok(gw, client)


async def test_a_tts_node_cannot_bill_more_characters_than_sold(gw: Gw) -> None:
    client = await gw.funded(1.0)
    tts = await client.create_tts_session(max_characters=2000)
    record = await gw.ledger.get_session(tts.session_id)
    body = json.dumps(
        {
            "session_id": tts.session_id,
            "event": "complete",
            "usage": {"used_characters": 90_000_000},
        }
    ).encode()
    r = await gw.post_signed("/internal/events", body, node_named(gw, record.node_pubkey))
    assert r.status == 200, await r.text()
    settled = await gw.ledger.get_session(tts.session_id)
    assert (settled.usage_units, settled.charged_microcredits) == (2000, pricing.cost("tts", 2000))
    await audit_ok(gw, client)


# ---------------------------------------------------------------- 2. rooms per wallet


async def test_another_wallet_never_lands_in_my_room(gw: Gw) -> None:
    """Wallet B asks for wallet A's room name and caller identity: it gets a grant for a room of
    its own, so it can neither listen in nor kick A's caller out; A's session is untouched."""
    trusted = {str(gw.net.issuer.pubkey())}
    alice, mallory = await gw.funded(1.0), await gw.funded(1.0)
    mine = await alice.create_webrtc_token("tutor-room", "user-42", 10)
    before = await ledger_state(gw, alice)
    theirs = await mallory.create_webrtc_token("tutor-room", "user-42", 10)
    room_a = verify_token(mine.token, trusted, "webrtc").room
    room_b = verify_token(theirs.token, trusted, "webrtc").room
    assert room_a == sfu_room((await alice.account()).id, "tutor-room")
    assert room_b == sfu_room((await mallory.account()).id, "tutor-room")
    assert room_a != room_b and room_a.startswith("tutor-room~")
    # Nor can B name A's SFU room outright: that is just another name of B's own.
    forged = await mallory.create_webrtc_token(room_a, "user-42", 10)
    assert verify_token(forged.token, trusted, "webrtc").room not in (room_a, room_b)
    with pytest.raises(NotFound):
        await mallory.extend_webrtc_token(mine.session_id, 5)
    # The API still speaks A's own room name, and A's ledger did not move.
    [listed] = await alice.sessions()
    assert listed["room_name"] == "tutor-room"
    assert await ledger_state(gw, alice) == before


async def test_one_account_keeps_one_room_per_name(gw: Gw) -> None:
    """Within an account a name is one room: an agent bundle and a later token meet there."""
    trusted = {str(gw.net.issuer.pubkey())}
    client = await gw.funded(1.0)
    bundle = await client.create_agent_session("tutor", "agent", 5, client_identity="user-42")
    later = await client.create_webrtc_token("tutor", "observer", 5)
    rooms = {
        verify_token(t, trusted, "webrtc").room
        for t in (bundle.webrtc.agent.token, bundle.webrtc.client.token, later.token)
    }
    assert rooms == {sfu_room((await client.account()).id, "tutor")}


# ---------------------------------------------------------------- 3. tokens bound to a node


async def test_a_token_names_the_node_it_was_routed_to_and_keeps_it(gw: Gw) -> None:
    trusted = {str(gw.net.issuer.pubkey())}
    client = await gw.funded(1.0)
    stt = await client.create_stt_session(2)
    routed = (await gw.ledger.get_session(stt.session_id)).node_pubkey
    other = next(
        str(k.pubkey())
        for n, k in gw.net.nodes.items()
        if n.startswith("stt") and str(k.pubkey()) != routed
    )
    assert verify_token(stt.token, trusted, "stt", audience=routed).session_id == stt.session_id
    with pytest.raises(TokenError) as refused:
        verify_token(stt.token, trusted, "stt", audience=other)
    assert refused.value.code == "wrong_node"
    extended = await client.extend_stt_session(stt.session_id, 1)
    assert verify_token(extended.token, trusted, "stt", audience=routed).limit == 180
    with pytest.raises(TokenError, match="wrong_node|routed|node"):
        verify_token(extended.token, trusted, "stt", audience=other)


# ---------------------------------------------------------------- 5. settling a room


async def test_room_finished_does_not_settle_sessions_that_never_joined(gw: Gw) -> None:
    """A room ends while one of its tokens was never used: that session stays open with its
    reservation (settled at expiry), instead of being closed with its token still working; the
    participant who left is settled by its own leave."""
    client = await gw.funded(1.0)
    joined, _, node, room = await webrtc_session(gw, client, "talk")
    unused = await client.create_webrtc_token("talk", "late", 10)
    await backdate(gw.ledger, joined.session_id, 30)
    r = await gw.post_signed(
        "/v1/webhooks/sfu", participant_left(joined.session_id, room, 1_000, 1_030), node
    )
    assert r.status == 200 and (await r.json())["status"] == "completed"
    before = await ledger_state(gw, client)
    finished = json.dumps(
        {"event": "room_finished", "id": "EV_fin", "createdAt": 1_040, "room": {"name": room}}
    ).encode()
    r = await gw.post_signed("/v1/webhooks/sfu", finished, node)
    assert r.status == 200
    assert await ledger_state(gw, client) == before
    still = await gw.ledger.get_session(unused.session_id)
    assert (still.status, still.charged_microcredits) == ("active", 0)
    await audit_ok(gw, client)


# ---------------------------------------------------------------- 6. webhooks applied once


async def test_replayed_and_concurrent_participant_left_bill_once(gw: Gw) -> None:
    client = await gw.funded(1.0)
    session, _, node, room = await webrtc_session(gw, client, "talk")
    await backdate(gw.ledger, session.session_id, 120)
    body = participant_left(session.session_id, room, 5_000, 5_060)
    # Two deliveries of one event at once, then the same event again, then a "new" event id
    # for the same interval: the minute in the room is billed once.
    first = await asyncio.gather(
        *(gw.post_signed("/v1/webhooks/sfu", body, node) for _ in range(2))
    )
    assert [r.status for r in first] == [200, 200]
    after_first = await ledger_state(gw, client)
    settled = await gw.ledger.get_session(session.session_id)
    assert (settled.usage_units, settled.charged_microcredits) == (60, pricing.cost("webrtc", 60))
    for replay in (
        body,
        participant_left(session.session_id, room, 5_000, 5_060, "EV_other"),
        participant_left(session.session_id, room, 5_000, 5_118, "EV_longer"),
    ):
        r = await gw.post_signed("/v1/webhooks/sfu", replay, node)
        assert r.status == 200
        assert await ledger_state(gw, client) == after_first
    await audit_ok(gw, client)


async def test_a_malformed_webhook_changes_nothing(gw: Gw) -> None:
    client = await gw.funded(1.0)
    session, _, node, room = await webrtc_session(gw, client, "talk")
    before = await ledger_state(gw, client)
    for body in (
        participant_left(session.session_id, room, 2_000, 1_000),  # left before joined
        participant_left(session.session_id, room, 1_000, 1_010, "x" * 129),
        json.dumps({"event": "participant_left", "participant": ["nope"]}).encode(),
        json.dumps({"event": "participant_left", "participant": {"attributes": 7}}).encode(),
    ):
        r = await gw.post_signed("/v1/webhooks/sfu", body, node)
        assert r.status == 400, await r.text()
    assert await ledger_state(gw, client) == before


# ---------------------------------------------------------------- 11. smaller ones


async def test_bodies_in_utf16_or_utf32_are_400_not_500(gw: Gw) -> None:
    client = await gw.funded(1.0)
    before = await ledger_state(gw, client)
    deep = "[" * 10_000 + "]" * 10_000  # 40 kB in UTF-16, under the 64 kB body limit
    for second, (text, codec) in enumerate(
        (
            (json.dumps({"duration_minutes": 1}), "utf-16"),
            (json.dumps({"duration_minutes": 1}), "utf-32"),
            (deep, "utf-16"),
        )
    ):
        signed_at = time.time() + 5 + second  # one signature per request
        headers = {
            **sign_request("POST", "/v1/stt/session", client.key, now=signed_at),
            "Content-Type": "application/json",
        }
        async with gw.http.post(
            gw.url + "/v1/stt/session", data=text.encode(codec), headers=headers
        ) as r:
            assert r.status == 400, await r.text()
            assert "UTF-8" in (await r.json())["error"]
    assert await ledger_state(gw, client) == before


async def test_a_huge_offset_is_400(gw: Gw) -> None:
    client = await gw.funded(1.0)
    for path in ("/v1/account/sessions", "/v1/account/transactions"):
        query = "?offset=" + "9" * 30
        headers = sign_request("GET", path, client.key)
        async with gw.http.get(gw.url + path + query, headers=headers) as r:
            assert r.status == 400, await r.text()
            assert "offset" in (await r.json())["error"]


def test_nodes_with_plain_http_urls_off_loopback_are_never_routed() -> None:
    """An entry written before the program checked URLs (or on another deployment) with a
    plain-http public URL would receive tokens in clear text: the gateway skips it."""
    secure = make_node("frankfurt")
    live = LiveLoad(0, 10, "0.1.0", 1, 0.0)  # reporting, idle: only the URL can disqualify it
    assert unhealthy_reason(secure, live) is None
    for url in ("http://sfu.example.org", "ws://10.0.0.7:7880", "ftp://sfu.example.org"):
        assert unhealthy_reason(dataclasses.replace(secure, url=url), live) == "insecure url"
    for url in ("http://127.0.0.1:7880", "ws://localhost:7880", "http://[::1]:7880"):
        assert unhealthy_reason(dataclasses.replace(secure, url=url), live) is None


def test_payment_headers_in_utf16_or_too_deep_are_refused_cleanly() -> None:
    """The x402 header is base64 JSON: decoded through the same UTF-8-only, depth-bounded parser
    as every body, so a UTF-16 or deeply nested payload is the documented invalid_payload."""
    ok = base64.b64encode(json.dumps({"x402Version": 1}).encode()).decode()
    assert decode_header(ok, "X-PAYMENT") == {"x402Version": 1}
    for raw in (
        json.dumps({"x402Version": 1}).encode("utf-16"),
        json.dumps({"x402Version": 1}).encode("utf-32"),
        ("[" * 2000 + "]" * 2000).encode(),
    ):
        with pytest.raises(PaymentInvalid, match="malformed X-PAYMENT header"):
            decode_header(base64.b64encode(raw).decode(), "X-PAYMENT")
