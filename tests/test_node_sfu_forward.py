"""node/sfu/forward.py: Opus forwarding without decode/encode, on aiortc's internals.

End to end with three real aiortc peer connections on loopback: a publisher encodes a 440 Hz
tone; the "SFU" receives it through the passthrough and forwards it with ``ForwardTrack``; a
subscriber decodes it. The SFU's own sender must never call the Opus encoder.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from fractions import Fraction

import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.codecs import opus
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtp import RtpPacket

from node.sfu import forward
from node.sfu.forward import ForwardTrack, install_passthrough, level_to_unit
from tests.support.audio import dominant_hz


class Tone(MediaStreamTrack):
    kind = "audio"

    def __init__(self, freq: float = 440.0) -> None:
        super().__init__()
        self.freq, self.n, self.start = freq, 0, None

    async def recv(self) -> av.AudioFrame:
        if self.start is None:
            self.start = time.monotonic()
        wait = self.start + self.n / 48000 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (np.arange(960) + self.n) / 48000
        samples = (np.sin(2 * np.pi * self.freq * t) * 10000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 48000, self.n
        frame.time_base = fractions.Fraction(1, 48000)
        self.n += 960
        return frame


async def connect(offerer: RTCPeerConnection, answerer: RTCPeerConnection) -> None:
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(answerer.localDescription)


async def test_forwarded_opus_is_the_tone_and_never_reencoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoders: list[int] = []
    real_encode = opus.OpusEncoder.encode

    def counting_encode(self, frame, force_keyframe=False):  # type: ignore[no-untyped-def]
        encoders.append(id(self))
        return real_encode(self, frame, force_keyframe)

    monkeypatch.setattr(opus.OpusEncoder, "encode", counting_encode)
    cfg = RTCConfiguration(iceServers=[])
    pub, sfu_in, sfu_out, sub = (RTCPeerConnection(cfg) for _ in range(4))
    levels: list[int] = []
    relay = ForwardTrack(track_id="TR_test")
    frames = 0

    def on_frame(packet: av.Packet) -> None:
        nonlocal frames
        frames += 1
        assert isinstance(packet, av.Packet) and packet.time_base == fractions.Fraction(1, 48000)
        relay.push(packet)

    @sfu_in.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        receiver = next(t.receiver for t in sfu_in.getTransceivers() if t.receiver.track is track)
        install_passthrough(receiver, on_frame, levels.append)

    received: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
    sub.on("track", lambda t: received.done() or received.set_result(t))
    try:
        pub.addTrack(Tone())
        await connect(pub, sfu_in)
        out_sender = sfu_out.addTrack(relay)
        await connect(sfu_out, sub)
        track = await asyncio.wait_for(received, 20)
        chunks = []
        deadline = time.monotonic() + 20
        while sum(len(c) for c in chunks) < 48000 and time.monotonic() < deadline:
            frame = await asyncio.wait_for(track.recv(), 10)
            chunks.append(
                frame.to_ndarray().reshape(-1)[
                    :: frame.layout.nb_channels if len(frame.layout.channels) > 1 else 1
                ]
            )
        audio = np.concatenate(chunks)[-24000:].astype(float)
        assert abs(dominant_hz(audio) - 440) < 5, dominant_hz(audio)
        assert frames > 25 and relay.forwarded > 25 and relay.dropped == 0
        assert levels and min(levels) < 40, "the audio level is read at the receiver"
        sfu_encoder = out_sender._RTCRtpSender__encoder
        assert sfu_encoder is not None and id(sfu_encoder) not in encoders, (
            "the SFU's sender must only pack, never encode"
        )
        assert encoders, "the publisher did encode (sanity check of the spy)"
    finally:
        for pc in (pub, sfu_in, sfu_out, sub):
            await pc.close()


@pytest.mark.fast
async def test_forward_track_drops_oldest_when_a_subscriber_stalls() -> None:
    stalled, live = ForwardTrack(max_queue=3), ForwardTrack(max_queue=3)
    for i in range(10):
        packet = av.Packet(bytes([i]))
        packet.pts = i * 960
        for track in (stalled, live):
            track.push(packet)
        assert bytes(await live.recv()) == bytes([i])  # the live one is never held back
    assert stalled.dropped == 7
    assert [bytes(await stalled.recv()) for _ in range(3)] == [bytes([7]), bytes([8]), bytes([9])]
    stalled.paused = True
    stalled.push(av.Packet(b"x"))
    assert not stalled._frames
    stalled.stop()
    with pytest.raises(Exception):
        await asyncio.wait_for(stalled.recv(), 1)


@pytest.mark.fast
def test_direct_queue_delivers_opus_and_video_and_passes_the_stop_signal() -> None:
    got: list[av.Packet] = []
    q = forward._DirectQueue(got.append)

    from aiortc import RTCRtpCodecParameters
    from aiortc.jitterbuffer import JitterFrame

    def codec(mime: str, rate: int) -> RTCRtpCodecParameters:
        return RTCRtpCodecParameters(mimeType=mime, clockRate=rate, payloadType=96)

    q.put((codec("audio/opus", 48000), JitterFrame(b"\x01\x02", 960)))
    q.put((codec("audio/PCMU", 8000), JitterFrame(b"\x03", 160)))  # not forwarded: no packer
    q.put((codec("video/VP8", 90000), JitterFrame(b"\x04\x05\x06", 3000)))
    assert [bytes(p) for p in got] == [b"\x01\x02", b"\x04\x05\x06"]
    assert (got[0].pts, got[0].time_base) == (960, Fraction(1, 48000))
    assert (got[1].pts, got[1].time_base) == (3000, Fraction(1, 90000))
    q.put(None)
    assert q.get() is None  # the idle decoder thread wakes up and ends


@pytest.mark.fast
def test_levels_and_internals_check() -> None:
    forward.check_compatible()
    assert level_to_unit(0) == 1.0 and level_to_unit(127) < 0.001
    assert 0.09 < level_to_unit(20) < 0.11


async def test_a_track_negotiated_during_the_handshake_still_flows() -> None:
    """A LiveKit client offers its data channel, then its microphone before DTLS is up: aiortc
    alone never starts that receiver (no RTP for the whole call, one browser join in three);
    with ``start_late_transceivers`` the tone arrives. (Both ends are aiortc here, and both
    need the mend; a browser needs none.)"""
    cfg = RTCConfiguration(iceServers=[])
    client, sfu = RTCPeerConnection(cfg), RTCPeerConnection(cfg)
    for pc in (client, sfu):
        forward.start_late_transceivers(pc)
    frames = 0

    def on_frame(packet: av.Packet) -> None:
        nonlocal frames
        frames += 1

    @sfu.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        receiver = next(t.receiver for t in sfu.getTransceivers() if t.receiver.track is track)
        install_passthrough(receiver, on_frame)

    try:
        client.createDataChannel("_reliable")
        await connect(client, sfu)
        client.addTrack(Tone())
        await connect(client, sfu)  # at once: the first handshake is still under way
        deadline = time.monotonic() + 10
        while frames < 50 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert frames >= 50, f"{frames} frames reached the SFU in 10 s"
    finally:
        await client.close()
        await sfu.close()


def rtp(seq: int, ts: int, marker: bool, data: bytes) -> RtpPacket:
    """A depayloaded video packet as aiortc's receiver hands it to its jitter buffer."""
    packet = RtpPacket(payload_type=96, sequence_number=seq, timestamp=ts, marker=marker)
    packet._data = data  # type: ignore[attr-defined]
    return packet


def feed(fa: forward.FrameAssembler, packet: RtpPacket) -> tuple[bool, list[tuple[bytes, int]]]:
    """aiortc's call, then what the receiver wrapper hands on: (PLI flag, [(data, pts)])."""
    pli, none = fa.add(packet)
    assert none is None, "frames leave only through take()"
    return pli, [(f.data, f.timestamp) for f in fa.take()]


@pytest.mark.fast
def test_frame_assembler_hands_on_a_frame_at_its_marker() -> None:
    """aiortc's buffer would hold each frame until the next one's first packet came."""
    fa = forward.FrameAssembler()
    # joined mid-frame: the tail of a frame is skipped, the next starts after its marker
    assert feed(fa, rtp(65533, 4294967000, True, b"tail")) == (False, [])
    assert feed(fa, rtp(65534, 4294967000 + 3000 - 2**32, False, b"a")) == (False, [])
    # a frame at its marker, its timestamp from 0; across both wraps (sequence and timestamp)
    assert feed(fa, rtp(65535, 2704, True, b"b")) == (False, [(b"ab", 0)])
    assert feed(fa, rtp(0, 5704, True, b"c")) == (False, [(b"c", 3000)])


@pytest.mark.fast
def test_frame_assembler_waits_for_a_retransmission_then_gives_up() -> None:
    fa = forward.FrameAssembler()
    feed(fa, rtp(9, 0, True, b""))
    assert feed(fa, rtp(10, 3000, False, b"a")) == (False, [])
    # 11 lost; 12 closes frame 3000, 13 is all of frame 6000: both wait for 11
    assert feed(fa, rtp(12, 3000, True, b"c")) == (False, [])
    assert feed(fa, rtp(13, 6000, True, b"d")) == (False, [])
    # the NACKed copy arrives: both frames go out at once, in order
    assert feed(fa, rtp(11, 3000, False, b"b")) == (False, [(b"abc", 0), (b"d", 3000)])
    assert feed(fa, rtp(13, 6000, True, b"d")) == (False, []), "a late copy is ignored"
    # a frame whose marker packet was lost ends where the next timestamp begins
    feed(fa, rtp(14, 9000, False, b"e"))
    assert feed(fa, rtp(15, 12000, True, b"f")) == (False, [(b"e", 6000), (b"f", 9000)])
    # 16 lost for good: what waits behind it is dropped with a PLI after MAX_WAIT packets
    seq, ts, out = 17, 15000, []
    while seq < 400:
        pli, frames = feed(fa, rtp(seq, ts, True, b"x"))
        out += frames
        seq, ts = seq + 1, ts + 3000
        if pli:
            break
    assert (
        pli and fa.given_up == 1 and out == [] and seq - 16 <= forward.FrameAssembler.MAX_WAIT + 1
    )
    # then it starts again after the next marker, each frame out at its marker
    assert feed(fa, rtp(seq, ts, True, b"y")) == (False, [])
    # (timestamps stay counted from the first frame: the stream a subscriber sees is continuous)
    assert feed(fa, rtp(seq + 1, ts + 3000, True, b"z"))[1] == [(b"z", ts + 3000 - 3000)]


@pytest.mark.fast
def test_frame_assembler_skips_padding_between_frames() -> None:
    """A simulcast publisher pads its layers with payload-less packets (bandwidth probes) on the
    media stream: they hold sequence numbers, and a frame made of one would break the viewer's
    decoder until the next keyframe."""
    fa = forward.FrameAssembler()
    feed(fa, rtp(1, 0, True, b"k"))
    assert feed(fa, rtp(2, 3000, True, b"a")) == (False, [(b"a", 0)])
    assert feed(fa, rtp(3, 3000, False, b"")) == (False, [])
    assert feed(fa, rtp(5, 6000, True, b"b")) == (False, []), "4 is missing"
    assert feed(fa, rtp(4, 3000, False, b"")) == (False, [(b"b", 3000)])


# libwebrtc's offer for a camera with three simulcast layers (the lines that matter, as sent)
SIMULCAST_OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 1 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
        "a=mid:0",
        "m=video 9 UDP/TLS/RTP/SAVPF 96 97",
        "a=mid:1",
        "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
        "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
        "a=extmap:11/sendonly urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id",
        "a=sendonly",
        "a=rid:f send",
        "a=rid:q send",
        "a=rid:h send",
        "a=simulcast:send f;~q,x;h",
        "",
    ]
)


@pytest.mark.fast
def test_simulcast_is_read_from_the_offer_and_answered() -> None:
    offered = forward.read_simulcast(SIMULCAST_OFFER)
    assert list(offered) == ["1"]
    assert offered["1"].rids == ("q", "h", "f"), "lowest first, a paused layer included"
    assert {(e.id, e.uri) for e in offered["1"].extensions} == {
        (10, forward.RID_URI),
        (11, forward.REPAIRED_RID_URI),
    }
    # no rid header extension: the layers could not be told apart, so no simulcast
    assert forward.read_simulcast(SIMULCAST_OFFER.replace("sdes:rtp-stream-id", "x")) == {}
    # one layer, or rids that are not tokens, is no simulcast either
    assert forward.read_simulcast(SIMULCAST_OFFER.replace("f;~q,x;h", "q")) == {}
    odd = SIMULCAST_OFFER.replace("f;~q,x;h", "a b;c\x00;" + "z" * 40)
    assert forward.read_simulcast(odd) == {}
    many = forward.read_simulcast(SIMULCAST_OFFER.replace("f;~q,x;h", "a;b;c;d;e"))
    assert many["1"].rids == ("a", "b", "c"), "at most three layers"

    answer = "\r\n".join(["v=0", "m=application 9 X", "a=mid:0", "m=video 9 X 96", "a=mid:1", ""])
    munged = forward.answer_simulcast(answer, offered)
    video = munged.split("m=video")[1]
    assert "a=rid:q recv\r\na=rid:h recv\r\na=rid:f recv\r\na=simulcast:recv q;h;f\r\n" in video
    assert "a=rid" not in munged.split("m=video")[0]
    rejected = answer.replace("m=video 9 X 96", "m=video 0 X 96")
    assert forward.answer_simulcast(rejected, offered) == rejected


@pytest.mark.fast
def test_keyframes_are_recognised() -> None:
    assert forward.is_keyframe("video/vp8", b"\x10\x02\x00\x9d\x01\x2a")
    assert not forward.is_keyframe("video/vp8", b"\x11\x02\x00")
    assert forward.is_keyframe("video/h264", b"\x00\x00\x00\x01\x67\x42\x00\x00\x00\x01\x65\x88")
    assert not forward.is_keyframe("video/h264", b"\x00\x00\x00\x01\x41\x9a")
    assert not forward.is_keyframe("video/vp8", b"")
    assert not forward.is_keyframe("video/h264", b"\x00\x00\x01")


def frame(pts: int) -> av.Packet:
    packet = av.Packet(b"f")
    packet.pts, packet.time_base = pts, Fraction(1, 90000)
    return packet


@pytest.mark.fast
async def test_a_viewer_moves_layer_at_a_keyframe_and_its_timestamps_run_on() -> None:
    track = ForwardTrack(kind="video", max_queue=100)
    track.want = 0
    sent: list[int] = []

    async def drain() -> None:
        while track._frames:
            sent.append((await track.recv()).pts)

    # layer 1 is not wanted; layer 0 waits for its keyframe
    track.push_layer(frame(1000), 1, True)
    track.push_layer(frame(500), 0, False)
    track.push_layer(frame(3500), 0, True)
    track.push_layer(frame(6500), 0, False)
    await drain()
    assert sent == [3500, 6500] and track.layer == 0
    # asked to move up: layer 0 goes on until layer 1's keyframe; its own clock differs
    track.want = 1
    track.push_layer(frame(90_000), 1, False)
    track.push_layer(frame(9500), 0, False)
    track.push_layer(frame(93_000), 1, True)
    track.push_layer(frame(12_500), 0, True)
    track.push_layer(frame(96_000), 1, False)
    await drain()
    assert sent[2:] == [9500, 12_500, 15_500], "one frame step on, whatever the layer's clock"
    assert track.layer == 1 and track.switches == 2


@pytest.mark.fast
def test_a_viewer_is_given_the_best_arriving_layer_at_or_below_its_ask() -> None:
    """The layer choice of node/sfu/rtc.py: what the viewer asks (quality, or its element's size),
    bounded by what the publisher is sending now (it stops top layers when short of bandwidth)."""
    from livekit.protocol import models
    from livekit.protocol import rtc as signal

    from node.sfu.rtc import PublishedTrack, announced_layers

    asked = [
        models.VideoLayer(quality=2, width=1280, height=720),
        models.VideoLayer(quality=0, width=320, height=180),
        models.VideoLayer(quality=1, width=640, height=360),
        models.VideoLayer(quality=1, width=9, height=9),  # a second MEDIUM: ignored
        models.VideoLayer(quality=7, width=99999, height=5),  # no such quality
    ]
    layers = announced_layers(asked)
    assert [(v.quality, v.width) for v in layers] == [(0, 320), (1, 640), (2, 1280)]
    track = PublishedTrack("TR_x", "c", "cam", owner=None, kind="video", layers=layers)  # type: ignore[arg-type]
    track.rids, track.layer_at = ("q", "h", "f"), [0.0, 0.0, 0.0]

    def quality(**kw: int) -> int:
        return track.quality_for(signal.UpdateTrackSettings(**kw))

    assert quality(quality=0) == 0 and quality(quality=2) == 2 and quality(quality=3) == 2
    assert quality(width=300, height=170) == 0, "the smallest layer that fills the element"
    assert quality(width=321, height=100) == 1
    assert quality(width=4000, height=4000) == 2

    viewer = ForwardTrack(kind="video")
    now = time.monotonic()
    track.layer_at = [now, now, 0.0]  # the top layer is not arriving
    viewer.asked = 2
    track.pick_layer(viewer)
    assert viewer.want == 1, "the best layer arriving"
    viewer.asked = 0
    track.pick_layer(viewer)
    assert viewer.want == 0
    track.layer_at = [0.0, 0.0, now]
    track.pick_layer(viewer)
    assert viewer.want == 2, "only the top one arrives: better than nothing"

    # The viewer's own link: an estimate (RTCP REMB) well under its layer's rate, at two picks a
    # second apart, holds it one layer lower; a one-off dip does not; the cap lifts after a while.
    track.layer_at, track.layer_bps = [now] * 3, [150e3, 500e3, 1500e3]
    viewer.asked, viewer.layer = 2, 2
    viewer.note_estimate(2_000_000)
    track.pick_layer(viewer)
    assert viewer.want == 2 and viewer.cap is None

    def said(bps: int, at: float) -> None:  # the viewer's REMB, as note_estimate keeps it
        viewer.estimate_bps, viewer.estimate_at = bps, at

    said(600_000, now)
    track.step_down(viewer, now)
    track.step_down(viewer, now + 0.5)
    assert viewer.cap is None, "half a second of a low estimate is not congestion"
    said(2_000_000, now + 1.0)
    track.step_down(viewer, now + 1.0)
    said(600_000, now + 2.0)
    track.step_down(viewer, now + 2.0)
    track.step_down(viewer, now + 3.0)
    assert viewer.cap == 1
    track.pick_layer(viewer)
    assert viewer.want == 1, "stepped down"
    viewer.layer = 1
    said(600_000, now + 4.0)  # fine for the middle layer
    track.step_down(viewer, now + 4.0)
    assert viewer.cap == 1
    track.step_down(viewer, now + 3.0 + 10.5)  # RETRY_UP later
    assert viewer.cap is None


@pytest.mark.fast
def test_a_roster_from_a_linked_node_is_checked() -> None:
    """node/sfu/mirror.py: what a link announces is read back as sent; anything else is refused
    whole (the room then keeps the mirrors it had)."""
    from types import SimpleNamespace

    from livekit.protocol import models

    from node.sfu.mirror import (
        MAX_FIELD,
        ROSTER_TOPIC,
        read_roster,
        read_speakers,
        roster_packet,
        speakers_packet,
    )

    ann = SimpleNamespace(identity="ann", name="Ann", metadata="m", attributes={"a": "1"})
    packet = models.DataPacket.FromString(roster_packet([ann]))
    assert packet.user.topic == ROSTER_TOPIC
    assert read_roster(packet.user.payload) == [
        {"identity": "ann", "name": "Ann", "metadata": "m", "attributes": {"a": "1"}}
    ]
    for bad in (
        b"{}",
        b"[1]",
        b'[{"name": "no identity"}]',
        b'[{"identity": "x", "attributes": {"a": 1}}]',
        b'[{"identity": "x", "metadata": 5}]',
        b'[{"identity": "x", "metadata": "' + b"m" * (MAX_FIELD + 1) + b'"}]',
        b"not json",
        b"\xff\xfe",
    ):
        with pytest.raises(ValueError):
            read_roster(bad)
    said = models.DataPacket.FromString(speakers_packet({"ann": 30}))
    assert read_speakers(said.user.payload) == {"ann": 30}
    for bad in (b"[]", b'{"ann": 128}', b'{"ann": "loud"}', b'{"ann": -1}', b"{"):
        with pytest.raises(ValueError):
            read_speakers(bad)
