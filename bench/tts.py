"""TTS node figures: time to first audio, real-time factor, real-time streams per core.

    .venv/bin/python bench/tts.py [--runs 10] [--capacity 16] [--threads 0]

Runs the TTS role in-process on a real WebSocket server (node/tts/harness.py) with the real
Kokoro-82M int8 weights, and prints, in the same run:

* engine: the raw engine's synthesis time for the very first clause the node would speak;
* TTFA p50/p95 for a one-sentence reply and for a long text, measured at the client from sending
  the text to the first audio frame, and the node's overhead over the engine's first-clause time;
* RTF: engine compute time / audio duration over a long text, segment by segment as the node does;
* capacity: the node calibrates at start as a real node does (node/capacity.py; --capacity is the
  config's upper bound) and advertises what it measured; then as many clients as it advertises
  speak ~25 s each at once, and one more client tries to join while they play. It prints the
  underruns (a frame that ran late after the first) and whether the extra client got
  ``server_full``: the advertised capacity is true when there are none and it did;
* conversations: as many streams as it advertises, started together, each speaking ``--turns``
  replies of one or two sentences with 1-3 s of listening between (an agent's side of a call):
  underruns, and each stream's time to first audio over its replies.

The CPU is shared on dev machines: run it on a quiet box for numbers you quote.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from solders.keypair import Keypair

from node.tts.engine import create_engine
from node.tts.harness import RoleServer
from node.tts.segments import plan_segments
from node.tts.voices import VoiceSpec

SHORT = [
    "Sure, I can help you with that right away.",
    "The meeting has been moved to three o'clock tomorrow.",
    "Your order will arrive on Friday afternoon.",
    "I think that is a great idea for the weekend.",
    "Let me check the schedule and get back to you.",
]
LONG = (
    "Thanks for calling. I have looked at your account and everything seems to be in order. "
    "Your last payment arrived on the fifth, and the next one is due at the end of the month. "
    "If you would like, I can set up an automatic payment so that you never have to think about "
    "it again. It only takes a minute, and you can cancel it at any time from the app or by "
    "calling us. Is there anything else I can help you with today?"
)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def open_stream(
    srv: RoleServer, http: aiohttp.ClientSession
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    """A socket to the node with a fresh session key sent; the node's answer (``ready``, or an
    error such as ``server_full``)."""
    ws = await http.ws_connect(srv.url)
    await ws.send_json({"session_key": srv.token()})
    return ws, json.loads((await ws.receive(timeout=30)).data)


def gaps_since(srv: RoleServer, before: dict[str, float]) -> tuple[int, float]:
    """(underruns, stall seconds) since the node's stats were ``before``."""
    now = srv.role.stats
    underruns = int(now["underruns"] - before["underruns"])
    return underruns, now["stall_seconds"] - before["stall_seconds"]


async def first_audio(
    srv: RoleServer, http: aiohttp.ClientSession, text: str
) -> tuple[float, float]:
    """(time to first audio frame, audio seconds) for one text on a fresh socket."""
    ws, answer = await open_stream(srv, http)
    assert answer["type"] == "ready"
    t0 = time.perf_counter()
    await ws.send_json({"text": text})
    ttfa = None
    frames = 0
    while True:
        m = await ws.receive(timeout=120)
        if m.type == aiohttp.WSMsgType.BINARY:
            if ttfa is None:
                ttfa = time.perf_counter() - t0
                await ws.send_json({"type": "clear"})  # only the first audio matters here
            frames += 1
        elif json.loads(m.data)["type"] in ("done", "cleared"):
            break
    await ws.close()
    return ttfa or float("nan"), frames * 0.02


async def one_more(srv: RoleServer, http: aiohttp.ClientSession) -> str:
    """Try to open one more stream; what the node answered."""
    ws, msg = await open_stream(srv, http)
    closing = await ws.receive(timeout=10)
    await ws.close()
    if msg.get("error") == "server_full":
        return f"refused cleanly: server_full, close code {closing.data}"
    return f"NOT refused: {msg}"


async def speak(ws: aiohttp.ClientWebSocketResponse, text: str) -> float:
    """Send ``text`` and play it to ``done``; the time from sending it to its first audio frame."""
    t0 = time.perf_counter()
    await ws.send_json({"text": text})
    ttfa = None
    while True:
        m = await ws.receive(timeout=300)
        if m.type == aiohttp.WSMsgType.BINARY:
            ttfa = ttfa or time.perf_counter() - t0
        elif json.loads(m.data)["type"] == "done":
            return ttfa or float("nan")


async def stream_trial(
    srv: RoleServer, k: int, text: str, stagger: float = 0.0
) -> tuple[int, float, list[float], str]:
    """K streams, the i-th starting ``i * stagger`` seconds after the first, and, once they all
    play, one more; returns (underruns, stall seconds, TTFAs, what the extra client got)."""
    before = dict(srv.role.stats)
    async with aiohttp.ClientSession() as http:

        async def one(delay: float) -> float:
            await asyncio.sleep(delay)
            ws, _ = await open_stream(srv, http)
            ttfa = await speak(ws, text)
            await ws.close()
            return ttfa

        streams = [asyncio.ensure_future(one(i * stagger)) for i in range(k)]
        while srv.role.load() < k and not any(t.done() for t in streams):
            await asyncio.sleep(0.05)
        extra = await one_more(srv, http)
        ttfas = await asyncio.gather(*streams)
    return (*gaps_since(srv, before), list(ttfas), extra)


REPLIES = [*SHORT, *(f"{a} {b}" for a, b in zip(SHORT, SHORT[1:], strict=False))]


async def conversation_trial(
    srv: RoleServer, k: int, turns: int, seed: int = 1
) -> tuple[int, float, list[list[float]]]:
    """K streams started together, each an agent's side of a conversation: a reply of one or two
    sentences, played to the end, then 1-3 s of listening, ``turns`` times. Returns (underruns,
    stall seconds, each stream's TTFAs)."""
    before = dict(srv.role.stats)
    rng = random.Random(seed)
    plans = [[(rng.choice(REPLIES), rng.uniform(1.0, 3.0)) for _ in range(turns)] for _ in range(k)]
    async with aiohttp.ClientSession() as http:

        async def one(plan: list[tuple[str, float]]) -> list[float]:
            ws, _ = await open_stream(srv, http)
            ttfas = []
            for text, listen in plan:
                ttfas.append(await speak(ws, text))
                await asyncio.sleep(listen)
            await ws.close()
            return ttfas

        per_stream = await asyncio.gather(*(one(p) for p in plans))
    return (*gaps_since(srv, before), list(per_stream))


async def main_async(args: argparse.Namespace) -> None:
    cores = os.cpu_count() or 1
    t = time.perf_counter()
    engine = create_engine("kokoro-onnx", threads=args.threads)
    print(
        f"engine kokoro-onnx int8, providers {engine.providers}, {cores} cores, "
        f"loaded in {time.perf_counter() - t:.1f} s"
    )
    voice = VoiceSpec.parse("af_heart")
    engine.synthesize("Warm up.", voice, 1.0)

    # raw engine: first clause of each text, and RTF over the long text
    def engine_first(text: str) -> tuple[str, float]:
        seg = plan_segments(text, "a", engine, narrow=True)[0].text  # as a multi-core node plans
        t0 = time.perf_counter()
        engine.synthesize(seg, voice, 1.0)
        return seg, time.perf_counter() - t0

    import tempfile

    with (
        tempfile.TemporaryDirectory() as tmp,
        RoleServer(
            engine,
            Keypair(),
            Path(tmp),
            settings={"warmup": False},
            capacity=args.capacity,
            calibrate=True,
        ) as srv,
    ):
        cal = srv.role.context.calibration
        print(
            f"calibration: {cal.cost:.2f} core-seconds per second of speech (one thread per "
            f"inference) on {cal.cores} cores -> advertises {srv.role.capacity} streams "
            f"(config upper bound {args.capacity}); scheduler: {srv.role.scheduler.workers} "
            "workers"
        )
        async with aiohttp.ClientSession() as http:
            rows = {}
            inner = {}
            for label, texts in (("short", SHORT), ("long", [LONG])):
                ttfas, raws = [], []
                mark = len(srv.role.first_audio)
                for i in range(args.runs):
                    text = texts[i % len(texts)]
                    seg, raw = engine_first(text)
                    ttfa, _ = await first_audio(srv, http, text)
                    # let the cleared stream's segment in flight finish before the next run
                    await asyncio.wrap_future(
                        asyncio.run_coroutine_threadsafe(srv.role.scheduler.idle(), srv.loop)
                    )
                    ttfas.append(ttfa)
                    raws.append(raw)
                rows[label] = (ttfas, raws, seg)
                inner[label] = list(srv.role.first_audio)[mark:]
            print(
                "\ntime to first audio (client: text sent -> first 20 ms frame), "
                f"{args.runs} runs each"
            )
            for label, (ttfas, raws, seg) in rows.items():
                over = statistics.median(ttfas) - statistics.median(raws)
                print(
                    f"  {label:5s} TTFA p50 {pct(ttfas, 50) * 1000:6.0f} ms"
                    f"  p95 {pct(ttfas, 95) * 1000:6.0f} ms"
                    f" | engine first clause p50 {pct(raws, 50) * 1000:6.0f} ms"
                    f" p95 {pct(raws, 95) * 1000:6.0f} ms"
                    f" | node overhead p50 {over * 1000:+5.0f} ms"
                    f"  (e.g. first clause {seg!r})"
                )
            print(
                "  inside the node, same runs (text received -> first frame sent, vs the engine's "
                "time for that very first clause):"
            )
            for label, pairs in inner.items():
                node = [a for a, _ in pairs]
                over = [a - b for a, b in pairs]
                print(
                    f"  {label:5s} node TTFA p50 {pct(node, 50) * 1000:6.0f} ms"
                    f" p95 {pct(node, 95) * 1000:6.0f} ms"
                    f" | engine p50 {pct([b for _, b in pairs], 50) * 1000:6.0f} ms"
                    f" | node adds p50 {pct(over, 50) * 1000:5.1f} ms"
                    f" p95 {pct(over, 95) * 1000:5.1f} ms"
                )

        # RTF over the long text, as the node synthesizes it
        segs = plan_segments(LONG, "a", engine)
        t0, c0 = time.perf_counter(), time.process_time()
        samples = sum(len(engine.synthesize(s.text, voice, 1.0)) for s in segs)
        compute, cpu = time.perf_counter() - t0, time.process_time() - c0
        audio = samples / engine.sample_rate
        print(
            f"\nreal-time factor: {compute:.2f} s wall for {audio:.2f} s of audio "
            f"({len(segs)} segments) = RTF {compute / audio:.2f}; CPU {cpu:.2f} s = "
            f"{cpu / audio:.2f} core-seconds per audio second -> at most {audio / cpu:.1f} "
            "real-time streams per core by CPU alone (load-independent)"
        )
        print(f"  load average now {os.getloadavg()[0]:.1f} on {cores} cores")

        k = srv.role.capacity
        start = f"{args.stagger:g} s apart" if args.stagger else "started together"
        print(
            f"\nat the advertised capacity: {k} real-time streams (each ~25 s of speech, "
            f"{start}), and one more client while they play"
        )
        wide, preempted = srv.role.scheduler.wide_jobs, srv.role.scheduler.preempted
        under, stall, ttfas, extra = await stream_trial(srv, k, LONG, args.stagger)
        print(
            f"  {k} streams: underruns {under}, stalled {stall:.2f} s, first audio p50 "
            f"{pct(ttfas, 50) * 1000:.0f} ms max {max(ttfas) * 1000:.0f} ms -> "
            f"{'no stream underran' if under == 0 else 'GAPS'}; jobs on every core "
            f"{srv.role.scheduler.wide_jobs - wide}, jobs stopped for a more urgent one "
            f"{srv.role.scheduler.preempted - preempted}"
        )
        print(f"  stream {k + 1}: {extra}")
        print(f"  load average now {os.getloadavg()[0]:.1f} on {cores} cores")

        print(
            f"\nat the advertised capacity, conversations: {k} streams started together, each "
            f"{args.turns} replies of one or two sentences with 1-3 s of listening between"
        )
        under, stall, per_stream = await conversation_trial(srv, k, args.turns)
        for i, ttfas in enumerate(per_stream):
            print(
                f"  stream {i + 1}: first audio p50 {pct(ttfas, 50) * 1000:.0f} ms, p95 "
                f"{pct(ttfas, 95) * 1000:.0f} ms, first reply {ttfas[0] * 1000:.0f} ms"
            )
        print(
            f"  underruns {under}, stalled {stall:.2f} s -> "
            f"{'no stream underran' if under == 0 else 'GAPS'}"
        )
    # the node's memory: weights, both sessions and their working memory at the largest input
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of the process (node and clients): {peak_mb:.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument(
        "--capacity",
        type=int,
        default=16,
        help="the config's capacity: the upper bound of what the node advertises",
    )
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = all cores)")
    ap.add_argument("--turns", type=int, default=12, help="replies per stream in the conversations")
    ap.add_argument(
        "--stagger",
        type=float,
        default=0.0,
        help="seconds between the capacity streams' starts (0: together, the worst case)",
    )
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
