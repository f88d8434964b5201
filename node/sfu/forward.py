"""Opus and video forwarding without decoding: the one module that leans on aiortc (1.16) internals.

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

For video the jitter buffer is ``FrameAssembler``: it hands on a frame the moment its last packet
is in (aiortc's waits for the next frame's first packet), while aiortc still asks the publisher
for missing packets with NACKs; the direct queue hands on the whole encoded frame (VP8, or H.264 as
Annex B). A simulcast publisher's layers share one receiver: ``install_simulcast`` gives each
layer its own assembler and NACK state, swapped in per packet, and ``ForwardTrack.push_layer``
moves a viewer between layers at a keyframe.

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
``_RTCRtpReceiver__decoder_queue``, ``_RTCRtpReceiver__nack_generator``,
``_RTCRtpReceiver__rtx_ssrc``, ``_RTCPeerConnection__connect``, the transceiver's
``_headerExtensions`` and the DTLS transport's ``_rtp_header_extensions_map``, the
``decoder_worker``
contract (``input_q.get()``; ``None`` stops), the sender's ``isinstance(data, Frame)`` switch and
``_send_keyframe``, the receiver's ``_send_rtcp_pli`` and the transceiver's negotiated ``_codecs``.
``check_compatible()`` asserts those, and tests/test_node_sfu_forward.py exercises them end to
end.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCIceCandidate,
    RTCPeerConnection,
    RTCRtpHeaderExtensionParameters,
    RTCRtpParameters,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCRtpTransceiver,
)
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpreceiver import NackGenerator
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, unpack_remb_fci

OPUS_CLOCK = 48000
TIME_BASE = Fraction(1, OPUS_CLOCK)
VIDEO_TIME_BASE = Fraction(1, 90000)  # every video codec's RTP clock
# what passes through: the codecs whose encoded frames aiortc's senders can packetise again
FORWARDED = frozenset(("audio/opus", "video/vp8", "video/h264"))
_JB = "_RTCRtpReceiver__jitter_buffer"
_DQ = "_RTCRtpReceiver__decoder_queue"
_CONNECT = "_RTCPeerConnection__connect"
_NACK = "_RTCRtpReceiver__nack_generator"
_RTX = "_RTCRtpReceiver__rtx_ssrc"

MAX_SSRCS = 4  # a track's media and retransmission sources; more is a client's noise
FrameSink = Callable[[av.Packet], None]
LayerSink = Callable[[av.Packet, int], None]  # a frame and its simulcast layer (0 = lowest)
LevelSink = Callable[[int], None]
log = logging.getLogger("node.sfu.forward")


def check_compatible() -> None:
    """Fail loudly at start-up, not silently at run time, if aiortc's internals moved."""
    import inspect

    source = inspect.getsource(RTCRtpReceiver.__init__)
    names = ("__jitter_buffer", "__decoder_queue", "__nack_generator", "__rtx_ssrc")
    if not all(f"self.{name}" in source for name in names):
        raise RuntimeError("aiortc RTCRtpReceiver internals changed: forwarding needs aiortc 1.16")
    if not callable(getattr(RTCPeerConnection, _CONNECT, None)):
        raise RuntimeError("aiortc RTCPeerConnection internals changed: the SFU needs aiortc 1.16")
    if not callable(getattr(RTCRtpReceiver, "_send_rtcp_pli", None)) or not callable(
        getattr(RTCRtpSender, "_send_keyframe", None)
    ):
        raise RuntimeError("aiortc keyframe requests changed: video forwarding needs aiortc 1.16")


class _PassThroughBuffer:
    """Stands in for aiortc's JitterBuffer: every Opus packet is a complete frame, at once."""

    capacity = 1

    def add(self, packet: Any) -> tuple[bool, JitterFrame | None]:
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)

    def remove(self, count: int) -> None:  # pragma: no cover - aiortc does not call it for us
        pass


class FrameAssembler:
    """Stands in for aiortc's video JitterBuffer, which hands a frame on only once the first packet
    of the *next* frame arrives (one frame interval, 33-66 ms, of latency at every hop), and only
    one frame per packet (frames completed together by a retransmission would stay behind for
    good). Here a frame is complete as soon as its last packet (the RTP marker bit) is in and
    every packet since the previous frame's last one is present; ``take`` hands on every complete
    frame, its timestamp unwrapped to start at 0.

    A gap waits for the publisher's retransmission (aiortc's receiver NACKs it). A gap still open
    ``MAX_WAIT`` packets later is given up: what waits behind it cannot be decoded without a
    keyframe, so it is dropped, ``add`` returns the PLI flag (aiortc then asks the publisher for a
    keyframe) and assembly starts again after the next marker, as it does when joining a stream."""

    capacity = 256  # aiortc's receiver only reads it
    MAX_WAIT = 128

    def __init__(self) -> None:
        self._packets: dict[int, Any] = {}  # sequence number -> RtpPacket (depayloaded)
        self._start: int | None = None  # the next frame's first sequence number
        self._ready: list[JitterFrame] = []
        self._prev_ts: int | None = None  # the last frame's RTP timestamp
        self._pts_now = 0  # its timestamp unwrapped, from 0
        self.given_up = 0  # gaps never filled

    def add(self, packet: Any) -> tuple[bool, JitterFrame | None]:
        """aiortc's call: the PLI flag, and never a frame (frames leave through ``take``)."""
        seq = packet.sequence_number
        if self._start is None:
            if packet.marker:
                self._start = (seq + 1) & 0xFFFF
            return False, None
        ahead = (seq - self._start) & 0xFFFF
        if ahead >= 0x8000:  # behind: a late copy of what went out
            return False, None
        if ahead >= self.MAX_WAIT:  # the head frame has waited this long for a packet
            self.given_up += 1
            self._packets.clear()
            self._start = None
            return True, None
        self._packets[seq] = packet
        self._collect()
        return False, None

    def take(self) -> list[JitterFrame]:
        ready, self._ready = self._ready, []
        return ready

    def remove(self, count: int) -> None:  # pragma: no cover - aiortc does not call it for us
        pass

    def _collect(self) -> None:
        """Move every complete frame at the head to ``_ready``."""
        while self._start is not None:
            run: list[Any] = []
            seq = self._start
            while seq in self._packets and not self._packets[seq]._data:
                # padding (bandwidth probes): it fills a sequence number, not a frame
                del self._packets[seq]
                seq = self._start = (seq + 1) & 0xFFFF
            while seq in self._packets:
                packet = self._packets[seq]
                if run and packet.timestamp != run[0].timestamp:
                    break  # a new frame began: the one before lost its marker bit
                run.append(packet)
                if packet.marker:
                    break
                seq = (seq + 1) & 0xFFFF
            else:
                return  # a gap, or the frame is not all in yet
            for p in run:
                del self._packets[p.sequence_number]
            self._ready.append(JitterFrame(b"".join(p._data for p in run), self._pts(run[0])))
            self._start = (run[-1].sequence_number + 1) & 0xFFFF

    def _pts(self, packet: Any) -> int:
        """The RTP timestamp counted from the first frame, across 32-bit wraps."""
        prev = packet.timestamp if self._prev_ts is None else self._prev_ts
        step = (packet.timestamp - prev) & 0xFFFFFFFF
        self._pts_now += step - (1 << 32) if step >= 0x80000000 else step
        self._prev_ts = packet.timestamp
        return self._pts_now


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
        if codec.mimeType.lower() in FORWARDED:
            self.deliver(frame, Fraction(1, codec.clockRate))

    def deliver(self, frame: JitterFrame, time_base: Fraction) -> None:
        """``frame``, still encoded, to ``on_frame`` as an ``av.Packet``."""
        _hand_on(self._on_frame, encoded(frame, time_base))

    def get(self, *args: Any, **kwargs: Any) -> None:
        return self._stop.get()


def encoded(frame: JitterFrame, time_base: Fraction) -> av.Packet:
    """An assembled frame as the ``av.Packet`` a sender packetises again."""
    packet = av.Packet(frame.data)
    packet.pts = frame.timestamp
    packet.time_base = time_base
    return packet


def _hand_on(sink: Callable[..., None], *args: Any) -> None:
    try:
        sink(*args)
    except Exception:  # one subscriber's fault must not kill the receive path
        log.exception("forwarding a frame failed")


def install_passthrough(
    receiver: RTCRtpReceiver,
    on_frame: FrameSink,
    on_level: LevelSink | None = None,
    ssrcs: set[int] | None = None,
) -> None:
    """Make ``receiver`` hand each frame, still encoded, to ``on_frame``; call before the receiver
    starts (i.e. from the peer connection's ``track`` event). ``on_level`` gets an audio track's
    RFC 6464 levels; ``ssrcs`` collects the sources seen (a keyframe request names them)."""
    if getattr(receiver, "_sfu_passthrough", False):
        return
    if not hasattr(receiver, _JB) or not hasattr(receiver, _DQ):
        raise RuntimeError("aiortc RTCRtpReceiver internals changed: forwarding needs aiortc 1.16")
    assembler = None
    if receiver.track.kind == "audio":
        setattr(receiver, _JB, _PassThroughBuffer())
    else:
        assembler = FrameAssembler()
        setattr(receiver, _JB, assembler)
    queue = _DirectQueue(on_frame)
    setattr(receiver, _DQ, queue)
    original = receiver._handle_rtp_packet

    async def handle(packet: Any, arrival_time_ms: int) -> None:
        if ssrcs is not None and len(ssrcs) < MAX_SSRCS:
            ssrcs.add(packet.ssrc)
        level = packet.extensions.audio_level
        if on_level is not None and level is not None:
            on_level(int(level[1]))  # (voice flag, -dBov 0..127)
        await original(packet, arrival_time_ms)
        if assembler is not None:
            for frame in assembler.take():
                queue.deliver(frame, VIDEO_TIME_BASE)

    receiver._handle_rtp_packet = handle  # type: ignore[method-assign]
    receiver._sfu_passthrough = True  # type: ignore[attr-defined]


RID_URI = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
REPAIRED_RID_URI = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"
MAX_LAYERS = 3
_RID = re.compile(r"[A-Za-z0-9_-]{1,16}")
_RID_RANK = {"q": 0, "h": 1, "f": 2}  # LiveKit clients' rids, lowest layer first


@dataclass(frozen=True)
class Simulcast:
    """An offered m-line's simulcast: its layers' rids, lowest first, and the RTP header
    extensions that name a packet's layer (aiortc neither offers nor answers them)."""

    rids: tuple[str, ...]
    extensions: tuple[RTCRtpHeaderExtensionParameters, ...]


def read_simulcast(sdp: str) -> dict[str, Simulcast]:
    """The m-lines of a publisher's offer that send simulcast (``a=simulcast:send q;h;f``), by
    mid. At most ``MAX_LAYERS`` layers; an m-line without the rid header extension is left out
    (its packets could not be told apart)."""
    found: dict[str, Simulcast] = {}
    for section in re.split(r"\r?\n(?=m=)", sdp)[1:]:
        mid, rids, extensions = "", [], []
        for line in section.splitlines():
            if line.startswith("a=mid:"):
                mid = line[len("a=mid:") :].strip()
            elif line.startswith("a=simulcast:send "):
                spec = line[len("a=simulcast:send ") :].split()
                for alternatives in spec[0].split(";") if spec else []:
                    rid = alternatives.split(",")[0].lstrip("~")
                    if _RID.fullmatch(rid) and rid not in rids:
                        rids.append(rid)
            elif line.startswith("a=extmap:"):
                head, _, rest = line[len("a=extmap:") :].partition(" ")
                ext_id, uri = head.split("/")[0], rest.split(" ")[0].strip()
                if uri in (RID_URI, REPAIRED_RID_URI) and ext_id.isdigit() and 0 < int(ext_id) < 15:
                    extensions.append(RTCRtpHeaderExtensionParameters(id=int(ext_id), uri=uri))
        if mid and len(rids) > 1 and any(e.uri == RID_URI for e in extensions):
            ordered = sorted(rids[:MAX_LAYERS], key=lambda r: _RID_RANK.get(r, len(_RID_RANK)))
            found[mid] = Simulcast(tuple(ordered), tuple(extensions))
    return found


def accept_simulcast(pc: RTCPeerConnection, offered: dict[str, Simulcast]) -> None:
    """After ``setRemoteDescription``: negotiate the rid header extensions of the simulcast
    m-lines (aiortc's answer then carries them) and have the transport parse them now (a
    receiver already started keeps the map it was given)."""
    for transceiver in pc.getTransceivers():
        simulcast = offered.get(transceiver.mid or "")
        if simulcast is None:
            continue
        known = {e.uri for e in transceiver._headerExtensions}
        transceiver._headerExtensions += [e for e in simulcast.extensions if e.uri not in known]
        transport = transceiver.receiver.transport
        transport._rtp_header_extensions_map.configure(
            RTCRtpParameters(headerExtensions=list(simulcast.extensions))
        )


def answer_simulcast(sdp: str, offered: dict[str, Simulcast]) -> str:
    """aiortc's answer, with ``a=rid:… recv`` and ``a=simulcast:recv …`` on each simulcast
    m-line it accepted: without them the publisher falls back to sending one layer."""
    sections = re.split(r"(?<=\r\n)(?=m=)", sdp)
    for i, section in enumerate(sections):
        mid = re.search(r"^a=mid:(\S+)", section, re.M)
        simulcast = offered.get(mid.group(1)) if mid else None
        if simulcast is None or section.startswith("m=video 0 "):
            continue
        lines = [f"a=rid:{rid} recv" for rid in simulcast.rids]
        lines.append("a=simulcast:recv " + ";".join(simulcast.rids))
        sections[i] = section + "\r\n".join(lines) + "\r\n"
    return "".join(sections)


def install_simulcast(
    receiver: RTCRtpReceiver, rids: Sequence[str], on_frame: LayerSink, sources: list[set[int]]
) -> None:
    """Make ``receiver`` take a simulcast publisher's layers, each its own RTP stream named by
    the rid header extension, and hand each layer's frames, still encoded, to
    ``on_frame(packet, layer)``. aiortc's receiver knows one stream: each packet is run through
    it with the packet's layer's NACK state and frame assembler swapped in (packets are handled
    one at a time), so statistics, receiver reports, NACKs, retransmissions and PLIs stay
    aiortc's, per layer. ``sources[layer]`` holds the layer's media SSRC once known."""
    if getattr(receiver, "_sfu_passthrough", False):
        return
    if not all(hasattr(receiver, name) for name in (_JB, _DQ, _NACK, _RTX)):
        raise RuntimeError("aiortc RTCRtpReceiver internals changed: simulcast needs aiortc 1.16")
    index = {rid: i for i, rid in enumerate(rids[:MAX_LAYERS])}
    assemblers = [FrameAssembler() for _ in index]
    nacks = [NackGenerator() for _ in index]
    layer_of: dict[int, int] = {}  # media SSRC -> layer
    repairs: dict[int, int] = getattr(receiver, _RTX)  # aiortc's RTX SSRC -> media SSRC
    setattr(receiver, _DQ, _DirectQueue(lambda packet: None))  # nothing reaches it
    original = receiver._handle_rtp_packet

    def learn(packet: Any) -> None:
        """A packet that names its layer (the first of each stream do) maps its SSRC."""
        rid, repaired = packet.extensions.rtp_stream_id, packet.extensions.repaired_rtp_stream_id
        if rid in index and packet.ssrc not in layer_of:
            layer = index[rid]
            for ssrc in [s for s, v in layer_of.items() if v == layer]:  # the layer restarted
                del layer_of[ssrc]
                for rtx in [r for r, media in repairs.items() if media == ssrc]:
                    del repairs[rtx]
            layer_of[packet.ssrc] = layer
            sources[layer].clear()
            sources[layer].add(packet.ssrc)
            assemblers[layer], nacks[layer] = FrameAssembler(), NackGenerator()
        elif repaired in index and packet.ssrc not in repairs and sources[index[repaired]]:
            media = next(iter(sources[index[repaired]]))
            for ssrc in [s for s, v in repairs.items() if v == media]:
                del repairs[ssrc]
            repairs[packet.ssrc] = media

    async def handle(packet: Any, arrival_time_ms: int) -> None:
        learn(packet)
        layer = layer_of.get(repairs.get(packet.ssrc, packet.ssrc))
        if layer is None:
            return  # a stream not yet named by its rid: nothing to assemble it with
        setattr(receiver, _JB, assemblers[layer])
        setattr(receiver, _NACK, nacks[layer])
        await original(packet, arrival_time_ms)
        for frame in assemblers[layer].take():
            _hand_on(on_frame, encoded(frame, VIDEO_TIME_BASE), layer)

    receiver._handle_rtp_packet = handle  # type: ignore[method-assign]
    receiver._sfu_passthrough = True  # type: ignore[attr-defined]


def is_keyframe(mime: str, frame: bytes | memoryview) -> bool:
    """Whether an encoded frame decodes on its own: a VP8 key frame (RFC 6386, frame tag bit 0
    clear) or an H.264 access unit with an IDR slice (NAL type 5)."""
    if not frame:
        return False
    if mime == "video/vp8":
        return not frame[0] & 1
    if mime == "video/h264":
        frame = bytes(frame)  # VP8 needs one byte; H.264 is searched for its NAL units
        at = frame.find(b"\x00\x00\x01")
        while at != -1 and at + 3 < len(frame):
            if frame[at + 3] & 0x1F == 5:
                return True
            at = frame.find(b"\x00\x00\x01", at + 3)
    return False


def negotiated_mime(transceiver: RTCRtpTransceiver) -> str:
    """The codec the publisher sends on ``transceiver`` (the first one negotiated), lower case."""
    codecs = [c for c in transceiver._codecs if not c.mimeType.lower().endswith("/rtx")]
    return codecs[0].mimeType.lower() if codecs else ""


def prefer_codec(transceiver: RTCRtpTransceiver, mime: str) -> None:
    """Offer a subscriber only the publisher's codec (and its retransmissions): the frames go
    out as they came in, so the subscriber must decode what the publisher encoded."""
    kind = mime.split("/")[0]
    caps = RTCRtpSender.getCapabilities(kind).codecs
    transceiver.setCodecPreferences(
        [c for c in caps if c.mimeType.lower() in (mime, f"{kind}/rtx")]
    )


async def request_keyframe(receiver: RTCRtpReceiver, ssrcs: set[int]) -> None:
    """Ask the publisher behind ``receiver`` for a keyframe (RTCP PLI to each of its sources)."""
    for ssrc in list(ssrcs):
        await receiver._send_rtcp_pli(ssrc)


def on_keyframe_request(sender: RTCRtpSender, callback: Callable[[], None]) -> None:
    """Call ``callback`` when the subscriber behind ``sender`` asks for a keyframe (PLI/FIR)
    instead of aiortc's answer (encode one: there is no encoder here)."""
    sender._send_keyframe = callback  # type: ignore[method-assign]


def on_bandwidth_estimate(sender: RTCRtpSender, callback: Callable[[int], None]) -> None:
    """Call ``callback(bits per second)`` with each estimate (RTCP REMB) the subscriber behind
    ``sender`` reports of its own link; aiortc goes on handling the packet as before."""
    original = sender._handle_rtcp_packet

    async def handle(packet: Any) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, _ = unpack_remb_fci(packet.fci)
            except ValueError:
                pass
            else:
                callback(bitrate)
        await original(packet)

    sender._handle_rtcp_packet = handle  # type: ignore[method-assign]


def peer_connection() -> RTCPeerConnection:
    """A peer connection as the SFU uses them: no STUN/TURN of its own (host candidates), every
    m-line on one transport (max-bundle, as LiveKit clients offer; aiortc's default "balanced"
    policy leaves the second and later video m-lines of an offer on a transport it then stops, so
    their RTP is never routed), and tracks negotiated during the handshake started
    (``start_late_transceivers``)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))
    start_late_transceivers(pc)
    return pc


async def add_candidate(pc: RTCPeerConnection, candidate: RTCIceCandidate) -> None:
    """Give a client's trickled candidate to the one ICE transport of a max-bundle connection.
    aiortc hands a remote candidate only to the m-line it names when that m-line owns its
    transport, and a client names the first m-line of its BUNDLE group, which here may share the
    data channel's transport: the candidate would be dropped."""
    transceivers = pc.getTransceivers()
    owner = transceivers[0].receiver.transport if transceivers else None
    if owner is None and pc.sctp is not None:
        owner = pc.sctp.transport
    if owner is None:
        await pc.addIceCandidate(candidate)
    else:
        await owner.transport.addRemoteCandidate(candidate)


def bundle_data_channels(pc: RTCPeerConnection) -> None:
    """Call once the SFU's own data channels exist on ``pc`` (before any track): their transport
    is the one every m-line shares. Unless it is marked bundled, aiortc stops it when the client's
    answer names a track's m-line first in its BUNDLE group, and the connection never comes up."""
    assert pc.sctp is not None, "create the data channels first"
    pc.sctp._bundled = True


def start_late_transceivers(pc: RTCPeerConnection) -> None:
    """Once ``pc`` is connected, start every negotiated sender and receiver that aiortc left
    unstarted because it was negotiated during the DTLS handshake (see the module docstring)."""

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        if pc.connectionState == "connected":
            await getattr(pc, _CONNECT)()


class ForwardTrack(MediaStreamTrack):
    """An outgoing track fed with encoded ``av.Packet`` s (Opus, VP8 or H.264 frames); the
    sender only packetises.

    ``push`` never blocks: past ``max_queue`` frames the oldest are dropped (counted in
    ``dropped``; ``on_gap`` is called, since a video decoder then needs a keyframe). ``paused``
    frames are dropped too (a subscription switched off).

    A simulcast track's frames come through ``push_layer``: the viewer gets one layer, and moves
    to ``want`` at that layer's next keyframe, its timestamps shifted to carry on where the
    last layer's stopped (the sender numbers the packets, so the viewer sees one stream)."""

    kind = "audio"

    def __init__(
        self, track_id: str | None = None, max_queue: int = 10, kind: str = "audio"
    ) -> None:
        super().__init__()
        self.kind = kind  # type: ignore[misc]
        if track_id is not None:
            self._id = track_id
        self._frames: deque[tuple[av.Packet, int | None, float]] = deque(maxlen=max_queue)
        self._ready = asyncio.Event()
        self.paused = False
        self.dropped = 0
        self.forwarded = 0
        self.on_sent: Callable[[float], None] | None = None  # gets the seconds spent queued
        self.on_gap: Callable[[], None] | None = None
        # simulcast: the quality asked for, the layer to move to, the layer sent now
        self.asked = MAX_LAYERS - 1
        self.want = 0
        self.layer: int | None = None
        self.switches = 0
        self.estimate_bps = 0  # what the viewer last said its link carries (REMB), 0: unknown
        self.estimate_at = 0.0
        self.cap: int | None = None  # the highest layer its link was seen to carry
        self.capped_at = 0.0
        self.congested_since: float | None = None
        self._shift = 0  # added to the layer's timestamps
        self._last_pts: int | None = None
        self._step = 3000  # one frame at 30 fps, in 90 kHz ticks, until measured

    def push(self, packet: av.Packet, pts: int | None = None) -> None:
        """Queue ``packet`` to send (with ``pts`` in place of its own, when given)."""
        if self.readyState != "live" or self.paused:
            return
        if len(self._frames) == self._frames.maxlen:
            self.dropped += 1
            if self.on_gap is not None:
                self.on_gap()
        self._frames.append((packet, pts, time.perf_counter()))
        self._ready.set()

    def note_estimate(self, bps: int) -> None:
        self.estimate_bps, self.estimate_at = bps, time.monotonic()

    def push_layer(self, packet: av.Packet, layer: int, keyframe: bool) -> None:
        """A frame of simulcast ``layer``: sent if it is this viewer's layer, or if it is the
        keyframe of the layer it moves to."""
        if layer != self.layer:
            if layer != self.want or not keyframe or self.paused:
                return
            if self._last_pts is not None:
                self._shift = self._last_pts + self._step - packet.pts
            self.layer = layer
            self.switches += 1
        pts = packet.pts + self._shift
        if self._last_pts is not None and 0 < pts - self._last_pts <= 90000:
            self._step = pts - self._last_pts
        self._last_pts = pts
        self.push(packet, pts)

    async def recv(self) -> av.Packet:  # type: ignore[override]
        while not self._frames:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        packet, pts, queued_at = self._frames.popleft()
        if pts is not None:  # a simulcast frame shared by viewers: the sender reads it at once
            packet.pts = pts
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
