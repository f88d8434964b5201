"""STT benchmark: engine RTF, end-of-speech latency, interim cadence, streams per core.

    .venv/bin/python bench/stt.py [--streams 1,2,4,6,8,12] [--utterances 8] [--quick]

Method. Speech is Kokoro-82M (tests/support/speech.py, cached under .local/cache/stt-speech).
1. RTF: each engine/model transcribes every corpus sentence whole (wall time / audio time), and
   the front end (Silero VAD + GTCRN) is timed over the same audio.
2. Latency: the STT role runs in-process on a real aiohttp WebSocket (tokens from a local issuer,
   usage kept in a local outbox); a client streams sentences separated by 1.5 s of silence in
   20 ms frames in real time and measures, client side, the time from the ``speech_end`` event
   to the final transcript, and from the end of speech itself (the event's ``audio_time`` on the
   client's send clock; this includes the end-of-utterance silence), p50/p95, and the interval
   between interim results during speech. The node starts the final's inference once the pause
   reaches speech_pad_ms (300 ms), so the final is often ready when speech_end is declared.
3. Capacity: k clients stream concurrently in real time (k from --streams); the largest k whose
   p50 latency from the end of speech stays under twice the single-stream value (and that drops
   no utterance) is the capacity, divided by the cores this process may use.
4. ``--at-capacity``: the node calibrates at start as a real node does (node/capacity.py;
   ``--capacity`` is the config's bound); exactly the streams it advertises run in real time
   (every final delivered, p50 from the end of speech under twice the single-stream value), and
   one more client, connecting meanwhile, must get ``server_full``.
All numbers depend on the machine and on whatever else runs on it: the report prints the load.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp
import numpy as np
from aiohttp import web
from solders.keypair import Keypair

from node.outbox import Outbox
from node.roles import RoleContext
from node.stt.engines import ParakeetEngine, WhisperEngine
from node.stt.frontend import FrontEnd
from node.stt.models import Models
from node.stt.role import STTRole
from node.stt.settings import load_settings
from registry.tokens import Grant, TokenVerifier, mint_token
from tests.conftest import free_port
from tests.support.speech import corpus, pcm16, silence


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(int(round(q * (len(v) - 1))), len(v) - 1)]


def rtf_table(sentences: list[tuple[str, np.ndarray]], models: Models, device: str) -> None:
    audio_s = sum(len(a) for _, a in sentences) / 16000
    print(
        f"\n1. Real-time factor (inference time / audio time), {len(sentences)} sentences, "
        f"{audio_s:.0f} s of speech, device {device}"
    )
    for name in ("tiny.en", "base"):
        engine = WhisperEngine([name], device=device)
        engine.load()
        for words in (False, True):
            t, c = time.perf_counter(), time.process_time()
            for _, a in sentences:
                engine.transcribe(a, "en", word_timestamps=words)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            flag = "on " if words else "off"
            print(
                f"   whisper {name:8s} {engine.compute_type:13s} words={flag}"
                f"  RTF {wall / audio_s:.3f} wall, {cpu / audio_s:.3f} CPU-s/s"
                f"  ({1000 * wall / len(sentences):.0f} ms/utterance)"
            )
    try:
        ParakeetEngine().load()
    except Exception as exc:
        print(f"   parakeet: not measured ({str(exc).split(';')[0]})")
    fe = FrontEnd(models.silero, models.gtcrn, models_vad(), 300, None)
    t, c = time.perf_counter(), time.process_time()
    for _, a in sentences:
        for i in range(0, len(a), 320):
            fe.feed(a[i : i + 320])
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    print(
        f"   front end (Silero VAD + GTCRN, 20 ms frames)  RTF {wall / audio_s:.3f} wall, "
        f"{cpu / audio_s:.3f} CPU-s/s"
    )


def models_vad():
    from node.stt.vad import VadConfig

    return VadConfig()


class LocalNode:
    def __init__(
        self,
        models: Models,
        settings: dict[str, Any],
        capacity: int = 64,
        calibrate: bool = False,
    ) -> None:
        self.issuer = Keypair()
        self.models, self.settings, self.capacity = models, settings, capacity
        self.calibrate = calibrate

    async def __aenter__(self) -> LocalNode:
        import tempfile

        self.tmp = tempfile.TemporaryDirectory()
        issuer = str(self.issuer.pubkey())

        async def issuers() -> list[str]:
            return [issuer]

        key = self.node_key = Keypair()
        self.outbox = Outbox(Path(self.tmp.name) / "outbox.sqlite", None, key)
        port = free_port()
        ctx = RoleContext(
            "stt",
            self.settings,
            key,
            TokenVerifier(issuers, "stt"),
            f"http://127.0.0.1:{port}",
            self.capacity,
            None,
            self.tmp.name,
            self.outbox,
            calibrate=self.calibrate,
        )
        self.role = STTRole(ctx, load_settings(self.settings), self.models)
        app = web.Application()
        self.role.routes(app)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        await self.role.start()
        self.url = f"ws://127.0.0.1:{port}/v1/stream"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.role.stop()
        await self.runner.cleanup()
        self.tmp.cleanup()

    def token(self) -> str:
        return mint_token(
            self.issuer,
            "bench",
            Grant("stt", limit=3600),
            3600,
            audience=str(self.node_key.pubkey()),
        )


async def one_stream(
    node: LocalNode, audio: np.ndarray, expected: int, start_delay: float = 0.0
) -> dict[str, Any]:
    await asyncio.sleep(start_delay)
    latencies: list[float] = []
    eos: list[float] = []  # from the end of speech itself (audio time) to the final
    interims: list[float] = []
    finals = 0
    speech_end_at: list[float] = []
    speech_end_audio: list[float] = []
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http, http.ws_connect(node.url) as ws:
        await ws.send_json({"type": "config", "session_key": node.token(), "language": "en"})
        msg = json.loads((await ws.receive()).data)
        assert msg["type"] == "ready", msg

        async def reader() -> None:
            nonlocal finals
            async for m in ws:
                data = json.loads(m.data)
                now = time.monotonic()
                if data["type"] == "vad_event" and data["event"] == "speech_end":
                    speech_end_at.append(now)
                    speech_end_audio.append(data["audio_time"])
                elif data["type"] == "transcription":
                    if data["is_final"]:
                        finals += 1
                        if speech_end_at:
                            latencies.append(now - speech_end_at[-1])
                            eos.append(now - (t0 + speech_end_audio[-1]))
                        if finals >= expected:
                            return
                    else:
                        interims.append(now)
                elif data["type"] == "error":
                    print("   error:", data)

        task = asyncio.create_task(reader())
        data = pcm16(audio)
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(data), 640)):
            await ws.send_bytes(data[i : i + 640])
            delay = t0 + (k + 1) * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        try:
            await asyncio.wait_for(task, 10)
        except TimeoutError:
            task.cancel()
    gaps = [b - a for a, b in itertools.pairwise(interims) if b - a < 3]
    return {
        "latencies": latencies,
        "eos": eos,
        "finals": finals,
        "interim_gaps": gaps,
        "interims": len(interims),
    }


async def one_more(node: LocalNode, after: float) -> str:
    """What a client connecting ``after`` seconds into the run is told by the node."""
    await asyncio.sleep(after)
    async with aiohttp.ClientSession() as http, http.ws_connect(node.url) as ws:
        await ws.send_json({"type": "config", "session_key": node.token(), "language": "en"})
        msg = json.loads((await ws.receive()).data)
    return f"{msg['error']}: {msg['message']}" if msg["type"] == "error" else msg["type"]


async def latency_run(
    models: Models,
    sentences: list[tuple[str, np.ndarray]],
    streams: int,
    eou_ms: float,
    n_utt: int,
    node_options: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """``streams`` real-time clients; ``streams=0``: as many as the node advertises, and one more
    client that connects meanwhile (its answer is ``one_more``)."""
    chosen = sentences[:n_utt]
    audio = np.concatenate([np.concatenate([a, silence(1.5)]) for _, a in chosen])
    settings = {"vad": {"end_of_utterance_ms": eou_ms}, **extra}
    async with LocalNode(models, settings, **(node_options or {})) as node:
        extra_client = []
        if streams == 0:
            streams = node.role.capacity
            extra_client = [one_more(node, 0.37 * streams + 1.0)]
        t, c = time.perf_counter(), time.process_time()
        *results, told = await asyncio.gather(
            *[one_stream(node, audio, len(chosen), start_delay=0.37 * k) for k in range(streams)],
            *(extra_client or [asyncio.sleep(0)]),
        )
        stats = dict(node.role.stats)
    cores_used = (time.process_time() - c) / (time.perf_counter() - t)
    lat = [x for r in results for x in r["latencies"]]
    eos = [x for r in results for x in r["eos"]]
    gaps = [x for r in results for x in r["interim_gaps"]]
    return {
        "p50": pct(lat, 0.5),
        "p95": pct(lat, 0.95),
        "n": len(lat),
        "eos50": pct(eos, 0.5),
        "eos95": pct(eos, 0.95),
        "finals": sum(r["finals"] for r in results),
        "expected": len(chosen) * streams,
        "gap": statistics.median(gaps) if gaps else float("nan"),
        "interims": sum(r["interims"] for r in results),
        "cores": cores_used,
        "stats": stats,
        "streams": streams,
        "one_more": told if extra_client else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default="1,4,8,12,16,20")
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--eou-ms", type=float, default=500)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer sentences and steps")
    parser.add_argument(
        "--at-capacity",
        action="store_true",
        help="also run the calibrated node at the streams it advertises (see the docstring)",
    )
    parser.add_argument("--capacity", type=int, default=32, help="the config's bound")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    sentences = corpus()
    if args.quick:
        sentences, args.utterances, args.streams = sentences[:8], 4, "1,4,8"
    print(f"STT bench: {cores} cores, load average {os.getloadavg()[0]:.1f} at start")
    models = Models(load_settings({"whisper": {"models": ["tiny.en"], "device": args.device}}))
    models.load()
    rtf_table(sentences, models, args.device)

    print(
        f"\n2. Latency, speech_end -> final (tiny.en, end-of-utterance silence "
        f"{args.eou_ms:.0f} ms, real-time 20 ms frames, {args.utterances} utterances)"
    )
    base = asyncio.run(latency_run(models, sentences, 1, args.eou_ms, args.utterances))
    print(
        f"   1 stream: p50 {1000 * base['p50']:.0f} ms, p95 {1000 * base['p95']:.0f} ms "
        f"after the speech_end event; from the end of speech itself p50 "
        f"{1000 * base['eos50']:.0f} ms, p95 {1000 * base['eos95']:.0f} ms "
        f"({base['finals']}/{base['expected']} finals); this process used "
        f"{base['cores']:.2f} cores (client included)"
    )
    st = base["stats"]
    print(
        f"   early finals (inference started in the pause at speech_pad_ms): "
        f"{st['early_used']} used of {st['early_started']} started"
    )
    late = asyncio.run(
        latency_run(models, sentences, 1, args.eou_ms, args.utterances, speculative_finals=False)
    )
    print(
        f"   without early finals: p50 {1000 * late['p50']:.0f} ms, p95 "
        f"{1000 * late['p95']:.0f} ms after speech_end; from the end of speech p50 "
        f"{1000 * late['eos50']:.0f} ms, p95 {1000 * late['eos95']:.0f} ms"
    )
    print(
        f"\n3. Interim results: {base['interims']} partials, median interval "
        f"{1000 * base['gap']:.0f} ms while speech goes on (setting 1000 ms)"
    )

    print(
        "\n4. Concurrent real-time streams (latency after speech_end p50/p95; from the end of "
        "speech p50/p95; finals delivered)"
    )
    limit = 2 * base["eos50"]
    best = 1
    for k in [int(x) for x in args.streams.split(",")]:
        r = asyncio.run(latency_run(models, sentences, k, args.eou_ms, args.utterances))
        ok = r["eos50"] <= limit and r["finals"] >= r["expected"]
        print(
            f"   {k:3d} streams: {1000 * r['p50']:.0f}/{1000 * r['p95']:.0f} ms; "
            f"{1000 * r['eos50']:.0f}/{1000 * r['eos95']:.0f} ms, "
            f"finals {r['finals']}/{r['expected']}, {r['cores']:.2f} cores used, "
            f"{r['interims']} partials  {'ok' if ok else 'over'}"
        )
        if ok:
            best = max(best, k)
        else:
            break
    print(
        f"\n   capacity: {best} real-time streams on {cores} cores before the p50 latency from "
        f"the end of speech doubles (> {1000 * limit:.0f} ms) = {best / cores:.1f} "
        "streams per core"
    )
    if args.at_capacity:
        r = asyncio.run(
            latency_run(
                models,
                sentences,
                0,
                args.eou_ms,
                args.utterances,
                node_options={"capacity": args.capacity, "calibrate": True},
            )
        )
        ok = r["eos50"] <= limit and r["finals"] >= r["expected"]
        print(
            f"\n5. At the advertised capacity: the node calibrated to {r['streams']} streams "
            f"(config bound {args.capacity}); {1000 * r['eos50']:.0f}/{1000 * r['eos95']:.0f} ms "
            f"from the end of speech, finals {r['finals']}/{r['expected']}, "
            f"{'kept real time' if ok else 'FELL BEHIND'}; one more client was told "
            f"{r['one_more']!r}"
        )
    print(f"   load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
