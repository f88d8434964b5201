"""Run the TTS role in-process on a real HTTP server, without a chain: for tests and bench.

Tokens are verified by a real :class:`TokenVerifier` whose issuer list is the one key given;
usage goes to a real :class:`Outbox` with no gateway (events stay in its SQLite file).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

from aiohttp import web
from solders.keypair import Keypair

from node.outbox import Outbox
from node.roles import RoleContext
from node.tts.role import TtsRole
from registry.tokens import Grant, TokenVerifier, mint_token


class RoleServer:
    """The TTS role on a real HTTP server in a thread with its own loop (shared by a module)."""

    def __init__(
        self,
        engine,
        issuer: Keypair,
        state: Path,
        settings: dict | None = None,
        capacity: int = 8,
        calibrate: bool = False,
    ) -> None:
        """``calibrate``: measure the capacity at start as a node does (``capacity`` is then the
        upper bound); off by default so tests that open several sockets get ``capacity``."""
        self.engine, self.issuer, self.state = engine, issuer, state
        self.settings = settings or {}
        self.capacity = capacity
        self.calibrate = calibrate
        self.port = 0  # the port the system picked, once the server is up
        self.node_key = Keypair()  # the node's key: its tokens carry it as their audience
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> RoleServer:
        self.thread = threading.Thread(target=self._thread, daemon=True)
        self.thread.start()
        assert self._ready.wait(60), "role server did not start"
        if self._error:
            raise self._error
        return self

    def _thread(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced in __enter__
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        issuer_key = str(self.issuer.pubkey())

        async def issuers() -> list[str]:
            return [issuer_key]

        node_key = self.node_key
        self.outbox = Outbox(self.state / "outbox.sqlite", None, node_key)
        context = RoleContext(
            role="tts",
            settings=self.settings,
            keypair=node_key,
            verifier=TokenVerifier(issuers, "tts"),
            public_url="",
            capacity=self.capacity,
            gateway_url=None,
            state_dir=self.state,
            outbox=self.outbox,
            calibrate=self.calibrate,
        )
        self.role = TtsRole(context, engine=self.engine)
        app = web.Application()
        self.role.routes(app)
        await self.role.start()
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.port = runner.addresses[0][1]
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await self.role.stop()
        await runner.cleanup()

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(15)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/stream"

    def token(self, limit: int = 10_000, session_id: str | None = None, ttl: int = 600) -> str:
        return mint_token(
            self.issuer,
            "tester",
            Grant("tts", limit=limit),
            ttl,
            session_id=session_id or str(uuid.uuid4()),
            audience=str(self.node_key.pubkey()),
        )

    def completion(self, session_id: str, timeout: float = 15.0) -> dict | None:
        """The session's ``complete`` event, once the node settled it (after its last socket
        closed and the reconnect grace passed), or None if it did not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [
                e
                for e in self.usage_events()
                if e["session_id"] == session_id and e["event"] == "complete"
            ]
            if done:
                return done[-1]
            time.sleep(0.1)
        return None

    def usage_events(self) -> list[dict]:
        return self.outbox.queued()
