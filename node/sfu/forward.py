"""Opus forwarding without decoding: the one module that leans on aiortc (1.16) internals.

aiortc's receive path is packet -> jitter buffer -> decoder thread -> ``RemoteStreamTrack``, and its
send path is ``track.recv()`` -> encoder -> packetiser. An SFU wants neither the decode nor the
encode, nor the jitter buffer's prefetch (four 20 ms frames, i.e. 80 ms of added latency). So, on a
*receiver* we replace, per instance (nothing global is patched):

* the jitter buffer by ``_PassThroughBuffer``: an Opus RTP packet is one whole frame, handed on the
  moment it arrives (reordering is left to the subscriber's own jitter buffer, as every SFU does);
* the decoder queue by ``_DirectQueue``: instead of queueing the frame for the decoder thread it
  calls ``on_frame(av.Packet)`` on the event loop (the thread aiortc still starts just waits for
  the stop signal);
* ``_handle_rtp_packet`` by a wrapper that reads the RTP audio-level header extension (RFC 6464)
  first, since the level is lost once the payload leaves the packet.

On a *sender* we give ``ForwardTrack``, whose ``recv()`` returns ``av.Packet`` objects: aiortc's
sender then only calls ``encoder.pack()`` (no encode). RTCP, NACK handling and statistics stay
aiortc's. ``ForwardTrack`` holds a small bounded queue and drops the oldest frame when a subscriber
falls behind, so a slow subscriber never stalls the publisher or the other subscribers.

One more mend, on the *peer connection*: aiortc starts a transceiver's sender and receiver at the
end of ``setRemoteDescription`` only if the DTLS transport is already connected, or by starting
the handshake itself; a transceiver negotiated while an earlier handshake is still under way is
never started. LiveKit clients do exactly that (the publisher offers its data channel, then its
microphone 20 ms later; the SFU's subscriber offer grows a track as the room fills), and then no
RTP comes in, or none goes out, for the whole call. ``start_late_transceivers`` runs aiortc's own
connect step again once the connection is up (every step in it is idempotent); every peer
connection the SFU makes comes from ``peer_connection``, which applies it.

What breaks if aiortc changes: the private names ``_RTCRtpReceiver__jitter_buffer``,
``_RTCRtpReceiver__decoder_queue`` and ``_RTCPeerConnection__connect``, the ``decoder_worker``
contract (``input_q.get()``; ``None`` stops), the sender's ``isinstance(data, Frame)`` switch.
``check_compatible()`` asserts those, and tests/test_node_sfu_forward.py exercises them end to
end.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections import deque
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

OPUS_CLOCK = 48000
TIME_BASE = Fraction(1, OPUS_CLOCK)
_JB = "_RTCRtpReceiver__jitter_buffer"
_DQ = "_RTCRtpReceiver__decoder_queue"
_CONNECT = "_RTCPeerConnection__connect"

FrameSink = Callable[[av.Packet], None]
LevelSink = Callable[[int], None]


def check_compatible() -> None:
    """Fail loudly at start-up, not silently at run time, if aiortc's internals moved."""
    import inspect

    source = inspect.getsource(RTCRtpReceiver.__init__)
    if "self.__jitter_buffer" not in source or "self.__decoder_queue" not in source:
        raise RuntimeError("aiortc RTCRtpReceiver internals changed: forwarding needs aiortc 1.16")
    if not callable(getattr(RTCPeerConnection, _CONNECT, None)):
        raise RuntimeError("aiortc RTCPeerConnection internals changed: the SFU needs aiortc 1.16")


class _PassThroughBuffer:
    """Stands in for aiortc's JitterBuffer: every Opus packet is a complete frame, at once."""

    capacity = 1

    def add(self, packet: Any) -> tuple[bool, JitterFrame | None]:
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)

    def remove(self, count: int) -> None:  # pragma: no cover - aiortc does not call it for us
        pass


class _DirectQueue:
    """Stands in for the decoder queue: ``put`` delivers to ``on_frame`` on the event loop; the
    decoder thread's ``get`` only ever returns the stop signal."""

    def __init__(self, on_frame: FrameSink) -> None:
        self._on_frame = on_frame
        self._stop: queue.Queue[None] = queue.Queue()

    def put(self, task: Any) -> None:
        if task is None:
            self._stop.put(None)
            return
        codec, frame = task
        if codec.mimeType.lower() != "audio/opus":
            return
        packet = av.Packet(frame.data)
        packet.pts = frame.timestamp
        packet.time_base = TIME_BASE
        try:
            self._on_frame(packet)
        except Exception:  # one subscriber's fault must not kill the receive path
            import logging

            logging.getLogger("node.sfu.forward").exception("forwarding a frame failed")

    def get(self, *args: Any, **kwargs: Any) -> None:
        return self._stop.get()


def install_passthrough(
    receiver: RTCRtpReceiver, on_frame: FrameSink, on_level: LevelSink | None = None
) -> None:
    """Make ``receiver`` hand each Opus frame, still encoded, to ``on_frame``; call before the
    receiver starts (i.e. from the peer connection's ``track`` event)."""
    if getattr(receiver, "_sfu_passthrough", False):
        return
    if not hasattr(receiver, _JB) or not hasattr(receiver, _DQ):
        raise RuntimeError("aiortc RTCRtpReceiver internals changed: forwarding needs aiortc 1.16")
    setattr(receiver, _JB, _PassThroughBuffer())
    setattr(receiver, _DQ, _DirectQueue(on_frame))
    if on_level is not None:
        original = receiver._handle_rtp_packet

        async def handle(packet: Any, arrival_time_ms: int) -> None:
            level = packet.extensions.audio_level
            if level is not None:
                on_level(int(level[1]))  # (voice flag, -dBov 0..127)
            await original(packet, arrival_time_ms)

        receiver._handle_rtp_packet = handle  # type: ignore[method-assign]
    receiver._sfu_passthrough = True  # type: ignore[attr-defined]


def peer_connection() -> RTCPeerConnection:
    """A peer connection as the SFU uses them: no STUN/TURN of its own (host candidates), and
    tracks negotiated during the handshake started (``start_late_transceivers``)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    start_late_transceivers(pc)
    return pc


def start_late_transceivers(pc: RTCPeerConnection) -> None:
    """Once ``pc`` is connected, start every negotiated sender and receiver that aiortc left
    unstarted because it was negotiated during the DTLS handshake (see the module docstring)."""

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        if pc.connectionState == "connected":
            await getattr(pc, _CONNECT)()


class ForwardTrack(MediaStreamTrack):
    """An outgoing audio track fed with encoded Opus ``av.Packet`` s; the sender only packetises.

    ``push`` never blocks: past ``max_queue`` frames the oldest are dropped (counted in
    ``dropped``). ``paused`` frames are dropped too (a subscription switched off)."""

    kind = "audio"

    def __init__(self, track_id: str | None = None, max_queue: int = 10) -> None:
        super().__init__()
        if track_id is not None:
            self._id = track_id
        self._frames: deque[tuple[av.Packet, float]] = deque(maxlen=max_queue)
        self._ready = asyncio.Event()
        self.paused = False
        self.dropped = 0
        self.forwarded = 0
        self.on_sent: Callable[[float], None] | None = None  # gets the seconds spent queued

    def push(self, packet: av.Packet) -> None:
        if self.readyState != "live" or self.paused:
            return
        if len(self._frames) == self._frames.maxlen:
            self.dropped += 1
        self._frames.append((packet, time.perf_counter()))
        self._ready.set()

    async def recv(self) -> av.Packet:  # type: ignore[override]
        while not self._frames:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        packet, queued_at = self._frames.popleft()
        self.forwarded += 1
        if self.on_sent is not None:
            self.on_sent(time.perf_counter() - queued_at)
        return packet

    def stop(self) -> None:
        super().stop()
        self._ready.set()


def level_to_unit(dbov: int) -> float:
    """RFC 6464 level (0 = loudest, 127 = silence, in -dBov) to LiveKit's 0..1 speaker level."""
    dbov = max(0, min(127, dbov))
    return round(10 ** (-dbov / 20), 4)
