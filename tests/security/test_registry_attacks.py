"""Attacks on the registry, run as the attacker would on the local network (issue 12, items 1 and
11): a real localnet process with the real program, the real `registry` CLI, a real gateway on
loopback. Each test asserts the refusal and that chain accounts, balances and sessions are exactly
as before.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from gateway.app import create_app
from gateway.client import GatewayClient, NoCapacity
from gateway.config import GatewayConfig
from gateway.ledger import Ledger
from node.liveness import LoadReporter
from registry import program as p
from registry.client import RegistryClient
from registry.keys import save_keypair
from tests.conftest import (
    ROOT,
    UNSERVED_GATEWAY_URL,
    Localnet,
    free_port,
    init_registry,
    start_localnet_process,
)

MAX_U32 = 4_294_967_295
# GatewayConfig's default location: where a client without a usable IP is placed.
DEFAULT_LAT, DEFAULT_LON, DEFAULT_COUNTRY = 50.11, 8.68, "DE"
HONEST_URL = "https://stt-honest.test"


@dataclass
class Net:
    localnet: Localnet
    issuer: Keypair
    honest: Keypair

    @property
    def url(self) -> str:
        return self.localnet.url


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    """`make up`'s setup: the approval policy, one approved STT node a little off the default
    location (so a rogue node at the default location would win on distance)."""
    localnet = start_localnet_process(tmp_path_factory.mktemp("attacks") / "ledger")
    issuer, honest = Keypair(), Keypair()

    async def setup() -> None:
        await init_registry(localnet, 3600, p.Policy.APPROVAL)
        async with RegistryClient(localnet.url) as client:
            await client.add_issuer(localnet.authority, issuer.pubkey(), UNSERVED_GATEWAY_URL)
            await client.ensure_funded(honest)
            await client.register_node(
                honest, p.Role.STT, p.NodeFields(HONEST_URL, 52.52, 13.40, "DE", 10, "0.1.0")
            )
            await client.approve_node(localnet.authority, honest.pubkey())

    asyncio.run(setup())
    yield Net(localnet, issuer, honest)
    localnet.stop()


def registry_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "registry.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def snapshot(client: RegistryClient, *keys: Pubkey) -> dict[str, tuple[int, bytes] | None]:
    """Lamports and data of each account (None when absent): what must not move."""
    out: dict[str, tuple[int, bytes] | None] = {}
    for key in keys:
        info = (await client.rpc.get_account_info(key)).value
        out[str(key)] = None if info is None else (info.lamports, bytes(info.data))
    return out


async def refused(name: str, call: object) -> None:
    with pytest.raises(p.RegistryProgramError) as err:
        await call  # type: ignore[misc]
    assert err.value.name == name


@dataclass
class Gateway:
    url: str
    ledger: Ledger
    http: aiohttp.ClientSession

    async def funded_client(self, usd: float = 1.0) -> GatewayClient:
        key = Keypair()
        await self.ledger.grant("solana", str(key.pubkey()), int(usd * 1_000_000), memo="test")
        return GatewayClient(self.url, key, "solana", session=self.http)


@pytest.fixture
async def gateway(net: Net, tmp_path: Path) -> AsyncIterator[Gateway]:
    """The real gateway app on loopback, reading this localnet's registry."""
    db = f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
    registry = RegistryClient(net.url)
    ledger = Ledger(db)
    config = GatewayConfig(
        database_url=db,
        rpc_url=net.url,
        load_report_port=0,  # served by a TestServer on a free port
        registry_refresh_seconds=0.2,
        sweep_interval_seconds=0.2,
        refresh_sfu_tokens=False,
    )
    server = TestServer(
        create_app(config, net.issuer, registry.list_nodes, ledger=ledger), host="127.0.0.1"
    )
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    honest = LoadReporter(net.honest, p.Role.STT, lambda: (0, 10), "0.1.0", [url], interval=0.2)
    await honest.start()  # the approved node reports its load, as its agent would
    http = aiohttp.ClientSession()
    try:
        yield Gateway(url, ledger, http)
    finally:
        await honest.close()
        await http.close()
        await server.close()
        await registry.close()


async def test_rogue_node_is_pending_and_never_routed_to(
    net: Net, gateway: Gateway, tmp_path: Path
) -> None:
    """Item 1: a fresh key registers an STT node at the gateway's default location, capacity
    2^32-1, on a port where nothing listens. It is listed as pending, cannot update or heartbeat
    its entry, and the gateway routes every session to the approved node (or answers 503)."""
    key_path = tmp_path / "rogue.json"
    rogue = Keypair()
    save_keypair(rogue, key_path)
    dead_url = f"https://127.0.0.1:{free_port()}"
    node_args = [
        "--rpc",
        net.url,
        "--keypair",
        str(key_path),
        "--url",
        dead_url,
        "--lat",
        str(DEFAULT_LAT),
        "--lon",
        str(DEFAULT_LON),
        "--country",
        DEFAULT_COUNTRY,
        "--capacity",
        str(MAX_U32),
    ]
    proc = registry_cli("node", "register", "--role", "stt", *node_args)
    assert proc.returncode == 0, proc.stderr
    assert "(pending)" in proc.stdout

    listing = registry_cli("nodes", "--rpc", net.url, "--json")
    rogue_entry = next(n for n in json.loads(listing.stdout) if n["pubkey"] == str(rogue.pubkey()))
    assert (rogue_entry["status"], rogue_entry["capacity"]) == ("pending", MAX_U32)

    async with RegistryClient(net.url) as client:
        registry_addr, _ = p.registry_pda()
        rogue_addr, _ = p.node_pda(rogue.pubkey())
        honest_addr, _ = p.node_pda(net.honest.pubkey())
        watched = (registry_addr, rogue_addr, honest_addr, rogue.pubkey())
        before = await snapshot(client, *watched)

        # It cannot steer its entry or make it look alive before approval.
        await refused("NodePending", client.heartbeat(rogue, 0, MAX_U32))
        fields = p.NodeFields(dead_url, DEFAULT_LAT, DEFAULT_LON, DEFAULT_COUNTRY, 1, "0.1.1")
        await refused("NodePending", client.update_node(rogue, fields))
        update = registry_cli("node", "update", *node_args[:-1], "7")
        assert update.returncode == 1 and "NodePending" in update.stderr
        # Nor approve itself.
        await refused("NotAuthority", client.approve_node(rogue, rogue.pubkey()))
        await refused(
            "NotAuthority", client.set_node_status(rogue, rogue.pubkey(), p.NodeStatus.ACTIVE)
        )
        assert await snapshot(client, *watched) == before

        # Every session goes to the approved node, never to the pending one, even while the
        # pending one sends correctly signed load reports saying it is idle.
        rogue_reports = LoadReporter(
            rogue, p.Role.STT, lambda: (0, MAX_U32), "0.1.0", [gateway.url], interval=0.2
        )
        await rogue_reports.start()
        await asyncio.sleep(0.5)
        user = await gateway.funded_client()
        for _ in range(3):
            session = await user.create_stt_session(duration_minutes=1)
            assert session.server_url == HONEST_URL
        sessions_before = await user.sessions()
        balance_before = (await user.account()).available_balance

        # With the approved node suspended, there is nobody to route to: 503, not the rogue.
        await client.set_node_status(
            net.localnet.authority, net.honest.pubkey(), p.NodeStatus.SUSPENDED
        )
        try:
            await asyncio.sleep(0.5)  # past the gateway's registry refresh (0.2 s)
            with pytest.raises(NoCapacity):
                await user.create_stt_session(duration_minutes=1)
            assert (await user.account()).available_balance == balance_before
            assert await user.sessions() == sessions_before
        finally:
            await client.set_node_status(
                net.localnet.authority, net.honest.pubkey(), p.NodeStatus.ACTIVE
            )
        await rogue_reports.close()
        after = await snapshot(client, *watched)
        assert after[str(rogue_addr)] == before[str(rogue_addr)]
        assert after[str(registry_addr)] == before[str(registry_addr)]
        assert after[str(rogue.pubkey())] == before[str(rogue.pubkey())]


async def test_initialize_registry_by_another_key_is_refused(tmp_path: Path) -> None:
    """Item 11: right after the deploy, a stranger races to `registry init`; only the program's
    upgrade authority may, so the registry stays absent until that key does."""
    localnet = start_localnet_process(tmp_path / "ledger")
    try:
        async with RegistryClient(localnet.url) as client:
            mallory = Keypair()
            await client.ensure_funded(mallory)
            registry_addr, _ = p.registry_pda()
            before = await snapshot(client, registry_addr, mallory.pubkey())
            for policy in p.Policy:
                await refused(
                    "NotUpgradeAuthority", client.initialize_registry(mallory, 60, policy)
                )
            assert await snapshot(client, registry_addr, mallory.pubkey()) == before
            assert before[str(registry_addr)] is None
            assert await client.get_registry() is None
            # The upgrade authority still can, and becomes the registry's authority.
            await init_registry(localnet, 60, p.Policy.APPROVAL)
            registry = await client.require_registry()
            assert (registry.authority, registry.policy) == (
                localnet.authority.pubkey(),
                p.Policy.APPROVAL,
            )
    finally:
        localnet.stop()


async def test_heartbeat_load_over_capacity_is_refused(net: Net) -> None:
    """Item 11: an approved node claims more load than capacity (to skew routing or billing)."""
    async with RegistryClient(net.url) as client:
        node = Keypair()
        await client.ensure_funded(node)
        await client.register_node(
            node, p.Role.TTS, p.NodeFields("https://tts.test", 1.0, 2.0, "SG", 8, "0.1.0")
        )
        await client.approve_node(net.localnet.authority, node.pubkey())
        await client.heartbeat(node, 8, 8)
        addr, _ = p.node_pda(node.pubkey())
        before = await snapshot(client, addr, node.pubkey())
        for load, capacity in ((9, 8), (MAX_U32, 1), (MAX_U32, MAX_U32 - 1)):
            await refused("LoadExceedsCapacity", client.heartbeat(node, load, capacity))
        assert await snapshot(client, addr, node.pubkey()) == before
        assert (await client.get_node(node.pubkey())).load == 8


async def test_plain_http_url_off_loopback_is_refused(net: Net) -> None:
    """Item 11: a node publishes a plain-http URL on a public host, where the gateway would push
    tokens in the clear. Refused at registration and at update; nothing is created or changed."""
    async with RegistryClient(net.url) as client:
        node = Keypair()
        await client.ensure_funded(node)
        registry_addr, _ = p.registry_pda()
        addr, _ = p.node_pda(node.pubkey())
        before = await snapshot(client, registry_addr, addr, node.pubkey())
        for url in (
            "http://stt.example.net:8001",
            "ws://203.0.113.7/rtc",
            "http://127.0.0.1.evil.example",
            "http://127.0.0.1@evil.example",
        ):
            fields = p.NodeFields(url, DEFAULT_LAT, DEFAULT_LON, DEFAULT_COUNTRY, 4, "0.1.0")
            await refused("InsecureUrl", client.register_node(node, p.Role.STT, fields))
        assert await snapshot(client, registry_addr, addr, node.pubkey()) == before
        assert before[str(addr)] is None

        # An admitted node cannot switch to such a URL either.
        await client.register_node(
            node, p.Role.STT, p.NodeFields("https://ok.test", 0, 0, "DE", 4, "0.1.0")
        )
        await client.approve_node(net.localnet.authority, node.pubkey())
        admitted = await snapshot(client, addr, node.pubkey())
        fields = p.NodeFields("http://stt.example.net", 0, 0, "DE", 4, "0.1.0")
        await refused("InsecureUrl", client.update_node(node, fields))
        assert await snapshot(client, addr, node.pubkey()) == admitted
