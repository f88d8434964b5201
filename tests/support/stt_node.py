"""An STT role on loopback for tests: the real models (session fixture ``stt_models``,
registered as a pytest plugin in tests/conftest.py), the real token verifier reading issuers from
the session localnet, a real durable outbox posting to a stand-in gateway (``stt_node``), and a
WebSocket client that records every server message (``connect``). Used by the STT tests and the
node attack tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from solders.keypair import Keypair

from node.outbox import Outbox
from node.roles import RoleContext
from node.stt.models import Models
from node.stt.role import STTRole
from node.stt.settings import STTSettings, load_settings
from registry.client import RegistryClient
from registry.tokens import Grant, TokenVerifier, mint_token
from tests.conftest import Chain, free_port
from tests.support.serving import serve


@pytest.fixture(scope="session")
def stt_models() -> Models:
    models = Models(STTSettings())
    models.load()
    return models


@dataclass
class Node:
    role: STTRole
    url: str
    events: list[dict[str, Any]] = field(default_factory=list)

    def token(
        self, chain: Chain, seconds: int = 300, session_id: str | None = None, ttl: int = 600
    ) -> str:
        return mint_token(
            chain.issuer,
            "agent",
            Grant("stt", limit=seconds),
            ttl,
            session_id=session_id,
            audience=self.role.context.node_key,
        )


@contextlib.asynccontextmanager
async def stt_node(
    chain: Chain,
    tmp: Path,
    models: Models,
    capacity: int = 4,
    calibrate: bool = False,
    **settings: Any,
) -> AsyncIterator[Node]:
    """An STT role on loopback; ``calibrate``: measure its capacity at start as a node does
    (``capacity`` is then the upper bound), off so that tests opening streams get ``capacity``."""
    events: list[dict[str, Any]] = []

    async def internal_events(request: web.Request) -> web.Response:
        assert request.headers.get("Authorization", "").startswith("Bearer ")
        events.append(json.loads(await request.read()))
        return web.json_response({"ok": True})

    gw = web.Application()
    gw.router.add_post("/internal/events", internal_events)
    gw_runner, gw_port = await serve(gw)

    client = RegistryClient(chain.url)
    key = Keypair()
    outbox = Outbox(tmp / f"outbox-{free_port()}.sqlite", f"http://127.0.0.1:{gw_port}", key)
    port = free_port()
    context = RoleContext(
        role="stt",
        settings=settings,
        keypair=key,
        verifier=TokenVerifier(client.issuer_keys, "stt", cache_ttl=30),
        public_url=f"http://127.0.0.1:{port}",
        capacity=capacity,
        gateway_url=f"http://127.0.0.1:{gw_port}",
        state_dir=tmp,
        outbox=outbox,
        calibrate=calibrate,
    )
    role = STTRole(context, load_settings(settings), models)
    app = web.Application()
    role.routes(app)
    runner, _ = await serve(app, port)
    await outbox.start()
    await role.start()
    node = Node(role, f"ws://127.0.0.1:{port}/v1/stream", events)
    try:
        yield node
    finally:
        await role.stop()
        await outbox.stop()
        await runner.cleanup()
        await gw_runner.cleanup()
        await client.close()


class Client:
    """A test client that records every server message with its arrival time."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self._task = asyncio.create_task(self._read())
        self._new = asyncio.Event()

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.messages.append((time.monotonic(), json.loads(msg.data)))
                self._new.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m["type"] == kind]

    async def wait_for(self, pred, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for _, m in self.messages[seen:]:
                if pred(m):
                    return m
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0 or (self._task.done() and seen == len(self.messages)):
                raise AssertionError(f"no such message; got {[m for _, m in self.messages]}")
            self._new.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new.wait(), min(left, 0.5))

    async def type(self, kind: str, timeout: float = 20.0) -> dict[str, Any]:
        return await self.wait_for(lambda m: m["type"] == kind, timeout)

    async def closed(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self._task, timeout)


@contextlib.asynccontextmanager
async def connect(node: Node, config: dict[str, Any] | None = None) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as http, http.ws_connect(node.url) as ws:
        client = Client(ws)
        if config is not None:
            await ws.send_json({"type": "config", **config})
        yield client
        await ws.close()
