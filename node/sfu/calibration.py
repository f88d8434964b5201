"""What one participant costs this SFU, measured on this machine through the real forwarding path.

The unit the SFU advertises is a participant (its load is the participants in its rooms), and the
participant it serves is one side of a two-party call, an agent or the person talking to it: one
Opus stream in, one out. ``forwarding_cost`` measures exactly that with aiortc in this process: a
publisher sends pre-encoded Opus frames (nothing is encoded while measuring) to a receiving peer
connection with the SFU's passthrough, which forwards them through ``ForwardTrack`` on a second
connection to a subscriber that only counts them. Every packet is then handled four times (sent,
received and sent again by the SFU, received), each with the same SRTP and RTP work, so the SFU's
share of the process's CPU time is half: one stream in plus one stream out, i.e. one participant.
The signalling a participant adds (a join, a few messages) is not counted; the headroom of
``node.capacity`` absorbs it.
"""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
from aiortc import RTCPeerConnection
from aiortc.codecs.opus import OpusEncoder

from node.capacity import CalibrationError
from node.sfu.forward import ForwardTrack, install_passthrough, peer_connection

FRAME_SECONDS = 0.02
SAMPLES = 960  # 20 ms at 48 kHz
MODEL = "aiortc-opus-passthrough"


def forwarding_cost(streams: int = 8, seconds: float = 2.0) -> float:
    """Core-seconds per second that one participant (one stream in, one out) costs the SFU.
    Blocking (it runs its own event loop: call it from a thread); raises CalibrationError when
    the measured streams did not flow."""
    return asyncio.run(_measure(streams, seconds))


def _opus_frame() -> bytes:
    """One encoded 20 ms frame of a tone: what a publisher's packet carries."""
    t = np.arange(SAMPLES) / 48000
    pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate, frame.pts = 48000, 0
    frame.time_base = fractions.Fraction(1, 48000)
    payloads, _ = OpusEncoder().encode(frame)
    return payloads[0]


async def _negotiate(offerer: RTCPeerConnection, answerer: RTCPeerConnection) -> None:
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(answerer.localDescription)


async def _measure(streams: int, seconds: float) -> float:
    pub, sfu_in, sfu_out, sub = (peer_connection() for _ in range(4))
    sources = [ForwardTrack(max_queue=50) for _ in range(streams)]
    relays = [ForwardTrack(max_queue=50) for _ in range(streams)]
    received = [0] * streams
    for track in sources:
        pub.addTrack(track)
    for track in relays:
        sfu_out.addTrack(track)

    @sfu_in.on("track")
    def on_in(track: object) -> None:
        for i, t in enumerate(sfu_in.getTransceivers()):
            if t.receiver.track is track:
                install_passthrough(t.receiver, relays[i].push)

    @sub.on("track")
    def on_out(track: object) -> None:
        for i, t in enumerate(sub.getTransceivers()):
            if t.receiver.track is track:

                def count(_packet: av.Packet, i: int = i) -> None:
                    received[i] += 1

                install_passthrough(t.receiver, count)

    payload = _opus_frame()
    pts = 0

    async def pump(until: float) -> None:
        nonlocal pts
        tick = time.monotonic()
        while tick < until:
            for track in sources:
                packet = av.Packet(payload)
                packet.pts, packet.time_base = pts, fractions.Fraction(1, 48000)
                track.push(packet)
            pts += SAMPLES
            tick += FRAME_SECONDS
            await asyncio.sleep(max(0.0, tick - time.monotonic()))

    try:
        await _negotiate(pub, sfu_in)
        await _negotiate(sfu_out, sub)
        # until every stream flows end to end (connections up, passthroughs installed)
        deadline = time.monotonic() + 15
        while min(received) == 0:
            if time.monotonic() > deadline:
                raise CalibrationError(
                    f"forwarding calibration: {sum(r > 0 for r in received)} of {streams} "
                    "streams reached a local subscriber in 15 s; the node cannot reach its own "
                    "ICE addresses (check `sfu.ice_addresses`, or `calibrate: false`)"
                )
            await pump(time.monotonic() + 0.1)
        before = sum(received)
        c0, t0 = time.process_time(), time.monotonic()
        await pump(t0 + seconds)
        cpu, wall = time.process_time() - c0, time.monotonic() - t0
        sent = round(wall / FRAME_SECONDS) * streams
        if sum(received) - before < sent * 0.5:
            raise CalibrationError(
                f"forwarding calibration: {sum(received) - before} of about {sent} frames "
                "arrived; the machine could not forward the streams"
            )
        return cpu / wall / streams / 2
    finally:
        for pc in (pub, sfu_in, sfu_out, sub):
            await pc.close()
