"""Live load off chain: the gateway's board of the nodes' signed load reports, and the UDP
endpoint that fills it (the format and why UDP: ``registry/loadreport.py``). Under
``gateway serve --workers N`` (``gateway/workers.py``) the endpoint is the supervisor's: it checks
each report once and relays the accepted ones to every worker's board over a private socket.

A report is accepted only from a node on the registry's current view, for the role it registered,
no older than the TTL, not replayed (its ``seq`` above the last accepted) and signed by the node's
key; the checks run cheapest first, so a flood of replayed or unknown datagrams costs no
signature check. Routing asks the board for a node's last report and treats a node without a
fresh one as down: a node that stops reporting leaves routing within ``ttl`` seconds, and a node
that registered but never reported is never routed to.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from registry.loadreport import BadReport, LoadReport, parse, verify
from registry.program import NodeAccount

log = logging.getLogger(__name__)

DEFAULT_REPORT_TTL = 15.0
DEFAULT_REPORT_INTERVAL = 5.0
# A report stamped further ahead than this is refused: a clock that far off would make every
# later report from the node look older or newer than it is.
MAX_FUTURE_SECONDS = 5.0


@dataclass(slots=True)
class LiveLoad:
    """A node's last accepted report; ``received`` is on the board's monotonic clock."""

    load: int
    capacity: int
    version: str
    seq: int
    received: float


class LoadBoard:
    """The last accepted report of every node, with counts of what was refused and why."""

    def __init__(
        self,
        ttl: float = DEFAULT_REPORT_TTL,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"report ttl must be > 0 seconds, got {ttl!r}")
        self.ttl = ttl
        self._clock, self._wall = clock, wall
        self._last: dict[bytes, LiveLoad] = {}
        self.accepted = 0
        self.refused: Counter[str] = Counter()

    def ingest(self, datagram: bytes, nodes: Mapping[bytes, NodeAccount]) -> LiveLoad:
        """Check one datagram against the registry view ``nodes`` (node key bytes -> entry) and
        keep it; ``BadReport`` (counted by reason) if it is refused."""
        try:
            live = self._check(datagram, nodes)
        except BadReport as exc:
            self.refused[exc.reason] += 1
            raise
        self.accepted += 1
        return live

    def keep_relayed(self, datagram: bytes) -> LiveLoad | None:
        """Keep a report the supervisor has already checked (signature, registry, age): only
        the order is checked again, as relayed datagrams may overtake each other."""
        report, _, _ = parse(datagram)
        if not self._newer(report):
            return None
        self.accepted += 1
        return self._keep(report)

    def _check(self, datagram: bytes, nodes: Mapping[bytes, NodeAccount]) -> LiveLoad:
        report, body, signature = parse(datagram)
        key = bytes(report.node)
        entry = nodes.get(key)
        if entry is None:
            raise BadReport("unknown", f"node {report.node} is not on the registry")
        if entry.role != report.role:
            raise BadReport(
                "wrong_role",
                f"node {report.node} registered as {entry.role.label}, reports {report.role.label}",
            )
        age = self._wall() - report.time_ms / 1000
        if age > self.ttl:
            raise BadReport("stale", f"report of node {report.node} is {age:.1f}s old")
        if age < -MAX_FUTURE_SECONDS:
            raise BadReport("future", f"report of node {report.node} is {-age:.1f}s ahead")
        if not self._newer(report):
            raise BadReport("replayed", f"seq {report.seq} of node {report.node} is not new")
        verify(report, body, signature)
        return self._keep(report)

    def _newer(self, report: LoadReport) -> bool:
        """Whether ``report`` comes after the last one kept from its node (its ``seq``)."""
        last = self._last.get(bytes(report.node))
        return last is None or report.seq > last.seq

    def _keep(self, report: LoadReport) -> LiveLoad:
        live = LiveLoad(report.load, report.capacity, report.version, report.seq, self._clock())
        self._last[bytes(report.node)] = live
        return live

    def record(self, node: bytes, load: int, capacity: int, version: str = "") -> None:
        """Keep a load for ``node`` as if a report had just arrived: for code that has already
        established the node's word another way (routing tests over made-up entries)."""
        seq = (self._last[node].seq + 1) if node in self._last else 0
        self._last[node] = LiveLoad(load, capacity, version, seq, self._clock())

    def last(self, node: bytes) -> LiveLoad | None:
        """The node's last accepted report, however old."""
        return self._last.get(node)

    def age(self, live: LiveLoad) -> float:
        return self._clock() - live.received

    def fresh(self, node: bytes) -> LiveLoad | None:
        """The node's last report if it is younger than the TTL, else None."""
        live = self._last.get(node)
        if live is None or self._clock() - live.received > self.ttl:
            return None
        return live

    def retain(self, nodes: Mapping[bytes, NodeAccount]) -> None:
        """Forget nodes that left the registry (called on each registry read)."""
        for key in [k for k in self._last if k not in nodes]:
            del self._last[key]

    def __len__(self) -> int:
        return len(self._last)


class LoadReportEndpoint(asyncio.DatagramProtocol):
    """The UDP socket nodes send their reports to; each datagram goes through ``board.ingest``
    against the registry view ``nodes()`` returns, and an accepted one is relayed to each socket
    in ``relay_to`` (the workers')."""

    def __init__(
        self,
        board: LoadBoard,
        nodes: Callable[[], Mapping[bytes, NodeAccount]],
        relay_to: list[socket.socket] | None = None,
    ) -> None:
        self.board, self._nodes = board, nodes
        self.relay_to = relay_to or []
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.board.ingest(data, self._nodes())
        except BadReport as exc:
            log.debug("load report from %s:%s refused: %s", addr[0], addr[1], exc)
            return
        for sock in self.relay_to:
            try:
                sock.send(data)
            except OSError as exc:  # a worker too busy to read: it gets the next report
                log.debug("load report not relayed to a worker: %s", exc)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class RelayedReports(asyncio.DatagramProtocol):
    """A worker's end of the supervisor's relay: reports already checked, kept on ``board``.
    ``port`` is the supervisor's UDP port, which the worker advertises (``GET /v1/liveness``)."""

    def __init__(self, board: LoadBoard, port: int) -> None:
        self.board, self.port = board, port
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: object) -> None:
        try:
            self.board.keep_relayed(data)
        except BadReport as exc:  # cannot happen from our own supervisor; never fatal
            log.warning("relayed load report unreadable: %s", exc)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass(frozen=True)
class Relay:
    """What a worker needs to take reports from its supervisor: its end of the socket pair and
    the UDP port nodes send to."""

    sock: socket.socket
    port: int


def bind_udp(host: str, port: int) -> socket.socket:
    """The report socket, bound before any worker is forked (so its port is known to all)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


async def open_endpoint(
    board: LoadBoard,
    nodes: Callable[[], Mapping[bytes, NodeAccount]],
    host: str,
    port: int,
    *,
    sock: socket.socket | None = None,
    relay_to: list[socket.socket] | None = None,
) -> LoadReportEndpoint:
    """The UDP endpoint on ``host:port`` (0: a free port; ``.port`` says which), or on ``sock``
    if it is already bound."""
    loop = asyncio.get_running_loop()
    _, endpoint = await loop.create_datagram_endpoint(
        lambda: LoadReportEndpoint(board, nodes, relay_to),
        sock=sock if sock is not None else bind_udp(host, port),
    )
    return endpoint


async def open_relay(board: LoadBoard, relay: Relay) -> RelayedReports:
    """A worker's reader of the reports its supervisor relays."""
    loop = asyncio.get_running_loop()
    _, reader = await loop.create_datagram_endpoint(
        lambda: RelayedReports(board, relay.port), sock=relay.sock
    )
    return reader


__all__ = [
    "DEFAULT_REPORT_INTERVAL",
    "DEFAULT_REPORT_TTL",
    "LiveLoad",
    "LoadBoard",
    "LoadReportEndpoint",
    "Relay",
    "RelayedReports",
    "bind_udp",
    "open_endpoint",
    "open_relay",
]
