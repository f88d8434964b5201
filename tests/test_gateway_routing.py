"""Client location (gateway.geo) and node choice (gateway.routing).

The node directory is fed by a fake ``list_nodes`` callable: it stands in for the registry view,
whose real client is tested against the localnet elsewhere, and for the nodes' load reports (each
listed node's ``load``/``capacity`` goes on the directory's board as if it had just reported;
the reports themselves are tested in test_gateway_liveness.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from solders.pubkey import Pubkey

from gateway.geo import (
    GeoConfigError,
    InvalidClientIP,
    Location,
    Locator,
    client_address,
    load_country_centroids,
    parse_ip,
)
from gateway.liveness import LiveLoad, LoadBoard
from gateway.routing import (
    DirectoryUnavailable,
    NoCapacity,
    NodeDirectory,
    haversine_km,
    score_nodes,
)
from registry.program import NodeAccount, NodeStatus, Role
from tests.support.node_entries import CITIES, node

BERLIN = Location(52.52, 13.40, "DE", "default")
DE_CENTRE = Location(51.0533, 9.7943, "DE", "embedded-country")  # as the locator gives for DE
LONDON = Location(51.5074, -0.1278, "GB", "mmdb-city")


class FakeRegistry:
    """The registry view: a list the test edits, and a count of reads; each read also puts every
    listed node's load on ``board`` (nodes named in ``silent`` send none)."""

    def __init__(self, nodes: list[NodeAccount] | None = None) -> None:
        self.nodes = list(nodes or [])
        self.calls = 0
        self.fail: Exception | None = None
        self.board = LoadBoard()
        self.silent: set[str] = set()

    async def __call__(self) -> list[NodeAccount]:
        self.calls += 1
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        for n in self.nodes:
            if n.url not in self.silent:
                self.board.record(bytes(n.owner), n.load, n.capacity)
        return list(self.nodes)


def directory_of(registry: FakeRegistry, **kw) -> NodeDirectory:
    return NodeDirectory(registry, board=registry.board, **kw)


def reported(n: NodeAccount) -> LiveLoad:
    """The live load ``FakeRegistry`` puts on the board for ``n``."""
    return LiveLoad(n.load, n.capacity, "", 0, 0.0)


def directory(*nodes: NodeAccount, **kw) -> NodeDirectory:
    return directory_of(FakeRegistry(list(nodes)), **kw)


# ---------------------------------------------------------------- choice


@pytest.mark.fast
def test_haversine() -> None:
    assert haversine_km(51.5074, -0.1278, 48.8566, 2.3522) == pytest.approx(343.6, abs=1)
    assert haversine_km(0, 179.5, 0, -179.5) == pytest.approx(111.2, abs=0.5)  # across 180°
    assert haversine_km(10, 10, 10, 10) == 0


@pytest.mark.fast
async def test_nearest_wins() -> None:
    d = directory(node("newyork"), node("frankfurt"), node("london"))
    assert (await d.choose("sfu", LONDON)).url == "wss://london.example"
    assert (await d.choose(Role.SFU, BERLIN)).url == "wss://frankfurt.example"


@pytest.mark.fast
async def test_role_is_respected() -> None:
    d = directory(node("london"), node("frankfurt", role=Role.STT))
    assert (await d.choose("stt", LONDON)).url == "wss://frankfurt.example"
    with pytest.raises(NoCapacity, match="no healthy tts node: none registered"):
        await d.choose("tts", LONDON)


@pytest.mark.fast
@pytest.mark.parametrize(
    "bad",
    [
        {"load": 10},
        {"load": 11},
        {"capacity": 0},
        {"stale": True},
        {"status": NodeStatus.SUSPENDED},
    ],
)
async def test_unhealthy_nearest_is_skipped(bad: dict) -> None:
    d = directory(node("london", **bad), node("frankfurt"))
    assert (await d.choose("sfu", LONDON)).url == "wss://frankfurt.example"
    assert [n.url for n in await d.healthy("sfu")] == ["wss://frankfurt.example"]


@pytest.mark.fast
async def test_same_country_bonus_changes_the_choice() -> None:
    """From Germany's centre Strasbourg (FR) is 312 km, Munich (DE) 349 km: the bonus must tip it.
    A bonus that is computed but then overwritten by the bare distance would pick Strasbourg."""
    nodes = [node("strasbourg"), node("munich")]
    with_bonus = directory(*nodes)
    without = directory(*nodes, country_bonus_km=0)
    assert (await without.choose("sfu", DE_CENTRE)).url == "wss://strasbourg.example"
    assert (await with_bonus.choose("sfu", DE_CENTRE)).url == "wss://munich.example"
    ranked = score_nodes([(n, reported(n)) for n in nodes], DE_CENTRE)
    assert ranked[0].same_country and ranked[0].score == pytest.approx(ranked[0].distance_km - 300)
    # A client whose country is unknown gets no bonus from anyone.
    unknown = Location(DE_CENTRE.lat, DE_CENTRE.lon, "", "default:invalid")
    assert (await with_bonus.choose("sfu", unknown)).url == "wss://strasbourg.example"


@pytest.mark.fast
async def test_load_aware_among_near_distances() -> None:
    # From Germany's centre: Frankfurt 131 km, Cologne 199 km.
    busy = directory(node("frankfurt", load=9), node("cologne", load=0))
    assert (await busy.choose("sfu", DE_CENTRE)).url == "wss://cologne.example"
    even = directory(node("frankfurt", load=1), node("cologne", load=1))
    assert (await even.choose("sfu", DE_CENTRE)).url == "wss://frankfurt.example"
    # Load does not drag a session across an ocean.
    far = directory(node("newyork", load=0), node("frankfurt", load=9))
    assert (await far.choose("sfu", DE_CENTRE)).url == "wss://frankfurt.example"


@pytest.mark.fast
async def test_deterministic_tie_break() -> None:
    a, b = Pubkey.from_string("1" * 32), Pubkey.new_unique()
    n1, n2 = node("london", owner=b), node("london", owner=a)
    for order in ([n1, n2], [n2, n1]):
        assert (await directory(*order).choose("sfu", LONDON)).owner == a


@pytest.mark.fast
async def test_no_capacity_names_the_reasons() -> None:
    d = directory(node("london", load=10), node("frankfurt", stale=True))
    with pytest.raises(NoCapacity) as ei:
        await d.choose("sfu", LONDON)
    assert ei.value.role == Role.SFU
    assert "2 registered" in str(ei.value) and "full 10/10" in str(ei.value)
    assert "presence expired" in str(ei.value)
    with pytest.raises(NoCapacity):
        await directory().choose("sfu", LONDON)


@pytest.mark.fast
async def test_a_report_moves_the_choice_at_once_and_the_registry_at_its_next_read() -> None:
    registry = FakeRegistry([node("london"), node("frankfurt")])
    d = directory_of(registry)
    london = registry.nodes[0]
    assert (await d.choose("sfu", LONDON)).url == "wss://london.example"
    d.board.record(bytes(london.owner), 10, 10)  # London reports itself full
    assert (await d.choose("sfu", LONDON)).url == "wss://frankfurt.example"
    d.board.record(bytes(london.owner), 9, 10)  # and has room again
    assert (await d.choose("sfu", LONDON)).url == "wss://london.example"
    assert registry.calls == 1  # no registry read for any of it
    registry.nodes = [node("london", stale=True)]
    assert (await d.choose("sfu", LONDON)).url == "wss://london.example"  # same view
    await d.refresh()
    with pytest.raises(NoCapacity, match="presence expired"):
        await d.choose("sfu", LONDON)


@pytest.mark.fast
async def test_a_silent_node_leaves_routing_after_the_report_ttl() -> None:
    """Routing needs a fresh report: a node that never reported is never chosen, and one whose
    last report is older than the TTL is passed over and named as silent."""
    now = [1000.0]
    registry = FakeRegistry([node("london"), node("frankfurt"), node("newyork")])
    registry.silent = {"wss://newyork.example"}
    registry.board = LoadBoard(ttl=15, clock=lambda: now[0])
    d = directory_of(registry)
    assert (await d.choose("sfu", LONDON)).url == "wss://london.example"
    registry.silent.add("wss://london.example")  # London stops reporting
    now[0] += 10
    await d.refresh()  # Frankfurt reports again; London's last report is 10 s old
    assert (await d.choose("sfu", LONDON)).url == "wss://london.example"
    now[0] += 6  # 16 s: past the TTL
    assert (await d.choose("sfu", LONDON)).url == "wss://frankfurt.example"
    assert [n.url for n in await d.healthy("sfu")] == ["wss://frankfurt.example"]
    reasons = {n.url: d.reason(n) for n in await d.nodes()}
    assert reasons == {
        "wss://london.example": "silent for 16s",
        "wss://frankfurt.example": None,
        "wss://newyork.example": "no fresh load report",
    }


@pytest.mark.fast
async def test_the_bounded_walk_picks_what_scoring_every_node_picks() -> None:
    """``choose`` reads live loads only until no farther node can win; over random fleets, loads
    and clients it must name the same node as scoring all of them (``score_nodes``)."""
    rng = random.Random(7)
    cities = list(CITIES)
    for trial in range(40):
        nodes = [
            replace(
                node(rng.choice(cities)),
                lat=rng.uniform(-60, 70),
                lon=rng.uniform(-180, 180),
                country=rng.choice(["DE", "FR", "US", "GB", "JP"]),
                load=(load := rng.randint(0, 10)),
                capacity=rng.choice([load, 10, 16]) or 1,
                stale=rng.random() < 0.1,
            )
            for _ in range(rng.randint(1, 300))
        ]
        d = directory(*nodes)
        await d.refresh()  # the view, and every node's report on the board
        client = Location(
            rng.uniform(-60, 70), rng.uniform(-180, 180), rng.choice(["DE", "US"]), "t"
        )
        routable = [(n, reported(n)) for n in nodes if d.reason(n) is None]
        if not routable:
            with pytest.raises(NoCapacity):
                await d.choose("sfu", client)
            continue
        best = score_nodes(routable, client)[0].node
        assert (await d.choose("sfu", client)).owner == best.owner, trial


@pytest.mark.fast
async def test_choice_is_logged_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    d = directory(node("london", load=3), node("frankfurt"), node("newyork", stale=True))
    with caplog.at_level(logging.DEBUG, logger="gateway.routing"):
        await d.choose("sfu", LONDON)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("route ")]
    assert "\n" not in line
    assert "client=(51.51,-0.13 GB via mmdb-city)" in line
    assert "winner=" in line and "london.example" in line.split("candidates=")[0]
    assert "load=3/10" in line and "score=" in line and "d=" in line
    assert "newyork.example) presence expired" in line.split("skipped=")[1]


@pytest.mark.fast
async def test_counts() -> None:
    d = directory(
        node("london", load=2),
        node("frankfurt", load=10),  # full: live, not healthy
        node("newyork", stale=True, load=5),  # dead: counted in total only
        node("cologne", role=Role.STT, load=1, capacity=4),
        node("munich", role=Role.TTS, status=NodeStatus.SUSPENDED),
    )
    assert await d.counts() == {
        "webrtc": {"total": 3, "healthy": 1, "capacity": 20, "load": 12},
        "stt": {"total": 1, "healthy": 1, "capacity": 4, "load": 1},
        "tts": {"total": 1, "healthy": 0, "capacity": 0, "load": 0},
    }


# ---------------------------------------------------------------- the cached view


@pytest.mark.fast
async def test_refresh_on_demand_after_refresh_seconds() -> None:
    now = [100.0]
    reg = FakeRegistry([node("frankfurt")])
    d = directory_of(reg, refresh_seconds=3, clock=lambda: now[0])
    assert (await d.choose("sfu", LONDON)).url == "wss://frankfurt.example"
    reg.nodes.append(node("london"))
    now[0] += 2.9
    assert (await d.choose("sfu", LONDON)).url == "wss://frankfurt.example"  # cached
    assert reg.calls == 1
    now[0] += 0.1
    assert (await d.choose("sfu", LONDON)).url == "wss://london.example"
    assert reg.calls == 2


@pytest.mark.fast
async def test_background_refresh_picks_up_new_node() -> None:
    reg = FakeRegistry([node("frankfurt")])
    d = directory_of(reg, refresh_seconds=0.05)
    await d.start()
    try:
        assert reg.calls == 1
        reg.nodes.append(node("london"))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if len(await d.healthy("sfu")) == 2:
                break
        assert (await d.choose("sfu", LONDON)).url == "wss://london.example"
        assert reg.calls >= 2
    finally:
        await d.close()


@pytest.mark.fast
async def test_concurrent_first_reads_share_one_fetch() -> None:
    reg = FakeRegistry([node("london")])
    d = directory_of(reg)
    await asyncio.gather(*(d.choose("sfu", LONDON) for _ in range(10)))
    assert reg.calls == 1


@pytest.mark.fast
async def test_failed_refresh_keeps_view_until_max_age() -> None:
    now = [0.0]
    reg = FakeRegistry([node("london")])
    d = directory_of(reg, refresh_seconds=3, max_age_seconds=30, clock=lambda: now[0])
    await d.choose("sfu", LONDON)
    reg.fail = ConnectionError("rpc down")
    now[0] = 10
    assert (await d.choose("sfu", LONDON)).url == "wss://london.example"
    now[0] = 31
    with pytest.raises(DirectoryUnavailable, match="rpc down"):
        await d.choose("sfu", LONDON)
    reg.fail = None
    assert (await d.choose("sfu", LONDON)).url == "wss://london.example"


@pytest.mark.fast
async def test_unreachable_registry_from_the_start() -> None:
    reg = FakeRegistry()
    reg.fail = ConnectionError("connection refused")
    d = directory_of(reg)
    await d.start()  # logs, does not raise
    try:
        with pytest.raises(DirectoryUnavailable, match="connection refused"):
            await d.counts()
    finally:
        await d.close()


@pytest.mark.fast
def test_refresh_seconds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="refresh_seconds"):
        NodeDirectory(FakeRegistry(), refresh_seconds=0)


# ---------------------------------------------------------------- geo: addresses


@pytest.mark.fast
@pytest.mark.parametrize(
    "text,expected",
    [
        ("81.2.69.160", "81.2.69.160"),
        (" 81.2.69.160:5678 ", "81.2.69.160"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:81.2.69.160", "81.2.69.160"),
        ("fe80::1%eth0", "fe80::1%eth0"),
        ("unknown", None),
        ("", None),
        (None, None),
        ("[::1", None),
    ],
)
def test_parse_ip(text: str | None, expected: str | None) -> None:
    addr = parse_ip(text)
    assert (str(addr) if addr is not None else None) == expected


@pytest.mark.fast
@pytest.mark.parametrize(
    "ip,reason",
    [
        ("10.1.2.3", "private"),
        ("192.168.1.1", "private"),
        ("172.16.0.1", "private"),
        ("fd00::1", "private"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.254", "cgnat"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "private"),
        ("not-an-ip", "invalid"),
        ("", "invalid"),
    ],
)
def test_non_public_addresses_get_the_default(ip: str, reason: str) -> None:
    loc = Locator(BERLIN).locate(ip)
    assert (loc.lat, loc.lon, loc.country) == (BERLIN.lat, BERLIN.lon, "DE")
    assert loc.source == f"default:{reason}"


def test_embedded_database_country_level() -> None:
    loc = Locator(BERLIN)
    us = loc.locate("8.8.8.8")
    assert us.country == "US" and us.source == "embedded-country"
    assert (us.lat, us.lon) == load_country_centroids()["US"]
    assert loc.locate("81.2.69.160").country == "GB"
    assert loc.locate("2a00:1450:4001::1").country == "DE"  # IPv6 too
    assert loc.locate("::ffff:81.2.69.160").country == "GB"
    off = Locator(BERLIN, embedded=False).locate("8.8.8.8")
    assert off.source == "default:not-found"


@pytest.mark.fast
def test_country_centroid_table() -> None:
    table = load_country_centroids()
    assert len(table) > 240
    assert all(-90 <= la <= 90 and -180 <= lo <= 180 for la, lo in table.values())
    # Population-weighted: the US centre sits in Missouri, not in Kansas or the Arctic.
    assert haversine_km(*table["US"], 37.4, -92.2) < 300
    assert haversine_km(*table["DE"], 51.05, 9.79) < 50
    assert haversine_km(*table["FJ"], -17.8, 178.2) < 100  # antimeridian handled


@pytest.fixture(scope="module")
def mmdb_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GeoLite2-City-shaped database: one city record, one country-only, IPv4 and IPv6."""
    import mmdb_writer
    from netaddr import IPSet

    w = mmdb_writer.MMDBWriter(
        ip_version=6, database_type="GeoLite2-City", languages=["en"], ipv4_compatible=True
    )
    f64 = mmdb_writer.MmdbF64
    w.insert_network(
        IPSet(["81.2.69.0/24"]),
        {
            "country": {"iso_code": "GB"},
            "city": {"names": {"en": "London"}},
            "location": {"latitude": f64(51.5142), "longitude": f64(-0.0931)},
        },
    )
    w.insert_network(IPSet(["2a02:ff::/32"]), {"country": {"iso_code": "FR"}})
    w.insert_network(IPSet(["5.6.7.0/24"]), {"registered_country": {"iso_code": "BR"}})
    path = tmp_path_factory.mktemp("geo") / "tiny-city.mmdb"
    w.to_db_file(str(path))
    return path


def test_mmdb_city_then_country_then_embedded(mmdb_file: Path) -> None:
    loc = Locator(BERLIN, mmdb_file)
    try:
        city = loc.locate("81.2.69.160")
        assert (city.lat, city.lon, city.country, city.source) == (
            51.5142,
            -0.0931,
            "GB",
            "mmdb-city",
        )
        fr = loc.locate("2a02:ff::5")
        assert (fr.country, fr.source) == ("FR", "mmdb-country")
        assert (fr.lat, fr.lon) == load_country_centroids()["FR"]
        assert loc.locate("5.6.7.8").country == "BR"
        missing = loc.locate("8.8.8.8")  # not in the file: the embedded database answers
        assert (missing.country, missing.source) == ("US", "embedded-country")
        assert loc.locate("10.0.0.1").source == "default:private"
    finally:
        loc.close()


@pytest.mark.fast
def test_mmdb_config_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(GeoConfigError, match="nope.mmdb.*does not exist"):
        Locator(BERLIN, tmp_path / "nope.mmdb")
    junk = tmp_path / "junk.mmdb"
    junk.write_bytes(b"not a database")
    with pytest.raises(GeoConfigError, match="junk.mmdb.*not a MaxMind DB"):
        Locator(BERLIN, junk)


def test_country_without_centroid_keeps_the_country() -> None:
    loc = Locator(BERLIN, centroids={}).locate("8.8.8.8")
    assert (loc.country, loc.source, loc.lat) == ("US", "default:no-centroid", BERLIN.lat)


# ---------------------------------------------------------------- geo: which address


@pytest.fixture
async def addr_client():
    async def handler(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        trust = request.query.get("trust", "1") == "1"
        try:
            ip = client_address(request, body.get("client_ip"), trust_forwarded_for=trust)
        except InvalidClientIP as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ip": ip})

    app = web.Application()
    app.router.add_post("/where", handler)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


async def where(c: TestClient, body: dict | None = None, xff: str | None = None, trust: str = "1"):
    headers = {"X-Forwarded-For": xff} if xff else {}
    r = await c.post(f"/where?trust={trust}", json=body or {}, headers=headers)
    return r.status, await r.json()


@pytest.mark.fast
async def test_client_address_order(addr_client: TestClient) -> None:
    xff = "81.2.69.160, 10.0.0.2, 172.16.0.9"
    assert await where(addr_client, {"client_ip": "2a00:1450:4001::1"}, xff) == (
        200,
        {"ip": "2a00:1450:4001::1"},
    )
    assert await where(addr_client, {}, xff) == (200, {"ip": "81.2.69.160"})
    assert await where(addr_client, {"client_ip": ""}, "[2001:db8::7]:443") == (
        200,
        {"ip": "2001:db8::7"},
    )
    assert await where(addr_client) == (200, {"ip": "127.0.0.1"})  # the TCP peer


@pytest.mark.fast
async def test_forwarded_for_untrusted_or_garbage_uses_peer(addr_client: TestClient) -> None:
    assert await where(addr_client, {}, "81.2.69.160", trust="0") == (200, {"ip": "127.0.0.1"})
    assert await where(addr_client, {}, "unknown, 81.2.69.160") == (200, {"ip": "127.0.0.1"})


@pytest.mark.fast
async def test_bad_client_ip_is_refused(addr_client: TestClient) -> None:
    status, body = await where(addr_client, {"client_ip": "my-laptop"})
    assert status == 400 and "'my-laptop'" in body["error"]


async def test_end_to_end_forwarded_client_is_routed_near() -> None:
    """A request from a UK address picks the London node; one from 127.0.0.1 the default's."""
    locator = Locator(BERLIN)
    d = directory(node("london"), node("frankfurt"), node("newyork"))
    uk = locator.locate("81.2.69.160")
    assert (await d.choose("sfu", uk)).url == "wss://london.example"
    here = locator.locate("127.0.0.1")
    assert (await d.choose("sfu", here)).url == "wss://frankfurt.example"
    us = locator.locate("8.8.8.8")
    assert (await d.choose("sfu", us)).url == "wss://newyork.example"
