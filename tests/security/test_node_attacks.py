"""Attacks on the nodes (issue 12, items 3, 4, 5, 7, 11), each as the attacker would run it on
loopback against real roles: tokens minted by an issuer listed on the session localnet (the TTS
harness trusts its issuer directly), real Whisper and Kokoro weights, real WebRTC signalling.

Each test asserts the refusal and that nothing moved: no usage reported, no session, clock or
participant created on the node that refused, counts exactly as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from livekit.protocol import rtc
from solders.keypair import Keypair

from node.outbox import Outbox
from node.roles import RoleContext
from node.tts.harness import RoleServer
from registry.client import RegistryClient
from registry.tokens import Grant, TokenVerifier, mint_token, sign_body
from tests.conftest import Chain
from tests.support.livekit_signal import RawClient
from tests.support.serving import serve
from tests.support.speech import silence, stream_audio
from tests.support.stt_node import connect as stt_connect
from tests.support.stt_node import stt_node
from tests.support.tts_role import connect as tts_connect

pytestmark = pytest.mark.timeout(180)

UTF16_PING = '{"type": "ping"}'.encode("utf-16-le").decode("utf-8")  # valid UTF-8: NULs
UTF32_PING = '{"type": "ping"}'.encode("utf-32-le").decode("utf-8")
DEEP = "[" * 100_000 + "]" * 100_000


def stt_token(chain: Chain, node_key: str, seconds: int = 60, session_id: str | None = None) -> str:
    return mint_token(
        chain.issuer,
        "agent",
        Grant("stt", limit=seconds),
        600,
        session_id=session_id,
        audience=node_key,
    )


# ---------------------------------------------------------------- item 3: tokens bound to a node


async def test_stt_token_routed_to_node_a_is_refused_by_node_b(
    chain: Chain, tmp_path: Path, stt_models: Any
) -> None:
    async with (
        stt_node(chain, tmp_path / "a", stt_models) as a,
        stt_node(chain, tmp_path / "b", stt_models) as b,
    ):
        token = stt_token(chain, a.role.context.node_key)
        async with stt_connect(b, {"session_key": token}) as c:
            err = await c.type("error")
            assert err["error"] == "wrong_node" and err["message"].startswith("wrong_node:")
            assert a.role.context.node_key in err["message"]
            await c.closed()
        assert b.role.sessions.sessions == {} and b.role.load() == 0
        async with stt_connect(a, {"session_key": token}) as c:  # the control: A accepts it
            assert (await c.type("ready"))["session_id"]
        await asyncio.sleep(0.3)
    assert b.events == [], "node B reports no usage for a session it never served"
    assert a.events and all(e["session_id"] for e in a.events)


async def test_tts_token_routed_to_node_a_is_refused_by_node_b(engine: Any, tmp_path: Path) -> None:
    issuer = Keypair()
    with (
        RoleServer(engine, issuer, tmp_path / "a", settings={"warmup": False}) as a,
        RoleServer(engine, issuer, tmp_path / "b", settings={"warmup": False}) as b,
    ):
        session = str(uuid.uuid4())
        token = a.token(limit=100, session_id=session)
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(b.url)
            await ws.send_json({"session_key": token})
            msg = await ws.receive_json(timeout=10)
            assert msg["type"] == "error" and msg["message"].startswith("auth: wrong_node:"), msg
            assert str(a.node_key.pubkey()) in msg["message"]
            assert (await ws.receive(timeout=10)).type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
            )
            c = await tts_connect(http, a, token)  # the control: A accepts it
            await c.ws.close()
        assert b.role.sessions.sessions == {} and b.role.load() == 0
        assert b.usage_events() == [], "node B reports no usage"
        assert await asyncio.to_thread(a.completion, session) is not None


@contextlib.asynccontextmanager
async def sfu_node(chain: Chain, tmp: Path) -> AsyncIterator[tuple[Any, str, RegistryClient]]:
    """The SFU role on loopback, trusting the issuers on the session localnet."""
    from node.sfu import create_role

    key = Keypair()
    client = RegistryClient(chain.url)
    outbox = Outbox(tmp / "outbox.sqlite", None, key)  # webhooks kept on disk, counted
    role = create_role(
        RoleContext(
            "sfu",
            {"empty_timeout": 0.5},
            key,
            TokenVerifier(client.issuer_keys, "webrtc", cache_ttl=30),
            "http://127.0.0.1",
            10,
            None,
            tmp,
            outbox,
            calibrate=False,
        )
    )
    app = web.Application()
    role.routes(app)
    runner, port = await serve(app)
    await role.start()
    try:
        yield role, f"http://127.0.0.1:{port}", client
    finally:
        await role.stop()
        await outbox.stop()
        await runner.cleanup()
        await client.close()


def rtc_token(
    chain: Chain, role: Any, identity: str, room: str = "r", session_id: str | None = None
) -> str:
    return mint_token(
        chain.issuer,
        identity,
        Grant("webrtc", room=room),
        600,
        session_id=session_id,
        audience=role.context.node_key,
    )


async def test_sfu_token_routed_to_node_a_is_refused_by_node_b(
    chain: Chain, tmp_path: Path
) -> None:
    async with (
        sfu_node(chain, tmp_path / "a") as (a, url_a, _),
        sfu_node(chain, tmp_path / "b") as (b, url_b, _),
    ):
        token = rtc_token(chain, a, "caller")
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as http:
            for path in ("/rtc", "/rtc/validate"):
                async with http.get(url_b + path, headers=auth) as r:
                    assert r.status == 401 and (await r.text()).startswith("wrong_node:")
            async with http.post(url_b + "/rtc/refresh", headers=auth) as r:
                assert r.status == 401 and (await r.json())["error"] == "wrong_node"
            async with http.get(url_a + "/rtc/validate", headers=auth) as r:  # the control
                assert (r.status, await r.text()) == (200, "success")
        assert b.rooms == {} and b.events == [] and b.context.outbox.pending() == 0
        assert b.load() == 0


# ---------------------------------------------------------------- item 4: one TTS limit per session


async def test_tts_parallel_sockets_and_a_reconnect_share_one_limit(
    engine: Any, tmp_path: Path
) -> None:
    with RoleServer(
        engine, Keypair(), tmp_path, settings={"warmup": False, "reconnect_grace": 1.0}
    ) as srv:
        session = str(uuid.uuid4())
        token = srv.token(limit=40, session_id=session)
        async with aiohttp.ClientSession() as http:
            one = await tts_connect(http, srv, token)
            two = await tts_connect(http, srv, token)  # the same token, a second socket
            await one.send({"text": "Twenty-five characters ok"})
            await one.until("generating")  # accepted: its 25 characters are the session's
            await two.expect_error({"text": "Twenty-five characters no"}, "character limit")
            await two.send({"text": "Fifteen chars!!"})
            await one.until("done")
            await two.until("done")
            await one.ws.close()
            await two.ws.close()
            three = await tts_connect(http, srv, token)  # a reconnect within the grace
            await three.expect_error({"text": "More."}, "0 of the session's 40 remain")
            await three.ws.close()
            done = await asyncio.to_thread(srv.completion, session)
            assert done is not None and done["usage"]["used_characters"] == 40
            # settled: the token is dead on this node
            ws = await http.ws_connect(srv.url)
            await ws.send_json({"session_key": token})
            msg = await ws.receive_json(timeout=10)
            assert msg["type"] == "error" and "session_ended" in msg["message"], msg
            await ws.close()
        reports = [e for e in srv.usage_events() if e["session_id"] == session]
        assert max(e["usage"]["used_characters"] for e in reports) == 40
        assert [e["event"] for e in reports].count("complete") == 1


# ---------------------------------------------------------------- item 7: STT faster than real time


async def test_stt_audio_ten_times_real_time_is_rate_limited(
    chain: Chain, tmp_path: Path, stt_models: Any
) -> None:
    audio = np.concatenate(
        [silence(1.0), 0.05 * np.sin(2 * np.pi * 220 * np.arange(16000 * 19) / 16000)]
    )
    audio = audio.astype(np.float32)
    async with stt_node(chain, tmp_path, stt_models, interim_results=False) as node:
        token = stt_token(chain, node.role.context.node_key, seconds=300)
        async with stt_connect(node, {"session_key": token}) as c:
            await c.type("ready")
            conn = next(iter(node.role.live.values()))
            t0 = time.monotonic()
            await stream_audio(c.ws, audio, speed=10.0)  # 20 s of audio in about 2 s
            await c.ws.send_json({"type": "ping"})
            await c.type("pong")  # the node has read every frame
            elapsed = time.monotonic() - t0
            await asyncio.sleep(0.5)
            limited = [m for m in c.of("error") if m["error"] == "rate_limited"]
            assert len(limited) == 1, "one rate_limited message, not one per frame"
            seen = conn.frontend.position / 16000
            burst = node.role.settings.burst_seconds
            print(
                f"sent {len(audio) / 16000:.1f} s in {elapsed:.1f} s; the front end saw "
                f"{seen:.2f} s (burst {burst:g} s)"
            )
            assert seen <= elapsed + burst + 0.02, "at most real time plus the burst"
            assert seen < len(audio) / 16000 / 2
            assert conn.audio_in.maxsize == node.role.settings.audio_queue_frames
            # slowing down to real time is served again
            await asyncio.sleep(1.5)  # the budget refills at real time
            before = conn.frontend.position
            await stream_audio(c.ws, silence(1.0), speed=1.0)
            await c.ws.send_json({"type": "ping"})
            await c.type("pong", timeout=10)
            await asyncio.sleep(0.3)
            assert conn.frontend.position - before >= 16000 * 0.9


# ------------------------------------------------------------- item 5: settled sessions at the SFU


async def test_sfu_refuses_and_drops_a_revoked_session(chain: Chain, tmp_path: Path) -> None:
    async with sfu_node(chain, tmp_path) as (sfu, url, _):
        live_sid, later_sid = str(uuid.uuid4()), str(uuid.uuid4())
        live_token = rtc_token(chain, sfu, "caller", session_id=live_sid)
        later_token = rtc_token(chain, sfu, "late", session_id=later_sid)
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(
                url.replace("http", "ws") + "/rtc",
                headers={"Authorization": f"Bearer {live_token}"},
            )
            caller = RawClient(ws)
            await caller.next("join")
            body = json.dumps({"session_ids": [live_sid, later_sid]}).encode()
            # a revoke by a key that is not a listed issuer, or over another body, changes nothing
            for signer, sent in ((Keypair(), body), (chain.issuer, b'{"session_ids": ["x"]}')):
                async with http.post(
                    url + "/rtc/revoke",
                    data=sent,
                    headers={"Authorization": f"Bearer {sign_body(signer, body)}"},
                ) as r:
                    assert r.status in (401, 403), await r.text()
            assert len(sfu.revoked) == 0 and sfu.rooms["r"].by_identity("caller") is not None
            async with http.post(
                url + "/rtc/revoke",
                data=body,
                headers={"Authorization": f"Bearer {sign_body(chain.issuer, body)}"},
            ) as r:
                assert (r.status, await r.json()) == (200, {"revoked": 2})
            leave = (await caller.next("leave")).leave
            assert leave.action == rtc.LeaveRequest.Action.DISCONNECT
            assert "r" not in sfu.rooms or sfu.rooms["r"].by_identity("caller") is None
            for token in (live_token, later_token):
                auth = {"Authorization": f"Bearer {token}"}
                for path in ("/rtc", "/rtc/validate"):
                    async with http.get(url + path, headers=auth) as r:
                        assert r.status == 401 and (await r.text()).startswith("session_ended:")
                async with http.post(url + "/rtc/refresh", headers=auth) as r:
                    assert r.status == 401
            too_many = json.dumps({"session_ids": [str(i) for i in range(1001)]}).encode()
            async with http.post(
                url + "/rtc/revoke",
                data=too_many,
                headers={"Authorization": f"Bearer {sign_body(chain.issuer, too_many)}"},
            ) as r:
                assert r.status == 400 and "at most 1000" in await r.text()
            assert len(sfu.revoked) == 2
    # kept across a restart of the role (same state dir and key file name)
    from node.sfu.revoked import Revocations

    stores = list(tmp_path.glob("sfu-revoked-*.sqlite"))
    assert len(stores) == 1
    again = Revocations(stores[0])
    assert live_sid in again and later_sid in again and "x" not in again
    again.close()


# ---------------------------------------------------------------- item 11: JSON and add_track


async def test_utf16_utf32_and_deep_json_get_clean_errors_on_every_node(
    chain: Chain, tmp_path: Path, stt_models: Any, engine: Any
) -> None:
    async with stt_node(chain, tmp_path / "stt", stt_models) as node:
        async with stt_connect(
            node, {"session_key": stt_token(chain, node.role.context.node_key)}
        ) as c:
            await c.type("ready")
            for bad in (UTF16_PING, UTF32_PING, DEEP):
                await c.ws.send_str(bad)
            await c.ws.send_json({"type": "ping"})
            await c.type("pong")
            codes = [m["error"] for m in c.of("error")]
            assert codes == ["invalid_json"] * 3, c.of("error")
            assert "UTF-8" in c.of("error")[0]["message"]

    with RoleServer(engine, Keypair(), tmp_path / "tts", settings={"warmup": False}) as srv:
        async with aiohttp.ClientSession() as http:
            c = await tts_connect(http, srv, srv.token())
            for bad in (UTF16_PING, UTF32_PING):
                await c.expect_error(bad, "UTF-8")
            await c.expect_error(DEEP, "nested deeper")
            await c.send({"type": "ping"})
            await c.until("pong")
            await c.ws.close()

    async with sfu_node(chain, tmp_path / "sfu") as (sfu, url, _):
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(
                url.replace("http", "ws") + "/rtc",
                headers={"Authorization": f"Bearer {rtc_token(chain, sfu, 'm')}"},
            )
            client = RawClient(ws)
            await client.next("join")
            trickle = rtc.SignalRequest(trickle=rtc.TrickleRequest(candidateInit=UTF16_PING))
            for bad in (UTF16_PING, UTF32_PING, DEEP):
                await ws.send_str(bad)
                response = (await client.next("request_response")).request_response
                assert response.reason == rtc.RequestResponse.Reason.INVALID_REQUEST
            await client.send(trickle)
            response = (await client.next("request_response")).request_response
            assert response.reason == rtc.RequestResponse.Reason.INVALID_REQUEST
            assert "UTF-8" in response.message
            await client.send(rtc.SignalRequest(ping_req=rtc.Ping(timestamp=1)))
            await client.next("pong_resp")  # the session lives on
            admin = mint_token(
                chain.issuer,
                "admin",
                Grant("webrtc", room="r", room_admin=True),
                60,
                audience=sfu.context.node_key,
            )
            for body in (
                '{"room": "r"}'.encode("utf-16"),
                '{"room": "r"}'.encode("utf-32"),
                DEEP.encode(),
            ):
                async with http.post(
                    url + "/twirp/livekit.RoomService/ListParticipants",
                    data=body,
                    headers={
                        "Authorization": f"Bearer {admin}",
                        "Content-Type": "application/json",
                    },
                ) as r:
                    assert r.status == 400 and (await r.json())["code"] == "malformed"
            await ws.close()


async def test_an_add_track_flood_stays_bounded(chain: Chain, tmp_path: Path) -> None:
    from node.sfu.rtc import MAX_PENDING_TRACKS

    async with sfu_node(chain, tmp_path) as (sfu, url, _):
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(
                url.replace("http", "ws") + "/rtc",
                headers={"Authorization": f"Bearer {rtc_token(chain, sfu, 'flood')}"},
            )
            client = RawClient(ws)
            await client.next("join")
            for i in range(500):
                await client.send(
                    rtc.SignalRequest(
                        add_track=rtc.AddTrackRequest(cid=f"cid-{i}", name=f"t{i}", type=0)
                    )
                )
            await client.send(rtc.SignalRequest(ping_req=rtc.Ping(timestamp=7)))
            published = refused = 0
            while True:
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.BINARY, msg
                response = rtc.SignalResponse.FromString(msg.data)
                kind = response.WhichOneof("message")
                if kind == "track_published":
                    published += 1
                elif kind == "request_response":
                    assert (
                        response.request_response.reason
                        == rtc.RequestResponse.Reason.LIMIT_EXCEEDED
                    )
                    refused += 1
                elif kind == "pong_resp":
                    break
            assert (published, refused) == (MAX_PENDING_TRACKS, 500 - MAX_PENDING_TRACKS)
            participant = sfu.rooms["r"].by_identity("flood")
            assert len(participant._pending_cids) == MAX_PENDING_TRACKS
            assert participant.tracks == {}
            await ws.close()
