"""The SFU role end to end: a real node agent (registered on the session localnet) running the sfu
role, the real gateway app with a SQLite ledger, and the official ``livekit`` Python SDK (its Rust
core, libwebrtc) as the client. Refusals at the protocol level use a raw WebSocket client speaking
``livekit-protocol`` protobufs.

One node and one gateway serve the module (module-scoped event loop) to stay fast on 2 cores.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import numpy as np
import pytest
import pytest_asyncio
from livekit import rtc as lk
from livekit.protocol import models, rtc
from solders.keypair import Keypair

from gateway.client import GatewayClient
from node.agent import NodeAgent
from node.config import Location, NodeConfig
from node.sfu.client import LiveKitClient
from registry.client import RegistryClient
from registry.keys import load_keypair
from registry.tokens import Grant, mint_token
from tests.conftest import Chain, free_port
from tests.support.audio import tone_hz
from tests.support.livekit_signal import RawClient
from tests.support.polling import wait_for
from tests.support.serving import serve
from tests.support.sfu_net import SfuNet, get_status, sfu_and_gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Far from every other test node, so the gateway routes our sessions to this node.
WHERE = {"lat": -33.87, "lon": 151.21, "country": "AU"}


@dataclass
class Setup(SfuNet):
    """The module's SFU node and gateway, and the chain whose issuer signs test tokens."""

    chain: Chain | None = None

    def token(
        self,
        identity: str,
        room: str = "lobby",
        ttl: int = 600,
        issuer: Keypair | None = None,
        session_id: str | None = None,
        now: float | None = None,
        node: str | None = None,
        **grant: Any,
    ) -> str:
        """A token for this node (``aud``), or for ``node`` (another node's key)."""
        assert self.chain is not None
        return mint_token(
            issuer or self.chain.issuer,
            identity,
            Grant("webrtc", room=room, **grant),
            ttl,
            session_id=session_id,
            now=now,
            audience=node or str(self.agent.pubkey),
        )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sfu(chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    async with sfu_and_gateway(chain, tmp_path_factory.mktemp("sfu"), WHERE) as net:
        yield Setup(**vars(net), chain=chain)


async def connect(setup: Setup, token: str) -> lk.Room:
    room = lk.Room()
    await asyncio.wait_for(room.connect(setup.ws_url, token), 20)
    return room


async def connect_as(setup: Setup, room: lk.Room, identity: str, name: str) -> None:
    """Join ``room`` to the node's room ``name`` as ``identity`` with a token minted for it."""
    await asyncio.wait_for(room.connect(setup.ws_url, setup.token(identity, room=name)), 20)


def tone_frames(freq: float = 440.0) -> Any:
    n = 0
    while True:
        t = (np.arange(480) + n) / 48000
        n += 480
        data = (np.sin(2 * np.pi * freq * t) * 12000).astype(np.int16)
        yield lk.AudioFrame(data.tobytes(), 48000, 1, 480)


async def play(source: lk.AudioSource, freq: float = 440.0) -> None:
    for frame in tone_frames(freq):
        await source.capture_frame(frame)


def record_audio(remote: lk.Track, samples: list[np.ndarray]) -> asyncio.Future[None]:
    """Append the 48 kHz mono PCM that ``remote`` delivers to ``samples``, until cancelled."""

    async def read() -> None:
        async for event in lk.AudioStream(remote, sample_rate=48000, num_channels=1):
            samples.append(np.frombuffer(event.frame.data, dtype=np.int16).copy())

    return asyncio.ensure_future(read())


# ---------------------------------------------------------------- the official SDK


async def test_livekit_sdk_hears_the_tone_gets_data_and_speakers_and_is_billed(sfu: Setup) -> None:
    wallet = Keypair()
    await sfu.ledger.grant("solana", str(wallet.pubkey()), 2_000_000, memo="sfu test")
    room_name = f"tone-{uuid.uuid4().hex[:6]}"
    async with GatewayClient(sfu.gateway_url, wallet, session=sfu.http) as gw:
        alice_s = await gw.create_webrtc_token(room_name, "alice", 5)
        bob_s = await gw.create_webrtc_token(room_name, "bob", 5)
    assert alice_s.ws_url == sfu.ws_url, "the gateway routed the session to our node"
    # the SFU's room is the account's own (its name plus a digest of account and name)
    sfu_name = jwt.decode(alice_s.token, options={"verify_signature": False})["video"]["room"]
    assert sfu_name.startswith(f"{room_name}~")

    alice, bob = lk.Room(), lk.Room()
    data: list[tuple[bytes, str]] = []
    speakers: list[list[str]] = []
    subscribed: asyncio.Future[lk.Track] = asyncio.get_running_loop().create_future()
    bob.on("data_received", lambda p: data.append((p.data, p.participant.identity)))
    bob.on("active_speakers_changed", lambda sp: speakers.append([p.identity for p in sp]))
    bob.on(
        "track_subscribed",
        lambda track, pub, part: subscribed.done() or subscribed.set_result(track),
    )
    heard: list[str] = []  # alice's tracks that a subscriber receives (track_subscribed)
    alice.on("local_track_subscribed", lambda track: heard.append(track.sid))
    player = reader = None
    try:
        await asyncio.wait_for(alice.connect(alice_s.ws_url, alice_s.token), 20)
        await asyncio.wait_for(bob.connect(bob_s.ws_url, bob_s.token), 20)
        assert {p.identity for p in bob.remote_participants.values()} == {"alice"}
        assert sfu.role.load() == 2

        source = lk.AudioSource(48000, 1)
        track = lk.LocalAudioTrack.create_audio_track("tone", source)
        publication = await alice.local_participant.publish_track(
            track, lk.TrackPublishOptions(source=lk.TrackSource.SOURCE_MICROPHONE)
        )
        assert publication.sid.startswith("TR_")
        player = asyncio.ensure_future(play(source))

        remote = await asyncio.wait_for(subscribed, 15)
        await wait_for(lambda: heard, 10, "track_subscribed at the publisher")
        assert heard == [track.sid]
        samples: list[np.ndarray] = []
        reader = record_audio(remote, samples)
        await wait_for(lambda: sum(len(s) for s in samples) > 48000 * 1.5, 15, "1.5 s of audio")
        audio = np.concatenate(samples)[-48000:]
        assert np.sqrt(np.mean(audio.astype(float) ** 2)) > 1000, "bob hears more than silence"
        assert abs(tone_hz(audio) - 440) < 5

        await alice.local_participant.publish_data(b"hello bob", reliable=True, topic="chat")
        await wait_for(lambda: data, 10, "the data message")
        assert data[0] == (b"hello bob", "alice")
        await wait_for(lambda: any("alice" in s for s in speakers), 10, "speakers_changed")

        published = sfu.role.rooms[sfu_name].find_track(publication.sid)
        forwarded = next(iter(published.subscribers.values()))
        assert forwarded.forwarded > 50 and forwarded.dropped == 0
        # A subscription change from the client pauses forwarding to it, and resumes it.
        remote_pub = bob.remote_participants["alice"].track_publications[publication.sid]
        remote_pub.set_subscribed(False)
        await wait_for(
            lambda: forwarded.paused or forwarded.readyState != "live",
            10,
            "the subscription switched off",
        )
        await asyncio.sleep(1.2)  # bill at least a couple of seconds
    finally:
        for task in (player, reader):
            if task is not None:
                task.cancel()
        await bob.disconnect()
        await alice.disconnect()

    # a client whose leave did not arrive before its socket closed is held for the resume grace
    await wait_for(
        lambda: sfu.role.load() == 0, sfu.role.settings.resume_grace + 10, "both participants gone"
    )
    events = [e["event"] for e in sfu.role.events if e["room"]["name"] == sfu_name]
    assert events[:2] == ["room_started", "participant_joined"]
    assert events.count("participant_left") == 2 and "track_published" in events
    await wait_for(
        lambda: (
            "room_finished"
            in [e["event"] for e in sfu.role.events if e["room"]["name"] == sfu_name]
        ),
        10,
        "room_finished",
    )
    # The webhooks went through the outbox, signed by the node key, and the gateway billed them.
    await wait_for(lambda: sfu.agent.outbox.pending() == 0, 15, "outbox drained")
    assert sfu.agent.outbox.dead() == []
    record = await sfu.ledger.get_session(alice_s.session_id)
    assert record is not None and record.usage_units >= 2, record
    assert record.node_pubkey == str(sfu.agent.pubkey)
    for _ in range(100):
        record = await sfu.ledger.get_session(alice_s.session_id)
        if record.status == "completed":
            break
        await asyncio.sleep(0.1)
    assert record.status == "completed", "room_finished settled the session"


def paint(width: int, height: int, rgb: tuple[int, int, int]) -> lk.VideoFrame:
    """One RGBA frame of a single colour."""
    data = np.empty((height, width, 4), np.uint8)
    data[...] = (*rgb, 255)
    return lk.VideoFrame(width, height, lk.VideoBufferType.RGBA, data.tobytes())


async def film(
    source: lk.VideoSource, rgb: tuple[int, int, int], width: int = 320, height: int = 240
) -> None:
    """A camera at 15 frames a second that shows one colour."""
    frame = paint(width, height, rgb)
    while True:
        source.capture_frame(frame)
        await asyncio.sleep(1 / 15)


def watch(room: lk.Room) -> asyncio.Future[lk.Track]:
    """The first video track ``room`` subscribes to."""
    got: asyncio.Future[lk.Track] = asyncio.get_running_loop().create_future()

    def on_subscribed(track: lk.Track, pub: Any, part: Any) -> None:
        if track.kind == lk.TrackKind.KIND_VIDEO and not got.done():
            got.set_result(track)

    room.on("track_subscribed", on_subscribed)
    return got


async def seen(track: lk.Track, frames: int = 5) -> tuple[int, int, np.ndarray]:
    """Width, height and mean RGB of the ``frames``-th decoded frame a subscriber sees."""
    n = 0
    async for event in lk.VideoStream(track, format=lk.VideoBufferType.RGBA):
        n += 1
        if n >= frames:
            f = event.frame
            rgba = np.frombuffer(bytes(f.data), np.uint8).reshape(f.height, f.width, 4)
            return f.width, f.height, rgba[..., :3].reshape(-1, 3).mean(axis=0)
    raise AssertionError("the video stream ended")


@pytest.mark.parametrize("codec", ["VP8", "H264"])
async def test_livekit_sdk_sees_video_forwarded_without_a_decode(sfu: Setup, codec: str) -> None:
    room_name = f"video-{codec}-{uuid.uuid4().hex[:6]}"
    cam, early, late = lk.Room(), lk.Room(), lk.Room()
    early_track, late_track = watch(early), watch(late)
    camera = None
    try:
        await connect_as(sfu, cam, "cam", room_name)
        await connect_as(sfu, early, "early", room_name)
        source = lk.VideoSource(320, 240)
        track = lk.LocalVideoTrack.create_video_track("camera", source)
        camera = asyncio.ensure_future(film(source, (200, 40, 40)))
        options = lk.TrackPublishOptions(
            source=lk.TrackSource.SOURCE_CAMERA,
            video_codec=getattr(lk.VideoCodec, codec),
            simulcast=False,
        )
        publication = await cam.local_participant.publish_track(track, options)

        width, height, rgb = await asyncio.wait_for(
            seen(await asyncio.wait_for(early_track, 15)), 20
        )
        assert (width, height) == (320, 240)
        assert np.abs(rgb - (200, 40, 40)).max() < 30, f"the viewer saw {rgb}, not the red frame"
        remote = early.remote_participants["cam"].track_publications[publication.sid]
        assert remote.kind == lk.TrackKind.KIND_VIDEO
        assert remote.mime_type.lower() == f"video/{codec.lower()}"

        published = sfu.role.rooms[next(iter(n for n in sfu.role.rooms if n.startswith(room_name)))]
        published = published.find_track(publication.sid)
        assert published.kind == "video" and published.mime_type == f"video/{codec.lower()}"
        requests = published.keyframe_requests
        assert requests >= 1, "a new subscriber makes the SFU ask the publisher for a keyframe"

        # A viewer joining a running stream can decode only from a keyframe: the camera sends one
        # because the SFU asked for it (libwebrtc sends none on its own for minutes).
        await connect_as(sfu, late, "late", room_name)
        width, height, rgb = await asyncio.wait_for(
            seen(await asyncio.wait_for(late_track, 15)), 20
        )
        assert (width, height) == (320, 240) and np.abs(rgb - (200, 40, 40)).max() < 30
        assert published.keyframe_requests > requests
        assert all(f.dropped == 0 for f in published.subscribers.values())

        # Muted, nothing more goes out; unmuted, it flows again (from a keyframe it asks for).
        track.mute()
        await wait_for(lambda: published.muted and remote.muted, 10, "the mute, at both ends")
        await asyncio.sleep(0.3)  # what was on the wire arrives
        sent = sum(f.forwarded for f in published.subscribers.values())
        await asyncio.sleep(1.0)
        assert sum(f.forwarded for f in published.subscribers.values()) == sent
        requests = published.keyframe_requests
        track.unmute()
        await wait_for(lambda: not published.muted and not remote.muted, 10, "the unmute")
        await wait_for(
            lambda: sum(f.forwarded for f in published.subscribers.values()) > sent + 10,
            10,
            "frames flow again",
        )
        assert published.keyframe_requests > requests

        # Unpublished (the client renegotiates the m-line inactive), it leaves the room.
        gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        early.on("track_unpublished", lambda pub, part: gone.done() or gone.set_result(pub.sid))
        await cam.local_participant.unpublish_track(publication.sid)
        assert await asyncio.wait_for(gone, 10) == publication.sid
        room = sfu.role.rooms[next(n for n in sfu.role.rooms if n.startswith(room_name))]
        assert room.find_track(publication.sid) is None
    finally:
        if camera is not None:
            camera.cancel()
        for room in (late, early, cam):
            await room.disconnect()


def frame_sizes(track: lk.Track) -> tuple[list[tuple[int, int]], asyncio.Future[None]]:
    """The size of every frame a subscriber decodes, as they come, until cancelled."""
    sizes: list[tuple[int, int]] = []

    async def read() -> None:
        stream = lk.VideoStream(track)
        try:
            async for event in stream:
                sizes.append((event.frame.width, event.frame.height))
        finally:  # closed, not left to the interpreter's exit (the SDK's native side panics)
            await stream.aclose()

    return sizes, asyncio.ensure_future(read())


async def test_simulcast_viewers_get_the_layer_they_ask_for(sfu: Setup) -> None:
    """A 720p camera publishes simulcast (the SDK's three layers); each viewer gets one layer,
    the one it asks for, and moves between layers on request without a break in its stream."""
    room_name = f"simulcast-{uuid.uuid4().hex[:6]}"
    cam, one, two = lk.Room(), lk.Room(), lk.Room()
    one_track, two_track = watch(one), watch(two)
    camera = readers = None
    try:
        for room, identity in ((cam, "cam"), (one, "one"), (two, "two")):
            await connect_as(sfu, room, identity, room_name)
        source = lk.VideoSource(1280, 720)
        camera = asyncio.ensure_future(film(source, (220, 200, 40), 1280, 720))
        publication = await cam.local_participant.publish_track(
            lk.LocalVideoTrack.create_video_track("camera", source),
            lk.TrackPublishOptions(
                source=lk.TrackSource.SOURCE_CAMERA, video_codec=lk.VideoCodec.VP8, simulcast=True
            ),
        )
        room = sfu.role.rooms[next(n for n in sfu.role.rooms if n.startswith(room_name))]
        await wait_for(lambda: room.find_track(publication.sid), 10, "the track in the room")
        track = room.find_track(publication.sid)
        assert track.rids == ("q", "h", "f")
        assert [(v.quality, v.width, v.height) for v in track.layers] == [
            (0, 320, 180),
            (1, 640, 360),
            (2, 1280, 720),
        ]
        one_sizes, one_reader = frame_sizes(await asyncio.wait_for(one_track, 15))
        two_sizes, two_reader = frame_sizes(await asyncio.wait_for(two_track, 15))
        readers = (one_reader, two_reader)
        await wait_for(lambda: one_sizes and two_sizes, 20, "both viewers decode")
        me_one, me_two = room.by_identity("one"), room.by_identity("two")
        one_fwd, two_fwd = track.subscribers[me_one.sid], track.subscribers[me_two.sid]

        def flowing(sizes: list[tuple[int, int]], size: tuple[int, int]) -> bool:
            """The viewer decodes a run of frames of ``size``: it moved, and its stream goes on."""
            return len(sizes) >= 15 and all(s == size for s in sizes[-15:])

        one_pub = one.remote_participants["cam"].track_publications[publication.sid]
        two_pub = two.remote_participants["cam"].track_publications[publication.sid]
        one_pub.set_video_quality(lk.VideoQuality.VIDEO_QUALITY_LOW)
        two_pub.set_video_quality(lk.VideoQuality.VIDEO_QUALITY_MEDIUM)
        await wait_for(lambda: flowing(one_sizes, (320, 180)), 20, "viewer one on the low layer")
        await wait_for(lambda: flowing(two_sizes, (640, 360)), 20, "viewer two on the middle one")
        assert (one_fwd.layer, two_fwd.layer) == (0, 1), "one track, two layers at once"

        one_pub.set_video_quality(lk.VideoQuality.VIDEO_QUALITY_HIGH)
        await wait_for(lambda: flowing(one_sizes, (1280, 720)), 30, "viewer one moves up")
        one_pub.set_video_quality(lk.VideoQuality.VIDEO_QUALITY_LOW)
        await wait_for(lambda: flowing(one_sizes, (320, 180)), 20, "and down again")
        assert flowing(two_sizes, (640, 360)), "the other viewer stayed where it was"
        assert one_fwd.switches >= 3 and one_fwd.dropped == 0 and two_fwd.dropped == 0
        # each viewer's own link estimate (RTCP REMB) reaches the node; uncongested, no cap
        assert one_fwd.estimate_bps > 0 and two_fwd.estimate_bps > 0
        assert one_fwd.cap is None and two_fwd.cap is None
    finally:
        for task in (camera, *(readers or ())):
            if task is not None:
                task.cancel()
        for r in (two, one, cam):
            await r.disconnect()


async def test_a_hidden_track_is_not_forwarded_until_shown_again(sfu: Setup) -> None:
    """UpdateTrackSettings ``disabled``, as a client with adaptive stream sends it for a video
    element nobody sees."""
    room_name = f"hidden-{uuid.uuid4().hex[:6]}"
    cam = lk.Room()
    camera = None
    client, _ = await raw_join(sfu, sfu.token("viewer", room=room_name))
    try:
        await connect_as(sfu, cam, "cam", room_name)
        source = lk.VideoSource(320, 240)
        camera = asyncio.ensure_future(film(source, (40, 200, 40)))
        publication = await cam.local_participant.publish_track(
            lk.LocalVideoTrack.create_video_track("camera", source),
            lk.TrackPublishOptions(source=lk.TrackSource.SOURCE_CAMERA, simulcast=False),
        )
        room = sfu.role.rooms[next(n for n in sfu.role.rooms if n.startswith(room_name))]
        await wait_for(lambda: room.find_track(publication.sid), 10, "the track in the room")
        track = room.find_track(publication.sid)
        viewer = room.by_identity("viewer")
        await wait_for(lambda: viewer.sid in track.subscribers, 10, "the viewer subscribed")
        forward = track.subscribers[viewer.sid]

        def setting(disabled: bool) -> rtc.SignalRequest:
            return rtc.SignalRequest(
                track_setting=rtc.UpdateTrackSettings(
                    track_sids=[publication.sid, "TR_unknown"], disabled=disabled
                )
            )

        await client.send(setting(True))
        await wait_for(lambda: forward.paused, 5, "forwarding stops")
        await asyncio.sleep(0.6)  # past the keyframe request interval
        requests = track.keyframe_requests
        await client.send(setting(False))
        await wait_for(lambda: not forward.paused, 5, "forwarding resumes")
        assert track.keyframe_requests == requests + 1, "from a keyframe"
    finally:
        if camera is not None:
            camera.cancel()
        await cam.disconnect()
        await client.ws.close()


async def test_a_viewer_without_auto_subscribe_gets_only_the_track_it_asks_for(sfu: Setup) -> None:
    room_name = f"ask-{uuid.uuid4().hex[:6]}"
    cam, viewer = lk.Room(), lk.Room()
    got = watch(viewer)
    camera = None
    try:
        await connect_as(sfu, cam, "cam", room_name)
        token = sfu.token("viewer", room=room_name)
        await asyncio.wait_for(
            viewer.connect(sfu.ws_url, token, lk.RoomOptions(auto_subscribe=False)), 20
        )
        source = lk.VideoSource(320, 240)
        camera = asyncio.ensure_future(film(source, (40, 40, 200)))
        publication = await cam.local_participant.publish_track(
            lk.LocalVideoTrack.create_video_track("camera", source),
            lk.TrackPublishOptions(source=lk.TrackSource.SOURCE_CAMERA, simulcast=False),
        )
        await wait_for(
            lambda: publication.sid in viewer.remote_participants["cam"].track_publications,
            10,
            "the viewer learns of the track",
        )
        room = sfu.role.rooms[next(n for n in sfu.role.rooms if n.startswith(room_name))]
        track = room.find_track(publication.sid)
        me = room.by_identity("viewer")
        await asyncio.sleep(1.0)
        assert me.sid not in track.subscribers and not got.done(), "nothing unasked is sent"

        remote = viewer.remote_participants["cam"].track_publications[publication.sid]
        remote.set_subscribed(True)
        width, height, rgb = await asyncio.wait_for(seen(await asyncio.wait_for(got, 15)), 20)
        assert (width, height) == (320, 240) and np.abs(rgb - (40, 40, 200)).max() < 30
        forward = track.subscribers[me.sid]
        remote.set_subscribed(False)
        await wait_for(lambda: forward.paused, 10, "the subscription switched off")
    finally:
        if camera is not None:
            camera.cancel()
        for r in (viewer, cam):
            await r.disconnect()


# ---------------------------------------------------------------- refusals


async def test_refusals_before_the_websocket(sfu: Setup) -> None:
    assert (await get_status(sfu, "/rtc/v1"))[0] == 404, "clients fall back to /rtc on 404"
    status, text = await get_status(sfu, "/rtc")
    assert status == 401 and "no_token" in text
    status, text = await get_status(sfu, "/rtc", sfu.token("eve", issuer=Keypair()))
    assert status == 401 and "untrusted_issuer" in text
    expired = sfu.token("eve", ttl=10, now=time.time() - 120)
    status, text = await get_status(sfu, "/rtc", expired)
    assert status == 401 and "token_expired" in text
    status, text = await get_status(sfu, "/rtc/validate", expired, header=False)
    assert status == 401 and "token_expired" in text, "validate says why a join would fail"
    other_room = sfu.token("eve", room="other")
    status, text = await get_status(sfu, "/rtc", other_room, {"room": "lobby"})
    assert status == 403 and "wrong_room" in text
    assert await get_status(sfu, "/rtc/validate", other_room, {"room": "other"}) == (200, "success")
    stt = mint_token(sfu.chain.issuer, "eve", Grant("stt", limit=60), 60)
    status, text = await get_status(sfu, "/rtc", stt, header=False)
    assert status == 401 and "wrong_service" in text


async def test_the_sdk_refuses_a_bad_token_without_crashing(sfu: Setup) -> None:
    room = lk.Room()
    with pytest.raises(Exception):
        await asyncio.wait_for(room.connect(sfu.ws_url, sfu.token("eve", issuer=Keypair())), 20)
    ok = await connect(sfu, sfu.token("carol", room="after-refusal"))  # the process lives on
    await ok.disconnect()


async def raw_join(setup: Setup, token: str) -> tuple[RawClient, rtc.JoinResponse]:
    ws = await setup.http.ws_connect(
        setup.ws_url + "/rtc", headers={"Authorization": f"Bearer {token}"}
    )
    client = RawClient(ws)
    join = (await client.next("join")).join
    return client, join


async def test_protocol_level_refusals_and_malformed_frames(sfu: Setup) -> None:
    client, join = await raw_join(
        sfu, sfu.token("mallory", room="raw", can_publish=False, can_publish_data=False)
    )
    try:
        assert join.room.name == "raw" and join.participant.identity == "mallory"
        assert join.ping_interval > 0 and join.ping_timeout > 0 and join.subscriber_primary
        assert not join.participant.permission.can_publish
        offer = await client.next("offer")  # the server offers the subscriber right after join
        assert "m=application" in offer.offer.sdp, "the server's data channels ride the subscriber"
        await client.send(
            rtc.SignalRequest(
                add_track=rtc.AddTrackRequest(cid="mic", name="mic", type=models.TrackType.AUDIO)
            )
        )
        refused = (await client.next("request_response")).request_response
        assert refused.reason == rtc.RequestResponse.Reason.NOT_ALLOWED
        assert "canPublish" in refused.message

        await client.send(b"\xff\xff\xff\xff not a protobuf")
        bad = (await client.next("request_response")).request_response
        assert bad.reason == rtc.RequestResponse.Reason.INVALID_REQUEST
        await client.send(rtc.SignalRequest(trickle=rtc.TrickleRequest(candidateInit="{nope")))
        assert (
            await client.next("request_response")
        ).request_response.reason == rtc.RequestResponse.Reason.INVALID_REQUEST
        # A candidate that overtakes its offer is kept for it, without holding up what follows
        # (a blocked read loop once starved an SDK client of its pongs).
        import json

        early = json.dumps(
            {
                "candidate": "candidate:1 1 udp 2122260223 192.0.2.9 50000 typ host",
                "sdpMid": "0",
                "sdpMLineIndex": 0,
            }
        )
        for _ in range(3):
            await client.send(
                rtc.SignalRequest(
                    trickle=rtc.TrickleRequest(
                        candidateInit=early, target=rtc.SignalTarget.PUBLISHER
                    )
                )
            )
        # ...and the session is still alive: ping_req -> pong_resp, at once.
        await client.send(rtc.SignalRequest(ping_req=rtc.Ping(timestamp=1234)))
        pong = (await client.next("pong_resp", timeout=1.0)).pong_resp
        assert pong.last_ping_timestamp == 1234 and pong.timestamp > 0
        assert sfu.role.rooms["raw"].by_identity("mallory") is not None
        await client.send(rtc.SignalRequest(leave=rtc.LeaveRequest()))
        await wait_for(
            lambda: (
                "raw" not in sfu.role.rooms or sfu.role.rooms["raw"].by_identity("mallory") is None
            ),
            5,
            "leave",
        )
    finally:
        await client.ws.close()


async def test_add_track_of_an_unknown_type_or_absurd_size(sfu: Setup) -> None:
    """A data "track" or a type no SDK sends is refused by name; a video track's claimed size is
    bounded before it reaches anyone's ParticipantInfo."""
    client, _ = await raw_join(sfu, sfu.token("odd", room="odd-tracks"))
    try:
        await client.next("offer")
        for kind in (models.TrackType.DATA, 99):
            await client.send(
                rtc.SignalRequest(add_track=rtc.AddTrackRequest(cid=f"c{kind}", type=kind))
            )
            refused = (await client.next("request_response")).request_response
            assert refused.reason == rtc.RequestResponse.Reason.UNSUPPORTED_TYPE
            assert f"not track type {int(kind)}" in refused.message
        big = rtc.AddTrackRequest(
            cid="cam", name="cam", type=models.TrackType.VIDEO, width=10**9, height=10**9
        )
        await client.send(rtc.SignalRequest(add_track=big))
        published = (await client.next("track_published")).track_published
        assert published.track.type == models.TrackType.VIDEO
        assert (published.track.width, published.track.height) == (16384, 16384)
        assert published.track.source == models.TrackSource.CAMERA
        # announced, but no media came: nothing is in the room for anyone to subscribe to
        assert sfu.role.rooms["odd-tracks"].by_identity("odd").tracks == {}
    finally:
        await client.ws.close()


async def test_sdk_without_can_publish_cannot_publish(sfu: Setup) -> None:
    room = await connect(sfu, sfu.token("listener", room="nopub", can_publish=False))
    try:
        source = lk.AudioSource(48000, 1)
        track = lk.LocalAudioTrack.create_audio_track("mic", source)
        # The node answers add_track with NOT_ALLOWED, which this SDK does not read: it would
        # wait out its own 10 s. A publish the node accepted would be done well inside 3 s.
        with pytest.raises(Exception):
            await asyncio.wait_for(
                room.local_participant.publish_track(
                    track, lk.TrackPublishOptions(source=lk.TrackSource.SOURCE_MICROPHONE)
                ),
                3,
            )
        live = sfu.role.rooms["nopub"].by_identity("listener")
        assert live is not None and not live.tracks
    finally:
        await room.disconnect()


# ---------------------------------------------------------------- resume


async def test_a_dropped_signal_socket_is_resumed_without_a_new_join(sfu: Setup) -> None:
    """The SDK's resume: its signal socket drops, it reconnects with ``reconnect=1`` and its
    participant sid, and the node hands it the same participant, tracks and peer connections:
    no ``participant_left`` (no billing gap), the other side never sees it leave, the audio
    goes on. A resume after the grace is told to start over; a stranger cannot resume it."""
    room_name = f"resume-{uuid.uuid4().hex[:6]}"
    talker, listener = lk.Room(), lk.Room()
    gone: list[str] = []
    listener.on("participant_disconnected", lambda p: gone.append(p.identity))
    resumed = asyncio.Event()
    talker.on("reconnected", resumed.set)
    player = recorder = None
    samples: list[np.ndarray] = []
    try:
        await connect_as(sfu, talker, "talker", room_name)
        await connect_as(sfu, listener, "listener", room_name)
        heard = asyncio.get_running_loop().create_future()
        listener.on("track_subscribed", lambda t, pub, part: heard.done() or heard.set_result(t))
        source = lk.AudioSource(48000, 1)
        await talker.local_participant.publish_track(
            lk.LocalAudioTrack.create_audio_track("mic", source),
            lk.TrackPublishOptions(source=lk.TrackSource.SOURCE_MICROPHONE),
        )
        player = asyncio.ensure_future(play(source, 523.0))
        recorder = record_audio(await asyncio.wait_for(heard, 15), samples)
        room = sfu.role.rooms[room_name]
        me = room.by_identity("talker")
        await wait_for(lambda: len(samples) > 50, 10, "the listener hears the talker")

        await talker.simulate_scenario(lk.SimulateScenarioKind.SIMULATE_SIGNAL_RECONNECT)
        await asyncio.wait_for(resumed.wait(), 20)
        assert room.by_identity("talker") is me and me.resumes == 1
        before = len(samples)
        await wait_for(lambda: len(samples) > before + 100, 10, "the audio goes on")
        assert tone_hz(np.concatenate(samples[-100:])) == pytest.approx(523, abs=15)
        # the resumed socket carries signalling: a mute reaches the node and the listener
        publication = next(iter(talker.local_participant.track_publications.values()))
        publication.track.mute()
        await wait_for(lambda: all(t.muted for t in me.tracks.values()), 10, "the mute")
        assert not gone
        events = [
            e["event"]
            for e in sfu.role.events
            if e["room"]["name"] == room_name
            and e.get("participant", {}).get("identity") == "talker"
        ]
        assert "participant_left" not in events and events.count("participant_joined") == 1

        # A stranger (another identity) naming the talker's sid gets no resume.
        url = f"{sfu.ws_url}/rtc?reconnect=1&sid={me.sid}"
        headers = {"Authorization": f"Bearer {sfu.token('mallory', room=room_name)}"}
        async with sfu.http.ws_connect(url, headers=headers) as ws:
            reply = rtc.SignalResponse.FromString((await ws.receive(timeout=10)).data)
        assert reply.WhichOneof("message") == "leave"
        assert reply.leave.action == rtc.LeaveRequest.Action.RECONNECT
        assert room.by_identity("talker") is me and me.resumes == 1

        # A client that never comes back leaves when the grace runs out, and is told to start
        # over if it tries later.
        grace, sfu.role.settings.resume_grace = sfu.role.settings.resume_grace, 1.0
        try:
            client, join = await raw_join(sfu, sfu.token("dropper", room=room_name))
            await client.ws.close()  # no leave request: a dead network
            await asyncio.sleep(0.3)
            assert room.by_identity("dropper") is not None, "it waits for a resume"
            await wait_for(lambda: room.by_identity("dropper") is None, 10, "gone after the grace")
        finally:
            sfu.role.settings.resume_grace = grace
        assert any(
            e["event"] == "participant_left" and e["participant"]["identity"] == "dropper"
            for e in sfu.role.events
        )
        url = f"{sfu.ws_url}/rtc?reconnect=1&sid={join.participant.sid}"
        headers = {"Authorization": f"Bearer {sfu.token('dropper', room=room_name)}"}
        async with sfu.http.ws_connect(url, headers=headers) as ws:
            reply = rtc.SignalResponse.FromString((await ws.receive(timeout=10)).data)
        assert reply.leave.action == rtc.LeaveRequest.Action.RECONNECT
    finally:
        for task in (player, recorder):
            if task is not None:
                task.cancel()
        for r in (listener, talker):
            await r.disconnect()


async def test_a_client_that_closed_its_peer_connection_is_not_held_for_a_resume(
    sfu: Setup,
) -> None:
    """A client whose ``leave`` is lost with its socket, but which closed its peer connections
    (their DTLS close_notify arrives), has left: it is not held for the resume grace. The client
    is the node's own aiortc LiveKit client; the grace is long, so only the close can end it."""
    client = LiveKitClient(sfu.ws_url, sfu.token("closer", room="closing"), http=sfu.http)
    grace, sfu.role.settings.resume_grace = sfu.role.settings.resume_grace, 600.0
    try:
        join = await client.connect()
        room = sfu.role.rooms["closing"]
        me = room.by_identity("closer")
        assert me is not None and me.sid == join.participant.sid
        await wait_for(
            lambda: me.subscriber.connectionState == "connected", 15, "the media connected"
        )
        assert client.ws is not None
        await client.ws.close()  # the socket drops and no leave arrives ...
        await wait_for(lambda: not me.signal_up.is_set(), 10, "the socket gone")
        assert room.by_identity("closer") is me, "a socket alone that drops waits for a resume"
        await client.subscriber.close()  # ... but the client closed its peer connections
        await client.publisher.close()
        await wait_for(lambda: me.closed.is_set(), 30, "the participant gone")
        assert "closing" not in sfu.role.rooms or room.by_identity("closer") is None
        assert me.disconnect_reason == models.DisconnectReason.CLIENT_INITIATED
    finally:
        sfu.role.settings.resume_grace = grace
        await client.close()
    assert any(
        e["event"] == "participant_left" and e["participant"]["identity"] == "closer"
        for e in sfu.role.events
    )


# ---------------------------------------------------------------- token lifetime


async def test_expiry_disconnects_and_a_refreshed_token_keeps_one_in(sfu: Setup) -> None:
    short = sfu.token("short", room="expiry", ttl=2)
    sid = str(uuid.uuid4())
    kept = sfu.token("kept", room="expiry", ttl=2, session_id=sid)
    a, b = await connect(sfu, short), await connect(sfu, kept)
    gone = asyncio.Event()
    a.on("disconnected", lambda reason: gone.set())
    try:
        refreshed = sfu.token("kept", room="expiry", ttl=60, session_id=sid)
        async with sfu.http.post(
            sfu.http_url + "/rtc/refresh", headers={"Authorization": f"Bearer {refreshed}"}
        ) as r:
            assert r.status == 200, await r.text()
        stranger = sfu.token("kept", room="expiry", ttl=60)  # another session: refused
        async with sfu.http.post(
            sfu.http_url + "/rtc/refresh", headers={"Authorization": f"Bearer {stranger}"}
        ) as r:
            assert r.status == 404
        await asyncio.wait_for(gone.wait(), 10)
        room = sfu.role.rooms["expiry"]
        await wait_for(lambda: room.by_identity("short") is None, 5, "short removed")
        assert room.by_identity("kept") is not None, "the refreshed participant stays"
    finally:
        await a.disconnect()
        await b.disconnect()


# ---------------------------------------------------------------- RoomService (Twirp)


async def twirp(setup: Setup, method: str, body: dict[str, Any], token: str) -> tuple[int, Any]:
    async with setup.http.post(
        f"{setup.http_url}/twirp/livekit.RoomService/{method}",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
    ) as r:
        return r.status, await r.json(content_type=None)


async def test_room_service_under_room_admin(sfu: Setup) -> None:
    admin = sfu.token("server", room="svc", room_admin=True)
    user = sfu.token("plain", room="svc")
    a = await connect(sfu, sfu.token("ann", room="svc"))
    b = await connect(sfu, sfu.token("ben", room="svc"))
    got: list[bytes] = []
    b.on("data_received", lambda p: got.append(p.data))
    try:
        assert (await twirp(sfu, "ListParticipants", {"room": "svc"}, user))[0] == 403
        status, body = await twirp(sfu, "ListParticipants", {"room": "other"}, admin)
        assert status == 403 and body["code"] == "permission_denied"
        status, body = await twirp(sfu, "ListRooms", {}, admin)
        assert status == 200 and [r["name"] for r in body["rooms"]] == ["svc"]
        status, body = await twirp(sfu, "ListParticipants", {"room": "svc"}, admin)
        assert sorted(p["identity"] for p in body["participants"]) == ["ann", "ben"]

        source = lk.AudioSource(48000, 1)
        pub = await a.local_participant.publish_track(
            lk.LocalAudioTrack.create_audio_track("mic", source),
            lk.TrackPublishOptions(source=lk.TrackSource.SOURCE_MICROPHONE),
        )
        await wait_for(lambda: sfu.role.rooms["svc"].find_track(pub.sid), 10, "media arrives")
        status, body = await twirp(
            sfu,
            "MutePublishedTrack",
            {"room": "svc", "identity": "ann", "track_sid": pub.sid, "muted": True},
            admin,
        )
        assert status == 200 and body["track"]["muted"] is True
        assert sfu.role.rooms["svc"].find_track(pub.sid).muted

        import base64

        status, _ = await twirp(
            sfu,
            "SendData",
            {
                "room": "svc",
                "data": base64.b64encode(b"from the server").decode(),
                "kind": "RELIABLE",
            },
            admin,
        )
        assert status == 200
        await wait_for(lambda: got, 10, "server data")
        assert got == [b"from the server"]

        gone = asyncio.Event()
        b.on("disconnected", lambda reason: gone.set())
        status, _ = await twirp(sfu, "RemoveParticipant", {"room": "svc", "identity": "ben"}, admin)
        assert status == 200
        await asyncio.wait_for(gone.wait(), 10)
        assert (await twirp(sfu, "RemoveParticipant", {"room": "svc", "identity": "ben"}, admin))[
            0
        ] == 404
    finally:
        await a.disconnect()
        await b.disconnect()


async def test_a_moderator_updates_a_participant_live(sfu: Setup) -> None:
    admin = sfu.token("server", room="mod", room_admin=True)
    a = await connect(sfu, sfu.token("ann", room="mod"))
    b = await connect(sfu, sfu.token("ben", room="mod"))
    gone: list[str] = []
    b.on("track_unpublished", lambda pub, part: gone.append(pub.sid))
    try:
        pub = await a.local_participant.publish_track(
            lk.LocalAudioTrack.create_audio_track("mic", lk.AudioSource(48000, 1)),
            lk.TrackPublishOptions(source=lk.TrackSource.SOURCE_MICROPHONE),
        )
        room = sfu.role.rooms["mod"]
        await wait_for(lambda: room.find_track(pub.sid), 10, "ann's track in the room")
        ann = room.by_identity("ann")

        # Refused updates change nothing (checked whole before anything is applied).
        for body in (
            {"metadata": "x" * 70_000},
            {"attributes": {f"k{i}": "v" for i in range(65)}, "metadata": "half"},
            {"name": "n" * 300},
        ):
            status, answer = await twirp(
                sfu, "UpdateParticipant", {"room": "mod", "identity": "ann", **body}, admin
            )
            assert status == 400 and answer["code"] == "invalid_argument", answer
        assert (ann.metadata, ann.attributes, ann.can_publish) == ("", {}, True)
        ben_token = sfu.token("ben", room="mod")
        status, _ = await twirp(
            sfu, "UpdateParticipant", {"room": "mod", "identity": "ann"}, ben_token
        )
        assert status == 403
        status, _ = await twirp(
            sfu, "UpdateParticipant", {"room": "mod", "identity": "nobody"}, admin
        )
        assert status == 404

        update = {
            "room": "mod",
            "identity": "ann",
            "metadata": "speaker",
            "attributes": {"hand": "up"},
            "permission": {"canSubscribe": True, "canPublish": False, "canPublishData": True},
        }
        status, info = await twirp(sfu, "UpdateParticipant", update, admin)
        assert status == 200, info
        assert info["metadata"] == "speaker" and info["attributes"] == {"hand": "up"}
        assert not info["permission"].get("canPublish", False)
        # Ben sees the new metadata and attributes, and ann's track go away.
        seen_ann = b.remote_participants["ann"]
        await wait_for(lambda: seen_ann.metadata == "speaker", 10, "ben sees the metadata")
        await wait_for(lambda: seen_ann.attributes == {"hand": "up"}, 10, "and the attributes")
        await wait_for(lambda: pub.sid in gone, 10, "ben sees ann's track unpublished")
        assert room.find_track(pub.sid) is None and ann.tracks == {}
        events = [e["event"] for e in sfu.role.events if e["room"]["name"] == "mod"]
        assert "track_unpublished" in events
        # An empty value deletes an attribute.
        update = {"room": "mod", "identity": "ann", "attributes": {"hand": ""}}
        status, info = await twirp(sfu, "UpdateParticipant", update, admin)
        assert status == 200 and info.get("attributes", {}) == {}
    finally:
        await b.disconnect()
        await a.disconnect()


async def test_heartbeat_load_is_the_participant_count(sfu: Setup) -> None:
    # the node is shared by this module's tests: a client of an earlier test whose leave did not
    # arrive before its socket closed is held for the resume grace
    await wait_for(
        lambda: sfu.role.load() == 0, sfu.role.settings.resume_grace + 10, "the node empty"
    )
    room = await connect(sfu, sfu.token("counted", room="load"))
    try:
        async with RegistryClient(sfu.chain.url) as client:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                node = await client.get_node(sfu.agent.pubkey)
                if node.load == 1:
                    break
                await asyncio.sleep(0.3)
            assert node.load == 1
    finally:
        await room.disconnect()


# ---------------------------------------------------------------- a room on two nodes


async def test_a_room_spans_two_nodes(sfu: Setup, tmp_path: Path) -> None:
    port = free_port()
    config = NodeConfig(
        role="sfu",
        keypair=tmp_path / "sfu-b.json",
        rpc_url=sfu.chain.url,
        listen_port=port,
        public_url=f"http://127.0.0.1:{port}",
        location=Location(lat=1.35, lon=103.8, country="SG"),
        capacity=20,
        report_interval=0.5,
        drain_timeout=1,
        issuer_cache_seconds=1,
        state_dir=tmp_path / "state-b",
        sfu={"empty_timeout": 0.5, "webhooks": False},
    )
    node_b = NodeAgent(config)
    await node_b.start()
    url_b = f"ws://127.0.0.1:{port}"
    alice, bob = lk.Room(), lk.Room()
    subscribed: asyncio.Future[lk.Track] = asyncio.get_running_loop().create_future()
    owners: list[str] = []

    def on_subscribed(track: lk.Track, pub: Any, part: Any) -> None:
        owners.append(part.identity)
        if not subscribed.done():
            subscribed.set_result(track)

    bob.on("track_subscribed", on_subscribed)
    data: list[tuple[bytes, str]] = []
    bob.on(
        "data_received",
        lambda p: data.append((p.data, p.participant.identity if p.participant else "")),
    )
    bob_video = watch(bob)
    speaking: list[list[str]] = []
    bob.on("active_speakers_changed", lambda ps: speaking.append([p.identity for p in ps]))
    player = reader = camera = None
    try:
        await alice.connect(sfu.ws_url, sfu.token("alice", room="span"))  # on node A
        key_b = str(node_b.pubkey)
        await bob.connect(url_b, sfu.token("bob", room="span", node=key_b))  # on node B
        admin = sfu.token("linker", room="span", room_admin=True)
        peer = sfu.token("linker", room="span", room_admin=True, node=key_b)
        async with sfu.http.post(
            sfu.http_url + "/relay/link",
            json={"peer_url": url_b},
            headers={"Authorization": f"Bearer {admin}"},
        ) as r:
            assert r.status == 400 and "peer_token" in await r.text()
        async with sfu.http.post(
            sfu.http_url + "/relay/link",
            json={"peer_url": url_b, "peer_token": admin},
            headers={"Authorization": f"Bearer {admin}"},
        ) as r:
            assert r.status == 502, "B refuses a token routed to A"
        async with sfu.http.post(
            sfu.http_url + "/relay/link",
            json={"peer_url": url_b, "peer_token": peer},
            headers={"Authorization": f"Bearer {admin}"},
        ) as r:
            assert r.status == 200, await r.text()
        async with sfu.http.post(
            sfu.http_url + "/relay/link",
            json={"peer_url": url_b, "peer_token": peer},
            headers={"Authorization": f"Bearer {sfu.token('x', room='span')}"},
        ) as r:
            assert r.status == 403, "linking needs roomAdmin"

        source = lk.AudioSource(48000, 1)
        await alice.local_participant.publish_track(
            lk.LocalAudioTrack.create_audio_track("tone", source),
            lk.TrackPublishOptions(source=lk.TrackSource.SOURCE_MICROPHONE),
        )
        player = asyncio.ensure_future(play(source))
        remote = await asyncio.wait_for(subscribed, 20)
        samples: list[np.ndarray] = []
        reader = record_audio(remote, samples)
        await wait_for(lambda: sum(len(s) for s in samples) > 48000, 15, "audio over the relay")
        audio = np.concatenate(samples)[-24000:]
        assert abs(tone_hz(audio) - 440) < 5, "bob on node B hears alice on node A"
        # Each side sees the other's people by identity, not the link: bob hears alice's track
        # as alice's, and the data she sends comes from her.
        assert set(bob.remote_participants) == {"alice"} and owners == ["alice"]
        await wait_for(lambda: ["alice"] in speaking, 10, "bob sees alice speak")
        await wait_for(lambda: set(alice.remote_participants) == {"bob"}, 10, "alice sees bob")
        await alice.local_participant.publish_data(b"across", reliable=True)
        await wait_for(lambda: data, 10, "data over the relay")
        assert data[0] == (b"across", "alice")
        assert node_b.role.load() == 1 and sfu.role.load() == 1, "relays are not load"
        # what a moderator changes on A is what B shows
        status, _ = await twirp(
            sfu, "UpdateParticipant", {"room": "span", "identity": "alice", "metadata": "hi"}, admin
        )
        assert status == 200
        await wait_for(
            lambda: bob.remote_participants["alice"].metadata == "hi", 10, "the metadata on B"
        )

        # Video crosses too: bob on node B decodes alice's camera on node A (VP8, as it came).
        video = lk.VideoSource(320, 240)
        camera = asyncio.ensure_future(film(video, (30, 160, 220)))
        await alice.local_participant.publish_track(
            lk.LocalVideoTrack.create_video_track("camera", video),
            lk.TrackPublishOptions(source=lk.TrackSource.SOURCE_CAMERA, simulcast=False),
        )
        width, height, rgb = await asyncio.wait_for(seen(await asyncio.wait_for(bob_video, 20)), 20)
        assert (width, height) == (320, 240)
        assert np.abs(rgb - (30, 160, 220)).max() < 30, f"bob saw {rgb}, not alice's camera"
        assert owners == ["alice", "alice"]

        # alice leaves node A: bob sees her leave node B
        await alice.disconnect()
        await wait_for(lambda: not bob.remote_participants, 10, "alice gone from B")
    finally:
        for task in (player, reader, camera):
            if task is not None:
                task.cancel()
        await alice.disconnect()
        await bob.disconnect()
        await node_b.shutdown()


async def test_a_misspelt_sfu_setting_is_an_error(tmp_path: Path) -> None:
    from common.settings import SettingsError
    from node.outbox import Outbox
    from node.roles import RoleContext
    from node.sfu import create_role
    from registry.tokens import TokenVerifier

    async def issuers() -> list[str]:
        return []

    key = Keypair()
    context = RoleContext(
        "sfu",
        {"ping_intervall": 5},
        key,
        TokenVerifier(issuers, "webrtc"),
        "http://127.0.0.1:1",
        1,
        None,
        tmp_path,
        Outbox(tmp_path / "o.sqlite", None, key),
    )
    with pytest.raises(SettingsError, match="ping_intervall"):
        create_role(context)


async def test_the_sfu_measures_what_a_participant_costs_and_caches_it(tmp_path: Path) -> None:
    """At start the SFU forwards real Opus streams through its own path (aiortc, passthrough,
    ForwardTrack) and advertises what the cores carry, at most the config's capacity; a restart
    on the same machine reuses the measurement."""
    from node.capacity import derive_capacity, usable_cores
    from node.outbox import Outbox
    from node.roles import RoleContext
    from node.sfu import create_role
    from registry.tokens import TokenVerifier

    async def issuers() -> list[str]:
        return []

    async def started(capacity: int) -> tuple[Any, RoleContext]:
        key = Keypair()
        context = RoleContext(
            "sfu",
            {},
            key,
            TokenVerifier(issuers, "webrtc"),
            "http://127.0.0.1:1",
            capacity,
            None,
            tmp_path,
            Outbox(tmp_path / f"o-{key.pubkey()}.sqlite", None, key),
        )
        role = create_role(context)
        await role.start()
        await role.stop()
        return role, context

    first, ctx = await started(100_000)
    assert ctx.calibration is not None and not ctx.calibration.cached
    cost = ctx.calibration.cost
    assert 0 < cost < 0.5, cost  # core-seconds per second of one stream in and one out
    assert first.capacity == derive_capacity(cost, usable_cores(), 100_000) > 1
    again, ctx2 = await started(3)
    assert ctx2.calibration is not None and ctx2.calibration.cached
    assert ctx2.calibration.cost == cost and again.capacity == min(3, first.capacity)


async def test_node_cli_runs_the_sfu_role(chain: Chain, tmp_path: Path) -> None:
    """``node --role sfu`` as a real process: healthy, validates tokens, exits cleanly."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.support.node_process import node_config, wait_health

    config, port = node_config(tmp_path, chain, "sfu-cli", sfu={"ping_interval": 3})
    log = open(tmp_path / "sfu-cli.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--role", "sfu", "--config", str(config)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        health = await wait_health(port, proc)
        assert health["role"] == "sfu" and health["load"] == 0
        node_key = str(load_keypair(config.parent / "sfu-cli.json").pubkey())
        token = mint_token(chain.issuer, "cli", Grant("webrtc", room="cli"), 60, audience=node_key)
        async with aiohttp.ClientSession() as http:
            async with http.get(
                f"http://127.0.0.1:{port}/rtc/validate", params={"access_token": token}
            ) as r:
                assert (r.status, await r.text()) == (200, "success")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_data_needs_can_publish_data_and_can_subscribe(sfu: Setup) -> None:
    mute = await connect(sfu, sfu.token("mute", room="perm", can_publish_data=False))
    deaf = await connect(sfu, sfu.token("deaf", room="perm", can_subscribe=False))
    ears = await connect(sfu, sfu.token("ears", room="perm"))
    got: dict[str, list[bytes]] = {"deaf": [], "ears": [], "mute": []}
    mute.on("data_received", lambda p: got["mute"].append(p.data))
    deaf.on("data_received", lambda p: got["deaf"].append(p.data))
    ears.on("data_received", lambda p: got["ears"].append(p.data))
    try:
        await mute.local_participant.publish_data(b"not allowed", reliable=True)
        await ears.local_participant.publish_data(b"to everyone", reliable=True)
        mute_p = sfu.role.rooms["perm"].by_identity("mute")
        await wait_for(lambda: got["mute"], 10, "ears' message at mute (the control)")
        await asyncio.sleep(0.5)
        assert got["ears"] == [], "data from a token without canPublishData is dropped"
        assert got["deaf"] == [], "a token without canSubscribe receives nothing"
        assert mute_p is not None and not mute_p.can_publish_data
    finally:
        for room in (mute, deaf, ears):
            await room.disconnect()


async def test_webhooks_survive_a_gateway_blip(tmp_path: Path) -> None:
    """The gateway is down when the participant leaves: the signed webhooks wait in the outbox
    and arrive, in order, once it is back."""
    from aiohttp import web

    from node.outbox import Outbox
    from node.roles import RoleContext
    from node.sfu import create_role
    from registry.tokens import TokenVerifier, verify_body

    issuer, node_key = Keypair(), Keypair()

    async def issuers() -> list[str]:
        return [str(issuer.pubkey())]

    gw_port = free_port()
    outbox = Outbox(
        tmp_path / "outbox.sqlite", f"http://127.0.0.1:{gw_port}", node_key, max_backoff=1.0
    )
    role = create_role(
        RoleContext(
            "sfu",
            {"empty_timeout": 0},
            node_key,
            TokenVerifier(issuers, "webrtc"),
            "http://127.0.0.1",
            5,
            f"http://127.0.0.1:{gw_port}",
            tmp_path,
            outbox,
            calibrate=False,
        )
    )
    app = web.Application()
    role.routes(app)
    runner, port = await serve(app)
    await outbox.start()
    await role.start()
    received: list[dict[str, Any]] = []

    async def webhook(request: web.Request) -> web.Response:
        body = await request.read()
        signer = verify_body(request.headers["Authorization"][7:], body)
        assert signer == str(node_key.pubkey())
        import json

        received.append(json.loads(body))
        return web.json_response({"ok": True})

    gateway = web.Application()
    gateway.router.add_post("/v1/webhooks/sfu", webhook)
    gw_runner: web.AppRunner | None = None
    try:
        sid = str(uuid.uuid4())
        token = mint_token(
            issuer,
            "blip",
            Grant("webrtc", room="blip"),
            60,
            session_id=sid,
            audience=str(node_key.pubkey()),
        )
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"ws://127.0.0.1:{port}/rtc?access_token={token}")
            client = RawClient(ws)
            await client.next("join")
            await client.send(rtc.SignalRequest(leave=rtc.LeaveRequest()))
            await wait_for(lambda: "blip" not in role.rooms, 10, "room_finished")
            await ws.close()
        await wait_for(lambda: outbox.failures >= 1, 10, "a failed delivery")
        assert outbox.pending() == 4 and received == []
        gw_runner, _ = await serve(gateway, gw_port)  # the gateway comes up late
        await wait_for(lambda: outbox.pending() == 0, 15, "the outbox drained")
        assert [e["event"] for e in received] == [
            "room_started",
            "participant_joined",
            "participant_left",
            "room_finished",
        ]
        left = received[2]
        assert left["participant"]["attributes"]["session_id"] == sid
        assert isinstance(left["participant"]["joinedAt"], int)
        assert isinstance(left["createdAt"], int) and left["room"]["name"] == "blip"
    finally:
        await role.stop()
        await outbox.stop()
        await runner.cleanup()
        if gw_runner is not None:
            await gw_runner.cleanup()
