"""One SFU node agent on the session localnet and the real gateway that routes to it: the
fixture behind the SFU tests, the browser tests and the room attack tests, and a plain HTTP GET
to the node (``get_status``) for their refusals."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import DefaultLocation, GatewayConfig
from gateway.ledger import Ledger
from node.agent import NodeAgent
from node.config import Location, NodeConfig
from registry.client import RegistryClient
from tests.conftest import Chain, free_port


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
    gw_config = GatewayConfig(
        database_url=db,
        rpc_url=chain.url,
        load_report_port=0,  # served by a TestServer on a free port
        registry_refresh_seconds=0.2,
        sweep_interval_seconds=0.5,
        settle_grace_seconds=0,
        default_location=DefaultLocation(**where),
    )
    server = TestServer(
        create_app(gw_config, chain.issuer, registry.list_nodes, ledger=ledger), host="127.0.0.1"
    )
    await server.start_server()
    gateway_url = str(server.make_url("")).rstrip("/")
    port = free_port()
    config = NodeConfig(
        role="sfu",
        keypair=tmp / "sfu.json",
        rpc_url=chain.url,
        listen_port=port,
        public_url=f"http://127.0.0.1:{port}",
        location=Location(**where),
        capacity=20,
        calibrate=False,  # test_node_capacity measures the forwarding path
        gateway_url=gateway_url,
        report_interval=0.5,
        drain_timeout=1,
        issuer_cache_seconds=1,
        state_dir=tmp / "state",
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
        yield SfuNet(
            agent, f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", gateway_url, ledger, http
        )
    finally:
        await http.close()
        await agent.shutdown()
        await server.close()
        await registry.close()


async def get_status(
    setup: SfuNet,
    path: str,
    token: str | None = None,
    query: dict[str, str] | None = None,
    header: bool = True,
) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token and header else {}
    params = dict(query or {})
    if token and not header:
        params["access_token"] = token
    async with setup.http.get(setup.http_url + path, headers=headers, params=params) as r:
        return r.status, await r.text()
