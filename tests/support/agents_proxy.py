"""A loopback WebSocket relay between a client and a real node, to test what the node never does
on its own: drop a live socket (``drop()``), or slip a malformed message into what it sends
(``inject()``). Everything else passes through unchanged, both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self

import aiohttp
from aiohttp import web

from tests.support.serving import serve


class WSProxy:
    def __init__(self, target_ws_url: str) -> None:
        self.target = target_ws_url
        self.clients: list[web.WebSocketResponse] = []
        self.connections = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Self:
        app = web.Application()
        app.router.add_get("/v1/stream", self._handle)
        self._runner, port = await serve(app)
        self.url = f"ws://127.0.0.1:{port}/v1/stream"
        return self

    async def stop(self) -> None:
        await self.drop()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def inject(self, message: str | bytes) -> None:
        """Send ``message`` to every connected client as if the node had sent it."""
        for ws in list(self.clients):
            if isinstance(message, bytes):
                await ws.send_bytes(message)
            else:
                await ws.send_str(message)

    async def drop(self) -> None:
        """Cut every client's socket (the node sees its upstream socket close too)."""
        for ws in list(self.clients):
            await ws.close(code=1011, message=b"proxy dropped")

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        client = web.WebSocketResponse(max_msg_size=1 << 22)
        await client.prepare(request)
        self.connections += 1
        self.clients.append(client)
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(self.target, max_msg_size=1 << 22) as node,
        ):

            async def down() -> None:
                async for msg in node:
                    if client.closed:
                        break
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        await client.send_str(msg.data)
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        await client.send_bytes(msg.data)
                await client.close()

            task = asyncio.create_task(down())
            async for msg in client:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await node.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await node.send_bytes(msg.data)
            await node.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.clients.remove(client)
        return client
