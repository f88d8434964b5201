"""What every request handler reaches through the app: the gateway's parts, and the route table
it serves (read by ``GET /openapi.json``). Handler modules (sessions in ``gateway.app``, credit
purchases in ``gateway.payments``) import this, never each other."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.auth import ReplayGuard
from gateway.config import GatewayConfig
from gateway.geo import Locator
from gateway.ledger import Ledger
from gateway.liveness import LoadReportEndpoint, RelayedReports
from gateway.ratelimit import RateLimiter
from gateway.routes import Route
from gateway.routing import NodeDirectory
from gateway.sessions import SessionService


@dataclass
class Gateway:
    """Everything a request handler needs; built once per process by ``create_app``."""

    config: GatewayConfig
    ledger: Ledger
    directory: NodeDirectory
    locator: Locator
    sessions: SessionService
    limiter: RateLimiter
    replay: ReplayGuard  # wallet signatures already answered
    # bound when the app starts: the UDP endpoint, or a worker's end of its supervisor's relay
    load_reports: LoadReportEndpoint | RelayedReports | None = None


GATEWAY_KEY = web.AppKey("gateway", Gateway)
ROUTES_KEY = web.AppKey("routes", tuple[Route, ...])


def gw(request: web.Request) -> Gateway:
    return request.app[GATEWAY_KEY]
