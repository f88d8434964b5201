"""A gateway over a localnet of its own with known node entries, served on loopback: the
fixtures of the gateway API tests and of the gateway attack tests (registered as a pytest plugin
in tests/conftest.py). Nodes here are registry entries with their keys (routing and node-signed
callbacks only need those), each sending its signed load report to the gateway every 0.2 s, as a
node agent does (``node.liveness.LoadReporter``), with the load a test sets in ``Gw.loads``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from solders.keypair import Keypair

from gateway.app import create_app
from gateway.client import GatewayClient
from gateway.config import GatewayConfig
from gateway.ledger import Ledger
from node.liveness import LoadReporter
from registry import program as p
from registry.client import RegistryClient
from registry.tokens import sign_body
from tests.conftest import UNSERVED_GATEWAY_URL, Localnet, start_localnet_process

NODES = {  # name: (role, url, lat, lon, country)
    "sfu-de": (p.Role.SFU, "https://sfu-de.test", 50.11, 8.68, "DE"),
    "sfu-us": (p.Role.SFU, "https://sfu-us.test", 38.9, -77.0, "US"),
    "sfu-sg": (p.Role.SFU, "https://sfu-sg.test", 1.35, 103.8, "SG"),
    "stt-de": (p.Role.STT, "https://stt-de.test", 52.5, 13.4, "DE"),
    "stt-us": (p.Role.STT, "https://stt-us.test", 37.7, -122.4, "US"),
    "tts-de": (p.Role.TTS, "https://tts-de.test", 48.1, 11.6, "DE"),
}
US_IP, SG_IP = "8.8.8.8", "202.166.126.10"


@dataclass
class Net:
    url: str
    authority: Keypair
    issuer: Keypair
    nodes: dict[str, Keypair]


@pytest.fixture(scope="module")
def gateway_net(tmp_path_factory: pytest.TempPathFactory) -> Net:
    """A localnet of its own (long TTL, known nodes) so routing is deterministic."""
    localnet: Localnet = start_localnet_process(tmp_path_factory.mktemp("gw") / "ledger")
    authority, issuer = localnet.authority, Keypair()  # the program's upgrade authority
    nodes = {name: Keypair() for name in NODES}

    async def setup() -> None:
        async with RegistryClient(localnet.url) as client:
            await client.ensure_funded(authority)
            await client.initialize_registry(authority, 3600, p.Policy.OPEN)
            await client.add_issuer(authority, issuer.pubkey(), UNSERVED_GATEWAY_URL)
            for name, (role, url, lat, lon, country) in NODES.items():
                await client.ensure_funded(nodes[name])
                await client.register_node(
                    nodes[name], role, p.NodeFields(url, lat, lon, country, 100, "0.1.0")
                )

    asyncio.run(setup())
    yield Net(localnet.url, authority, issuer, nodes)
    localnet.stop()


@dataclass
class Gw:
    url: str
    ledger: Ledger
    net: Net
    registry: RegistryClient
    http: aiohttp.ClientSession
    # name -> (load, capacity) each node's load reports say; a test edits it to move a load
    loads: dict[str, tuple[int, int]]

    def client(self, key: Keypair | str | None = None, chain: str = "solana") -> GatewayClient:
        return GatewayClient(self.url, key or Keypair(), chain, session=self.http)

    async def funded(self, usd: float = 1.0, chain: str = "solana") -> GatewayClient:
        key: Keypair | str = (
            Keypair()
            if chain == "solana"
            else "0x" + "11" * 31 + f"{int(time.time_ns()) % 256:02x}"
        )
        client = self.client(key, chain)
        address = str(key.pubkey()) if isinstance(key, Keypair) else _evm_address(key)
        await self.ledger.grant(chain, address, int(usd * 1_000_000), memo="test")
        return client

    async def post_signed(self, path: str, body: bytes, node: str) -> aiohttp.ClientResponse:
        token = sign_body(self.net.nodes[node], body)
        return await self.http.post(
            self.url + path,
            data=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )


def _evm_address(key: str) -> str:
    from eth_account import Account

    return Account.from_key(key).address


def gateway_config(tmp: Path, db_url: str, **over: object) -> GatewayConfig:
    # The module's nodes have made-up URLs: pushing refreshed tokens to them is tested apart.
    over.setdefault("refresh_sfu_tokens", False)
    over.setdefault("account_cache_seconds", 2.0)
    over.setdefault("load_report_port", 0)  # served by a TestServer on a free port
    return GatewayConfig(
        database_url=db_url,
        registry_refresh_seconds=0.2,
        sweep_interval_seconds=0.2,
        settle_grace_seconds=0,
        **over,
    )


@pytest.fixture
async def gw(gateway_net: Net, tmp_path: Path) -> AsyncIterator[Gw]:
    db = f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
    async with serve_gateway(gateway_net, tmp_path, db) as g:
        yield g


class serve_gateway:
    """A gateway app over ``net``'s localnet on loopback, with its own ledger at ``db``; the
    nodes in ``loads`` (name -> (load, capacity); default: every node of ``net``, idle with
    capacity 100) report their load to it."""

    def __init__(
        self,
        net: Net,
        tmp: Path,
        db: str,
        loads: dict[str, tuple[int, int]] | None = None,
        **config: object,
    ) -> None:
        self.net, self.tmp, self.db, self.config = net, tmp, db, config
        self.loads = {name: (0, 100) for name in net.nodes} if loads is None else loads
        self.reporters: list[LoadReporter] = []

    async def __aenter__(self) -> Gw:
        self.registry = RegistryClient(self.net.url)
        self.ledger = Ledger(self.db)
        config = gateway_config(self.tmp, self.db, rpc_url=self.net.url, **self.config)
        app = create_app(config, self.net.issuer, self.registry.list_nodes, ledger=self.ledger)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        url = str(self.server.make_url("")).rstrip("/")
        roles = {str(n.owner): n.role for n in await self.registry.list_nodes()}
        for name in self.loads:
            key = self.net.nodes[name]
            reporter = LoadReporter(
                key,
                roles[str(key.pubkey())],
                lambda name=name: self.loads[name],
                "0.1.0",
                [url],
                interval=0.2,
            )
            await reporter.start()
            self.reporters.append(reporter)
        self.http = aiohttp.ClientSession()
        return Gw(url, self.ledger, self.net, self.registry, self.http, self.loads)

    async def __aexit__(self, *exc: object) -> None:
        for reporter in self.reporters:
            await reporter.close()
        await self.http.close()
        await self.server.close()
        await self.registry.close()


async def audit_ok(g: Gw, client: GatewayClient) -> None:
    account = await client.account()
    audit = await g.ledger.audit(account.id)
    assert audit.ok, audit
