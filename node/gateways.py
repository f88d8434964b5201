"""Where this node's gateways are: each token issuer's URL, for the usage and webhooks of the
sessions it issued, and every gateway on the registry for the load reports.

A node serves every gateway whose key the registry lists, and the registry lists each with its
public URL (``registry issuer add KEY --url URL``). A gateway in the node's own config
(``gateway_url``, ``report_to``) also says which key it signs with (``GET /v1/liveness``), and its
word wins for that key: the operator's config beats an entry that has not been updated. A session
whose issuer has no known URL reports to ``gateway_url``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from common.tasks import repeat, stop_tasks
from node.liveness import LoadReporter

log = logging.getLogger("node.gateways")

IssuerUrls = Callable[[], Awaitable[dict[str, str]]]  # issuer key -> URL, from the registry


class GatewayBook:
    """Issuer key -> gateway URL, the registry's read every ``refresh_seconds``; each gateway
    found there is handed to ``reporter`` for load reports too."""

    def __init__(
        self,
        default: str | None,
        reporter: LoadReporter,
        issuer_urls: IssuerUrls,
        refresh_seconds: float = 30.0,
    ) -> None:
        self.default = default.rstrip("/") if default else None
        self.reporter = reporter
        self._issuer_urls = issuer_urls
        self.refresh_seconds = refresh_seconds
        self.on_chain: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def url_for(self, issuer: str | None) -> str | None:
        """Where the events of a session issued by ``issuer`` go."""
        if issuer:
            url = self.reporter.issuer_url(issuer) or self.on_chain.get(issuer)
            if url:
                return url
        return self.default

    async def refresh(self) -> None:
        self.on_chain = {k: u.rstrip("/") for k, u in (await self._issuer_urls()).items()}
        self.reporter.add_gateways(list(self.on_chain.values()))

    async def start(self) -> None:
        """First read (a failure is logged: the registry may come back), then the loop; a read
        that fails keeps the last list."""
        try:
            await self.refresh()
        except Exception as exc:  # noqa: BLE001
            log.warning("reading the gateways listed on the registry failed: %s", exc)
        what = "reading the gateways listed on the registry"
        self._task = repeat(self.refresh_seconds, self.refresh, what, log)

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_tasks(task)


__all__ = ["GatewayBook"]
