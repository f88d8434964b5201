"""The node agent: one key, one registry entry, a presence on chain, load reports off chain, health
and metrics, and a graceful exit.

Life of a node: load (or create) its key; serve HTTP; make its registry entry match the config
(register the first time, update when the operator changed URL, location, capacity or version);
renew its presence on chain every ``presence_interval`` (hours: one transaction each), and send its
live load, signed, to every gateway that routes to it every few seconds (``node/liveness.py``).
Under the registry's `approval` policy a new entry is pending: the agent then serves /health as
not ready ("pending"), logs the command the registry authority must run, and polls the chain until
the entry is approved; only then does it renew and report. On SIGTERM/SIGINT it reports itself
full (gateways stop routing to it at their next read of the board), waits for live sessions up to
``drain_timeout``, then deregisters (rent back to the node key). A node killed with SIGKILL simply
stops reporting and leaves routing after the gateways' report TTL (15 s by default), with no
transaction.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from solders.pubkey import Pubkey

from node.config import NodeConfig
from node.gateways import GatewayBook
from node.liveness import DEFAULT_INTERVAL, LoadReporter
from node.outbox import Outbox
from node.roles import ROLE_SERVICE, Role, RoleContext, load_role
from registry import program as p
from registry.client import RegistryClient, RegistryError
from registry.keys import load_or_create_keypair
from registry.tokens import TokenVerifier

log = logging.getLogger("node.agent")

NODE_VERSION = "0.1.0"
RETRY_SECONDS = 30.0  # after a failed presence renewal
RoleFactory = Callable[[RoleContext], Role]


class NodeStartError(Exception):
    """The node cannot join the network; the message says why and what to do."""


class Metrics:
    """Prometheus series for one agent (a registry of its own, so tests can run several agents)."""

    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry()
        self.role = role
        self.load = self._gauge("voicenet_node_load", "Live sessions")
        self.capacity = self._gauge(
            "voicenet_node_capacity",
            "Advertised capacity (measured at start, at most the configured)",
        )
        self.capacity_configured = self._gauge(
            "voicenet_node_capacity_configured", "The config's capacity: the upper bound"
        )
        self.unit_cost = self._gauge(
            "voicenet_node_unit_cost_core_seconds",
            "Measured core-seconds per second of one unit of work (0: not calibrated)",
        )
        self.draining = self._gauge("voicenet_node_draining", "1 while draining")
        self.presence_renewals = Counter(
            "voicenet_node_presence_renewals",
            "Presence renewals sent to the chain (one transaction each)",
            registry=self.registry,
            labelnames=["role", "result"],
        )
        self.last_presence = self._gauge(
            "voicenet_node_last_presence_timestamp_seconds",
            "Unix time of the last confirmed presence renewal",
        )
        self.load_reports = self._gauge(
            "voicenet_node_load_reports", "Signed load reports sent (each to every gateway found)"
        )

    def _gauge(self, name: str, doc: str) -> Gauge:
        """A gauge of this agent's registry, labelled with its role."""
        return Gauge(name, doc, registry=self.registry, labelnames=["role"]).labels(role=self.role)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class NodeAgent:
    def __init__(self, config: NodeConfig, role_factory: RoleFactory | None = None) -> None:
        if config.role is None:
            raise NodeStartError("the config names no role")
        self.config = config
        self.role_name = config.role
        self.keypair = load_or_create_keypair(config.keypair)
        program_id = Pubkey.from_string(config.program_id) if config.program_id else p.PROGRAM_ID
        self.client = RegistryClient(config.rpc_url, program_id)
        self.verifier = TokenVerifier(
            self.client.issuer_keys,
            ROLE_SERVICE[self.role_name],
            cache_ttl=config.issuer_cache_seconds,
        )
        self.outbox = Outbox(
            Path(config.state_dir)
            / f"outbox-{self.role_name}-{str(self.keypair.pubkey())[:8]}.sqlite",
            config.gateway_url,
            self.keypair,
        )
        self.context = context = RoleContext(
            role=self.role_name,
            settings=config.role_settings(self.role_name),
            keypair=self.keypair,
            verifier=self.verifier,
            public_url=config.public_url,
            capacity=config.capacity,
            gateway_url=config.gateway_url,
            state_dir=config.state_dir,
            outbox=self.outbox,
            log=logging.getLogger(f"node.{self.role_name}"),
            calibrate=config.calibrate,
        )
        self.role: Role = (
            role_factory(context) if role_factory else load_role(self.role_name, context)
        )
        self.reporter = LoadReporter(
            self.keypair,
            p.Role.parse(self.role_name),
            self._load_now,
            self.version,
            [u for u in (config.gateway_url, *config.report_to) if u],
            interval=config.report_interval,
        )
        # every gateway on the registry gets load reports, and the usage of the sessions it issued
        self.gateways = GatewayBook(config.gateway_url, self.reporter, self.client.issuer_urls)
        self.outbox.resolve = self.gateways.url_for
        self.metrics = Metrics(self.role_name)
        self.state = "starting"
        self.last_presence: float | None = None
        self.presence_failures = 0
        self.presence_ttl: int | None = None  # the registry's, read at start
        self._presence_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.app = self._build_app()

    @property
    def pubkey(self) -> Pubkey:
        return self.keypair.pubkey()

    # ------------------------------------------------------------ HTTP

    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self.role.routes(app)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        body = {
            "status": "ok" if self.state == "serving" else self.state,
            "role": self.role_name,
            "pubkey": str(self.pubkey),
            "load": self.role.load(),
            "capacity": self.role.capacity,
            "capacity_configured": self.config.capacity,
            "last_presence": self.last_presence,
            "presence_failures": self.presence_failures,
            "load_reports_sent": self.reporter.sent,
            "load_report_gateways": [t.gateway_url for t in self.reporter.targets],
            "gateways_on_chain": self.gateways.on_chain,
            "version": self.version,
        }
        return web.json_response(body, status=200 if self.state == "serving" else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics.load.set(self.role.load())
        self.metrics.capacity.set(self.role.capacity)
        self.metrics.capacity_configured.set(self.config.capacity)
        calibration = self.context.calibration
        self.metrics.unit_cost.set(calibration.cost if calibration else 0.0)
        self.metrics.load_reports.set(self.reporter.sent)
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    @property
    def version(self) -> str:
        return self.config.version or NODE_VERSION

    def _fields(self) -> p.NodeFields:
        loc = self.config.location
        return p.NodeFields(
            url=self.config.public_url,
            lat=loc.lat,
            lon=loc.lon,
            country=loc.country,
            capacity=self.role.capacity,
            version=self.version,
        )

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.listen_host, self.config.listen_port)
        await site.start()
        addresses = self._runner.addresses  # port 0 in the config: the one the system picked
        self.port = addresses[0][1] if addresses else self.config.listen_port
        log.info(
            "%s node %s listening on %s:%s (public %s)",
            self.role_name,
            self.pubkey,
            self.config.listen_host,
            self.port,
            self.config.public_url,
        )
        await self.gateways.start()
        await self.outbox.start()
        await self.role.start()
        status = await self.ensure_registered()
        if status is p.NodeStatus.PENDING:
            # Not an error: the authority has yet to admit this key. Stay up, not ready.
            self.state = "pending"
            self._presence_task = asyncio.create_task(self._await_approval())
            return
        await self._begin_serving()
        self._presence_task = asyncio.create_task(self._presence_loop())

    async def _begin_serving(self) -> None:
        """Renew presence, then tell the gateways this node's load: from here it is routable."""
        await self.renew_presence()
        self.state = "serving"
        await self.reporter.start()

    def _load_now(self) -> tuple[int, int]:
        """What the load reports say: the live load and capacity, or full while not serving (a
        draining node takes no new session)."""
        load = self.role.load()
        return (load, self.role.capacity) if self.state == "serving" else (load, load)

    @property
    def poll_interval(self) -> float:
        """How often a pending node checks the chain for its approval."""
        return self.config.report_interval or DEFAULT_INTERVAL

    @property
    def presence_interval(self) -> float:
        """The config's interval, kept under half the registry's TTL so one failed renewal does
        not let the presence expire."""
        if self.presence_ttl is None:
            return self.config.presence_interval
        return min(self.config.presence_interval, self.presence_ttl / 2)

    def approval_command(self) -> str:
        """What the registry authority runs to admit this node."""
        return f"registry node approve {self.pubkey} --rpc {self.config.rpc_url}"

    async def _await_approval(self) -> None:
        """Poll the entry until the authority approves it, then bring the entry up to date and
        start serving. Chain errors are logged and retried, never fatal."""
        log.warning(
            "node %s is pending: waiting for the registry authority's approval; the "
            "authority runs `%s`",
            self.pubkey,
            self.approval_command(),
        )
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                status = await self._status()
            except (RegistryError, p.RegistryProgramError, NodeStartError, OSError) as exc:
                log.warning(
                    "checking approval failed (%s); retrying in %.0fs", exc, self.poll_interval
                )
                continue
            if status is p.NodeStatus.ACTIVE:
                break
            log.debug("node %s still %s", self.pubkey, status.label)
        log.info("node %s approved by the registry authority", self.pubkey)
        try:
            await self.ensure_registered()  # apply config changes held back while pending
        except NodeStartError as exc:
            log.warning("could not update the registry entry after approval: %s", exc)
        await self._begin_serving()
        await self._presence_loop()  # this task is self._presence_task: shutdown cancels it

    async def _status(self) -> p.NodeStatus:
        """The entry's status; registers again if the entry vanished while waiting."""
        node = await self.client.get_node(self.pubkey)
        if node is None:
            return await self.ensure_registered()
        return node.status

    async def ensure_registered(self) -> p.NodeStatus:
        """Make the on-chain entry match the config: register, update, or leave it as it is.
        Returns the entry's status (PENDING: the authority has not approved it yet)."""
        try:
            await self.client.ensure_funded(self.keypair)
            registry = await self.client.require_registry()
            self.presence_ttl = registry.heartbeat_ttl
            if self.config.presence_interval > registry.heartbeat_ttl / 2:
                log.warning(
                    "presence_interval %gs is over half the registry's presence TTL (%ds): "
                    "renewing every %gs instead",
                    self.config.presence_interval,
                    registry.heartbeat_ttl,
                    self.presence_interval,
                )
            existing = await self.client.get_node(self.pubkey)
            wanted = self._fields()
            if existing is None:
                await self.client.register_node(self.keypair, p.Role.parse(self.role_name), wanted)
                log.info("registered %s node %s at %s", self.role_name, self.pubkey, wanted.url)
                registered = await self.client.get_node(self.pubkey)
                return registered.status if registered else p.NodeStatus.PENDING
            if existing.role.label != self.role_name:
                raise NodeStartError(
                    f"key {self.pubkey} is registered as a {existing.role.label} node, not "
                    f"{self.role_name}: use another keypair or `registry node deregister` first"
                )
            if existing.status is p.NodeStatus.SUSPENDED:
                raise NodeStartError(
                    f"node {self.pubkey} is suspended by the registry authority; "
                    "it cannot serve until the authority activates it"
                )
            if existing.status is p.NodeStatus.PENDING:
                if _differs(existing, wanted):
                    log.info("node %s is pending: its entry is updated once approved", self.pubkey)
                return existing.status
            if _differs(existing, wanted):
                await self.client.update_node(self.keypair, wanted)
                log.info("updated registry entry of node %s", self.pubkey)
            else:
                log.info("registry entry of node %s is up to date", self.pubkey)
            return existing.status
        except RegistryError as exc:
            raise NodeStartError(str(exc)) from None

    async def renew_presence(self) -> bool:
        """One presence renewal on chain (the program's `heartbeat` instruction, which also
        records the capacity; its load field is the load now, for the record only: routing
        reads the load reports)."""
        capacity = self.role.capacity
        load = min(self.role.load(), capacity)  # the program refuses load > capacity
        try:
            await self.client.heartbeat(self.keypair, load, capacity)
        except (RegistryError, p.RegistryProgramError, OSError) as exc:
            self.presence_failures += 1
            self.metrics.presence_renewals.labels(role=self.role_name, result="error").inc()
            log.warning("presence renewal failed (%s); retrying in %.0fs", exc, RETRY_SECONDS)
            return False
        self.last_presence = time.time()
        self.metrics.presence_renewals.labels(role=self.role_name, result="ok").inc()
        self.metrics.last_presence.set(self.last_presence)
        log.info("presence renewed on chain (next in %.0fs)", self.presence_interval)
        return True

    async def _presence_loop(self) -> None:
        ok = True
        while True:
            await asyncio.sleep(self.presence_interval if ok else RETRY_SECONDS)
            ok = await self.renew_presence()

    async def shutdown(self) -> None:
        """Drain, then leave the registry; safe to call more than once."""
        if self.state in ("stopping", "stopped"):
            return
        self.state = "draining"
        self.metrics.draining.set(1)
        log.info(
            "draining: no new sessions, waiting up to %.0fs for %d live ones",
            self.config.drain_timeout,
            self.role.load(),
        )
        await self.role.drain()
        self.reporter.report_now()  # full from now on: no gateway routes a new session here
        deadline = time.monotonic() + self.config.drain_timeout
        while self.role.load() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        self.state = "stopping"
        if self._presence_task:
            self._presence_task.cancel()
        await self.reporter.close()
        await self.role.stop()
        await self.outbox.stop()
        await self.gateways.close()
        if self.config.deregister_on_exit:
            try:
                await self.client.deregister_node(self.keypair)
                log.info("deregistered node %s", self.pubkey)
            except (RegistryError, p.RegistryProgramError, OSError) as exc:
                log.warning(
                    "could not deregister (%s); gateways stop routing here when its load "
                    "reports stop, and its presence expires after the registry's TTL",
                    exc,
                )
        if self._runner:
            await self._runner.cleanup()
        await self.client.close()
        self.state = "stopped"


def _differs(node: p.NodeAccount, wanted: p.NodeFields) -> bool:
    return (
        node.url != wanted.url
        or p.to_micro(node.lat) != p.to_micro(wanted.lat)
        or p.to_micro(node.lon) != p.to_micro(wanted.lon)
        or node.country != wanted.country
        or node.capacity != wanted.capacity
        or node.version != wanted.version
    )


async def serve(config: NodeConfig, role_factory: RoleFactory | None = None) -> None:
    """Run a node until SIGTERM or SIGINT, then drain and deregister."""
    agent = NodeAgent(config, role_factory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
    except BaseException:
        await agent.shutdown()
        raise
    if agent.state == "pending":
        print(
            f"{agent.role_name} node {agent.pubkey} on {config.public_url} is pending: waiting "
            f"for the registry authority to run `{agent.approval_command()}`",
            flush=True,
        )
    else:
        print(f"{agent.role_name} node {agent.pubkey} ready on {config.public_url}", flush=True)
    await stop.wait()
    await agent.shutdown()
