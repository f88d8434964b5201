"""Serving an aiohttp app on loopback inside a test (a node's routes, a stand-in gateway)."""

from __future__ import annotations

from aiohttp import web

from tests.conftest import free_port


async def serve(app: web.Application, port: int | None = None) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on 127.0.0.1 (a free port unless ``port``); the caller cleans the runner up."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = port or free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port
