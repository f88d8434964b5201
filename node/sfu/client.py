"""A minimal LiveKit signal client on aiortc, for what a node itself must join: the room relay to a
peer SFU node (relay.py) and the forwarding benchmark (bench/sfu.py).

It speaks the same protocol as the official SDKs (``/rtc``, protobuf SignalRequest/Response, the
server-offered subscriber connection, ``add_track`` then a publisher offer), publishes
``ForwardTrack`` s (already-encoded Opus, no transcoding) and receives through the passthrough, so
a relayed stream is never decoded on either node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiortc import RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from livekit.protocol import models, rtc

from node.sfu.forward import (
    bundle_data_channels,
    on_keyframe_request,
    peer_connection,
    prefer_codec,
)

log = logging.getLogger("node.sfu.client")

TrackHandler = Callable[[str, str, Any], None]  # (track sid, participant sid, RTCRtpReceiver)
DataHandler = Callable[[str, bytes], None]  # (channel label, DataPacket bytes)


class SignalClosed(Exception):
    pass


class LiveKitClient:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        on_track: TrackHandler | None = None,
        on_data: DataHandler | None = None,
        query: dict[str, str] | None = None,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        base = url.rstrip("/")
        if base.startswith("http"):
            base = "ws" + base[4:]
        params = {"auto_subscribe": "1", "protocol": "16", **(query or {})}
        self.url = f"{base}/rtc?{urlencode(params)}"
        self.token = token
        self.on_track = on_track
        self.on_data = on_data
        self._http = http
        self._own_http = http is None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.join: rtc.JoinResponse | None = None
        self.publisher = peer_connection()
        self.subscriber = peer_connection()
        self.channels = {
            "_reliable": self.publisher.createDataChannel("_reliable", ordered=True),
            "_lossy": self.publisher.createDataChannel("_lossy", ordered=False, maxRetransmits=0),
        }
        bundle_data_channels(self.publisher)
        self.participants: dict[str, models.ParticipantInfo] = {}
        self._published: dict[str, asyncio.Future[models.TrackInfo]] = {}
        self._answer: asyncio.Future[str] | None = None
        self._publish_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self._offer_id = 0

        @self.subscriber.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            receiver = next(
                t.receiver for t in self.subscriber.getTransceivers() if t.receiver.track is track
            )
            owner = next(
                (
                    p.sid
                    for p in self.participants.values()
                    if any(t.sid == track.id for t in p.tracks)
                ),
                "",
            )
            if self.on_track is not None:
                self.on_track(track.id, owner, receiver)

        @self.subscriber.on("datachannel")
        def on_channel(channel: Any) -> None:
            @channel.on("message")
            def on_message(message: Any) -> None:
                if self.on_data is not None:
                    self.on_data(
                        channel.label, message if isinstance(message, bytes) else message.encode()
                    )

    async def connect(self, timeout: float = 15.0) -> rtc.JoinResponse:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        self.ws = await self._http.ws_connect(
            self.url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=aiohttp.ClientWSTimeout(ws_close=5),
        )
        first = await asyncio.wait_for(self.ws.receive(), timeout)
        if first.type != aiohttp.WSMsgType.BINARY:
            raise SignalClosed(f"no JoinResponse: {first.type}")
        response = rtc.SignalResponse.FromString(first.data)
        if response.WhichOneof("message") != "join":
            raise SignalClosed(f"expected join, got {response.WhichOneof('message')}")
        self.join = response.join
        for p in self.join.other_participants:
            self.participants[p.sid] = p
        self._reader = asyncio.ensure_future(self._read())
        self._pinger = asyncio.ensure_future(self._ping(max(1, self.join.ping_interval)))
        return self.join

    async def send(self, request: rtc.SignalRequest) -> None:
        if self.ws is None or self.ws.closed:
            raise SignalClosed("signal socket closed")
        await self.ws.send_bytes(request.SerializeToString())

    async def _ping(self, interval: int) -> None:
        import time

        while not self.closed.is_set():
            await asyncio.sleep(interval)
            try:
                ping = rtc.Ping(timestamp=int(time.time() * 1000))
                await self.send(rtc.SignalRequest(ping_req=ping))
            except SignalClosed:
                return

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                response = rtc.SignalResponse.FromString(msg.data)
                kind = response.WhichOneof("message")
                if kind == "offer":
                    await self._on_offer(response.offer)
                elif kind == "answer" and self._answer is not None and not self._answer.done():
                    self._answer.set_result(response.answer.sdp)
                elif kind == "track_published":
                    future = self._published.get(response.track_published.cid)
                    if future is not None and not future.done():
                        future.set_result(response.track_published.track)
                elif kind == "request_response":
                    rr = response.request_response
                    if rr.HasField("add_track"):
                        future = self._published.get(rr.add_track.cid)
                        if future is not None and not future.done():
                            future.set_exception(PermissionError(rr.message))
                elif kind == "update":
                    for p in response.update.participants:
                        if p.state == models.ParticipantInfo.State.DISCONNECTED:
                            self.participants.pop(p.sid, None)
                        else:
                            self.participants[p.sid] = p
                elif kind == "leave":
                    break
        except Exception:
            log.exception("signal client for %s failed", self.url.split("?")[0])
        finally:
            self.closed.set()

    async def _on_offer(self, offer: rtc.SessionDescription) -> None:
        await self.subscriber.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
        await self.subscriber.setLocalDescription(await self.subscriber.createAnswer())
        await self.send(
            rtc.SignalRequest(
                answer=rtc.SessionDescription(
                    type="answer", sdp=self.subscriber.localDescription.sdp, id=offer.id
                )
            )
        )

    async def publish(
        self,
        track: MediaStreamTrack,
        name: str = "audio",
        timeout: float = 10.0,
        *,
        mime: str = "",
        on_keyframe: Callable[[], None] | None = None,
    ) -> models.TrackInfo:
        """``add_track`` -> ``track_published``, then (re)negotiate the publisher connection.
        A video track of encoded frames offers only its ``mime`` codec and hands the SFU's
        keyframe requests to ``on_keyframe`` (there is no encoder to make one)."""
        async with self._publish_lock:
            cid, video = track.id, track.kind == "video"
            future = self._published[cid] = asyncio.get_running_loop().create_future()
            await self.send(
                rtc.SignalRequest(
                    add_track=rtc.AddTrackRequest(
                        cid=cid,
                        name=name,
                        type=models.TrackType.VIDEO if video else models.TrackType.AUDIO,
                        source=(
                            models.TrackSource.CAMERA if video else models.TrackSource.MICROPHONE
                        ),
                    )
                )
            )
            info = await asyncio.wait_for(future, timeout)
            sender = self.publisher.addTrack(track)
            if video:
                transceiver = next(
                    t for t in self.publisher.getTransceivers() if t.sender is sender
                )
                if mime:
                    prefer_codec(transceiver, mime)
                if on_keyframe is not None:
                    on_keyframe_request(sender, on_keyframe)
            await self._negotiate_publisher(timeout)
            return info

    async def _negotiate_publisher(self, timeout: float) -> None:
        self._answer = asyncio.get_running_loop().create_future()
        await self.publisher.setLocalDescription(await self.publisher.createOffer())
        self._offer_id += 1
        await self.send(
            rtc.SignalRequest(
                offer=rtc.SessionDescription(
                    type="offer", sdp=self.publisher.localDescription.sdp, id=self._offer_id
                )
            )
        )
        sdp = await asyncio.wait_for(self._answer, timeout)
        await self.publisher.setRemoteDescription(RTCSessionDescription(sdp, "answer"))

    async def open_data(self, timeout: float = 10.0) -> None:
        """Negotiate the publisher connection for data alone (no track published yet)."""
        async with self._publish_lock:
            if self.publisher.remoteDescription is None:
                await self._negotiate_publisher(timeout)

    def send_data(self, label: str, payload: bytes) -> bool:
        channel = self.channels.get(label) or self.channels["_reliable"]
        if channel.readyState != "open":
            return False
        channel.send(payload)
        return True

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            try:
                await self.send(rtc.SignalRequest(leave=rtc.LeaveRequest()))
            except (SignalClosed, ConnectionError, RuntimeError):
                pass
            await self.ws.close()
        for task in (self._reader, self._pinger):
            if task is not None:
                task.cancel()
        await self.publisher.close()
        await self.subscriber.close()
        if self._own_http and self._http is not None:
            await self._http.close()
        self.closed.set()
