"""The TTS engine with the real Kokoro-82M weights from the offline pack (session fixtures
``kokoro_files`` and ``engine``, registered as a pytest plugin in tests/conftest.py; loaded once
per test session), and a client of the TTS role's WebSocket protocol that records every event with
its arrival time (``connect``). Used by the TTS tests and the node attack tests."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

import aiohttp
import pytest

from node.models.kokoro import KokoroFiles, ensure_kokoro
from node.tts.engine import create_engine
from node.tts.harness import RoleServer


@pytest.fixture(scope="session")
def kokoro_files() -> KokoroFiles:
    return ensure_kokoro()


@pytest.fixture(scope="session")
def engine(kokoro_files: KokoroFiles):
    return create_engine("kokoro-onnx", files=kokoro_files)


@dataclass
class Event:
    at: float  # monotonic arrival time
    msg: dict | None = None
    audio: bytes | None = None


@dataclass
class Client:
    ws: aiohttp.ClientWebSocketResponse
    events: list[Event] = field(default_factory=list)

    async def send(self, msg: dict) -> float:
        await self.ws.send_json(msg)
        return time.monotonic()

    async def next(self, timeout: float = 60.0) -> Event:
        m = await self.ws.receive(timeout=timeout)
        at = time.monotonic()
        if m.type == aiohttp.WSMsgType.BINARY:
            ev = Event(at, audio=m.data)
        elif m.type == aiohttp.WSMsgType.TEXT:
            ev = Event(at, msg=json.loads(m.data))
        else:
            raise AssertionError(f"socket ended: {m.type} {m.data!r} {m.extra!r}")
        self.events.append(ev)
        return ev

    async def until(
        self, kind: str, timeout: float = 90.0, context_id: str | None = None
    ) -> list[Event]:
        """Events up to and including the next message of ``kind`` (for ``context_id``)."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            ev = await self.next(max(0.1, deadline - time.monotonic()))
            out.append(ev)
            if (
                ev.msg
                and ev.msg.get("type") == kind
                and (context_id is None or ev.msg.get("context_id") == context_id)
            ):
                return out

    async def expect_error(self, msg: dict | str | bytes, match: str) -> dict:
        if isinstance(msg, dict):
            await self.ws.send_json(msg)
        elif isinstance(msg, bytes):
            await self.ws.send_bytes(msg)
        else:
            await self.ws.send_str(msg)
        ev = await self.next(10)
        assert ev.msg is not None and ev.msg["type"] == "error", ev
        assert re.search(match, ev.msg["message"], re.IGNORECASE), ev.msg
        return ev.msg


async def connect(
    http: aiohttp.ClientSession, srv: RoleServer, token: str, config: dict | None = None
) -> Client:
    ws = await http.ws_connect(srv.url)
    first: dict = {"session_key": token}
    if config:
        first["config"] = config
    await ws.send_json(first)
    c = Client(ws)
    ev = await c.next(30)
    assert ev.msg and ev.msg["type"] == "ready", ev
    return c
