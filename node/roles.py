"""The narrow interface between the node agent and a role (sfu, stt, tts).

The agent owns keys, registration, presence, load reports, health and drain; a role owns its
protocol. Every role has one layout: a package ``node/<role>/`` whose ``role.py`` holds
``create_role(context) -> Role``, re-exported by the package's ``__init__``. Roles never import
each other and import only the agent's public pieces (this module, ``node.session``,
``node.protocol``, ``node.outbox``, ``node.capacity``, ``node.models``), ``registry`` and
``common``."""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from aiohttp import web
from solders.keypair import Keypair

from node.capacity import Calibration, calibrate
from node.outbox import Outbox
from registry.tokens import Claims, TokenVerifier

ROLE_MODULES = {"sfu": "node.sfu", "stt": "node.stt", "tts": "node.tts"}
ROLE_SERVICE = {"sfu": "webrtc", "stt": "stt", "tts": "tts"}


class RoleNotBuilt(Exception):
    """The role's plug-in is not part of this build; we refuse rather than fake it."""


@dataclass
class RoleContext:
    """What the agent hands a role: its settings, identity, the shared token verifier, and the
    durable outbox through which usage events and webhooks reach the gateway."""

    role: str
    settings: dict[str, Any]
    keypair: Keypair
    verifier: TokenVerifier
    public_url: str
    capacity: int
    gateway_url: str | None
    state_dir: Any
    outbox: Outbox
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("node"))
    # measure the capacity at start (node/capacity.py); False: advertise the config's as typed
    calibrate: bool = True
    calibration: Calibration | None = None

    @property
    def node_key(self) -> str:
        """This node's public key (base58): the ``aud`` its tokens must carry."""
        return str(self.keypair.pubkey())

    def state_file(self, name: str) -> Path | None:
        """The SQLite file ``name`` of this node under its state dir (None without one: keep
        nothing), named for the node key so nodes sharing a state dir keep theirs apart."""
        if not self.state_dir:
            return None
        return Path(self.state_dir) / f"{name}-{self.node_key[:8]}.sqlite"

    async def verify(self, token: str) -> Claims:
        """Verify a client's token for this very node: a token the gateway routed to another node
        (or one naming no node) is refused with ``wrong_node``, so a session cannot be spent on
        several nodes at once. Every role verifies client tokens through this."""
        return await self.verifier.verify(token, audience=self.node_key)

    async def measured_capacity(self, model: str, measure: Callable[[], float]) -> int:
        """The capacity to advertise: what this machine carries at the cost ``measure`` returns
        (core-seconds per second of one unit of work, run in a thread, cached per machine and
        model), at most the config's ``capacity``. Every role derives its capacity through this."""
        if not self.calibrate:
            return self.capacity
        self.calibration = await asyncio.get_running_loop().run_in_executor(
            None, calibrate, self.role, model, measure, self.state_dir
        )
        advertised = self.calibration.capacity(self.capacity)
        self.log.info(
            "%s capacity %d (%.3f core-seconds per unit-second on %d cores%s; config allows %d)",
            self.role,
            advertised,
            self.calibration.cost,
            self.calibration.cores,
            ", cached" if self.calibration.cached else "",
            self.capacity,
        )
        return advertised


@runtime_checkable
class Role(Protocol):
    """A role plug-in. ``load()`` is what the load reports say; it must be cheap to call."""

    name: str

    @property
    def capacity(self) -> int: ...

    def routes(self, app: web.Application) -> None:
        """Add the role's HTTP/WebSocket routes to the node's app."""

    async def start(self) -> None: ...

    async def drain(self) -> None:
        """Stop taking new sessions; live sessions go on until they end or the agent times out."""

    async def stop(self) -> None: ...

    def load(self) -> int: ...


def load_role(name: str, context: RoleContext) -> Role:
    module_name = ROLE_MODULES.get(name)
    if module_name is None:
        raise RoleNotBuilt(f"unknown role {name!r}: expected one of {', '.join(ROLE_MODULES)}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise RoleNotBuilt(
            f"the {name} role is not built in this version of the node (no module {module_name}); "
            "run a node of a role that exists"
        ) from None
    return module.create_role(context)
