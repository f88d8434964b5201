"""Voice-to-voice in a browser: the talk page in Chromium, by the page's own clock, next to the
same figure at a Python SDK caller (bench/agent.py) and the agent's own.

    .venv/bin/python bench/demo.py [--turns 10] [--gap 14] [--llm instant|embedded] [--skip-sdk]

Starts the whole network on loopback as processes (localnet, gateway, SFU, STT, TTS:
tests/support/agents_network.py) and the demo app in this process (tests/support/demo_site.py).
Chromium's fake microphone plays ``--turns`` Kokoro-made questions, ``--gap`` seconds apart; the
page (demo/static/talk.js) measures each turn with Web Audio: the end of the question in its
microphone (the last loud 10 ms) -> the first loud 10 ms of the tutor's voice it received. Printed:

* voice-to-voice at the page (Chromium), p50 and p95;
* the agent's own figure for the same turns (its STT node's speech_end -> first frame sent, from
  the ``transcript`` message), and the page minus the agent (endpointing and WebRTC both ways);
* unless ``--skip-sdk``: the same questions asked by bench/agent.py's caller on the official
  ``livekit`` Python SDK ("voice-to-voice at the caller"), the figure the page is held to (target:
  the page within 150 ms of it).

``--llm instant`` (default) answers at once, so the figures are the network's own; ``embedded``
is SmolLM2 as `make demo` runs it. Printed, never asserted; the CPU is shared: quote figures from
a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.plugins import LLM
from bench.agent import (
    INSTANT_ANSWER,
    QUESTIONS,
    InstantLLM,
    chain_in,
    latency_run,
    row,
)
from tests.support.agents_network import Network, running_network
from tests.support.browser import chromium, write_speech_wav
from tests.support.demo_site import demo_server, start_talking
from tests.support.speech import silence, speak


def llm_factory(kind: str) -> Callable[[], LLM]:
    if kind == "embedded":
        from agents.llm import EmbeddedLLM

        return lambda: EmbeddedLLM(options={"max_tokens": 60})
    return lambda: InstantLLM(INSTANT_ANSWER)


async def page_run(
    net: Network, factory: Callable[[], LLM], turns: int, gap: float, tmp: Path
) -> list[dict[str, Any]]:
    """The page's turns: ``page_ms`` (its clock) and ``agent_ms`` (the agent's figure)."""
    clips = [silence(2.0)]
    for i in range(turns):
        clips += [speak(QUESTIONS[i % len(QUESTIONS)]), silence(gap)]
    mic = write_speech_wav(tmp / "questions.wav", [*clips, silence(30.0)])
    async with (
        demo_server(net, factory, greeting="", minutes=max(5, turns)) as (site, _),
        chromium(mic) as browser,
    ):
        page = await browser.new_page()
        await start_talking(page, site, "bench")
        seen, done = 0, []
        deadline = asyncio.get_running_loop().time() + turns * (gap + 6) + 60
        while asyncio.get_running_loop().time() < deadline:
            done = json.loads(
                await page.evaluate(
                    "JSON.stringify(demo.turns.filter(t => t.agent_ms !== undefined))"
                )
            )
            for k, t in enumerate(done[seen:], seen + 1):
                print(
                    f"    {k:2d}. page {t['page_ms']:6.0f} ms   agent {t['agent_ms']:6.0f} ms",
                    flush=True,
                )
            seen = len(done)
            if seen >= turns:
                break
            await asyncio.sleep(0.5)
        await page.click("#hangup")
        return done[:turns]


async def bench(net: Network, args: argparse.Namespace, tmp: Path) -> None:
    factory = llm_factory(args.llm)
    print(f"network up; {args.turns} turns, {args.llm} LLM\n", flush=True)
    if not args.skip_sdk:
        print("the Python SDK caller (bench/agent.py):", flush=True)
        questions = {q: speak(q) for q in QUESTIONS}
        llm = factory()
        load = getattr(llm, "load", None)
        if load is not None:
            await load()
        await latency_run(net, llm, args.turns, "SDK caller", questions)
    print("Chromium, the talk page:", flush=True)
    turns = await page_run(net, factory, args.turns, args.gap, tmp)
    page = [t["page_ms"] for t in turns]
    agent = [t["agent_ms"] for t in turns]
    print(f"\nChromium: {len(turns)} of {args.turns} turns heard")
    print(row("voice-to-voice at the page", page))
    print(row("  endpointing + transport", [p - a for p, a in zip(page, agent, strict=False)]))
    print(row("  agent: speech_end -> first frame", agent))
    if page:
        print(
            f"\n  page p50 {statistics.median(page):.0f} ms; compare with 'voice-to-voice at "
            f"the caller' above (target: within 150 ms)",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument(
        "--gap",
        type=float,
        default=14.0,
        help="seconds of silence after each question (the answer plays in it)",
    )
    ap.add_argument("--llm", choices=("instant", "embedded"), default="instant")
    ap.add_argument(
        "--skip-sdk", action="store_true", help="only the page (not the Python SDK caller)"
    )
    args = ap.parse_args()
    if args.turns < 1:
        ap.error(f"--turns must be at least 1, got {args.turns}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as d:
        tmp = Path(d)
        chain, localnet = chain_in(tmp)
        try:
            print("starting the gateway, SFU, STT and TTS nodes ...", flush=True)
            with running_network(chain, tmp) as net:
                asyncio.run(bench(net, args, tmp))
        finally:
            localnet.stop()


if __name__ == "__main__":
    main()
