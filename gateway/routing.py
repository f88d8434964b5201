"""Which node serves a session: the registry's view, cached, and a choice by distance and load.

The gateway keeps no node list of its own (DESIGN §1): it reads the on-chain registry through a
``list_nodes`` callable, keeps the answer for a few seconds, and refreshes it in the background.

Choice. Every healthy node of the role gets a score in kilometres, lower is better::

    score = distance_km + load_penalty_km * load/capacity - (country_bonus_km if same country)

- distance is great-circle (haversine) between the client's location and the node's coordinates;
- the load term makes an empty node beat a busy one that is only a little nearer: with the default
  500 km, a node at 90 % load loses to an idle one up to 450 km farther;
- the same-country bonus is *added to* the score, never overwritten (dTelecom's peer computed a
  bonus and then replaced it with the bare distance). It matters because a country-level lookup
  puts the client at the country's centre, and a node across a border can be "nearer" than one
  in the client's own country;
- ties break on load ratio, then distance, then the node key, so the same inputs always give the
  same node.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from registry.nodeurl import node_url_problem
from registry.program import NodeAccount, NodeStatus, Role

from .geo import Location

log = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0088
DEFAULT_LOAD_PENALTY_KM = 500.0
DEFAULT_COUNTRY_BONUS_KM = 300.0

# Public service names (API, pricing, /v1/servers/status) <-> registry roles.
SERVICE_ROLES: dict[str, Role] = {"webrtc": Role.SFU, "stt": Role.STT, "tts": Role.TTS}

ListNodes = Callable[[], Awaitable[list[NodeAccount]]]


class NoCapacity(Exception):
    """No healthy node of ``role`` (the gateway answers 503)."""

    def __init__(self, role: Role, detail: str = "") -> None:
        self.role = role
        msg = f"no healthy {role.label} node"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class DirectoryUnavailable(Exception):
    """The registry could not be read and there is no recent view to fall back on (a 503 too)."""


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def unhealthy_reason(node: NodeAccount) -> str | None:
    """Why a node must not get new sessions, or None: stale heartbeat, not active (pending
    admission or suspended), a URL that would carry tokens in clear text, or full."""
    if node.stale:
        return "stale"
    if node.status != NodeStatus.ACTIVE:
        return node.status.label
    if node_url_problem(node.url):
        return "insecure url"
    if node.load >= node.capacity:
        return f"full {node.load}/{node.capacity}"
    return None


@dataclass(frozen=True)
class Candidate:
    node: NodeAccount
    distance_km: float
    load_ratio: float
    same_country: bool
    score: float

    def sort_key(self) -> tuple[float, float, float, str]:
        return (self.score, self.load_ratio, self.distance_km, str(self.node.owner))

    def describe(self) -> str:
        cc = " same-country" if self.same_country else ""
        return (
            f"{_name(self.node)} d={self.distance_km:.0f}km"
            f" load={self.node.load}/{self.node.capacity}"
            f"{cc} score={self.score:.0f}"
        )


def _name(node: NodeAccount) -> str:
    return f"{str(node.owner)[:8]}({node.country or '??'} {node.url})"


def score_nodes(
    nodes: list[NodeAccount],
    client: Location,
    *,
    load_penalty_km: float = DEFAULT_LOAD_PENALTY_KM,
    country_bonus_km: float = DEFAULT_COUNTRY_BONUS_KM,
) -> list[Candidate]:
    """Score healthy ``nodes`` for ``client``, best first (see the module docstring)."""
    out = []
    for node in nodes:
        distance = haversine_km(client.lat, client.lon, node.lat, node.lon)
        ratio = node.load / node.capacity if node.capacity > 0 else 1.0
        same = bool(client.country) and client.country.upper() == node.country.upper()
        score = distance + load_penalty_km * ratio
        if same:
            score -= country_bonus_km
        out.append(Candidate(node, distance, ratio, same, score))
    out.sort(key=Candidate.sort_key)
    return out


_MAX_CACHED_CHOICES = 65_536


class NodeDirectory:
    """The registry's node list, cached. ``start()`` refreshes every ``refresh_seconds`` in the
    background; without it (tests, one-off tools) a read refreshes when the view is that old.
    A failed refresh keeps the last view, up to ``max_age_seconds``; past that (or before any
    success) reads raise ``DirectoryUnavailable`` rather than route on a picture of the past.
    """

    def __init__(
        self,
        list_nodes: ListNodes,
        refresh_seconds: float = 3.0,
        *,
        max_age_seconds: float = 60.0,
        load_penalty_km: float = DEFAULT_LOAD_PENALTY_KM,
        country_bonus_km: float = DEFAULT_COUNTRY_BONUS_KM,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if refresh_seconds <= 0:
            raise ValueError(f"refresh_seconds must be > 0, got {refresh_seconds!r}")
        self._list_nodes = list_nodes
        self.refresh_seconds = refresh_seconds
        self.max_age_seconds = max(max_age_seconds, refresh_seconds)
        self.load_penalty_km = load_penalty_km
        self.country_bonus_km = country_bonus_km
        self._clock = clock
        self._nodes: list[NodeAccount] | None = None
        self._fetched_at = -math.inf
        self._last_error: BaseException | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        # (role, client) -> winner for the current view: a view is fixed (staleness included)
        # until the next fetch, and scoring every node on every request is most of routing's cost
        self._choices: dict[tuple[Role, Location], NodeAccount] = {}

    # ------------------------------------------------ lifecycle

    async def start(self) -> None:
        """First fetch (a failure is logged, not raised: the registry may come up later), then
        the background loop."""
        try:
            await self.refresh()
        except Exception as exc:
            log.warning("node directory: first registry read failed: %s", exc)
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="node-directory-refresh")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await self.refresh()
            except Exception as exc:
                log.warning(
                    "node directory: registry read failed (keeping %s): %s", self._age_text(), exc
                )

    def _age_text(self) -> str:
        if self._nodes is None:
            return "no view"
        return f"view of {self._clock() - self._fetched_at:.0f}s ago"

    # ------------------------------------------------ reading

    async def refresh(self) -> None:
        """Fetch now; concurrent callers share one registry read."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._fetch())
        await asyncio.shield(self._inflight)

    async def _fetch(self) -> None:
        try:
            nodes = list(await self._list_nodes())
        except Exception as exc:
            self._last_error = exc
            raise
        self._nodes, self._fetched_at, self._last_error = nodes, self._clock(), None
        self._choices = {}
        log.debug("node directory: %d nodes", len(nodes))

    async def nodes(self) -> list[NodeAccount]:
        """Every registered node as last read, refreshing first if the view is too old."""
        age = self._clock() - self._fetched_at
        if self._nodes is None or (self._task is None and age >= self.refresh_seconds):
            try:
                await self.refresh()
            except Exception as exc:
                if self._nodes is None:
                    raise DirectoryUnavailable(f"registry unreachable: {exc}") from exc
        age = self._clock() - self._fetched_at
        if self._nodes is None or age > self.max_age_seconds:
            raise DirectoryUnavailable(
                f"registry view is {age:.0f}s old (limit {self.max_age_seconds:g}s); "
                f"last error: {self._last_error}"
            )
        return self._nodes

    async def find(self, owner: str) -> NodeAccount | None:
        """A registered node by its key; an unknown key forces one fresh read (it may be new)."""
        for node in await self.nodes():
            if str(node.owner) == owner:
                return node
        if self._clock() - self._fetched_at < 1.0:
            return None
        try:
            await self.refresh()
        except Exception:  # noqa: BLE001 - keep the view we have
            return None
        return next((n for n in self._nodes or [] if str(n.owner) == owner), None)

    async def healthy(self, role: Role | str) -> list[NodeAccount]:
        """Nodes of ``role`` that may take a new session: not stale, not suspended, not full."""
        role = Role.parse(role)
        return [n for n in await self.nodes() if n.role == role and unhealthy_reason(n) is None]

    async def counts(self) -> dict[str, dict[str, int]]:
        """Per service, for ``/v1/servers/status``: ``total`` registered, ``healthy`` (routable),
        ``capacity``/``load`` summed over live nodes (active, fresh heartbeat; full ones too)."""
        nodes = await self.nodes()
        out: dict[str, dict[str, int]] = {}
        for service, role in SERVICE_ROLES.items():
            mine = [n for n in nodes if n.role == role]
            live = [n for n in mine if not n.stale and n.status == NodeStatus.ACTIVE]
            out[service] = {
                "total": len(mine),
                "healthy": sum(1 for n in mine if unhealthy_reason(n) is None),
                "capacity": sum(n.capacity for n in live),
                "load": sum(n.load for n in live),
            }
        return out

    async def choose(self, role: Role | str, client: Location) -> NodeAccount:
        """The best node of ``role`` for a client at ``client``; ``NoCapacity`` if there is none."""
        role = Role.parse(role)
        nodes = await self.nodes()
        explain = log.isEnabledFor(logging.DEBUG)
        if not explain and (hit := self._choices.get((role, client))) is not None:
            return hit
        mine = [n for n in nodes if n.role == role]
        skipped = [(n, r) for n in mine if (r := unhealthy_reason(n)) is not None]
        healthy = [n for n in mine if unhealthy_reason(n) is None]
        ranked = score_nodes(
            healthy,
            client,
            load_penalty_km=self.load_penalty_km,
            country_bonus_km=self.country_bonus_km,
        )
        if not ranked:
            reasons = ", ".join(f"{_name(n)} {r}" for n, r in skipped) or "none registered"
            log.debug("route %s client=%s: no healthy node (%s)", role.label, client, reasons)
            raise NoCapacity(
                role, f"{len(mine)} registered ({reasons})" if mine else "none registered"
            )
        winner = ranked[0]
        if nodes is self._nodes:
            if len(self._choices) >= _MAX_CACHED_CHOICES:
                self._choices.clear()
            self._choices[(role, client)] = winner.node
        if explain:
            log.debug(
                "route %s client=%s winner=%s candidates=[%s] skipped=[%s]",
                role.label,
                client,
                _name(winner.node),
                "; ".join(c.describe() for c in ranked),
                "; ".join(f"{_name(n)} {r}" for n, r in skipped),
            )
        return winner.node
