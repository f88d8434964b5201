"""A minimal role for testing the node agent before (and apart from) the real roles.

It serves one route that verifies a token with the agent's verifier, and lets a test set the load
the agent reports (its load reports, and the load field of its presence renewals). The agent, the
chain and the tokens under it are all real.
"""

from __future__ import annotations

import sys

from aiohttp import web

from node.config import load_config
from node.roles import RoleContext
from registry.tokens import TokenError


class ProbeRole:
    name = "probe"

    def __init__(self, context: RoleContext) -> None:
        self.context = context
        self._load = 0
        self.draining = False

    @property
    def capacity(self) -> int:
        return self.context.capacity

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/probe/load", self._set_load)
        app.router.add_post("/probe/verify", self._verify)

    async def _set_load(self, request: web.Request) -> web.Response:
        self._load = int((await request.json())["load"])
        return web.json_response({"load": self._load})

    async def _verify(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"error": "draining"}, status=503)
        try:
            claims = await self.context.verifier.verify((await request.json())["token"])
        except TokenError as exc:
            return web.json_response({"error": exc.code, "message": str(exc)}, status=401)
        return web.json_response({"identity": claims.identity})

    async def start(self) -> None:
        pass

    async def drain(self) -> None:
        self.draining = True

    async def stop(self) -> None:
        pass

    def load(self) -> int:
        return self._load


def main(config_path: str) -> None:
    import asyncio
    import logging

    from node.agent import serve

    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s")
    asyncio.run(serve(load_config(config_path), ProbeRole))


if __name__ == "__main__":
    main(sys.argv[1])
