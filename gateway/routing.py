"""Which node serves a session: the registry's view, cached, each node's live load as it last
reported it, and a choice by distance and load.

The gateway keeps no node list of its own (DESIGN §1): it reads the on-chain registry through a
``list_nodes`` callable, keeps the answer for a few seconds, and refreshes it in the background.
The chain says who may serve (key, role, URL, location, capacity, admission, a presence renewed
every few hours); the nodes' signed load reports (``gateway/liveness.py``) say who is up and how
busy. A node is routable when it is active, its presence has not expired, its URL is safe, its last
report is younger than the board's TTL and it reported headroom.

Choice. Every routable node of the role gets a score in kilometres, lower is better::

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

Speed. Loads change with every report, so no choice can be cached; what can be is each client
location's nodes ordered by ``distance - bonus``, the score's lower bound, until the registry's
geometry changes. A choice walks that order and stops at the first node whose bound is above the
best score so far: a few nodes, not all 10,000 (``bench/fleet.py``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from operator import is_

import numpy as np

from common.tasks import repeat, stop_tasks
from registry.nodeurl import node_url_problem
from registry.program import NodeAccount, NodeStatus, Role

from .geo import Location
from .liveness import LiveLoad, LoadBoard

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


def unhealthy_reason(node: NodeAccount, live: LiveLoad | None) -> str | None:
    """Why a node must not get new sessions, or None: its presence on chain expired, it is not
    active (pending admission or suspended), its URL would carry tokens in clear text, it sent no
    fresh load report (``live`` is None), or it reported itself full."""
    if reason := _static_reason(node):
        return reason
    if live is None:
        return "no fresh load report"
    capacity = min(live.capacity, node.capacity)
    if live.load >= capacity:
        return f"full {live.load}/{capacity}"
    return None


def _static_reason(node: NodeAccount) -> str | None:
    """The part of ``unhealthy_reason`` that only the registry view decides."""
    if node.stale:
        return "presence expired"
    if node.status != NodeStatus.ACTIVE:
        return node.status.label
    if node_url_problem(node.url):
        return "insecure url"
    return None


@dataclass(frozen=True)
class Candidate:
    node: NodeAccount
    load: int
    capacity: int
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
            f" load={self.load}/{self.capacity}"
            f"{cc} score={self.score:.0f}"
        )


def _name(node: NodeAccount) -> str:
    return f"{str(node.owner)[:8]}({node.country or '??'} {node.url})"


def score_nodes(
    nodes: list[tuple[NodeAccount, LiveLoad]],
    client: Location,
    *,
    load_penalty_km: float = DEFAULT_LOAD_PENALTY_KM,
    country_bonus_km: float = DEFAULT_COUNTRY_BONUS_KM,
) -> list[Candidate]:
    """Score ``nodes`` (each with its live load) for ``client``, best first (see the module
    docstring). Every node is scored: the reference the bounded walk in ``choose`` must agree
    with, and the full ranking a debug log shows."""
    out = []
    for node, live in nodes:
        distance = haversine_km(client.lat, client.lon, node.lat, node.lon)
        capacity = min(live.capacity, node.capacity)
        ratio = live.load / capacity if capacity > 0 else 1.0
        same = bool(client.country) and client.country.upper() == node.country.upper()
        score = distance + load_penalty_km * ratio
        if same:
            score -= country_bonus_km
        out.append(Candidate(node, live.load, capacity, distance, ratio, same, score))
    out.sort(key=Candidate.sort_key)
    return out


_MAX_CACHED_ORDERS = 4096


def _geometry(nodes: list[NodeAccount]) -> list[tuple[object, ...]]:
    """What the cached orders depend on: everything on chain but the presence time and the load
    recorded with it."""
    return [
        (bytes(n.owner), n.role, n.lat, n.lon, n.country, n.url, n.status, n.stale, n.capacity)
        for n in nodes
    ]


@dataclass(frozen=True, slots=True)
class _Order:
    """A client location's servable nodes (positions in ``group``) by the score's lower bound
    (distance - bonus), with their distances."""

    group: _Servable
    bounds: list[float]
    distances: list[float]
    positions: list[int]


class _Servable:
    """One role's nodes that the registry lets serve, with their coordinates as arrays, so a
    client location's order costs one vectorised haversine and one sort (about a millisecond
    for 3,000 nodes) instead of a Python loop."""

    def __init__(self, nodes: list[NodeAccount]) -> None:
        self.nodes = nodes
        self.keys = [bytes(n.owner) for n in nodes]
        self.texts = [str(n.owner) for n in nodes]
        self.lat = np.radians(np.array([n.lat for n in nodes], dtype=np.float64))
        self.lon = np.radians(np.array([n.lon for n in nodes], dtype=np.float64))
        self.country = np.array([n.country.upper() for n in nodes], dtype="<U2")

    def order(self, client: Location, bonus_km: float) -> _Order:
        lat, lon = math.radians(client.lat), math.radians(client.lon)
        a = (
            np.sin((self.lat - lat) / 2) ** 2
            + math.cos(lat) * np.cos(self.lat) * np.sin((self.lon - lon) / 2) ** 2
        )
        distance = 2 * EARTH_RADIUS_KM * np.arcsin(np.minimum(1.0, np.sqrt(a)))
        bound = distance
        if client.country:
            bound = distance - bonus_km * (self.country == client.country.upper())
        positions = np.argsort(bound, kind="stable")
        return _Order(
            self, bound[positions].tolist(), distance[positions].tolist(), positions.tolist()
        )


class NodeDirectory:
    """The registry's node list, cached, and the board of the nodes' load reports. ``start()``
    refreshes every ``refresh_seconds`` in the background; without it (tests, one-off tools) a
    read refreshes when the view is that old. A failed refresh keeps the last view, up to
    ``max_age_seconds``; past that (or before any success) reads raise ``DirectoryUnavailable``
    rather than route on a picture of the past.
    """

    def __init__(
        self,
        list_nodes: ListNodes,
        refresh_seconds: float = 3.0,
        *,
        board: LoadBoard | None = None,
        max_age_seconds: float = 60.0,
        load_penalty_km: float = DEFAULT_LOAD_PENALTY_KM,
        country_bonus_km: float = DEFAULT_COUNTRY_BONUS_KM,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if refresh_seconds <= 0:
            raise ValueError(f"refresh_seconds must be > 0, got {refresh_seconds!r}")
        self._list_nodes = list_nodes
        self.refresh_seconds = refresh_seconds
        self.board = board if board is not None else LoadBoard()
        self.max_age_seconds = max(max_age_seconds, refresh_seconds)
        self.load_penalty_km = load_penalty_km
        self.country_bonus_km = country_bonus_km
        self._clock = clock
        self._nodes: list[NodeAccount] | None = None
        self._by_key: dict[bytes, NodeAccount] = {}
        self._geometry: list[tuple[object, ...]] | None = None  # none read yet
        self._servable: dict[Role, _Servable] = {}
        self._fetched_at = -math.inf
        self._last_error: BaseException | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        # (role, client) -> that role's servable nodes by score lower bound; kept while the
        # registry's geometry is unchanged (most reads change only presence times)
        self._orders: dict[tuple[Role, Location], _Order] = {}

    # ------------------------------------------------ lifecycle

    async def start(self) -> None:
        """First fetch (a failure is logged, not raised: the registry may come up later), then
        the background loop."""
        try:
            await self.refresh()
        except Exception as exc:
            log.warning("node directory: first registry read failed: %s", exc)
        if self._task is None:
            self._task = repeat(self.refresh_seconds, self._refresh_keeping, "node directory", log)

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_tasks(task)

    async def _refresh_keeping(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:
            raise RuntimeError(f"registry read failed (keeping {self._age_text()}): {exc}") from exc

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
        previous = self._nodes
        self._nodes, self._fetched_at, self._last_error = nodes, self._clock(), None
        if previous is not None and len(previous) == len(nodes) and all(map(is_, nodes, previous)):
            return  # the registry client handed back the very same entries: nothing changed
        self._by_key = {bytes(n.owner): n for n in nodes}
        self.board.retain(self._by_key)
        geometry = _geometry(nodes)
        if geometry != self._geometry:
            self._geometry, self._orders = geometry, {}
            self._servable = {
                role: _Servable([n for n in nodes if n.role == role and _static_reason(n) is None])
                for role in Role
            }
        log.debug("node directory: %d nodes", len(nodes))

    def by_key(self) -> dict[bytes, NodeAccount]:
        """The current view by node key bytes (what a load report is checked against)."""
        return self._by_key

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

    def live(self, node: NodeAccount) -> LiveLoad | None:
        """The node's last load report if it is fresh."""
        return self.board.fresh(bytes(node.owner))

    def serving(self, node: NodeAccount) -> LiveLoad | None:
        """The node's fresh report if the registry also lets it serve: a live node (full or
        not)."""
        return self.live(node) if _static_reason(node) is None else None

    def reason(self, node: NodeAccount) -> str | None:
        """Why ``node`` takes no new session now, or None (``unhealthy_reason`` with its live
        load, and how long it has been silent when its last report is too old)."""
        live = self.live(node)
        reason = unhealthy_reason(node, live)
        if live is None and reason == "no fresh load report":
            last = self.board.last(bytes(node.owner))
            if last is not None:
                return f"silent for {self.board.age(last):.0f}s"
        return reason

    async def healthy(self, role: Role | str) -> list[NodeAccount]:
        """Nodes of ``role`` that may take a new session now."""
        role = Role.parse(role)
        return [n for n in await self.nodes() if n.role == role and self.reason(n) is None]

    async def counts(self) -> dict[str, dict[str, int]]:
        """Per service, for ``/v1/servers/status``: ``total`` registered, ``healthy`` (routable),
        ``capacity``/``load`` summed over live nodes (active, present, reporting; full ones
        too), as they reported them."""
        nodes = await self.nodes()
        out: dict[str, dict[str, int]] = {}
        for service, role in SERVICE_ROLES.items():
            mine = [n for n in nodes if n.role == role]
            live = [(n, report) for n in mine if (report := self.serving(n)) is not None]
            out[service] = {
                "total": len(mine),
                "healthy": sum(1 for n in mine if self.reason(n) is None),
                "capacity": sum(min(r.capacity, n.capacity) for n, r in live),
                "load": sum(r.load for _, r in live),
            }
        return out

    async def choose(self, role: Role | str, client: Location) -> NodeAccount:
        """The best node of ``role`` for a client at ``client``; ``NoCapacity`` if there is none."""
        role = Role.parse(role)
        nodes = await self.nodes()
        winner = self._walk(self._order(role, client))
        if winner is None:
            raise self._no_capacity(role, client, nodes)
        if log.isEnabledFor(logging.DEBUG):
            self._log_choice(role, client, nodes, winner)
        return winner

    def _order(self, role: Role, client: Location) -> _Order:
        """``role``'s servable nodes for ``client``, by the score's lower bound (cached)."""
        key = (role, client)
        order = self._orders.get(key)
        if order is None:
            order = self._servable[role].order(client, self.country_bonus_km)
            if len(self._orders) >= _MAX_CACHED_ORDERS:
                self._orders.clear()
            self._orders[key] = order
        return order

    def _walk(self, order: _Order) -> NodeAccount | None:
        """The best node in ``order`` by ``Candidate.sort_key``, reading live loads only until no
        later node's lower bound can beat the best score found."""
        best: tuple[float, float, float, str] | None = None
        winner = None
        fresh, penalty, group = self.board.fresh, self.load_penalty_km, order.group
        for bound, distance, i in zip(order.bounds, order.distances, order.positions, strict=True):
            if best is not None and bound > best[0]:
                break
            live = fresh(group.keys[i])
            if live is None:
                continue
            node = group.nodes[i]
            capacity = min(live.capacity, node.capacity)
            if live.load >= capacity:
                continue
            ratio = live.load / capacity
            key = (bound + penalty * ratio, ratio, distance, group.texts[i])
            if best is None or key < best:
                best, winner = key, node
        return winner

    def _skipped(self, role: Role, nodes: list[NodeAccount]) -> list[tuple[NodeAccount, str]]:
        return [(n, r) for n in nodes if n.role == role and (r := self.reason(n)) is not None]

    def _no_capacity(self, role: Role, client: Location, nodes: list[NodeAccount]) -> NoCapacity:
        """``NoCapacity`` naming each of the role's nodes and why it cannot serve."""
        mine = sum(1 for n in nodes if n.role == role)
        text = ", ".join(f"{_name(n)} {r}" for n, r in self._skipped(role, nodes))
        log.debug("route %s client=%s: no healthy node (%s)", role.label, client, text or "none")
        return NoCapacity(role, f"{mine} registered ({text})" if mine else "none registered")

    def _log_choice(
        self, role: Role, client: Location, nodes: list[NodeAccount], winner: NodeAccount
    ) -> None:
        """The whole ranking in one debug line: every routable node scored, and the rest with
        their reasons."""
        routable = [
            (n, live)
            for n in nodes
            if n.role == role and self.reason(n) is None and (live := self.live(n)) is not None
        ]
        ranked = score_nodes(
            routable,
            client,
            load_penalty_km=self.load_penalty_km,
            country_bonus_km=self.country_bonus_km,
        )
        log.debug(
            "route %s client=%s winner=%s candidates=[%s] skipped=[%s]",
            role.label,
            client,
            _name(winner),
            "; ".join(c.describe() for c in ranked),
            "; ".join(f"{_name(n)} {r}" for n, r in self._skipped(role, nodes)),
        )
