"""The node's side of liveness off chain: its signed load report, sent to every gateway that routes
to it, every few seconds (the format and why UDP: ``registry/loadreport.py``).

Each gateway says where and how often it wants reports (``GET /v1/liveness``: a UDP port, an
interval and its TTL). A gateway that cannot be asked yet (down, restarting) is asked again every
interval; the others get their reports meanwhile. Sending is fire and forget: a lost datagram is
replaced by the next, and the gateway's TTL spans three intervals.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from solders.keypair import Keypair

from common.tasks import stop_tasks
from registry.loadreport import LoadReport
from registry.program import Role

log = logging.getLogger("node.liveness")

DEFAULT_INTERVAL = 5.0
# what a gateway that is down, or answers nonsense, makes asking it raise
_UNANSWERED = (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError, TypeError)
LoadNow = Callable[[], tuple[int, int]]  # (load, capacity) as the role has them now


@dataclass(frozen=True)
class Target:
    """One gateway's report address, as it published it."""

    gateway_url: str
    family: int
    address: tuple[str, int]
    interval: float
    issuer: str | None  # the key it signs tokens with, in its own word


class LoadReporter:
    """Sends ``load_now()`` signed with ``keypair`` to each gateway in ``gateway_urls``; the
    interval is the shortest any gateway asks for unless ``interval`` fixes it."""

    def __init__(
        self,
        keypair: Keypair,
        role: Role,
        load_now: LoadNow,
        version: str,
        gateway_urls: list[str],
        *,
        interval: float | None = None,
        timeout: float = 5.0,
    ) -> None:
        if interval is not None and interval <= 0:
            raise ValueError(f"report interval must be > 0 seconds, got {interval!r}")
        self.keypair, self.role, self.version = keypair, role, version
        self._load_now = load_now
        self._pending: list[str] = []
        self._failing: set[str] = set()  # asked and not answering: warned once, then quiet
        self.targets: list[Target] = []
        self.add_gateways(gateway_urls)
        self._fixed_interval = interval
        self._timeout = timeout
        # grows by one per report and starts at the start time in microseconds, so it keeps
        # growing across restarts without state on disk (a gateway refuses a seq it has seen)
        self._seq = time.time_ns() // 1000
        self.sent = 0
        self._socks: dict[int, socket.socket] = {}  # one per address family in use
        self._task: asyncio.Task[None] | None = None

    def add_gateways(self, urls: list[str]) -> None:
        """Report to these gateways too (found later: a gateway listed on the registry)."""
        known = {t.gateway_url for t in self.targets} | set(self._pending)
        for url in dict.fromkeys(u.rstrip("/") for u in urls):
            if url not in known:
                self._pending.append(url)

    def issuer_url(self, issuer: str) -> str | None:
        """The URL of the reporting target whose gateway said it signs with ``issuer``."""
        return next((t.gateway_url for t in self.targets if t.issuer == issuer), None)

    @property
    def interval(self) -> float:
        if self._fixed_interval is not None:
            return self._fixed_interval
        return min((t.interval for t in self.targets), default=DEFAULT_INTERVAL)

    async def start(self) -> None:
        """Ask each gateway where it wants reports, send the first, then keep sending."""
        await self._discover()
        self.report_now()
        self._task = asyncio.create_task(self._loop(), name="load-reports")

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_tasks(task)
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()

    def report(self, load: int, capacity: int) -> bytes:
        """The next signed report of ``load``/``capacity`` (one ``seq`` for every gateway)."""
        self._seq += 1
        return LoadReport(
            self.keypair.pubkey(),
            self.role,
            min(load, capacity),
            capacity,
            self.version,
            self._seq,
            time.time_ns() // 1_000_000,
        ).sign(self.keypair)

    def report_now(self) -> None:
        """Send the role's load now to every gateway found so far."""
        if not self.targets:
            return
        datagram = self.report(*self._load_now())
        for target in self.targets:
            try:
                self._socket(target.family).sendto(datagram, target.address)
            except OSError as exc:  # a full buffer or an unreachable network: the next one
                log.debug("load report to %s not sent: %s", target.gateway_url, exc)
        self.sent += 1

    def _socket(self, family: int) -> socket.socket:
        sock = self._socks.get(family)
        if sock is None:
            sock = self._socks[family] = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
        return sock

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self._pending:
                await self._discover()
            self.report_now()

    async def _discover(self) -> None:
        """Ask every gateway not yet found, all at once (one that does not answer costs the
        timeout once, not once per gateway behind it); those that fail stay pending."""
        pending = list(self._pending)
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            answers = await asyncio.gather(
                *(self._ask(http, url) for url in pending), return_exceptions=True
            )
        for url, answer in zip(pending, answers, strict=True):
            if isinstance(answer, _UNANSWERED):
                level = logging.DEBUG if url in self._failing else logging.WARNING
                self._failing.add(url)
                log.log(
                    level,
                    "cannot ask %s where to send load reports (%s); retrying every %.0fs",
                    url,
                    answer,
                    self.interval,
                )
                continue
            if isinstance(answer, BaseException):
                raise answer
            self._pending.remove(url)
            self._failing.discard(url)
            self.targets.append(answer)
            log.info(
                "load reports to %s: udp %s:%d every %gs",
                url,
                answer.address[0],
                answer.address[1],
                self.interval,
            )

    async def _ask(self, http: aiohttp.ClientSession, url: str) -> Target:
        async with http.get(url + "/v1/liveness") as response:
            response.raise_for_status()
            body = await response.json()
        port, interval = int(body["udp_port"]), float(body["interval_seconds"])
        if not 0 < port < 65536 or interval <= 0:
            raise ValueError(f"{url}/v1/liveness answered port {port}, interval {interval}")
        host = urlsplit(url).hostname or "127.0.0.1"
        [(family, _, _, _, address), *_] = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_DGRAM
        )
        issuer = body.get("issuer")
        return Target(
            url, family, address[:2], interval, issuer if isinstance(issuer, str) else None
        )


__all__ = ["DEFAULT_INTERVAL", "LoadReporter", "Target"]
