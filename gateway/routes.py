"""The gateway's route table: one row per route, read by the app (to serve it), the OpenAPI
document (to describe it) and wallet auth (which paths need no wallet signature).

A leaf module: it names no handler module, so the payment routes plug in beside the session
routes without either importing the app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from gateway.schemas import Body

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Auth = Literal["wallet", "node", "public"]


@dataclass(frozen=True)
class Route:
    """A served route: ``auth`` says who may call it (a wallet signature, a node's signed body,
    anyone); ``model`` is the request body's schema; ``paged`` takes limit/offset."""

    method: str
    path: str
    handler: Handler
    summary: str
    auth: Auth = "wallet"
    model: type[Body] | None = None
    paged: bool = False


def unsigned_paths(routes: Iterable[Route]) -> tuple[str, ...]:
    """The paths wallet auth lets through: public routes and node-signed ones (whose handlers
    check the node's signature themselves)."""
    return tuple(r.path for r in routes if r.auth != "wallet")
