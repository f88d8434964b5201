"""One gateway process: the app on its port until SIGINT or SIGTERM (``gateway serve``)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from aiohttp import web
from solders.pubkey import Pubkey

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.liveness import Relay
from registry import program as p
from registry.client import RegistryClient
from registry.keys import load_or_create_keypair

log = logging.getLogger("gateway")


def registry_client(config: GatewayConfig) -> RegistryClient:
    program_id = Pubkey.from_string(config.program_id) if config.program_id else p.PROGRAM_ID
    return RegistryClient(config.rpc_url, program_id)


async def serve(
    config: GatewayConfig, relay: Relay | None = None, reuse_port: bool = False
) -> None:
    """Serve until SIGINT or SIGTERM. ``relay`` and ``reuse_port``: this is one of
    ``--workers N`` (``gateway/workers.py``)."""
    issuer = load_or_create_keypair(config.issuer_keypair)
    client = registry_client(config)
    app = create_app(config, issuer, client.list_nodes, relay=relay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.listen_host, config.listen_port, reuse_port=reuse_port)
    await site.start()
    issuers = await client.issuer_keys()
    if str(issuer.pubkey()) not in issuers:
        log.warning(
            "issuer key %s is not listed on the registry: nodes will refuse our tokens "
            "(run `registry issuer add %s`)",
            issuer.pubkey(),
            issuer.pubkey(),
        )
    print(
        f"gateway listening on http://{config.listen_host}:{config.listen_port} "
        f"(issuer {issuer.pubkey()}, ledger {config.database_url})",
        flush=True,
    )
    # Everything built so far (SQLAlchemy, pydantic, the registry view, ...) lives as long as
    # the process: move it out of the collector's sight, or each full collection walks all of it
    # while requests wait (bench/gateway.py: token p99 ~40-55 ms without this, ~16-19 ms with).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await client.close()
