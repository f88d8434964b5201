"""A real browser for the tests: Debian's chromium driven by Playwright for Python, and an SFU
node behind the real gateway for pages to join.

Playwright cannot download browsers here, so the system chromium is launched by path; its flags
(DESIGN.md section 9) give the page a fake microphone (a WAV file, or Chromium's beeps), let
WebRTC use loopback host candidates, and let audio play without a user gesture.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, Page, async_playwright

from gateway.app import create_app
from gateway.config import DefaultLocation, GatewayConfig
from gateway.ledger import Ledger
from node.agent import NodeAgent
from node.config import Location, NodeConfig
from registry.client import RegistryClient
from tests.conftest import Chain, free_port
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
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                           args=chromium_args(fake_audio))
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


def write_tone_wav(path: Path, freq: float, seconds: float = 5.0, rate: int = 48000) -> Path:
    """A mono 16-bit tone, for --use-file-for-fake-audio-capture (Chromium loops it)."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = (np.sin(2 * np.pi * freq * t) * 12000).astype(np.int16)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path


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


@dataclass
class SfuNet:
    """One SFU node agent registered on the session localnet, and the gateway that routes to it."""

    agent: NodeAgent
    http_url: str
    ws_url: str
    gateway_url: str
    ledger: Ledger
    http: aiohttp.ClientSession

    @property
    def role(self) -> Any:
        return self.agent.role


@contextlib.asynccontextmanager
async def sfu_and_gateway(chain: Chain, tmp: Path, where: dict[str, Any]) -> AsyncIterator[SfuNet]:
    """The SFU role in a real node agent at ``where`` (lat, lon, country), and the real gateway
    (SQLite ledger) placing its clients there too, so sessions are routed to this node."""
    db = f"sqlite+aiosqlite:///{tmp}/gateway.db"
    registry = RegistryClient(chain.url)
    ledger = Ledger(db)
    gw_config = GatewayConfig(database_url=db, rpc_url=chain.url, registry_refresh_seconds=0.2,
                              sweep_interval_seconds=0.5, settle_grace_seconds=0,
                              default_location=DefaultLocation(**where))
    server = TestServer(create_app(gw_config, chain.issuer, registry.list_nodes, ledger=ledger),
                        host="127.0.0.1")
    await server.start_server()
    gateway_url = str(server.make_url("")).rstrip("/")
    port = free_port()
    config = NodeConfig(
        role="sfu", keypair=tmp / "sfu.json", rpc_url=chain.url, listen_port=port,
        public_url=f"http://127.0.0.1:{port}", location=Location(**where), capacity=20,
        gateway_url=gateway_url, heartbeat_interval=0.5, drain_timeout=1,
        issuer_cache_seconds=1, state_dir=tmp / "state",
        sfu={"empty_timeout": 0.5, "ping_timeout": 15},
    )
    agent = NodeAgent(config)
    await agent.start()
    http = aiohttp.ClientSession()
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # the gateway's registry view catches up
            async with http.get(gateway_url + "/v1/servers/status") as r:
                if (await r.json())["services"]["webrtc"]["healthy"] >= 1:
                    break
            await asyncio.sleep(0.2)
        yield SfuNet(agent, f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", gateway_url,
                     ledger, http)
    finally:
        await http.close()
        await agent.shutdown()
        await server.close()
        await registry.close()
