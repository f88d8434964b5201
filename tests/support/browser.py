"""A real browser for the tests: Debian's chromium driven by Playwright for Python (the SFU
node that pages join is tests/support/sfu_net.py).

Playwright cannot download browsers here, so the system chromium is launched by path; its flags
(DESIGN.md section 9) give the page a fake microphone (a WAV file, or Chromium's beeps), let
WebRTC use loopback host candidates, and let audio play without a user gesture.
"""

from __future__ import annotations

import contextlib
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from aiohttp import web
from playwright.async_api import Browser, Page, async_playwright

from tests.support.serving import serve

CHROMIUM = "/usr/bin/chromium"
VENDOR = Path(__file__).resolve().parents[2] / "demo" / "static" / "vendor"


def chromium_args(fake_audio: Path | None = None) -> list[str]:
    """Flags for a headless chromium whose pages may capture (fake) media and play audio."""
    args = [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        "--autoplay-policy=no-user-gesture-required",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--no-sandbox",  # the tests run as root
    ]
    if fake_audio is not None:
        args.append(f"--use-file-for-fake-audio-capture={fake_audio.resolve()}")
    return args


@contextlib.asynccontextmanager
async def chromium(fake_audio: Path | None = None) -> AsyncIterator[Browser]:
    """The system chromium, headless, with the fake-media flags."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=chromium_args(fake_audio)
        )
        try:
            yield browser
        finally:
            await browser.close()


def console_log(page: Page) -> list[str]:
    """Everything the page logs (and its uncaught errors), for assertion messages."""
    lines: list[str] = []
    page.on("console", lambda msg: lines.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: lines.append(f"pageerror: {exc}"))
    return lines


def write_wav(path: Path, pcm: np.ndarray, rate: int = 48000) -> Path:
    """Mono 16-bit PCM as a WAV file, for --use-file-for-fake-audio-capture (Chromium loops
    it, from its start for each capture)."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.astype("<i2").tobytes())
    return path


def write_tone_wav(path: Path, freq: float, seconds: float = 5.0, rate: int = 48000) -> Path:
    """A mono 16-bit tone."""
    t = np.arange(int(seconds * rate)) / rate
    return write_wav(path, (np.sin(2 * np.pi * freq * t) * 12000).astype(np.int16), rate)


def write_speech_wav(path: Path, clips: list[np.ndarray]) -> Path:
    """16 kHz float clips (tests/support/speech.py: Kokoro speech, silences) in a row, as a
    48 kHz WAV: what a fake microphone says."""
    import soxr

    audio = soxr.resample(np.concatenate(clips).astype(np.float32), 16000, 48000)
    return write_wav(path, (np.clip(audio, -1, 1) * 32767).astype(np.int16))


@contextlib.asynccontextmanager
async def page_site(html: str) -> AsyncIterator[str]:
    """Serves ``html`` at / and the fetched vendor files at /vendor/ on loopback (an origin of
    its own, as a real page is not served by the SFU); yields the base URL."""
    if not (VENDOR / "livekit-client.umd.js").exists():
        raise RuntimeError(f"{VENDOR} has no livekit-client.umd.js: run `make web`")

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_static("/vendor/", VENDOR)
    runner, port = await serve(app)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- an SFU behind the gateway
