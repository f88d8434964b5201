"""Fleet benchmark: 10,000 nodes on the registry, their signed load reports, routing over them, and
what presence costs on chain.

    .venv/bin/python bench/fleet.py [--nodes 10000] [--interval 5] [--seconds 30]

Method:
- **Registry.** ``--nodes`` nodes (a third per role, spread over the globe and six countries) are
  registered in-process into a localnet ledger, four registrations per transaction, then a
  localnet *process* serves that ledger.
- **Ingest.** A real gateway process (``gateway.cli``, uvloop) reads that registry. Its CPU
  (utime + stime from /proc) and resident memory are measured over ``--seconds`` twice: first
  with no load reports (the baseline: the gateway refreshing a 10,000-node registry every 3 s),
  then while this process signs and sends every node's report every ``--interval`` seconds over
  loopback UDP, spread evenly. The gateway's ``/v1/servers/status`` must count every node
  healthy, i.e. every node's reports accepted.
- **Routing.** In this process, a ``NodeDirectory`` over the same localnet with its board fed
  real signed datagrams for every node (the ingest cost per report is timed too); then
  ``choose()`` for 10,000 sessions from 100 client locations, warm (each location's order cached,
  as in a running gateway) and cold (the first choice per location after the registry's geometry
  changed). Baseline in the same process: scoring every routable node of the role per choice.
- **Chain.** Three real node agents (the probe role) on a fresh localnet with the presence
  interval shortened to 2 s; transactions counted with ``getTransactionCount`` over a window
  after start-up and scaled to the default 6-hour interval.

Targets (issue 16): ingest of 10,000 nodes at a 5 s interval within 25 % of one core; routing
p99 under 2 ms; at most 4 chain transactions per node per day.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from solders.keypair import Keypair  # noqa: E402
from solders.message import Message  # noqa: E402
from solders.transaction import Transaction  # noqa: E402

from bench.gateway import start_gateway, wait_up  # noqa: E402
from gateway.geo import Location  # noqa: E402
from gateway.liveness import LoadBoard  # noqa: E402
from gateway.routing import NodeDirectory, score_nodes  # noqa: E402
from node.agent import NodeAgent  # noqa: E402
from node.config import NodeConfig  # noqa: E402
from registry import program as p  # noqa: E402
from registry.client import RegistryClient  # noqa: E402
from registry.keys import save_keypair  # noqa: E402
from registry.loadreport import LoadReport  # noqa: E402
from registry.localnet import LocalSvm, deploy_programs  # noqa: E402
from tests.conftest import free_port, start_localnet_process  # noqa: E402
from tests.support.probe_role import ProbeRole  # noqa: E402

PROGRAMS = [(p.SO_PATH, p.PROGRAM_KEYPAIR_PATH)]
COUNTRIES = ["DE", "US", "FR", "JP", "BR", "AU"]
PER_TX = 4
LAMPORTS_PER_SIGNATURE = 5000
USD_PER_SOL = 150.0
DEFAULT_PRESENCE_INTERVAL = 6 * 3600


def node_key(i: int) -> Keypair:
    """Node ``i``'s key, the same in every phase without storing 10,000 of them."""
    return Keypair.from_seed(i.to_bytes(32, "little"))


def node_fields(i: int, rng: random.Random) -> p.NodeFields:
    return p.NodeFields(
        f"https://node{i}.fleet.example:443",
        rng.uniform(-60, 70),
        rng.uniform(-180, 180),
        rng.choice(COUNTRIES),
        16,
        "0.1.0",
    )


def populate(ledger: Path, count: int) -> None:
    svm = LocalSvm(ledger)
    authority = Keypair()
    deploy_programs(svm, PROGRAMS, upgrade_authority=authority)
    svm.airdrop(authority.pubkey(), 10**10)
    send(svm, [p.initialize_registry_ix(authority.pubkey(), 13 * 3600, p.Policy.OPEN)], [authority])
    rng = random.Random(16)
    started = time.perf_counter()
    for first in range(0, count, PER_TX):
        keys = [node_key(i) for i in range(first, min(first + PER_TX, count))]
        for key in keys:
            svm.airdrop(key.pubkey(), 10**8)
        ixs = [
            p.register_node_ix(k.pubkey(), p.Role((first + j) % 3), node_fields(first + j, rng))
            for j, k in enumerate(keys)
        ]
        send(svm, ixs, keys)
    took = time.perf_counter() - started
    print(f"registered {count} nodes in {took:.0f} s ({PER_TX} per transaction, in-process)")
    svm.close()


def send(svm: LocalSvm, ixs: list, signers: list[Keypair]) -> None:
    blockhash, _ = svm.latest_blockhash()
    message = Message.new_with_blockhash(ixs, signers[0].pubkey(), blockhash)
    svm.send_transaction(Transaction(signers, message, blockhash))


def signed_report(i: int, key: Keypair, seq: int) -> bytes:
    load = (i * 7 + seq) % 12  # a moving load, always under the capacity of 16
    return LoadReport(
        key.pubkey(), p.Role(i % 3), load, 16, "0.1.0", seq, time.time_ns() // 1_000_000
    ).sign(key)


class Fleet:
    """Every node's report every ``interval`` seconds, spread evenly, over one UDP socket."""

    def __init__(self, count: int, interval: float, port: int) -> None:
        self.keys = [node_key(i) for i in range(count)]
        self.interval, self.port = interval, port
        self.seq = time.time_ns() // 1000
        self.sent = 0

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=("127.0.0.1", self.port)
        )
        tick = 0.05
        per_tick = max(1, round(len(self.keys) * tick / self.interval))
        i, next_at = 0, time.monotonic()
        try:
            while not stop.is_set():
                self.seq += 1
                for _ in range(per_tick):
                    transport.sendto(signed_report(i, self.keys[i], self.seq))
                    self.sent += 1
                    i = (i + 1) % len(self.keys)
                next_at += tick
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            transport.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def gateway_counts(url: str) -> dict[str, dict[str, int]]:
    async with aiohttp.ClientSession() as http, http.get(url + "/v1/servers/status") as r:
        return (await r.json())["services"]


async def udp_port(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(url + "/v1/liveness") as r:
        return int((await r.json())["udp_port"])


async def measure(pid: int, seconds: float) -> tuple[float, float]:
    """The process's share of one core over ``seconds``, and its RSS at the end."""
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0), rss_mib(pid)


async def ingest(url: str, pid: int, count: int, interval: float, seconds: float) -> None:
    deadline = time.monotonic() + 120
    while sum(c["total"] for c in (await gateway_counts(url)).values()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway never listed every node")
        await asyncio.sleep(1)
    await asyncio.sleep(4)  # past a refresh, so the baseline is steady
    idle_cpu, idle_rss = await measure(pid, seconds)
    print(
        f"gateway, {count} nodes registered, no reports: {idle_cpu:6.1%} of a core, "
        f"RSS {idle_rss:.0f} MiB"
    )
    fleet, stop = Fleet(count, interval, await udp_port(url)), asyncio.Event()
    sending = asyncio.create_task(fleet.run(stop))
    await asyncio.sleep(interval + 3)  # every node has reported once
    healthy = sum(c["healthy"] for c in (await gateway_counts(url)).values())
    sent0, t0 = fleet.sent, time.monotonic()
    busy_cpu, busy_rss = await measure(pid, seconds)
    rate = (fleet.sent - sent0) / (time.monotonic() - t0)
    healthy_after = sum(c["healthy"] for c in (await gateway_counts(url)).values())
    stop.set()
    await sending
    print(
        f"gateway, {count} nodes reporting every {interval:g} s ({rate:.0f} reports/s): "
        f"{busy_cpu:6.1%} of a core, RSS {busy_rss:.0f} MiB"
    )
    print(
        f"  ingest alone: {busy_cpu - idle_cpu:6.1%} of a core "
        f"({(busy_cpu - idle_cpu) / rate * 1e6:.0f} us per report), "
        f"+{busy_rss - idle_rss:.0f} MiB"
    )
    print(
        f"  healthy nodes counted by the gateway: {healthy} after one interval, "
        f"{healthy_after} at the end (of {count})"
    )


async def routing(rpc: str, count: int) -> None:
    async with RegistryClient(rpc) as client:
        # refreshed in the background every 3 s, as in a gateway; no report expires here
        directory = NodeDirectory(client.list_nodes, board=LoadBoard(3600))
        await directory.start()
        nodes = await directory.nodes()
        view = directory.by_key()
        seq = time.time_ns() // 1000
        datagrams = [signed_report(i, node_key(i), seq) for i in range(count)]
        t0 = time.perf_counter()
        for datagram in datagrams:
            directory.board.ingest(datagram, view)
        per_report = (time.perf_counter() - t0) / count
        print(
            f"routing over {len(nodes)} nodes (in-process; {len(directory.board)} reports "
            f"ingested at {per_report * 1e6:.0f} us each, signature check included)"
        )
        rng = random.Random(5)
        clients = [
            Location(rng.uniform(-50, 65), rng.uniform(-170, 170), rng.choice(COUNTRIES), "bench")
            for _ in range(100)
        ]
        roles = ["sfu", "stt", "tts"]
        cold = []
        for role in roles:
            for where in clients:
                t0 = time.perf_counter()
                await directory.choose(role, where)
                cold.append(time.perf_counter() - t0)
        warm, full = [], []
        for n in range(10_000):
            role, where = roles[n % 3], clients[rng.randrange(len(clients))]
            t0 = time.perf_counter()
            chosen = await directory.choose(role, where)
            warm.append(time.perf_counter() - t0)
            if n % 10 == 0:  # the baseline: score every routable node of the role
                t0 = time.perf_counter()
                mine = [
                    (x, live)
                    for x in nodes
                    if x.role.label == role and (live := directory.live(x)) is not None
                ]
                best = score_nodes(mine, where)[0].node
                full.append(time.perf_counter() - t0)
                assert best.owner == chosen.owner, "the bounded walk disagrees with full scoring"
        await directory.close()
        ms = lambda xs, q: statistics.quantiles(xs, n=100)[q - 1] * 1000  # noqa: E731
        print(
            f"  choose(), warm: p50 {ms(warm, 50):.3f} ms, p99 {ms(warm, 99):.3f} ms "
            f"({len(warm)} choices)"
        )
        print(
            f"  choose(), cold (first per location and role): p50 {ms(cold, 50):.1f} ms, "
            f"p99 {ms(cold, 99):.1f} ms"
        )
        print(
            f"  baseline, scoring every routable node: p50 {ms(full, 50):.2f} ms "
            f"-> warm walk {ms(full, 50) / ms(warm, 50):.0f}x faster at p50"
        )


async def chain_cost(
    tmp: Path, agents: int = 3, interval: float = 2.0, window: float = 20.0
) -> None:
    net = start_localnet_process(tmp / "ledger-presence")
    try:
        async with RegistryClient(net.url) as client:
            await client.ensure_funded(net.authority)
            await client.initialize_registry(net.authority, 13 * 3600, p.Policy.OPEN)
            running = []
            for i in range(agents):
                key = tmp / f"agent-{i}.json"
                save_keypair(Keypair(), key)
                port = free_port()
                config = NodeConfig(
                    role="stt",
                    keypair=key,
                    rpc_url=net.url,
                    listen_port=port,
                    public_url=f"http://127.0.0.1:{port}",
                    location={"lat": 50.1, "lon": 8.7, "country": "DE"},
                    capacity=4,
                    calibrate=False,
                    presence_interval=interval,
                    state_dir=tmp / f"state-{i}",
                )
                agent = NodeAgent(config, ProbeRole)
                await agent.start()
                running.append(agent)
            await asyncio.sleep(1)
            before, t0 = (await client.rpc.get_transaction_count()).value, time.monotonic()
            await asyncio.sleep(window)
            txs = (await client.rpc.get_transaction_count()).value - before
            took = time.monotonic() - t0
            for agent in running:
                await agent.shutdown()
    finally:
        net.stop()
    per_day_short = txs / agents / took * 86400
    per_day = per_day_short * interval / DEFAULT_PRESENCE_INTERVAL
    sol_month = per_day * 30 * LAMPORTS_PER_SIGNATURE / 1e9
    print(
        f"chain: {agents} agents, presence every {interval:g} s: {txs} transactions in "
        f"{took:.0f} s = {per_day_short:.0f} per node per day"
    )
    print(
        f"  scaled to the default {DEFAULT_PRESENCE_INTERVAL // 3600} h interval: "
        f"{per_day:.2f} transactions per node per day, {sol_month:.6f} SOL a month "
        f"(${sol_month * USD_PER_SOL:.3f} at ${USD_PER_SOL:.0f}/SOL; a 5 s heartbeat was "
        f"17,280 a day, ${17_280 * 30 * LAMPORTS_PER_SIGNATURE / 1e9 * USD_PER_SOL:.0f} a month)"
    )


async def run(args: argparse.Namespace, tmp: Path) -> None:
    ledger = tmp / "ledger-fleet"
    populate(ledger, args.nodes)
    net = start_localnet_process(ledger)
    try:
        issuer = tmp / "issuer.json"
        save_keypair(Keypair(), issuer)
        proc, url = start_gateway(tmp, net.url, f"sqlite+aiosqlite:///{tmp}/gw.db", issuer)
        try:
            await wait_up(url)
            await ingest(url, proc.pid, args.nodes, args.interval, args.seconds)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        await routing(net.url, args.nodes)
    finally:
        net.stop()
    await chain_cost(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
