"""The demo's talk server in a test: ``demo.app`` with ``Tutors`` paid by the agents network's
funded wallet (tests/support/agents_network.py), served on loopback in the test's event loop,
and what the talk page measured and received, read back from its ``window.demo``."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import soxr
from playwright.async_api import Page
from playwright.async_api import TimeoutError as PlaywrightTimeout

from agents import LLM
from demo.app import create_app
from demo.talk import Tutors
from tests.support.agents_network import Network
from tests.support.serving import serve


@contextlib.asynccontextmanager
async def demo_server(
    network: Network, llm_factory: Callable[[], LLM], **tutor_options: Any
) -> AsyncIterator[tuple[str, Tutors]]:
    """The demo app on a free port (base URL) and its tutors; every conversation ends and the
    gateway client closes on exit."""
    gateway = network.gateway()
    tutors = Tutors(gateway, llm_factory, **tutor_options)
    runner, port = await serve(create_app(network.gateway_url, tutors=tutors))
    try:
        yield f"http://127.0.0.1:{port}", tutors
    finally:
        await runner.cleanup()  # on_shutdown ends the conversations
        await gateway.close()


async def start_talking(page: Page, site: str, identity: str) -> float:
    """What a person does: open the talk page, type a name, press Talk, and start talking once
    the page says the tutor listens (its microphone reached her). Returns the page's clock at
    that moment: the fake microphone's WAV plays from its start from then on (speak_again)."""
    await page.goto(site + "/talk")
    await page.fill("#identity", identity)
    await page.click("#talk")
    await page.wait_for_function("demo.status.startsWith('Talking')", timeout=60_000)
    return await speak_again(page)


async def page_state(page: Page) -> dict[str, Any]:
    """The page's status, captions, turns (page and agent figures) and credit."""
    return json.loads(
        await page.evaluate(
            "JSON.stringify({status: demo.status, captions: demo.captions, turns: demo.turns, "
            "credit: demo.credit ?? null, sampleRate: demo.sampleRate})"
        )
    )


async def finals(page: Page, who: str) -> list[str]:
    """The final captions of ``who`` ('you' or 'agent'), in order."""
    return [
        c["text"] for c in (await page_state(page))["captions"] if c["who"] == who and c["final"]
    ]


async def wait_finals(page: Page, who: str, count: int, timeout: float) -> None:
    """Until the page shows ``count`` final captions of ``who``; on timeout, what it shows."""
    await wait_page(
        page,
        "([who, n]) => demo.captions.filter(c => c.who === who && c.final).length >= n",
        [who, count],
        f"no {count} final captions of {who} in {timeout:.0f} s",
        timeout,
    )


async def wait_turns(page: Page, count: int, timeout: float) -> None:
    """Until the page measured ``count`` turns (the tutor heard after the person stopped)."""
    await wait_page(
        page, "n => demo.turns.length >= n", count, f"no {count} turns in {timeout:.0f} s", timeout
    )


async def wait_page(page: Page, condition: str, arg: Any, failure: str, timeout: float) -> None:
    """Until ``condition(arg)`` holds in the page; on timeout, what the page shows and heard."""
    try:
        await page.wait_for_function(condition, arg=arg, timeout=timeout * 1000)
    except PlaywrightTimeout:
        state = await page_state(page)
        mic = await page.evaluate(
            "[demo.micLevels.length, Math.max(0, ...demo.micLevels.map(x => x[1]))]"
        )
        raise AssertionError(f"{failure}: {state}; microphone blocks, loudest: {mic}") from None


async def speak_again(page: Page) -> float:
    """Open the page's microphone again: Chromium's fake device plays its WAV from the start,
    so the person says it at a moment the test picks (once the tutor listens, or after she was
    heard). Returns the page's clock (Web Audio time, as in ``levels``) at the restart."""
    return await page.evaluate(
        "async () => { const at = demo.clock(); await demo.room.localParticipant"
        ".getTrackPublication(LivekitClient.Track.Source.Microphone).track.restartTrack();"
        " return at; }"
    )


async def received_audio(page: Page) -> np.ndarray:
    """The tutor's voice as the page received it (Web Audio), 48 kHz int16."""
    rate = await page.evaluate("demo.sampleRate")
    pcm = np.frombuffer(base64.b64decode(await page.evaluate("demo.recording()")), dtype="<i2")
    if rate != 48000:
        pcm = soxr.resample(pcm.astype(np.float32) / 32768, rate, 48000)
        pcm = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
    return pcm


async def levels(page: Page) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(Web Audio time, RMS) of every 10 ms block: the microphone's, the tutor's."""
    data = json.loads(await page.evaluate("JSON.stringify([demo.micLevels, demo.agentLevels])"))
    return [tuple(x) for x in data[0]], [tuple(x) for x in data[1]]  # type: ignore[misc]
