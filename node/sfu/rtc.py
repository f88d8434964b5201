"""Rooms and participants: LiveKit's signal protocol on aiortc.

One ``Participant`` per signal WebSocket. It owns two peer connections, as LiveKit clients expect:
the *publisher* (the client offers; its audio and video tracks and data channels come in) and the
*subscriber* (this server offers; the other participants' tracks and the server's ``_reliable`` /
``_lossy`` data channels go out). We join with ``subscriber_primary = true``, so the subscriber is
offered right after the JoinResponse. Media is forwarded without transcoding (``forward.py``).

Everything a participant does to the room happens on the event loop; sending to a peer never
awaits that peer (signal writes are queued per participant, media goes through bounded track
queues), so one slow or dead participant cannot stall the room.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.rtcdatachannel import RTCDataChannel
from aiortc.sdp import candidate_from_sdp
from livekit.protocol import models, rtc

from common import jsonsafe
from node.protocol import BadMessage, json_object
from node.sfu.forward import (
    MAX_LAYERS,
    ForwardTrack,
    Simulcast,
    accept_simulcast,
    add_candidate,
    answer_simulcast,
    bundle_data_channels,
    install_passthrough,
    install_simulcast,
    is_keyframe,
    level_to_unit,
    negotiated_mime,
    on_bandwidth_estimate,
    on_keyframe_request,
    peer_connection,
    prefer_codec,
    read_simulcast,
    request_keyframe,
)
from node.sfu.mirror import (
    ROSTER_TOPIC,
    SPEAKERS_TOPIC,
    Mirror,
    read_roster,
    read_speakers,
    roster_packet,
    speakers_packet,
)
from node.sfu.settings import SfuSettings
from registry.tokens import Claims

log = logging.getLogger("node.sfu")

PROTOCOL_VERSION = 16
MAX_PENDING_TRACKS = 32  # add_track requests awaiting their media, per participant
SERVER_VERSION = "1.9.0-voicenet"
KEYFRAME_INTERVAL = 0.5  # seconds between two keyframe requests to one publisher's track
LAYER_IDLE = 1.0  # seconds without a frame after which a simulcast layer counts as paused
CONGESTED = 0.7  # a viewer whose estimate stays under this share of its layer's rate steps down
RETRY_UP = 10.0  # seconds a stepped-down viewer stays down before it tries its layer again
KINDS = {models.TrackType.AUDIO: "audio", models.TrackType.VIDEO: "video"}


def new_sid(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(9).replace('-', 'x').replace('_', 'y')}"


@dataclass
class PublishedTrack:
    sid: str
    cid: str
    name: str
    owner: Participant
    source: int = models.TrackSource.MICROPHONE
    muted: bool = False
    mid: str = ""
    kind: str = "audio"
    mime_type: str = "audio/opus"
    width: int = 0
    height: int = 0
    # the simulcast layers the publisher announced (quality, size), lowest first
    layers: list[models.VideoLayer] = field(default_factory=list)
    receiving: bool = False  # the media arrived and the passthrough is installed
    subscribers: dict[str, ForwardTrack] = field(default_factory=dict)  # participant sid -> track
    level_dbov: int = 127
    level_at: float = 0.0
    frames: int = 0
    receiver: Any = None  # the publisher's RTCRtpReceiver, once the media arrived
    ssrcs: set[int] = field(default_factory=set)
    rids: tuple[str, ...] = ()  # the simulcast layers received, lowest first; () for one stream
    sources: list[set[int]] = field(default_factory=list)  # each layer's media SSRC
    layer_at: list[float] = field(default_factory=list)  # each layer's last frame (monotonic)
    keyframe_requests: int = 0
    _keyframe_at: dict[int, float] = field(default_factory=dict)  # per layer
    layer_bps: list[float] = field(default_factory=list)  # each layer's rate, last second
    _layer_bytes: list[int] = field(default_factory=list)
    _picked_at: float = 0.0

    def info(self) -> models.TrackInfo:
        return models.TrackInfo(
            sid=self.sid,
            type=models.TrackType.VIDEO if self.kind == "video" else models.TrackType.AUDIO,
            name=self.name,
            muted=self.muted,
            source=self.source,
            mime_type=self.mime_type,
            mid=self.mid,
            stereo=False,
            width=self.width,
            height=self.height,
            simulcast=len(self.layers) > 1,
            layers=self.layers,
        )

    def receive(self, receiver: Any, mime_type: str, simulcast: Simulcast | None = None) -> None:
        """The publisher's media arrived on ``receiver``: forward it from now on."""
        self.receiver = receiver
        if mime_type:
            self.mime_type = mime_type
        if self.kind == "video" and simulcast is not None:
            self.rids = simulcast.rids
            self.sources = [set() for _ in self.rids]
            self.layer_at = [0.0 for _ in self.rids]
            self.layer_bps = [0.0 for _ in self.rids]
            self._layer_bytes = [0 for _ in self.rids]
            install_simulcast(receiver, self.rids, self.on_layer_frame, self.sources)
        else:
            on_level = self.on_level if self.kind == "audio" else None
            install_passthrough(receiver, self.on_frame, on_level, self.ssrcs)
        self.receiving = True

    def request_keyframe(self, layer: int | None = None) -> None:
        """Ask the publisher for a keyframe of ``layer`` (every layer when None): a subscriber
        joined, lost a frame, asked, or moves there. At most once per ``KEYFRAME_INTERVAL`` a
        layer: every subscriber's request is answered by the same one."""
        if self.kind != "video" or self.receiver is None:
            return
        now = time.monotonic()
        for n in range(len(self.rids) or 1) if layer is None else (layer,):
            if now - self._keyframe_at.get(n, -KEYFRAME_INTERVAL) < KEYFRAME_INTERVAL:
                continue
            self._keyframe_at[n] = now
            self.keyframe_requests += 1
            sources = self.sources[n] if self.rids else self.ssrcs
            self.owner.spawn(request_keyframe(self.receiver, sources))

    def keyframe_for(self, forward: ForwardTrack) -> Callable[[], None]:
        """A viewer's keyframe request: for the layer it gets (or moves to)."""
        return lambda: self.request_keyframe(
            (forward.layer if forward.layer is not None else forward.want) if self.rids else None
        )

    def on_frame(self, packet: Any) -> None:
        self.frames += 1
        if self.muted:
            return
        for track in list(self.subscribers.values()):
            track.push(packet)

    def on_layer_frame(self, packet: Any, layer: int) -> None:
        self.frames += 1
        now = time.monotonic()
        self.layer_at[layer] = now
        self._layer_bytes[layer] += packet.size
        if self.muted:
            return
        if now - self._picked_at > LAYER_IDLE:  # a layer may have paused or come back
            elapsed = now - self._picked_at if self._picked_at else LAYER_IDLE
            self.layer_bps = [8 * b / elapsed for b in self._layer_bytes]
            self._layer_bytes = [0 for _ in self._layer_bytes]
            self._picked_at = now
            for forward in list(self.subscribers.values()):
                self.pick_layer(forward)
        keyframe = is_keyframe(self.mime_type, memoryview(packet))
        for forward in list(self.subscribers.values()):
            forward.push_layer(packet, layer, keyframe)

    def quality_for(self, setting: rtc.UpdateTrackSettings) -> int:
        """The layer a viewer's ``UpdateTrackSettings`` asks for: the smallest announced layer
        at least as large as its element (``width``/``height``, adaptive stream), else its
        ``quality`` (LOW 0, MEDIUM 1, HIGH 2; OFF counts as the top, pausing is ``disabled``)."""
        top = max(len(self.rids), 1) - 1
        if setting.width > 0 or setting.height > 0:
            sizes = sorted((layer.quality, layer.width, layer.height) for layer in self.layers)
            for quality, width, height in sizes:
                if width >= setting.width and height >= setting.height:
                    return min(quality, top)
            return top
        return min(setting.quality, top)

    def pick_layer(self, forward: ForwardTrack) -> None:
        """Point ``forward`` at the best layer now arriving at or below what it asked for (the
        lowest arriving one when none is that low), and ask for that layer's keyframe until it
        is there. A publisher short of bandwidth stops its top layers; a viewer then steps down.
        A viewer whose own link is short (``step_down``) is held below its layer for a while.
        Called on a viewer's request and for every viewer once per ``LAYER_IDLE``."""
        if not self.rids:
            return
        now = time.monotonic()
        self.step_down(forward, now)
        arriving = [n for n, at in enumerate(self.layer_at) if now - at < LAYER_IDLE]
        ceiling = forward.asked if forward.cap is None else min(forward.asked, forward.cap)
        below = [n for n in arriving if n <= ceiling]
        want = max(below) if below else min(arriving, default=forward.asked)
        forward.want = want
        if want != forward.layer:
            # again at every pick until it comes: libwebrtc drops a request that follows another
            # of the same camera within 300 ms, whatever the layer
            self.request_keyframe(want)

    def step_down(self, forward: ForwardTrack, now: float) -> None:
        """The viewer's estimate of its link (RTCP REMB, fresh) under ``CONGESTED`` of what its
        layer carries, at two picks running (a second apart; uncongested, libwebrtc's estimate
        is 1.1-3 times the rate it receives): cap it one layer lower. aiortc's sender does not
        probe, so a link that recovers is not seen: after ``RETRY_UP`` the cap goes and the
        viewer tries again."""
        if forward.cap is not None and now - forward.capped_at > RETRY_UP:
            forward.cap = None
        layer = forward.layer
        if layer is None or layer == 0 or now - forward.estimate_at > 2 * LAYER_IDLE:
            forward.congested_since = None
            return
        rate = self.layer_bps[layer] if layer < len(self.layer_bps) else 0.0
        if not (rate > 0 and forward.estimate_bps < CONGESTED * rate):
            forward.congested_since = None
        elif forward.congested_since is None:
            forward.congested_since = now
        elif now - forward.congested_since >= LAYER_IDLE * 0.9:
            forward.cap, forward.capped_at, forward.congested_since = layer - 1, now, None

    def on_level(self, dbov: int) -> None:
        self.level_dbov = dbov
        self.level_at = time.monotonic()


def ice_servers(settings: SfuSettings) -> list[rtc.ICEServer]:
    """The STUN/TURN servers a client is handed (in its JoinResponse, or on resume)."""
    return [
        rtc.ICEServer(urls=i.urls, username=i.username, credential=i.credential)
        for i in settings.ice_servers
    ]


def listed(participant: Any) -> bool:
    """Whether clients are told of ``participant``: everyone but a link to another node (the
    people behind it are listed one by one, as mirrors)."""
    return not participant.remote or participant.mirror


def announced_layers(layers: Any) -> list[models.VideoLayer]:
    """The simulcast layers an ``AddTrackRequest`` announces, as the room shows them: at most
    one per quality (LOW, MEDIUM, HIGH), sizes bounded, lowest first."""
    kept: dict[int, models.VideoLayer] = {}
    for layer in list(layers)[: MAX_LAYERS * 4]:
        if 0 <= layer.quality < MAX_LAYERS and layer.quality not in kept:
            kept[layer.quality] = models.VideoLayer(
                quality=layer.quality,
                width=min(max(layer.width, 0), 16384),
                height=min(max(layer.height, 0), 16384),
                bitrate=min(max(layer.bitrate, 0), 100_000_000),
            )
    return [kept[q] for q in sorted(kept)]


class SignalError(Exception):
    """A request the client may not make; answered with a RequestResponse, the session lives on."""


class Participant:
    mirror = False  # one of a linked node's people (``mirror.Mirror``), not a connection here

    def __init__(
        self,
        room: Room,
        claims: Claims,
        ws: web.WebSocketResponse,
        settings: SfuSettings,
        name: str = "",
        remote: bool = False,
        auto_subscribe: bool = True,
    ) -> None:
        self.room = room
        self.claims = claims
        self.ws = ws
        self.settings = settings
        self.sid = new_sid("PA")
        self.identity = claims.identity
        self.name = name or claims.raw.get("name", "") if claims.raw else name
        self.session_id = claims.session_id
        self.expires_at = claims.expires_at
        self.joined_at = time.time()
        self.state = models.ParticipantInfo.State.JOINING
        grant = claims.grant
        self.can_publish = bool(grant.get("canPublish", True))
        self.can_subscribe = bool(grant.get("canSubscribe", True))
        self.can_publish_data = bool(grant.get("canPublishData", True))
        self.remote = remote  # a relay from a peer SFU node: visible, but not billed or counted
        self.auto_subscribe = auto_subscribe  # else only the tracks its UpdateSubscription names
        self.metadata = str(claims.raw.get("metadata", "")) if claims.raw else ""
        self.attributes: dict[str, str] = {}
        self.tracks: dict[str, PublishedTrack] = {}  # sid -> track
        self._pending_cids: dict[str, PublishedTrack] = {}
        self._simulcast: dict[str, Simulcast] = {}  # mid -> the layers its last offer sends
        self._unannounced: dict[str, Any] = {}  # cid -> receiver of media sent before add_track
        self.publisher = peer_connection()
        self.subscriber = peer_connection()
        self._early_candidates: dict[int, list[Any]] = {
            id(self.publisher): [],
            id(self.subscriber): [],
        }
        self._sub_channels: dict[str, RTCDataChannel] = {}
        self._sub_data_backlog: list[tuple[str, bytes]] = []
        self._negotiate_lock = asyncio.Lock()
        self._awaiting_answer = False
        self._renegotiate = False
        self._offer_id = 0
        self._subscribed_transceivers: dict[str, Any] = {}  # track sid -> transceiver
        self._announced: set[str] = set()  # track sids whose publisher heard track_subscribed
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1000)
        self._writer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.last_ping = time.monotonic()
        self.closed = asyncio.Event()
        self.signal_up = asyncio.Event()  # a signal socket is attached (clear: awaiting resume)
        self.resumes = 0
        self._grace: asyncio.Task[None] | None = None
        self.disconnect_reason = models.DisconnectReason.CLIENT_INITIATED
        self._wire_peer_connections()

    # ------------------------------------------------------------ info

    def info(self) -> models.ParticipantInfo:
        perm = models.ParticipantPermission(
            can_subscribe=self.can_subscribe,
            can_publish=self.can_publish,
            can_publish_data=self.can_publish_data,
        )
        return models.ParticipantInfo(
            sid=self.sid,
            identity=self.identity,
            name=self.name or "",
            state=self.state,
            tracks=[t.info() for t in self.tracks.values()],
            joined_at=int(self.joined_at),
            joined_at_ms=int(self.joined_at * 1000),
            version=1,
            permission=perm,
            metadata=self.metadata,
            attributes=self.attributes,
            is_publisher=bool(self.tracks),
            region=self.settings.region,
        )

    # ------------------------------------------------------------ signal out

    def send(self, response: rtc.SignalResponse) -> None:
        """Queue a signal message; never blocks (a client that stops reading gets dropped)."""
        if self.closed.is_set():
            return
        try:
            self._out.put_nowait(response.SerializeToString())
        except asyncio.QueueFull:
            log.warning(
                "participant %s is not reading its signal socket; dropping it", self.identity
            )
            self.spawn(self.close(models.DisconnectReason.STATE_MISMATCH))

    async def _write_loop(self) -> None:
        """Send the queue in order; while the socket is down (awaiting a resume) it waits."""
        while True:
            data = await self._out.get()
            if data is None:
                return
            await self.signal_up.wait()
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s <- %s",
                    self.identity,
                    rtc.SignalResponse.FromString(data).WhichOneof("message"),
                )
            try:
                await self.ws.send_bytes(data)
            except (ConnectionError, RuntimeError):
                pass  # the socket died under the message: the read side notices

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def request_response(self, request_id: int, reason: int, message: str, **kw: Any) -> None:
        self.send(
            rtc.SignalResponse(
                request_response=rtc.RequestResponse(
                    request_id=request_id, reason=reason, message=message, **kw
                )
            )
        )

    # ------------------------------------------------------------ peer connections

    def _wire_peer_connections(self) -> None:
        @self.publisher.on("track")
        def on_track(track: Any) -> None:
            receiver = next(
                (t.receiver for t in self.publisher.getTransceivers() if t.receiver.track is track),
                None,
            )
            published = self._pending_cids.get(track.id)
            if published is None:
                # A client that did not send add_track for this cid: take the oldest pending one.
                published = next(
                    (
                        p
                        for p in self._pending_cids.values()
                        if not p.receiving and p.kind == track.kind
                    ),
                    None,
                )
            if receiver is not None and published is None:
                if len(self._unannounced) < MAX_PENDING_TRACKS:
                    self._unannounced[track.id] = receiver  # add_track may still come
                return
            if receiver is None or published is None or track.kind != published.kind:
                log.info(
                    "%s sent an unannounced %s track %s; ignored",
                    self.identity,
                    track.kind,
                    track.id,
                )
                return
            self._receive(published, receiver)

        @self.publisher.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            @channel.on("message")
            def on_message(message: Any) -> None:
                if isinstance(message, str):
                    message = message.encode()
                self.room.on_data(self, channel.label, message)

        @self.publisher.on("connectionstatechange")
        async def on_pub_state() -> None:
            await self._on_media_state(self.publisher.connectionState)

        @self.subscriber.on("connectionstatechange")
        async def on_sub_state() -> None:
            await self._on_media_state(self.subscriber.connectionState)
            self._announce_subscriptions()

        for label, options in (
            ("_reliable", {"ordered": True}),
            ("_lossy", {"ordered": False, "maxRetransmits": 0}),
        ):
            channel = self.subscriber.createDataChannel(label, **options)
            self._sub_channels[label] = channel

            @channel.on("open")
            def on_open() -> None:
                self._flush_data()

        bundle_data_channels(self.subscriber)

    def _receive(self, published: PublishedTrack, receiver: Any) -> None:
        """``published``'s media arrived on ``receiver``: note its m-line and codec, forward it."""
        transceiver = next(t for t in self.publisher.getTransceivers() if t.receiver is receiver)
        published.mid = transceiver.mid or ""
        simulcast = self._simulcast.get(published.mid)
        published.receive(receiver, negotiated_mime(transceiver), simulcast)

    def send_data(self, label: str, payload: bytes) -> None:
        channel = self._sub_channels.get(label) or self._sub_channels["_reliable"]
        if channel.readyState != "open":
            if len(self._sub_data_backlog) < 256:
                self._sub_data_backlog.append((label, payload))
            return
        try:
            channel.send(payload)
        except Exception as exc:  # a closing transport
            log.debug("data to %s lost: %s", self.identity, exc)

    def _flush_data(self) -> None:
        backlog, self._sub_data_backlog = self._sub_data_backlog, []
        for label, payload in backlog:
            self.send_data(label, payload)

    async def negotiate_subscriber(self) -> None:
        """Offer on the subscriber connection; one offer in flight at a time, more coalesce."""
        if self.closed.is_set():
            return
        async with self._negotiate_lock:
            if self._awaiting_answer:
                self._renegotiate = True
                return
            self._awaiting_answer = True
            offer = await self.subscriber.createOffer()
            await self.subscriber.setLocalDescription(offer)
            self._offer_id += 1
            self.send(
                rtc.SignalResponse(
                    offer=rtc.SessionDescription(
                        type="offer", sdp=self.subscriber.localDescription.sdp, id=self._offer_id
                    )
                )
            )

    async def _on_subscriber_answer(self, sdp: str) -> None:
        async with self._negotiate_lock:
            if self.subscriber.signalingState != "have-local-offer":
                return
            await self.subscriber.setRemoteDescription(RTCSessionDescription(sdp, "answer"))
            await self._add_early_candidates(self.subscriber)
            self._awaiting_answer = False
            again, self._renegotiate = self._renegotiate, False
            self._announce_subscriptions()
        if again:
            await self.negotiate_subscriber()

    def _announce_subscriptions(self) -> None:
        """Tell each publisher that this participant now receives its track (LiveKit's
        ``track_subscribed``, the SDK's ``local_track_subscribed``: an agent greets only once
        it is heard), once per track, when the subscriber connection is up and an applied
        answer carries the track."""
        if self.subscriber.connectionState != "connected":
            return
        for sid, transceiver in list(self._subscribed_transceivers.items()):
            if sid in self._announced or transceiver.currentDirection not in (
                "sendonly",
                "sendrecv",
            ):
                continue
            track = self.room.find_track(sid)
            if track is not None:
                self._announced.add(sid)
                track.owner.send(
                    rtc.SignalResponse(track_subscribed=rtc.TrackSubscribed(track_sid=sid))
                )

    def set_permission(self, permission: models.ParticipantPermission) -> None:
        """A moderator's new permissions, live: revoking ``canPublish`` unpublishes the
        participant's tracks, revoking ``canSubscribe`` stops what it receives, granting it back
        (with auto-subscription) starts it again."""
        could_subscribe = self.can_subscribe
        self.can_publish = permission.can_publish
        self.can_subscribe = permission.can_subscribe
        self.can_publish_data = permission.can_publish_data
        if not self.can_publish:
            for track in list(self.tracks.values()):
                self.room.unpublish(self, track)
        others = [t for p in self.room.participants.values() for t in p.tracks.values()]
        if could_subscribe and not self.can_subscribe:
            if any([self.unsubscribe(t) for t in others]):
                self.spawn(self.negotiate_subscriber())
        elif self.can_subscribe and not could_subscribe and self.auto_subscribe:
            for track in others:
                self.subscribe(track)
            self.spawn(self.negotiate_subscriber())

    def subscribe(self, track: PublishedTrack) -> bool:
        """Start forwarding ``track`` to this participant (renegotiation is the caller's); False
        when it may not subscribe or already does."""
        if (
            not self.can_subscribe
            or track.sid in self._subscribed_transceivers
            or track.owner is self
        ):
            return False
        forward = ForwardTrack(
            track_id=track.sid, max_queue=self.settings.subscriber_queue, kind=track.kind
        )
        sender = self.subscriber.addTrack(forward)
        # LiveKit clients attach a subscribed track by its msid stream id: PA_<owner>|TR_<track>.
        sender._stream_id = f"{track.owner.sid}|{track.sid}"
        transceiver = next(t for t in self.subscriber.getTransceivers() if t.sender is sender)
        if track.kind == "video":
            prefer_codec(transceiver, track.mime_type)
            # a video decoder starts at a keyframe and needs a new one after a gap
            on_keyframe_request(sender, track.keyframe_for(forward))
            forward.on_gap = track.keyframe_for(forward)
            if track.rids:
                on_bandwidth_estimate(sender, forward.note_estimate)
                track.pick_layer(forward)
            else:
                track.request_keyframe()
        self._subscribed_transceivers[track.sid] = transceiver
        track.subscribers[self.sid] = forward
        return True

    def unsubscribe(self, track: PublishedTrack) -> bool:
        """Stop forwarding ``track``; aiortc 1.16 has no removeTrack: the m-line goes inactive."""
        forward = track.subscribers.pop(self.sid, None)
        if forward is not None:
            forward.stop()
        transceiver = self._subscribed_transceivers.pop(track.sid, None)
        self._announced.discard(track.sid)
        if transceiver is None:
            return False
        transceiver.sender.replaceTrack(None)
        transceiver.direction = "inactive"
        return True

    async def _on_media_state(self, state: str) -> None:
        """A failed peer connection ends the participant. So does one the client closed (its DTLS
        close_notify): a client closes its peer connections only when it leaves, so it is gone
        even when its ``leave`` was lost with its socket, and is not held for a resume."""
        if state == "failed":
            await self.close(models.DisconnectReason.MEDIA_FAILURE)
        elif state == "closed" and not self.closed.is_set():
            log.info("%s closed its peer connection; it leaves %s", self.identity, self.room.name)
            await self.close(models.DisconnectReason.CLIENT_INITIATED, send_leave=False)

    # ------------------------------------------------------------ signal in

    async def handle(self, request: rtc.SignalRequest) -> None:
        kind = request.WhichOneof("message")
        log.debug("%s -> %s", self.identity, kind)
        if kind == "offer":
            await self._on_publisher_offer(request.offer)
        elif kind == "answer":
            await self._on_subscriber_answer(request.answer.sdp)
        elif kind == "trickle":
            await self._on_trickle(request.trickle)
        elif kind == "add_track":
            self._on_add_track(request.add_track)
        elif kind == "mute":
            self.room.set_muted(self, request.mute.sid, request.mute.muted)
        elif kind == "subscription":
            self._on_subscription(request.subscription)
        elif kind == "track_setting":
            self._on_track_setting(request.track_setting)
        elif kind == "ping_req":
            self.last_ping = time.monotonic()
            now_ms = int(time.time() * 1000)
            self.send(
                rtc.SignalResponse(
                    pong_resp=rtc.Pong(
                        last_ping_timestamp=request.ping_req.timestamp, timestamp=now_ms
                    )
                )
            )
        elif kind == "ping":
            self.last_ping = time.monotonic()
            self.send(rtc.SignalResponse(pong=request.ping))
        elif kind == "leave":
            await self.close(models.DisconnectReason.CLIENT_INITIATED, send_leave=False)
        elif kind in (
            "update_layers",
            "subscription_permission",
            "sync_state",
            "simulate",
            "update_metadata",
            "update_audio_track",
            "update_video_track",
        ):
            log.debug("%s: %s accepted and ignored", self.identity, kind)
        else:
            raise SignalError(f"unsupported request {kind!r}")

    async def _on_publisher_offer(self, offer: rtc.SessionDescription) -> None:
        # read first: a new track's receiver is set up inside setRemoteDescription
        self._simulcast = read_simulcast(offer.sdp)
        await self.publisher.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
        accept_simulcast(self.publisher, self._simulcast)
        await self._add_early_candidates(self.publisher)
        answer = await self.publisher.createAnswer()
        await self.publisher.setLocalDescription(answer)
        sdp = answer_simulcast(self.publisher.localDescription.sdp, self._simulcast)
        self.send(
            rtc.SignalResponse(answer=rtc.SessionDescription(type="answer", sdp=sdp, id=offer.id))
        )
        for published in list(self._pending_cids.values()):
            if published.receiving:
                self._pending_cids.pop(published.cid, None)
                self.room.publish(self, published)
        # a client unpublishes by renegotiating its track's m-line to inactive: take it out of
        # the room, or viewers keep a frozen tile (or a silent track) for the rest of the call
        receiving = {
            t.mid
            for t in self.publisher.getTransceivers()
            if t.currentDirection in ("recvonly", "sendrecv")
        }
        for track in list(self.tracks.values()):
            if track.mid and track.mid not in receiving:
                self.room.unpublish(self, track)

    async def _on_trickle(self, trickle: rtc.TrickleRequest) -> None:
        pc = self.publisher if trickle.target == rtc.SignalTarget.PUBLISHER else self.subscriber
        try:
            init = json_object(trickle.candidateInit, "trickle candidateInit")
        except BadMessage as exc:
            raise SignalError(str(exc)) from None
        text = init.get("candidate") or ""
        if not text:
            return  # end of candidates
        if text.startswith("candidate:"):
            text = text[len("candidate:") :]
        try:
            candidate = candidate_from_sdp(text)
        except (ValueError, IndexError):
            raise SignalError("trickle candidate does not parse") from None
        candidate.sdpMid = init.get("sdpMid")
        candidate.sdpMLineIndex = init.get("sdpMLineIndex")
        if pc.remoteDescription is None:
            # Candidates often overtake their offer/answer: keep them for it. Never wait here:
            # the read loop must go on to the very offer/answer (and pings) behind them.
            if len(self._early_candidates[id(pc)]) < 64:
                self._early_candidates[id(pc)].append(candidate)
            return
        await add_candidate(pc, candidate)

    async def _add_early_candidates(self, pc: RTCPeerConnection) -> None:
        early, self._early_candidates[id(pc)] = self._early_candidates[id(pc)], []
        for candidate in early:
            await add_candidate(pc, candidate)

    def _on_add_track(self, req: rtc.AddTrackRequest) -> None:
        if not self.can_publish:
            self.request_response(
                0,
                rtc.RequestResponse.Reason.NOT_ALLOWED,
                "this token does not allow publishing (canPublish is false)",
                add_track=req,
            )
            log.info("refused add_track from %s: no canPublish", self.identity)
            return
        if req.type not in KINDS:
            self.request_response(
                0,
                rtc.RequestResponse.Reason.UNSUPPORTED_TYPE,
                f"this SFU forwards audio, video and data; not track type {req.type}",
                add_track=req,
            )
            return
        if req.cid in self._pending_cids:
            published = self._pending_cids[req.cid]
        elif len(self._pending_cids) >= MAX_PENDING_TRACKS:
            # each pending request holds server memory until its media arrives: bound them
            log.info(
                "refused add_track from %s: %d requests already await their media",
                self.identity,
                len(self._pending_cids),
            )
            self.request_response(
                0,
                rtc.RequestResponse.Reason.LIMIT_EXCEEDED,
                f"at most {MAX_PENDING_TRACKS} add_track requests may await "
                "their media; send the offer with the tracks first",
                add_track=req,
            )
            return
        else:
            kind = KINDS[req.type]
            default_source = (
                models.TrackSource.CAMERA if kind == "video" else models.TrackSource.MICROPHONE
            )
            published = PublishedTrack(
                sid=new_sid("TR"),
                cid=req.cid,
                name=req.name,
                owner=self,
                source=req.source or default_source,
                muted=req.muted,
                kind=kind,
                mime_type="video/vp8" if kind == "video" else "audio/opus",
                width=min(max(req.width, 0), 16384),
                height=min(max(req.height, 0), 16384),
                layers=announced_layers(req.layers) if kind == "video" else [],
            )
            self._pending_cids[req.cid] = published
        self.send(
            rtc.SignalResponse(
                track_published=rtc.TrackPublishedResponse(cid=req.cid, track=published.info())
            )
        )
        receiver = self._unannounced.pop(req.cid, None)
        if receiver is not None and not published.receiving:  # the media came first
            if receiver.track.kind != published.kind:
                log.info(
                    "%s announced %s but sent %s",
                    self.identity,
                    published.kind,
                    receiver.track.kind,
                )
                return
            self._receive(published, receiver)
            self._pending_cids.pop(req.cid, None)
            self.room.publish(self, published)

    def _on_subscription(self, sub: rtc.UpdateSubscription) -> None:
        """Pause or resume a subscribed track (its m-line stays: resuming costs no offer), or
        start forwarding one this participant did not get by auto-subscription."""
        sids = list(sub.track_sids) + [s for pt in sub.participant_tracks for s in pt.track_sids]
        added = False
        for sid in sids[: MAX_PENDING_TRACKS * 8]:
            track = self.room.find_track(sid)
            if track is None:
                continue
            forward = track.subscribers.get(self.sid)
            if forward is not None:
                forward.paused = not sub.subscribe
            elif sub.subscribe and track.owner is not self:
                added = self.subscribe(track) or added
        if added:
            self.spawn(self.negotiate_subscriber())

    def _on_track_setting(self, setting: rtc.UpdateTrackSettings) -> None:
        """``disabled``: the client shows the track nowhere (adaptive stream: its element is
        hidden), so nothing is forwarded; enabled again, the video resumes from a keyframe.
        ``quality`` or ``width``/``height`` pick a simulcast track's layer."""
        for sid in list(setting.track_sids)[: MAX_PENDING_TRACKS * 8]:
            track = self.room.find_track(sid)
            forward = track.subscribers.get(self.sid) if track is not None else None
            if forward is None:
                continue
            resumed = forward.paused and not setting.disabled
            forward.paused = setting.disabled
            if track.rids and not setting.disabled:
                forward.asked = track.quality_for(setting)
                track.pick_layer(forward)
            if resumed:
                track.keyframe_for(forward)()

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve the signal socket until the client leaves, is removed or its token expires; a
        socket that drops leaves the participant in the room for ``resume_grace`` seconds, for
        the client's resume (``resume``) to pick up."""
        self._writer = asyncio.ensure_future(self._write_loop())
        self.spawn(self._watchdog())
        await self._serve(self.ws)

    async def resume(self, ws: web.WebSocketResponse) -> None:
        """The client's reconnect (``reconnect=1&sid=…``): the same participant, tracks,
        subscriptions and peer connections, on a new signal socket. The client hears
        ``ReconnectResponse`` first, then what was queued while it was away, the room as it is
        now, and the subscriber offer it may have missed."""
        if self.closed.is_set():  # it left between the lookup and now: start over
            await ws.close()
            return
        old, self.ws = self.ws, ws
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if not old.closed:
            await old.close()  # a client that reconnects gave up on it
        self.resumes += 1
        self.last_ping = time.monotonic()
        log.info("%s resumed in %s (resume %d)", self.identity, self.room.name, self.resumes)
        s = self.settings
        reconnect = rtc.ReconnectResponse(ice_servers=ice_servers(s))
        await ws.send_bytes(rtc.SignalResponse(reconnect=reconnect).SerializeToString())
        self.signal_up.set()
        others = [p.info() for p in self.room.participants.values() if p is not self]
        self.send(rtc.SignalResponse(update=rtc.ParticipantUpdate(participants=others)))
        if self._awaiting_answer and self.subscriber.localDescription is not None:
            self.send(
                rtc.SignalResponse(
                    offer=rtc.SessionDescription(
                        type="offer", sdp=self.subscriber.localDescription.sdp, id=self._offer_id
                    )
                )
            )
        await self._serve(ws)

    async def _serve(self, ws: web.WebSocketResponse) -> None:
        self.signal_up.set()
        left = False
        try:
            async for msg in ws:
                if msg.type == web.WSMsgType.BINARY:
                    await self._dispatch(msg.data)
                elif msg.type == web.WSMsgType.TEXT:
                    await self._dispatch_text(msg.data)
                elif msg.type in (web.WSMsgType.ERROR, web.WSMsgType.CLOSE):
                    break
                if self.closed.is_set():
                    break
            left = True
        finally:
            if ws is not self.ws or self.closed.is_set():
                pass  # a newer socket took over, or the participant is gone already
            elif left and self.settings.resume_grace > 0 and not self.remote:
                self.signal_up.clear()
                self._grace = self.spawn(self._await_resume())
            else:  # cancelled (the node stops), or resuming is off
                await self.close(models.DisconnectReason.SIGNAL_CLOSE, send_leave=False)

    async def _await_resume(self) -> None:
        grace = self.settings.resume_grace
        log.info(
            "%s lost its signal socket in %s; %ss to resume", self.identity, self.room.name, grace
        )
        await asyncio.sleep(grace)
        if not self.signal_up.is_set():
            log.info(
                "%s did not resume within %ss; it leaves %s", self.identity, grace, self.room.name
            )
            await self.close(models.DisconnectReason.SIGNAL_CLOSE, send_leave=False)

    async def _dispatch(self, data: bytes) -> None:
        request = rtc.SignalRequest()
        try:
            request.ParseFromString(data)
        except Exception:
            log.info("malformed signal frame from %s (%d bytes)", self.identity, len(data))
            self.request_response(
                0, rtc.RequestResponse.Reason.INVALID_REQUEST, "malformed SignalRequest protobuf"
            )
            return
        await self._handle_safely(request)

    async def _dispatch_text(self, text: str) -> None:
        from google.protobuf import json_format

        request = rtc.SignalRequest()
        try:
            json_format.ParseDict(jsonsafe.loads(text), request)
        except Exception:
            self.request_response(
                0, rtc.RequestResponse.Reason.INVALID_REQUEST, "malformed SignalRequest JSON"
            )
            return
        await self._handle_safely(request)

    async def _handle_safely(self, request: rtc.SignalRequest) -> None:
        try:
            await self.handle(request)
        except SignalError as exc:
            self.request_response(0, rtc.RequestResponse.Reason.INVALID_REQUEST, str(exc))
        except Exception as exc:  # a bad SDP must not take the node down
            log.exception("signal request from %s failed", self.identity)
            self.request_response(
                0, rtc.RequestResponse.Reason.UNCLASSIFIED_ERROR, f"{type(exc).__name__}: {exc}"
            )

    async def _watchdog(self) -> None:
        """Token expiry and ping timeout; a refreshed token moves ``expires_at``."""
        while not self.closed.is_set():
            await asyncio.sleep(0.5)
            if time.time() >= self.expires_at:
                log.info("token of %s in %s expired; disconnecting", self.identity, self.room.name)
                await self.close(models.DisconnectReason.PARTICIPANT_REMOVED)
                return
            if not self.signal_up.is_set():
                self.last_ping = time.monotonic()  # the resume grace is the bound meanwhile
            elif time.monotonic() - self.last_ping > self.settings.ping_timeout:
                log.info(
                    "%s missed pings for %ss; disconnecting",
                    self.identity,
                    self.settings.ping_timeout,
                )
                await self.close(models.DisconnectReason.CONNECTION_TIMEOUT)
                return

    async def close(
        self, reason: int = models.DisconnectReason.CLIENT_INITIATED, send_leave: bool = True
    ) -> None:
        if self.closed.is_set():
            return
        self.disconnect_reason = reason
        if send_leave and not self.ws.closed:
            try:
                await self.ws.send_bytes(
                    rtc.SignalResponse(
                        leave=rtc.LeaveRequest(
                            can_reconnect=False,
                            reason=reason,
                            action=rtc.LeaveRequest.Action.DISCONNECT,
                        )
                    ).SerializeToString()
                )
            except (ConnectionError, RuntimeError):
                pass
        self.closed.set()
        self.state = models.ParticipantInfo.State.DISCONNECTED
        self.room.leave(self)
        self._out.put_nowait(None) if not self._out.full() else None
        self.signal_up.set()  # a writer waiting for a resume drains and stops
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await self.publisher.close()
        await self.subscriber.close()
        if not self.ws.closed:
            await self.ws.close()


# (event, LiveKit webhook body, issuer of the token it is about): where the node's webhooks start
OnEvent = Callable[[str, dict[str, Any], str | None], None]


class Room:
    def __init__(self, name: str, settings: SfuSettings, on_event: OnEvent) -> None:
        self.name = name
        self.sid = new_sid("RM")
        self.settings = settings
        self.created_at = time.time()
        self.participants: dict[str, Participant] = {}  # sid -> participant
        self._on_event = on_event
        self._speakers: dict[str, float] = {}  # participant sid -> level last sent
        self._speaker_task: asyncio.Task[None] | None = None
        self._empty_since: float | None = time.monotonic()
        self.finished = False
        self.data_packets = 0
        self.issuer: str | None = None  # of the first participant's token
        self.mirrors: dict[str, dict[str, Mirror]] = {}  # link sid -> identity -> mirror
        self._roster_sent = b""
        self._speakers_sent = False  # the last speakers packet named someone

    def info(self) -> models.Room:
        return models.Room(
            sid=self.sid,
            name=self.name,
            creation_time=int(self.created_at),
            creation_time_ms=int(self.created_at * 1000),
            empty_timeout=int(self.settings.empty_timeout),
            max_participants=self.settings.max_participants,
            num_participants=len(self.visible()),
            num_publishers=sum(1 for p in self.visible() if p.tracks),
            enabled_codecs=[
                models.Codec(mime="audio/opus"),
                models.Codec(mime="video/VP8"),
                models.Codec(mime="video/H264"),
            ],
        )

    def visible(self) -> list[Participant]:
        return [p for p in self.participants.values() if not p.remote]

    def by_identity(self, identity: str) -> Participant | None:
        return next((p for p in self.participants.values() if p.identity == identity), None)

    def find_track(self, sid: str) -> PublishedTrack | None:
        for p in self.participants.values():
            if sid in p.tracks:
                return p.tracks[sid]
        return None

    # ------------------------------------------------------------ membership

    async def join(self, participant: Participant) -> None:
        old = self.by_identity(participant.identity)
        if old is not None:
            await old.close(models.DisconnectReason.DUPLICATE_IDENTITY)
        first = not self.participants
        self.participants[participant.sid] = participant
        if not participant.remote:
            self._empty_since = None
        participant.state = models.ParticipantInfo.State.JOINED
        others = [
            p.info() for p in self.participants.values() if p is not participant and listed(p)
        ]
        s = self.settings
        join = rtc.JoinResponse(
            room=self.info(),
            participant=participant.info(),
            other_participants=others,
            server_version=SERVER_VERSION,
            subscriber_primary=True,
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_timeout,
            ice_servers=ice_servers(s),
            server_info=models.ServerInfo(
                version=SERVER_VERSION, protocol=PROTOCOL_VERSION, region=s.region
            ),
        )
        participant.send(rtc.SignalResponse(join=join))
        if first:
            self._event("room_started")
        if not participant.remote:
            self._event("participant_joined", participant)
        for other in self.participants.values():
            for track in other.tracks.values():
                if participant.auto_subscribe and not (participant.remote and track.owner.remote):
                    participant.subscribe(track)
        await participant.negotiate_subscriber()
        self.broadcast_update([participant], exclude=participant)
        self.send_roster(force=participant.remote)  # a new link hears who is here
        if self._speaker_task is None:
            self._speaker_task = asyncio.ensure_future(self._speaker_loop())

    def leave(self, participant: Participant) -> None:
        if self.participants.pop(participant.sid, None) is None:
            return
        for mirror in list(self.mirrors.pop(participant.sid, {}).values()):
            mirror.state = models.ParticipantInfo.State.DISCONNECTED
            self.leave(mirror)  # type: ignore[arg-type]
        if participant.mirror:
            self.mirrors.get(participant.link.sid, {}).pop(participant.identity, None)
        for track in participant.tracks.values():
            sent = {sid: (f.forwarded, f.dropped) for sid, f in track.subscribers.items()}
            log.info(  # what a "they never heard me" report needs first
                "%s left %s: track %s received %d frames; (forwarded, dropped) per subscriber %s",
                participant.identity,
                self.name,
                track.sid,
                track.frames,
                sent,
            )
            self._drop(track)
        for other in self.participants.values():
            for track in other.tracks.values():
                forward = track.subscribers.pop(participant.sid, None)
                if forward is not None:
                    log.info(
                        "%s left %s: got %d frames of %s's track %s (%d dropped)",
                        participant.identity,
                        self.name,
                        forward.forwarded,
                        other.identity,
                        track.sid,
                        forward.dropped,
                    )
        self.broadcast_update([participant])
        if not participant.remote:
            self._event("participant_left", participant)
            self.send_roster()
        if not self.visible() and self._empty_since is None:
            self._empty_since = time.monotonic()

    def _drop(self, track: PublishedTrack) -> None:
        """Stop forwarding ``track`` to anyone (its publisher left or may no longer publish)."""
        for sub in list(self.participants.values()):
            if sub.unsubscribe(track):
                sub.spawn(sub.negotiate_subscriber())
        for forward in track.subscribers.values():
            forward.stop()
        track.subscribers.clear()

    def unpublish(self, owner: Participant, track: PublishedTrack) -> None:
        """Take ``track`` out of the room (a moderator revoked its owner's ``canPublish``)."""
        if owner.tracks.pop(track.sid, None) is None:
            return
        self._drop(track)
        self.broadcast_update([owner])
        if not owner.remote:
            self._event("track_unpublished", owner, track)

    def publish(self, owner: Participant, track: PublishedTrack) -> None:
        if owner in self.links() and "/" in track.name:
            # a track the link carries for one of the far side's people: theirs, not the link's
            identity, _, track.name = track.name.partition("/")
            owner = track.owner = self.mirror_for(owner, identity)  # type: ignore[assignment]
        owner.tracks[track.sid] = track
        for sub in self.participants.values():
            if (
                sub is not owner
                and sub.auto_subscribe
                and not sub.closed.is_set()
                and not (sub.remote and owner.remote)
            ):
                sub.subscribe(track)
                sub.spawn(sub.negotiate_subscriber())
        self.broadcast_update([owner], exclude=owner)
        owner.send(rtc.SignalResponse(update=rtc.ParticipantUpdate(participants=[owner.info()])))
        if not owner.remote:
            self._event("track_published", owner, track)

    def set_muted(self, owner: Participant, track_sid: str, muted: bool) -> None:
        track = owner.tracks.get(track_sid)
        if track is None:
            return
        track.muted = muted
        if not muted:
            track.request_keyframe()  # viewers resume mid-stream: they decode from a keyframe
        self.broadcast_update([owner])

    def broadcast_update(
        self, changed: list[Participant], exclude: Participant | None = None
    ) -> None:
        infos = [p.info() for p in changed if listed(p)]
        if any(not p.remote for p in changed):
            self.send_roster()
        if not infos:
            return
        message = rtc.SignalResponse(update=rtc.ParticipantUpdate(participants=infos))
        for p in list(self.participants.values()):
            if p is not exclude:
                p.send(message)

    # ------------------------------------------------------------ the far side of a link

    def links(self) -> list[Participant]:
        """The participants that are links to other nodes (not the people behind them)."""
        return [p for p in self.participants.values() if p.remote and not p.mirror]

    def send_roster(self, force: bool = False) -> None:
        """Tell every link who is here (the local participants), when that changed."""
        links = self.links()
        if not links:
            return  # a room on one node (the usual case) builds no roster
        packet = roster_packet([p for p in self.participants.values() if not p.remote])
        if packet == self._roster_sent and not force:
            return
        self._roster_sent = packet
        for link in links:
            link.send_data("_reliable", packet)

    def mirror_for(self, link: Participant, identity: str) -> Mirror:
        """The far side's participant ``identity`` behind ``link``, shown here as itself."""
        mine = self.mirrors.setdefault(link.sid, {})
        mirror = mine.get(identity)
        if mirror is None:
            mirror = mine[identity] = Mirror(self, link, new_sid("PA"), identity)
            self.participants[mirror.sid] = mirror  # type: ignore[assignment]
            self.broadcast_update([mirror])  # type: ignore[list-item]
        return mirror

    def apply_roster(self, link: Participant, payload: bytes) -> None:
        """The far side's people, as ``link``'s node announced them: new ones join here, changed
        ones are updated, missing ones leave. An identity that is also here locally stays the
        local participant's."""
        try:
            entries = read_roster(payload)
        except ValueError as exc:
            log.info("ignored a malformed roster from link %s: %s", link.identity, exc)
            return
        local = {p.identity for p in self.participants.values() if not p.remote}
        mine = self.mirrors.setdefault(link.sid, {})
        seen: set[str] = set()
        changed: list[Any] = []
        for entry in entries:
            identity = entry["identity"]
            if identity in local or identity in seen:
                continue
            seen.add(identity)
            mirror = self.mirror_for(link, identity)
            if mirror.update(entry):
                changed.append(mirror)
        for identity in [i for i in mine if i not in seen]:
            gone = mine.pop(identity)
            gone.state = models.ParticipantInfo.State.DISCONNECTED
            self.leave(gone)  # type: ignore[arg-type]
        if changed:
            self.broadcast_update(changed)

    def apply_speakers(self, link: Participant, payload: bytes) -> None:
        """Who speaks on the far side: their mirrors' audio tracks take the level, so this
        room's speaker check counts them as it counts its own."""
        try:
            levels = read_speakers(payload)
        except ValueError as exc:
            log.info("ignored malformed speakers from link %s: %s", link.identity, exc)
            return
        now = time.monotonic()
        for identity, dbov in levels.items():
            mirror = self.mirrors.get(link.sid, {}).get(identity)
            for track in mirror.tracks.values() if mirror is not None else ():
                if track.kind == "audio":
                    track.level_dbov, track.level_at = dbov, now

    def _tell_links_who_speaks(self, levels: dict[str, int]) -> None:
        if not levels and not self._speakers_sent:
            return
        self._speakers_sent = bool(levels)
        packet = speakers_packet(levels)
        for link in self.links():
            link.send_data("_lossy", packet)

    # ------------------------------------------------------------ data

    def on_data(self, sender: Participant, label: str, payload: bytes) -> None:
        if not sender.can_publish_data:
            log.info("dropped data from %s: no canPublishData", sender.identity)
            return
        packet = models.DataPacket()
        try:
            packet.ParseFromString(payload)
        except Exception:
            log.info("malformed data packet from %s", sender.identity)
            return
        if packet.WhichOneof("value") is None:
            return
        if sender.remote:  # relayed from a peer node, which already stamped the sender
            if packet.HasField("user") and packet.user.topic == ROSTER_TOPIC:
                self.apply_roster(sender, packet.user.payload)
                return
            if packet.HasField("user") and packet.user.topic == SPEAKERS_TOPIC:
                self.apply_speakers(sender, packet.user.payload)
                return
            self.send_data(packet, label, set(packet.destination_identities), exclude=sender)
            return
        # The SFU, not the client, says who sent it.
        packet.participant_identity = sender.identity
        packet.participant_sid = sender.sid
        destinations = set(packet.destination_identities)
        if packet.HasField("user"):
            packet.user.participant_identity = sender.identity
            packet.user.participant_sid = sender.sid
            destinations |= set(packet.user.destination_identities)
        self.send_data(packet, label, destinations, exclude=sender)

    def send_data(
        self,
        packet: models.DataPacket,
        label: str,
        destinations: set[str],
        exclude: Participant | None = None,
    ) -> int:
        self.data_packets += 1
        out = packet.SerializeToString()
        delivered = 0
        for p in list(self.participants.values()):
            if p is exclude or (destinations and p.identity not in destinations and not p.remote):
                continue
            if not p.can_subscribe and not p.remote:
                continue
            p.send_data(label if label in ("_reliable", "_lossy") else "_reliable", out)
            delivered += 1
        return delivered

    # ------------------------------------------------------------ speakers

    async def _speaker_loop(self) -> None:
        threshold = self.settings.speaker_threshold_dbov
        while not self.finished:
            await asyncio.sleep(self.settings.speaker_interval)
            now = time.monotonic()
            active: dict[str, float] = {}
            local: dict[str, int] = {}  # what the links hear: who speaks here, by identity
            for p in self.participants.values():
                levels = [
                    t.level_dbov
                    for t in p.tracks.values()
                    if not t.muted and now - t.level_at < 0.6 and t.level_dbov <= threshold
                ]
                if levels:
                    active[p.sid] = level_to_unit(min(levels))
                    if not p.remote:
                        local[p.identity] = min(levels)
            self._tell_links_who_speaks(local)
            if set(active) == set(self._speakers):
                self._speakers = active
                continue
            infos = [
                models.SpeakerInfo(sid=sid, level=level, active=True)
                for sid, level in sorted(active.items(), key=lambda kv: -kv[1])
            ]
            infos += [
                models.SpeakerInfo(sid=sid, level=0.0, active=False)
                for sid in self._speakers
                if sid not in active
            ]
            self._speakers = active
            message = rtc.SignalResponse(speakers_changed=rtc.SpeakersChanged(speakers=infos))
            for p in list(self.participants.values()):
                p.send(message)

    def speakers(self) -> dict[str, float]:
        return dict(self._speakers)

    # ------------------------------------------------------------ webhooks

    def _event(
        self,
        event: str,
        participant: Participant | None = None,
        track: PublishedTrack | None = None,
    ) -> None:
        body: dict[str, Any] = {
            "event": event,
            "room": {"sid": self.sid, "name": self.name, "creationTime": int(self.created_at)},
        }
        if participant is not None:
            body["participant"] = {
                "sid": participant.sid,
                "identity": participant.identity,
                "joinedAt": int(participant.joined_at),
                "state": models.ParticipantInfo.State.Name(participant.state),
                "attributes": {"session_id": participant.session_id},
            }
        if track is not None:
            body["track"] = {
                "sid": track.sid,
                "type": track.kind.upper(),
                "name": track.name,
                "mimeType": track.mime_type,
            }
        # to the gateway that issued the participant's token; a room's own events to the one that
        # issued its first participant's
        if participant is not None and self.issuer is None:
            self.issuer = participant.claims.issuer
        self._on_event(event, body, participant.claims.issuer if participant else self.issuer)

    def empty_for(self) -> float | None:
        if self.visible() or self._empty_since is None:
            return None
        return time.monotonic() - self._empty_since

    async def finish(self) -> None:
        self.finished = True
        for p in list(self.participants.values()):
            await p.close(models.DisconnectReason.ROOM_DELETED)
        if self._speaker_task is not None:
            self._speaker_task.cancel()
        self._event("room_finished")
