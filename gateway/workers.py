"""``gateway serve --workers N``: N gateway processes on one port, and a supervisor.

Each worker is a whole gateway (``gateway.server.serve``) with its own event loop, bound to the
same TCP port with SO_REUSEPORT, so the kernel spreads connections over them. What they must
agree on lives where every process sees it: balances, sessions and answered wallet signatures in
the PostgreSQL ledger (``LedgerReplayGuard``; SQLite allows one writer, so more than one worker
needs PostgreSQL), the nodes on chain.

Load reports are the exception: SO_REUSEPORT would hand each node's datagrams to one worker
only, and the others would never route to it. So the supervisor owns the UDP port: it reads the
registry, checks each report once (``LoadBoard.ingest``) and relays the accepted datagram to every
worker over a private socket pair, where it is kept without a second signature check.

Workers are forked before any event loop exists. If one exits, the supervisor stops the others
and exits with an error, for the service manager to restart the whole set.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import socket
import sys

import uvloop

from gateway.config import GatewayConfig
from gateway.ledger.db import normalize_url
from gateway.liveness import LoadBoard, Relay, bind_udp, open_endpoint
from gateway.routing import NodeDirectory
from gateway.server import registry_client, serve
from registry.keys import load_or_create_keypair

log = logging.getLogger("gateway.workers")

# A relay socket's buffer: at 2,000 reports a second, a worker that stalls for a second loses
# none (141 bytes each; the kernel counts its own overhead per datagram on top).
RELAY_BUFFER_BYTES = 4 << 20


def serve_workers(config: GatewayConfig, workers: int) -> None:
    """Run ``workers`` gateway processes and the supervisor until SIGINT or SIGTERM."""
    if not normalize_url(config.database_url).startswith("postgresql"):
        raise ValueError(
            f"--workers {workers} needs a PostgreSQL ledger (database_url: "
            "postgresql://user@host/db): SQLite allows one writing process. Run one process "
            "(--workers 1) on SQLite."
        )
    if config.replay_guard == "memory":
        raise ValueError(
            "replay_guard: memory with --workers would let each worker answer a copy of a signed "
            "request; remove the setting (the ledger is the default on PostgreSQL)"
        )
    load_or_create_keypair(config.issuer_keypair)  # now, not raced by the workers
    udp = bind_udp(config.listen_host, config.report_port())
    port = udp.getsockname()[1]
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(workers)]
    for ours, theirs in pairs:
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RELAY_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RELAY_BUFFER_BYTES)
        ours.setblocking(False)
    fork = multiprocessing.get_context("fork")
    procs = []
    for i, (_, theirs) in enumerate(pairs):
        closed = [udp, *(s for pair in pairs for s in pair if s is not theirs)]
        proc = fork.Process(
            target=_worker, args=(config, Relay(theirs, port), closed), name=f"gateway-worker-{i}"
        )
        proc.start()
        procs.append(proc)
    for _, theirs in pairs:
        theirs.close()
    print(
        f"gateway supervisor: {workers} workers on http://{config.listen_host}:"
        f"{config.listen_port}, load reports on udp {port}",
        flush=True,
    )
    code = uvloop.run(_supervise(config, udp, [ours for ours, _ in pairs], procs))
    if code:
        sys.exit(code)


def _worker(config: GatewayConfig, relay: Relay, close: list[socket.socket]) -> None:
    for sock in close:  # the supervisor's and the other workers': it reads only its own end
        sock.close()
    uvloop.run(serve(config, relay=relay, reuse_port=True))


async def _supervise(
    config: GatewayConfig,
    udp: socket.socket,
    relay_to: list[socket.socket],
    procs: list[multiprocessing.process.BaseProcess],
) -> int:
    """Check and relay load reports until told to stop or a worker dies; the exit code."""
    client = registry_client(config)
    directory = NodeDirectory(
        client.list_nodes,
        config.registry_refresh_seconds,
        board=LoadBoard(config.load_report_ttl_seconds),
    )
    await directory.start()
    endpoint = await open_endpoint(
        directory.board, directory.by_key, config.listen_host, 0, sock=udp, relay_to=relay_to
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    while not stop.is_set():
        dead = [p for p in procs if not p.is_alive()]
        if dead:
            for p in dead:
                log.error("%s exited with code %s; stopping the others", p.name, p.exitcode)
            code = 1
            break
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except TimeoutError:
            pass
    for p in procs:
        if p.is_alive():
            p.terminate()  # SIGTERM: each worker closes its app cleanly
    await loop.run_in_executor(None, _join, procs)
    endpoint.close()
    await directory.close()
    await client.close()
    return code


def _join(procs: list[multiprocessing.process.BaseProcess], timeout: float = 30.0) -> None:
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            log.warning("%s did not stop in %.0fs; killing it", p.name, timeout)
            p.kill()
            p.join()


__all__ = ["serve_workers"]
