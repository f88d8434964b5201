"""How many subscribers one core of the SFU forwards to without loss, and the latency it adds.

Method
------
* The SFU role runs alone in its own process (``serve``): the real ``node.sfu`` role on aiohttp +
  aiortc, a static token issuer instead of the chain, no gateway. Python runs it on one thread, so
  the process is bounded by one core; its CPU time is read from ``/proc/<pid>/stat``.
* One publisher (this process) joins over the LiveKit signal protocol (``node.sfu.client``) and
  publishes one Opus-shaped stream: 50 packets/s of 80 bytes, each carrying a sequence number and
  the CLOCK_MONOTONIC send time (the SFU never looks inside the payload: it forwards, it does not
  decode). DTLS-SRTP, RTP and RTCP are real.
* ``--workers`` subscriber processes join N subscribers to the same room and receive through
  aiortc's passthrough, so the clients spend no time decoding. Each records, over the same
  ``--seconds`` window, the sequence numbers (loss = gaps) and the one-way latency from the
  publisher's hand-off to its RTP sender until the subscriber's receiver saw the packet.
* Latency through the node is compared with the same publisher streaming directly to one
  subscriber (no SFU): the difference of the percentiles is the latency the node adds.
* ``--video``: the publisher sends one video track instead: ``--video-kbps`` (1500) at 30 frames
  a second, each frame a numbered, timestamped payload that aiortc packetises as VP8 (about five
  RTP packets a frame at 1.5 Mbps); loss and latency are counted per frame, end to end (the SFU
  reassembles each frame, forwards it whole, and each subscriber's receiver reassembles it again).
* ``--simulcast`` (with ``--video``): the publisher sends three layers instead, rids q/h/f at a
  ninth, a third and all of ``--video-kbps``, as a camera's simulcast does (aiortc sends no
  simulcast: ``SimulcastPublisher`` adds the rids to its offer, two more senders to the track's
  transport and the rid header extension to every packet). Subscribers take the top layer (a
  viewer's default), so the node receives all three and forwards one; every frame counts as a
  keyframe (the payload's first byte is even), so a viewer starts at once.
* Steps of N run one after another; the answer is the largest N with zero lost packets while the
  SFU process stayed under ``--max-cpu`` of one core, and streams/core = N / (SFU CPU fraction).

Run: ``python bench/sfu.py --steps 50,100,200 --workers 2 --seconds 10``; give the machine enough
cores for the subscriber workers (they cost about what the SFU does), or the clients, not the node,
become the bottleneck. Output: one JSON line per step and a summary.

``--at-capacity`` runs the node as an operator does instead: it calibrates at start
(``node/sfu/calibration.py``, bounded by ``--capacity``, the config's value), and the one step
fills it to the capacity it advertises (the publisher and capacity - 1 subscribers), checks that
no packet was lost there, and that one more join is refused with ``no_capacity``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiortc import RTCRtpSender, RTCSessionDescription  # noqa: E402
from aiortc.rtcrtpparameters import (  # noqa: E402
    RTCRtpHeaderExtensionParameters,
    RTCRtpParameters,
    RTCRtpSendParameters,
)
from aiortc.rtp import HeaderExtensionsMap, RtpPacket, is_rtcp  # noqa: E402
from aiortc.sdp import SessionDescription  # noqa: E402
from livekit.protocol import rtc  # noqa: E402
from solders.keypair import Keypair  # noqa: E402

from node.sfu.client import LiveKitClient  # noqa: E402
from node.sfu.forward import REPAIRED_RID_URI, RID_URI, ForwardTrack, install_passthrough  # noqa: E402
from registry.tokens import Grant, mint_token  # noqa: E402

PAYLOAD = 80
PPS = 50
VIDEO_FPS = 30
HEADER = struct.Struct("!IQ")


# ---------------------------------------------------------------- the SFU process


async def serve(port: int, issuer: str, capacity: int, calibrate: bool) -> None:
    import logging

    from aiohttp import web

    from node.outbox import Outbox
    from node.roles import RoleContext
    from node.sfu import create_role
    from registry.tokens import TokenVerifier

    logging.basicConfig(level="WARNING")

    async def issuers() -> list[str]:
        return [issuer]

    node = Keypair()
    state = Path(tempfile.mkdtemp())
    context = RoleContext(
        "sfu",
        {"empty_timeout": 5, "speaker_interval": 1.0},
        node,
        TokenVerifier(issuers, "webrtc", cache_ttl=3600),
        "http://127.0.0.1",
        capacity,
        None,
        state,
        Outbox(state / "outbox.sqlite", None, node),
        calibrate=calibrate,
    )
    role = create_role(context)
    app = web.Application()
    role.routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await role.start()
    # tokens name the node they are for; the capacity is what the node advertises
    print(f"ready {node.pubkey()} {role.capacity}", flush=True)
    await asyncio.Event().wait()


# ---------------------------------------------------------------- publisher


class Pacer:
    """Feeds ForwardTracks with numbered frames: 50/s of 80 bytes (what an Opus publisher sends),
    or 30 frames a second of each track's ``kbps`` (simulcast layers share the numbers)."""

    def __init__(self, tracks: list[tuple[ForwardTrack, int]]) -> None:
        self.tracks, self.seq = tracks, 0
        video = tracks[0][1] > 0
        self.rate = VIDEO_FPS if video else PPS
        self.clock = 90000 if video else 48000

    async def run(self) -> None:
        start = time.monotonic()
        pads = [
            bytes((k * 1000 // 8 // VIDEO_FPS if k else PAYLOAD) - HEADER.size)
            for _, k in self.tracks
        ]
        while True:
            self.seq += 1
            head = HEADER.pack(self.seq, time.monotonic_ns())
            for (track, _), pad in zip(self.tracks, pads, strict=True):
                packet = av.Packet(head + pad)
                packet.pts = self.seq * self.clock // self.rate
                packet.time_base = Fraction(1, self.clock)
                track.push(packet)
            delay = start + self.seq / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


class SimulcastPublisher(LiveKitClient):
    """A simulcast camera made of aiortc, which sends none: the video m-line of the offer gets
    ``a=rid`` q/h/f and ``a=simulcast:send``, two more senders join the track's transport, and
    each packet leaves with its layer's rid (and a retransmission with its repaired rid)."""

    RIDS = ("q", "h", "f")
    RID_ID, REPAIRED_ID = 10, 11  # header extension ids no aiortc extension uses

    async def publish_layers(self, layers: list[ForwardTrack], timeout: float = 10.0) -> None:
        """``layers`` lowest first; the last is the track the SFU announces."""
        self._layers = layers
        await self.publish(layers[-1], "video", timeout)

    async def _negotiate_publisher(self, timeout: float) -> None:
        self._answer = asyncio.get_running_loop().create_future()
        await self.publisher.setLocalDescription(await self.publisher.createOffer())
        self._offer_id += 1
        offer = self.publisher.localDescription.sdp
        video = offer.index("m=video")
        end = offer.find("m=", video + 1)
        end = len(offer) if end == -1 else end
        lines = [
            f"a=extmap:{self.RID_ID} {RID_URI}",
            f"a=extmap:{self.REPAIRED_ID} {REPAIRED_RID_URI}",
            *(f"a=rid:{r} send" for r in self.RIDS),
            f"a=simulcast:send {';'.join(self.RIDS)}",
        ]
        sdp = offer[:end] + "".join(line + "\r\n" for line in lines) + offer[end:]
        await self.send(
            rtc.SignalRequest(
                offer=rtc.SessionDescription(type="offer", sdp=sdp, id=self._offer_id)
            )
        )
        answer = await asyncio.wait_for(self._answer, timeout)
        assert "a=simulcast:recv q;h;f" in answer, "the node refused simulcast"
        await self.publisher.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await self._start_layers(SessionDescription.parse(answer))

    async def _start_layers(self, answer: SessionDescription) -> None:
        (transceiver,) = [t for t in self.publisher.getTransceivers() if t.kind == "video"]
        main = transceiver.sender
        extensions = transceiver._headerExtensions + [
            RTCRtpHeaderExtensionParameters(id=self.RID_ID, uri=RID_URI),
            RTCRtpHeaderExtensionParameters(id=self.REPAIRED_ID, uri=REPAIRED_RID_URI),
        ]
        stamp: dict[int, tuple[str, str]] = {}
        senders = [main]
        for track in self._layers[:-1]:
            sender = RTCRtpSender(track, main.transport)
            params = RTCRtpSendParameters(
                codecs=transceiver._codecs, headerExtensions=extensions, muxId=transceiver.mid
            )
            params.rtcp.cname, params.rtcp.ssrc, params.rtcp.mux = "bench", sender._ssrc, True
            await sender.send(params)
            senders.insert(-1, sender)
        for rid, sender in zip(self.RIDS, senders, strict=True):
            stamp[sender._ssrc] = ("rtp_stream_id", rid)
            stamp[sender._rtx_ssrc] = ("repaired_rtp_stream_id", rid)
        names = HeaderExtensionsMap()
        names.configure(RTCRtpParameters(headerExtensions=extensions))
        dtls = main.transport
        send_rtp = dtls._send_rtp

        async def stamped(data: bytes) -> None:
            if not is_rtcp(data):
                packet = RtpPacket.parse(data, names)
                field, rid = stamp.get(packet.ssrc, ("", ""))
                if field:
                    setattr(packet.extensions, field, rid)
                    data = packet.serialize(names)
            await send_rtp(data)

        dtls._send_rtp = stamped


class Recorder:
    def __init__(self) -> None:
        self.window: tuple[float, float] | None = None
        self.seqs: list[int] = []
        self.latency_ms: list[float] = []
        self.total = 0
        self.bytes = 0  # inside the window: which simulcast layer a subscriber got

    def on_frame(self, packet: av.Packet) -> None:
        self.total += 1
        now = time.monotonic()
        if self.window is None or not self.window[0] <= now < self.window[1]:
            return
        data = bytes(packet)
        seq, sent = HEADER.unpack_from(data)
        self.bytes += len(data)
        self.seqs.append(seq)
        self.latency_ms.append((time.monotonic_ns() - sent) / 1e6)

    def lost(self) -> int:
        if not self.seqs:
            return -1
        return (max(self.seqs) - min(self.seqs) + 1) - len(set(self.seqs))


# ---------------------------------------------------------------- subscriber worker


async def subscribers(url: str, tokens: list[str], settle: float, seconds: float) -> dict[str, Any]:
    recorders: list[Recorder] = []
    clients: list[LiveKitClient] = []
    gate = asyncio.Semaphore(8)

    async def join(token: str) -> None:
        recorder = Recorder()
        recorders.append(recorder)

        def on_track(track_sid: str, owner: str, receiver: Any) -> None:
            install_passthrough(receiver, recorder.on_frame)

        client = LiveKitClient(url, token, on_track=on_track)
        clients.append(client)
        async with gate:
            await client.connect()

    await asyncio.gather(*(join(t) for t in tokens))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(r.total == 0 for r in recorders):
        await asyncio.sleep(0.2)
    receiving = sum(1 for r in recorders if r.total)
    print("ready", flush=True)
    start = time.monotonic() + settle
    for r in recorders:
        r.window = (start, start + seconds)
    await asyncio.sleep(settle + seconds + 0.5)
    result = {
        "subscribers": len(recorders),
        "receiving": receiving,
        "lost": sum(max(0, r.lost()) for r in recorders),
        "silent": sum(1 for r in recorders if not r.seqs),
        "packets": sum(len(r.seqs) for r in recorders),
        "kbps": [round(r.bytes * 8 / seconds / 1000) for r in recorders],
        "latency_ms": [x for r in recorders for x in r.latency_ms[::5]],
    }
    for c in clients:
        await c.close()
    return result


# ---------------------------------------------------------------- direct baseline


async def direct_baseline(seconds: float, video_kbps: int) -> list[float]:
    from aiortc import RTCConfiguration, RTCPeerConnection

    cfg = RTCConfiguration(iceServers=[])
    pub, sub = RTCPeerConnection(cfg), RTCPeerConnection(cfg)
    track = ForwardTrack(max_queue=50, kind="video" if video_kbps else "audio")
    recorder = Recorder()

    @sub.on("track")
    def on_track(t: Any) -> None:
        receiver = next(x.receiver for x in sub.getTransceivers() if x.receiver.track is t)
        install_passthrough(receiver, recorder.on_frame)

    pub.addTrack(track)
    await pub.setLocalDescription(await pub.createOffer())
    await sub.setRemoteDescription(pub.localDescription)
    await sub.setLocalDescription(await sub.createAnswer())
    await pub.setRemoteDescription(sub.localDescription)
    pacer = asyncio.ensure_future(Pacer([(track, video_kbps)]).run())
    await asyncio.sleep(2)
    recorder.window = (time.monotonic(), time.monotonic() + seconds)
    await asyncio.sleep(seconds)
    pacer.cancel()
    await pub.close()
    await sub.close()
    return recorder.latency_ms


# ---------------------------------------------------------------- orchestration


async def refused(url: str, issuer: Keypair, room: str, node_key: str) -> str:
    """What one more join gets from a node at capacity: its validate answer and the status of
    the WebSocket upgrade (a join that gets in is reported, and left at once)."""
    import aiohttp

    token = mint_token(issuer, "one-more", Grant("webrtc", room=room), 3600, audience=node_key)
    http_url = url.replace("ws://", "http://")
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{http_url}/rtc/validate", params={"access_token": token}) as resp,
    ):
        reason = f"{resp.status} {await resp.text()}"
    client = LiveKitClient(url, token)
    try:
        await client.connect()
    except aiohttp.WSServerHandshakeError as exc:
        return f"refused: upgrade {exc.status}; validate {reason}"
    finally:
        await client.close()
    return f"ADMITTED beyond capacity (validate said {reason})"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else float("nan")


async def run(args: argparse.Namespace) -> None:
    issuer = Keypair()
    port = args.port
    serve_args = ["--port", str(port), "--issuer", str(issuer.pubkey())]
    if args.at_capacity:
        serve_args += ["--capacity", str(args.capacity), "--calibrate"]
    server = subprocess.Popen(
        [sys.executable, __file__, "serve", *serve_args], stdout=subprocess.PIPE, cwd=ROOT
    )
    assert server.stdout is not None
    ready, node_key, advertised = server.stdout.readline().decode().split()
    assert ready == "ready"
    if args.at_capacity:
        args.steps = [int(advertised) - 1]  # the publisher is a participant too
        print(
            json.dumps({"advertised_capacity": int(advertised), "config_capacity": args.capacity}),
            flush=True,
        )
    url = f"ws://127.0.0.1:{port}"
    room = "bench"
    kbps = args.video_kbps if args.video else 0
    base = await direct_baseline(args.seconds, kbps)
    base50, base95 = pct(base, 50), pct(base, 95)
    print(json.dumps({"baseline_direct_ms": {"p50": base50, "p95": base95}}), flush=True)

    kind = "video" if kbps else "audio"
    token = mint_token(issuer, "publisher", Grant("webrtc", room=room), 3600, audience=node_key)
    if kbps and args.simulcast:
        layers = [(ForwardTrack(max_queue=50, kind=kind), kbps // d) for d in (9, 3, 1)]
        publisher: LiveKitClient = SimulcastPublisher(url, token)
        await publisher.connect()
        await publisher.publish_layers([track for track, _ in layers])
    else:
        layers = [(ForwardTrack(track_id=f"bench-{kind}", max_queue=50, kind=kind), kbps)]
        publisher = LiveKitClient(url, token)
        await publisher.connect()
        await publisher.publish(layers[0][0], kind)
    pacer = asyncio.ensure_future(Pacer(layers).run())
    summary = []
    try:
        for n in args.steps:
            per = [
                n // args.workers + (1 if i < n % args.workers else 0) for i in range(args.workers)
            ]
            spec = []
            for w, count in enumerate(per):
                spec.append(
                    [
                        mint_token(
                            issuer,
                            f"s{n}-{w}-{i}",
                            Grant("webrtc", room=room, can_publish=False),
                            3600,
                            audience=node_key,
                        )
                        for i in range(count)
                    ]
                )
            workers = []
            for tokens in spec:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "subscribe",
                    "--url",
                    url,
                    "--settle",
                    str(args.settle),
                    "--seconds",
                    str(args.seconds),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    cwd=ROOT,
                    limit=1 << 26,
                )
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(tokens).encode() + b"\n")
                await proc.stdin.drain()
                proc.stdin.close()
                workers.append(proc)
            for proc in workers:
                assert proc.stdout is not None
                line = await proc.stdout.readline()
                assert line.strip() == b"ready", line
            await asyncio.sleep(args.settle)
            one_more = await refused(url, issuer, room, node_key) if args.at_capacity else None
            cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
            await asyncio.sleep(args.seconds)
            cpu = (cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0)
            results = []
            for proc in workers:
                assert proc.stdout is not None
                results.append(json.loads(await proc.stdout.readline()))
                await proc.wait()
            lat = [x for r in results for x in r["latency_ms"]]
            expected = n * (VIDEO_FPS if kbps else PPS) * args.seconds
            packets = sum(r["packets"] for r in results)
            step = {
                "media": (
                    f"video {kbps} kbps, {VIDEO_FPS} fps"
                    + (
                        f", simulcast {'/'.join(str(k) for _, k in layers)} kbps"
                        if len(layers) > 1
                        else ""
                    )
                    if kbps
                    else "audio 50 pps"
                ),
                "subscribers": n,
                "receiving": sum(r["receiving"] for r in results),
                # Fewer packets than sent inside the window (or seconds of latency) means the
                # subscriber processes, not the SFU, fell behind: the step says nothing of the SFU.
                "clients_kept_up": packets >= 0.97 * expected and pct(lat, 95) < 200,
                "expected_packets": expected,
                "silent": sum(r["silent"] for r in results),
                "lost_packets": sum(r["lost"] for r in results),
                "packets": packets,
                "kbps_per_subscriber": pct([k for r in results for k in r["kbps"]], 50),
                "sfu_cpu_core_fraction": round(cpu, 3),
                "streams_per_core": round(n / cpu) if cpu > 0 else None,
                "latency_ms": {"p50": pct(lat, 50), "p95": pct(lat, 95)},
                "added_latency_ms": {
                    "p50": round(pct(lat, 50) - base50, 2),
                    "p95": round(pct(lat, 95) - base95, 2),
                },
            }
            if one_more is not None:
                step["participants"] = n + 1
                step["one_more_join"] = one_more
            print(json.dumps(step), flush=True)
            summary.append(step)
            await asyncio.sleep(6)  # the SFU notices the departures (pc close) before the next step
    finally:
        pacer.cancel()
        await publisher.close()
        server.terminate()
        server.wait()
    clean = [
        s
        for s in summary
        if s["lost_packets"] == 0
        and s["silent"] == 0
        and s["clients_kept_up"]
        and s["sfu_cpu_core_fraction"] <= args.max_cpu
    ]
    marginal = None
    if len(clean) >= 2:  # CPU per extra stream, without the fixed cost of the publisher and loop
        lo, hi = clean[0], clean[-1]
        extra = (hi["sfu_cpu_core_fraction"] - lo["sfu_cpu_core_fraction"]) / (
            hi["subscribers"] - lo["subscribers"]
        )
        marginal = round(1 / extra) if extra > 0 else None
    best = max(clean, key=lambda s: s["subscribers"]) if clean else None
    print(
        json.dumps(
            {
                "summary": {
                    "max_subscribers_without_loss": best["subscribers"] if best else 0,
                    "sfu_cpu_at_that_load": best["sfu_cpu_core_fraction"] if best else None,
                    "streams_per_core_at_that_load": best["streams_per_core"] if best else None,
                    "streams_per_core_marginal": marginal,
                    "added_latency_ms": best["added_latency_ms"] if best else None,
                    "cpu_count": os.cpu_count(),
                }
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--issuer", required=True)
    s.add_argument("--capacity", type=int, default=100000)
    s.add_argument("--calibrate", action="store_true")
    w = sub.add_parser("subscribe")
    w.add_argument("--url", required=True)
    w.add_argument("--settle", type=float, default=2)
    w.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--steps", default="25,50,100")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--settle", type=float, default=2)
    parser.add_argument("--max-cpu", type=float, default=0.9)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--at-capacity",
        action="store_true",
        help="calibrate the node and fill it to what it advertises (see the docstring)",
    )
    parser.add_argument("--capacity", type=int, default=16, help="the config's bound")
    parser.add_argument("--video", action="store_true", help="one video publisher (see above)")
    parser.add_argument("--video-kbps", type=int, default=1500)
    parser.add_argument("--simulcast", action="store_true", help="three layers (see above)")
    args = parser.parse_args()
    if args.cmd == "serve":
        asyncio.run(serve(args.port, args.issuer, args.capacity, args.calibrate))
    elif args.cmd == "subscribe":
        tokens = json.loads(sys.stdin.readline())
        result = asyncio.run(subscribers(args.url, tokens, args.settle, args.seconds))
        print(json.dumps(result), flush=True)
    else:
        args.steps = [int(x) for x in args.steps.split(",")]
        if not args.port:
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                args.port = sock.getsockname()[1]
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
