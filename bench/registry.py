"""Registry benchmark: compute units, fees, listing time at scale, localnet throughput.

    .venv/bin/python bench/registry.py [--nodes 1000,10000] [--seconds 5]

Method: compute units and fees come from the program running in the embedded SVM (deterministic).
For listing, N nodes are registered in-process into a ledger directory, then a separate localnet
*process* serves that ledger and `RegistryClient.list_nodes()` is timed from this process over
loopback HTTP (getProgramAccounts with dataSize + memcmp filters, decoding, staleness), as a
gateway would see it. Throughput is heartbeat transactions sent through the RPC and confirmed,
one sender and eight concurrent senders, against the same localnet process. Everything is bounded
in time; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from solders.keypair import Keypair  # noqa: E402
from solders.message import Message  # noqa: E402
from solders.transaction import Transaction  # noqa: E402

from registry import program as p  # noqa: E402
from registry.client import RegistryClient  # noqa: E402
from registry.localnet import LocalSvm, deploy_programs  # noqa: E402
from tests.conftest import start_localnet_process  # noqa: E402

PROGRAMS = [(p.SO_PATH, p.PROGRAM_KEYPAIR_PATH)]


def send(svm: LocalSvm, ixs: list, signers: list[Keypair]) -> str:
    blockhash, _ = svm.latest_blockhash()
    tx = Transaction(
        signers, Message.new_with_blockhash(ixs, signers[0].pubkey(), blockhash), blockhash
    )
    return str(svm.send_transaction(tx))


def fields(i: int) -> p.NodeFields:
    return p.NodeFields(
        f"https://node{i}.example.org:443", (i % 170) - 85.0, (i % 350) - 175.0, "DE", 16, "0.1.0"
    )


def compute_units() -> None:
    from solders.signature import Signature

    svm = LocalSvm(None)
    authority, node, issuer = Keypair(), Keypair(), Keypair()
    deploy_programs(svm, PROGRAMS, upgrade_authority=authority)  # the one key that may init
    for k in (authority, node):
        svm.airdrop(k.pubkey(), 10**10)
    steps = [
        (
            "initialize_registry",
            [p.initialize_registry_ix(authority.pubkey(), 30, p.Policy.APPROVAL)],
            [authority],
        ),
        (
            "add_issuer",
            [p.add_issuer_ix(authority.pubkey(), issuer.pubkey(), "https://gw.example.org")],
            [authority],
        ),
        ("register_node", [p.register_node_ix(node.pubkey(), p.Role.STT, fields(1))], [node]),
        ("approve_node", [p.approve_node_ix(authority.pubkey(), node.pubkey())], [authority]),
        ("heartbeat", [p.heartbeat_ix(node.pubkey(), 3, 16)], [node]),
        ("update_node", [p.update_node_ix(node.pubkey(), fields(2))], [node]),
        (
            "set_node_status",
            [p.set_node_status_ix(authority.pubkey(), node.pubkey(), p.NodeStatus.ACTIVE)],
            [authority],
        ),
        ("deregister_node", [p.deregister_node_ix(node.pubkey())], [node]),
        ("remove_issuer", [p.remove_issuer_ix(authority.pubkey(), issuer.pubkey())], [authority]),
    ]
    print("compute units per instruction (one instruction per transaction):")
    for name, ixs, signers in steps:
        sig = send(svm, ixs, signers)
        meta = svm.get_transaction(Signature.from_string(sig)).meta
        extra = f"  fee {meta['fee']} lamports" if name == "heartbeat" else ""
        print(f"  {name:20} {meta['computeUnitsConsumed']:>6} CU{extra}")
    svm.close()


def populate(ledger: Path, count: int) -> None:
    svm = LocalSvm(ledger)
    authority = Keypair()
    deploy_programs(svm, PROGRAMS, upgrade_authority=authority)
    svm.airdrop(authority.pubkey(), 10**10)
    send(svm, [p.initialize_registry_ix(authority.pubkey(), 3600, p.Policy.OPEN)], [authority])
    started = time.perf_counter()
    for i in range(count):
        owner = Keypair()
        svm.airdrop(owner.pubkey(), 10**8)
        send(svm, [p.register_node_ix(owner.pubkey(), p.Role(i % 3), fields(i))], [owner])
    rate = count / (time.perf_counter() - started)
    print(f"  registered {count} nodes in-process ({rate:.0f} registrations/s with journal)")
    svm.close()


async def time_listing(url: str, count: int, repeats: int = 5) -> None:
    async with RegistryClient(url) as client:
        times, per_role = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            nodes = await client.list_nodes()
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await client.list_nodes("stt")
            per_role.append(time.perf_counter() - t0)
        assert len(nodes) == count, (len(nodes), count)
        print(
            f"  list_nodes() with {count:>6} nodes: "
            f"median {statistics.median(times) * 1000:7.1f} ms"
            f"  (best {min(times) * 1000:.1f} ms); role=stt (1/3): "
            f"{statistics.median(per_role) * 1000:.1f} ms"
        )


async def throughput(url: str, seconds: float, authority: Keypair) -> None:
    """``authority``: the localnet program's upgrade authority (the one key that may init)."""
    async with RegistryClient(url) as client:
        await client.ensure_funded(authority)
        if await client.get_registry() is None:
            await client.initialize_registry(authority, 3600, p.Policy.OPEN)
        owners = [Keypair() for _ in range(8)]
        for i, owner in enumerate(owners):
            await client.ensure_funded(owner)
            await client.register_node(owner, p.Role.SFU, fields(i))

        async def sender(owner: Keypair, deadline: float, counter: list[int]) -> None:
            load = 0
            while time.perf_counter() < deadline:
                load += 1  # a new load each time: never the same transaction twice
                await client.heartbeat(owner, load, 1_000_000)
                counter[0] += 1

        for concurrency in (1, 8):
            counter = [0]
            t0 = time.perf_counter()
            deadline = t0 + seconds
            await asyncio.gather(*(sender(o, deadline, counter) for o in owners[:concurrency]))
            rate = counter[0] / (time.perf_counter() - t0)
            print(
                f"  heartbeat transactions, {concurrency} sender(s): {rate:7.0f} tx/s confirmed "
                f"({counter[0]} in {seconds:.0f} s)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1000,10000")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    compute_units()
    with tempfile.TemporaryDirectory() as tmp:
        for count in [int(x) for x in args.nodes.split(",")]:
            ledger = Path(tmp) / f"ledger-{count}"
            print(f"listing {count} nodes:")
            populate(ledger, count)
            net = start_localnet_process(ledger)
            try:
                asyncio.run(time_listing(net.url, count))
            finally:
                net.stop()
        print("localnet throughput over JSON-RPC (separate localnet process, loopback):")
        net = start_localnet_process(Path(tmp) / "ledger-tps")
        try:
            asyncio.run(throughput(net.url, args.seconds, net.authority))
        finally:
            net.stop()


if __name__ == "__main__":
    main()
