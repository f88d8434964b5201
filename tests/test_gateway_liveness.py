"""Many gateways, one network: liveness off chain (signed load reports, registry/loadreport.py,
checked by the gateway's board, gateway/liveness.py, sent by the node side, node/liveness.py, over
real UDP on loopback), one node reporting to two gateways, and two gateways sharing one registry
and one PostgreSQL ledger.

The board's checks are unit tests over real keys and real signatures; the rest runs the real
gateway over its own localnet (``gateway_net``), with a real node agent process that is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from solders.keypair import Keypair

from gateway.auth import sign_request
from gateway.liveness import LoadBoard
from node.gateways import GatewayBook
from node.liveness import LoadReporter
from node.outbox import Outbox
from registry import program as p
from registry.client import RegistryClient
from registry.keys import load_keypair
from registry.loadreport import REPORT_LEN, BadReport, LoadReport, parse
from registry.tokens import TokenError, verify_token
from tests.conftest import ROOT, UNSERVED_GATEWAY_URL
from tests.support.gateway_net import Net, serve_gateway
from tests.support.node_entries import node
from tests.support.node_process import node_config, wait_health

NOW = 1_800_000_000.0


def report(
    key: Keypair,
    *,
    load: int = 1,
    capacity: int = 4,
    seq: int = 1,
    age: float = 0.0,
    role: p.Role = p.Role.STT,
) -> LoadReport:
    return LoadReport(key.pubkey(), role, load, capacity, "0.1.0", seq, int((NOW - age) * 1000))


def board_and_view() -> tuple[LoadBoard, Keypair, dict[bytes, p.NodeAccount]]:
    key = Keypair()
    entry = node("frankfurt", role=p.Role.STT, owner=key.pubkey())
    return LoadBoard(15, clock=lambda: 0.0, wall=lambda: NOW), key, {bytes(key.pubkey()): entry}


@pytest.mark.fast
def test_a_report_round_trips_and_is_kept() -> None:
    board, key, view = board_and_view()
    datagram = report(key, load=3, capacity=4, seq=7).sign(key)
    assert len(datagram) == REPORT_LEN
    assert parse(datagram)[0] == report(key, load=3, capacity=4, seq=7)
    live = board.ingest(datagram, view)
    assert (live.load, live.capacity, live.version, live.seq) == (3, 4, "0.1.0", 7)
    assert board.fresh(bytes(key.pubkey())) == live
    assert (board.accepted, sum(board.refused.values())) == (1, 0)


@pytest.mark.fast
def test_forged_stale_replayed_and_foreign_reports_are_refused_and_change_nothing() -> None:
    board, key, view = board_and_view()
    board.ingest(report(key, load=1, seq=10).sign(key), view)
    before = board.last(bytes(key.pubkey()))
    intruder = Keypair()
    body = bytearray(report(key, load=0, seq=11).sign(key))
    body[-64:] = bytes(intruder.sign_message(bytes(body[:-64])))  # right node, wrong signer
    tampered = bytearray(report(key, load=1, seq=12).sign(key))
    tampered[4 + 32 + 8 + 8 + 1] = 0  # load 1 -> 0 after signing
    cases = {
        "forged": [bytes(body), bytes(tampered)],
        "stale": [report(key, seq=20, age=16).sign(key)],
        "future": [report(key, seq=21, age=-6).sign(key)],
        "replayed": [report(key, seq=10).sign(key), report(key, seq=9).sign(key)],
        "unknown": [report(intruder, seq=30).sign(intruder)],
        "wrong_role": [report(key, seq=31, role=p.Role.TTS).sign(key)],
        "malformed": [b"", b"VNL1" + bytes(200), b"XXXX" + report(key, seq=32).sign(key)[4:]],
    }
    for reason, datagrams in cases.items():
        for datagram in datagrams:
            with pytest.raises(BadReport) as ei:
                board.ingest(datagram, view)
            assert ei.value.reason == reason, (reason, ei.value)
    assert board.refused == {reason: len(d) for reason, d in cases.items()}
    assert board.last(bytes(key.pubkey())) == before and board.accepted == 1
    with pytest.raises(ValueError, match="cannot be signed"):
        report(key).sign(intruder)


@pytest.mark.fast
def test_a_report_above_its_capacity_is_malformed() -> None:
    board, key, view = board_and_view()
    with pytest.raises(BadReport, match="above capacity"):
        board.ingest(report(key, load=5, capacity=4).sign(key), view)


async def wait_healthy(url: str, service: str, wanted: int, timeout: float = 20) -> float:
    """Seconds until the gateway at ``url`` counts ``wanted`` healthy ``service`` nodes."""

    start = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while time.monotonic() - start < timeout:
            async with http.get(url + "/v1/servers/status") as r:
                if (await r.json())["services"][service]["healthy"] == wanted:
                    return time.monotonic() - start
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never counted {wanted} healthy {service} node(s)")


async def node_list(url: str) -> dict[str, dict]:

    async with aiohttp.ClientSession() as http, http.get(url + "/v1/nodes") as r:
        return {n["key"]: n for n in (await r.json())["nodes"]}


async def test_one_node_reports_to_two_gateways_and_both_route_to_it(
    gateway_net: Net, tmp_path: Path
) -> None:
    load = [(2, 8)]
    key = gateway_net.nodes["tts-de"]
    a_db, b_db = (f"sqlite+aiosqlite:///{tmp_path}/{n}.db" for n in "ab")
    async with (
        serve_gateway(gateway_net, tmp_path, a_db, loads={}) as a,
        serve_gateway(gateway_net, tmp_path, b_db, loads={}) as b,
    ):
        for gw in (a, b):  # nobody reports yet: registered is not routable
            assert (await wait_healthy(gw.url, "tts", 0)) >= 0
        reporter = LoadReporter(
            key, p.Role.TTS, lambda: load[0], "0.1.0", [a.url, b.url], interval=0.2
        )
        await reporter.start()
        try:
            assert [t.gateway_url for t in reporter.targets] == [a.url, b.url]
            for gw in (a, b):
                await wait_healthy(gw.url, "tts", 1)
                entry = (await node_list(gw.url))[str(key.pubkey())]
                assert (entry["load"], entry["capacity"], entry["live"]) == (2, 8, True), entry
                client = await gw.funded(0.1)
                session = await client.create_tts_session(100)
                assert session.server_url == "https://tts-de.test"
        finally:
            await reporter.close()


async def test_a_killed_node_leaves_routing_within_the_report_ttl_without_a_transaction(
    gateway_net: Net, tmp_path: Path
) -> None:
    """A real node agent (the probe role) reports to the real gateway; SIGKILL, and the gateway
    stops routing to it once its last report is older than the TTL, while its entry on chain is
    as it was: present, active, same presence time (the registry's TTL here is an hour)."""
    db = f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
    async with serve_gateway(gateway_net, tmp_path, db, loads={}, load_report_ttl_seconds=2) as gw:
        config, port = node_config(
            tmp_path,
            gateway_net,
            "killed",
            gateway_url=gw.url,
            location={"lat": -33.9, "lon": 151.2, "country": "AU"},
        )
        log = open(tmp_path / "killed.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.probe_role", str(config)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            await wait_health(port, proc)
            key = load_keypair(tmp_path / "killed.json").pubkey()
            await wait_healthy(gw.url, "stt", 1)
            assert (await node_list(gw.url))[str(key)]["live"] is True
            async with RegistryClient(gateway_net.url) as chain:
                before = await chain.get_node(key)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                gone_after = await wait_healthy(gw.url, "stt", 0)
                after = await chain.get_node(key)
            print(f"killed node left routing {gone_after:.1f}s after SIGKILL (report TTL 2s)")
            assert after == before and after.status == p.NodeStatus.ACTIVE and not after.stale
            entry = (await node_list(gw.url))[str(key)]
            assert entry["live"] is False and entry["reason"].startswith("silent for"), entry
        finally:
            if proc.poll() is None:
                proc.kill()


async def test_two_gateways_on_one_registry_and_one_postgresql_ledger(
    gateway_net: Net, tmp_path: Path, pg_db_url: str
) -> None:
    """Gateway A and gateway B, each with its own issuer key listed on the registry, share the
    registry and one PostgreSQL ledger, both sweepers running: a request signed for A is refused
    as a replay by B; a session created on A is extended on B (B signs the new token), its node
    reports usage to B, and once it expires it is settled exactly once."""
    second = Keypair()
    async with RegistryClient(gateway_net.url) as chain:
        await chain.add_issuer(gateway_net.authority, second.pubkey(), UNSERVED_GATEWAY_URL)
    try:
        async with (
            serve_gateway(gateway_net, tmp_path, pg_db_url) as a,
            serve_gateway(replace(gateway_net, issuer=second), tmp_path, pg_db_url) as b,
        ):
            on_a = await a.funded(1.0)
            on_b = b.client(on_a.key)
            # A signed request answered by A is a replay at B: the answered signatures live in
            # the shared ledger, not in one process.
            spend = {
                **sign_request("POST", "/v1/tts/session", on_a.key),
                "Content-Type": "application/json",
            }
            body = json.dumps({"max_characters": 50}).encode()
            async with a.http.post(a.url + "/v1/tts/session", data=body, headers=spend) as r:
                assert r.status == 200
            async with b.http.post(b.url + "/v1/tts/session", data=body, headers=spend) as r:
                assert r.status == 401 and "replayed" in (await r.json())["error"]
            assert len(await on_b.sessions()) == 1
            session = await on_a.create_stt_session(duration_minutes=0.05)  # 3 s
            claims = verify_token(session.token, {str(gateway_net.issuer.pubkey())}, "stt")
            extended = await on_b.extend_stt_session(session.session_id, 0.05)
            assert extended.session_id == session.session_id
            claims_b = verify_token(extended.token, {str(second.pubkey())}, "stt")
            assert claims_b.issuer == str(second.pubkey()) != claims.issuer
            assert claims_b.limit > claims.limit and claims_b.session_id == claims.session_id
            with pytest.raises(TokenError):  # signed by B, not by A
                verify_token(extended.token, {str(gateway_net.issuer.pubkey())}, "stt")
            body = json.dumps(
                {
                    "session_id": session.session_id,
                    "event": "usage",
                    "usage": {"duration_seconds": 4},
                }
            ).encode()
            assert (await b.post_signed("/internal/events", body, "stt-de")).status == 200
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                [seen_a, _], [seen_b, _] = await on_a.sessions(), await on_b.sessions()
                if seen_a["status"] == "expired":
                    break
                await asyncio.sleep(0.3)
            assert seen_a == seen_b and seen_a["status"] == "expired", seen_a
            await asyncio.sleep(1.0)  # more sweeps on both gateways: nothing more to settle
            account = await on_a.account()
            kinds = [
                t.kind
                for t in await a.ledger.list_transactions(account.id)
                if t.session_id == session.session_id
            ]
            assert sorted(kinds) == ["charge", "refund", "reserve", "reserve"], kinds
            charged = int(seen_a["charged_microcredits"])
            assert charged > 0 and account.credit_balance == 1_000_000 - charged
            assert (await a.ledger.audit(account.id)).ok
    finally:
        async with RegistryClient(gateway_net.url) as chain:
            await chain.remove_issuer(gateway_net.authority, second.pubkey())


async def test_a_node_finds_every_gateway_on_the_registry_and_bills_each_its_own_sessions(
    gateway_net: Net, tmp_path: Path
) -> None:
    """Two gateways, each listed on the registry with its key and URL, and a node configured
    with neither: it reports its load to both (both route to it), and each session's usage goes
    to the gateway that issued its token, which settles it. A misrouted event would be refused
    by the other gateway's ledger (unknown session) and land in the outbox's dead letters."""
    second = Keypair()
    key = gateway_net.nodes["stt-de"]
    a_db, b_db = (f"sqlite+aiosqlite:///{tmp_path}/{n}.db" for n in "ab")
    async with (
        RegistryClient(gateway_net.url) as chain,
        serve_gateway(gateway_net, tmp_path, a_db, loads={}) as a,
        serve_gateway(replace(gateway_net, issuer=second), tmp_path, b_db, loads={}) as b,
    ):
        await chain.update_issuer(gateway_net.authority, gateway_net.issuer.pubkey(), a.url)
        await chain.add_issuer(gateway_net.authority, second.pubkey(), b.url)
        reporter = LoadReporter(key, p.Role.STT, lambda: (0, 8), "0.1.0", [], interval=0.2)
        book = GatewayBook(None, reporter, chain.issuer_urls, refresh_seconds=60)
        outbox = Outbox(tmp_path / "outbox.sqlite", None, key)
        outbox.resolve = book.url_for
        try:
            await book.start()
            await reporter.start()
            await outbox.start()
            for gw in (a, b):
                await wait_healthy(gw.url, "stt", 1)
            sessions = {}
            for gw, issuer in ((a, gateway_net.issuer), (b, second)):
                client = await gw.funded(0.1)
                session = await client.create_stt_session(duration_minutes=1)
                assert session.server_url == "https://stt-de.test"
                claims = verify_token(session.token, {str(issuer.pubkey())}, "stt")
                sessions[gw.url] = (client, session.session_id)
                outbox.report_usage(
                    session.session_id, True, duration_seconds=1, issuer=claims.issuer
                )
            for _ in range(100):
                if outbox.pending() == 0:
                    break
                await asyncio.sleep(0.1)
            assert outbox.pending() == 0 and outbox.dead() == []
            for client, session_id in sessions.values():
                [record] = await client.sessions()
                assert (record["session_id"], record["status"]) == (session_id, "completed")
                assert record["charged_microcredits"] == "100", record  # 1 s at $0.006/min
        finally:
            await outbox.stop()
            await reporter.close()
            await book.close()
            await chain.update_issuer(
                gateway_net.authority, gateway_net.issuer.pubkey(), UNSERVED_GATEWAY_URL
            )
            await chain.remove_issuer(gateway_net.authority, second.pubkey())
