"""The network map: the gateway's public node list (GET /v1/nodes) over a localnet of its own
with nodes in every standing (active and reporting, active and silent, pending, suspended), and
the demo's /network page
reading it in Chromium (the DOM says what a person sees; a screenshot shows it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from solders.keypair import Keypair

from demo.app import create_app
from registry import program as p
from registry.client import RegistryClient
from tests.conftest import UNSERVED_GATEWAY_URL, Localnet, free_port, start_localnet_process
from tests.support.browser import chromium, console_log
from tests.support.gateway_net import Net, serve_gateway
from tests.support.serving import serve

module_loop = pytest.mark.asyncio(loop_scope="module")  # the network fixture's loop

# name: role, url, lat, lon, country, capacity, load (None: never reports), standing
NODES: dict[str, tuple[p.Role, str, float, float, str, int, int | None, str]] = {
    "sfu-fra": (p.Role.SFU, "https://sfu-fra.test", 50.11, 8.68, "DE", 100, 30, "active"),
    "stt-iad": (p.Role.STT, "https://stt-iad.test", 38.9, -77.0, "US", 50, 40, "active"),
    "tts-sin": (p.Role.TTS, "https://tts-sin.test", 1.35, 103.8, "SG", 20, 2, "active"),
    "tts-gru": (p.Role.TTS, "https://tts-gru.test", -23.55, -46.63, "BR", 20, None, "active"),
    "sfu-nrt": (p.Role.SFU, "https://sfu-nrt.test", 35.68, 139.69, "JP", 100, None, "pending"),
    "stt-syd": (p.Role.STT, "https://stt-syd.test", -33.87, 151.21, "AU", 50, None, "suspended"),
}
GREYED = {"tts-gru", "sfu-nrt", "stt-syd"}


@dataclass
class Network:
    gateway_url: str
    keys: dict[str, str]  # name -> node key
    loads: dict[str, tuple[int, int]]  # what the nodes report; change it to move a node's load
    http: aiohttp.ClientSession

    def name_of(self, key: str) -> str:
        return next(name for name, k in self.keys.items() if k == key)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def network(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Network]:
    """A localnet under the approval policy with NODES in their standings, signed load reports
    from the ones with a load, and the real gateway reading it."""
    tmp = tmp_path_factory.mktemp("demo-network")
    localnet: Localnet = start_localnet_process(tmp / "ledger")
    authority, issuer = localnet.authority, Keypair()
    owners = {name: Keypair() for name in NODES}
    loads = {name: (spec[6], spec[5]) for name, spec in NODES.items() if spec[6] is not None}
    client = RegistryClient(localnet.url)
    try:
        await client.ensure_funded(authority)
        await client.initialize_registry(authority, 3600, p.Policy.APPROVAL)
        await client.add_issuer(authority, issuer.pubkey(), UNSERVED_GATEWAY_URL)
        for name, (role, url, lat, lon, country, capacity, _, standing) in NODES.items():
            await client.ensure_funded(owners[name])
            await client.register_node(
                owners[name], role, p.NodeFields(url, lat, lon, country, capacity, "0.1.0")
            )
            if standing != "pending":
                await client.approve_node(authority, owners[name].pubkey())
            if standing == "suspended":
                await client.set_node_status(
                    authority, owners[name].pubkey(), p.NodeStatus.SUSPENDED
                )
        net = Net(localnet.url, authority, issuer, owners)
        db = f"sqlite+aiosqlite:///{tmp}/gateway.db"
        async with serve_gateway(net, tmp, db, loads) as gw:
            yield Network(gw.url, {n: str(k.pubkey()) for n, k in owners.items()}, loads, gw.http)
    finally:
        await client.close()
        localnet.stop()


async def node_list(network: Network) -> tuple[dict[str, dict[str, Any]], aiohttp.ClientResponse]:
    async with network.http.get(network.gateway_url + "/v1/nodes") as r:
        body = await r.json()
    return {network.name_of(n["key"]): n for n in body["nodes"]}, r


async def until_live(network: Network) -> dict[str, dict[str, Any]]:
    """The node list once every reporting node's report has reached the gateway."""
    for _ in range(100):
        nodes, _ = await node_list(network)
        if all(nodes[name]["live"] for name in network.loads):
            return nodes
        await asyncio.sleep(0.2)
    raise AssertionError(f"not every reporting node is live: {nodes}")


@module_loop
async def test_public_node_list_needs_no_signature_and_shows_every_standing(
    network: Network,
) -> None:
    nodes = await until_live(network)
    _, response = await node_list(network)
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*", "a map page of any origin"
    assert set(nodes) == set(NODES)
    for name, (role, url, lat, lon, country, capacity, load, standing) in NODES.items():
        node = nodes[name]
        assert (node["role"], node["url"], node["country"], node["capacity"]) == (
            role.label,
            url,
            country,
            capacity,
        ), node
        assert (node["lat"], node["lon"]) == pytest.approx((lat, lon), abs=1e-3)
        assert node["status"] == standing, node
        assert isinstance(node["presence_age_seconds"], int) and node["presence_age_seconds"] >= 0
        if load is not None:  # reporting: live, with the load it reports
            assert (node["load"], node["live"], node["routable"]) == (load, True, True), node
            assert node["reason"] is None and 0 <= node["report_age_seconds"] <= 2, node
        else:
            assert not node["live"] and not node["routable"], node
            assert node["report_age_seconds"] is None, node
    assert nodes["tts-gru"]["reason"] == "no fresh load report"
    assert (nodes["sfu-nrt"]["reason"], nodes["stt-syd"]["reason"]) == ("pending", "suspended")


async def dom_nodes(page: Any) -> dict[str, dict[str, Any]]:
    return await page.eval_on_selector_all(
        "circle.node",
        """circles => Object.fromEntries(
        circles.map(c => [c.dataset.key, {role: c.dataset.role, status: c.dataset.status,
          live: c.dataset.live, load: Number(c.dataset.load), r: Number(c.getAttribute('r')),
          greyed: c.classList.contains('greyed'), colour: getComputedStyle(c).fill}]))""",
    )


@module_loop
async def test_network_page_maps_the_nodes_and_follows_the_registry(
    network: Network, tmp_path: Path
) -> None:
    await until_live(network)
    runner, port = await serve(create_app(network.gateway_url, refresh_seconds=1.0))
    try:
        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            log = console_log(page)
            await page.goto(f"http://127.0.0.1:{port}/network")
            await page.wait_for_function(
                f"document.querySelectorAll('circle.node').length === {len(NODES)}", timeout=20_000
            )
            assert await page.locator("#land path").count() > 150, "the shipped world map"
            by_key = await dom_nodes(page)
            shown = {network.name_of(key): node for key, node in by_key.items()}
            assert set(shown) == set(NODES), log
            for name, node in shown.items():
                role, standing = NODES[name][0].label, NODES[name][7]
                assert (node["role"], node["status"]) == (role, standing), (name, node)
                assert node["greyed"] == (name in GREYED), (name, node)
            colours = {shown[n]["colour"] for n in ("sfu-fra", "stt-iad", "tts-sin")}
            assert len(colours) == 3, f"one colour per role: {colours}"
            assert all(shown[n]["colour"] not in colours for n in GREYED)
            # size by load: 40/50 > 30/100 > 2/20
            assert shown["stt-iad"]["r"] > shown["sfu-fra"]["r"] > shown["tts-sin"]["r"]
            assert await page.locator("#node-table tbody tr").count() == len(NODES)
            assert await page.locator("#node-table tr.greyed").count() == len(GREYED)
            status = await page.inner_text("#status")
            assert status.startswith(f"{len(NODES)} nodes, 3 taking sessions"), status
            await page.screenshot(path=str(tmp_path / "network.png"), full_page=True)

            # The page follows the nodes: a report with a new load moves the circle.
            before = shown["sfu-fra"]["r"]
            network.loads["sfu-fra"] = (95, 100)
            await page.wait_for_function(
                f"document.querySelector('circle[data-key=\"{network.keys['sfu-fra']}\"]')"
                ".dataset.load === '95'",
                timeout=20_000,
            )
            after = (await dom_nodes(page))[network.keys["sfu-fra"]]["r"]
            assert after > before, (before, after)
    finally:
        network.loads["sfu-fra"] = (NODES["sfu-fra"][6], NODES["sfu-fra"][5])
        await runner.cleanup()


@module_loop
async def test_network_page_says_when_the_gateway_cannot_be_read(tmp_path: Path) -> None:
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    runner, port = await serve(create_app(gone, refresh_seconds=1.0))
    try:
        async with chromium() as browser:
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{port}/network")
            await page.wait_for_selector("#status.error", timeout=20_000)
            assert f"could not read {gone}/v1/nodes" in await page.inner_text("#status")
            assert await page.locator("#land path").count() > 150, "the map still draws"
            assert await page.locator("circle.node").count() == 0
    finally:
        await runner.cleanup()


def test_demo_app_refuses_a_gateway_url_that_is_not_http() -> None:
    with pytest.raises(ValueError, match="'ftp://gw' is not an http"):
        create_app("ftp://gw")
    with pytest.raises(ValueError, match="refresh_seconds must be > 0"):
        create_app("http://127.0.0.1:8402", refresh_seconds=0)
