"""Serving an aiohttp app on loopback inside a test (a node's routes, a stand-in gateway)."""

from __future__ import annotations

from aiohttp import web
from solders.keypair import Keypair

from tests.conftest import free_port


async def serve(app: web.Application, port: int | None = None) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on 127.0.0.1 (a free port unless ``port``); the caller cleans the runner up."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = port or free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def declare_issuer(app: web.Application, issuer: Keypair) -> None:
    """A stand-in gateway's ``GET /v1/liveness``: it signs tokens with ``issuer``, so a node
    agent sends it the usage of those tokens (node/gateways.py). Its load-report port is the
    discard port: nothing reads the reports."""

    async def liveness(request: web.Request) -> web.Response:
        body = {"udp_port": 9, "interval_seconds": 5, "ttl_seconds": 15}
        return web.json_response({**body, "issuer": str(issuer.pubkey())})

    app.router.add_get("/v1/liveness", liveness)
