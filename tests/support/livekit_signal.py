"""A bare LiveKit signal client (protobufs over the WebSocket), for what an SDK would not send."""

from __future__ import annotations

import time

import aiohttp
from livekit.protocol import rtc


class RawClient:
    """A bare signal client: enough of the protocol to test what the SDK would not send."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, request: rtc.SignalRequest | bytes) -> None:
        await self.ws.send_bytes(
            request if isinstance(request, bytes) else request.SerializeToString()
        )

    async def next(self, kind: str, timeout: float = 5.0) -> rtc.SignalResponse:
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.ws.receive(timeout=max(0.05, deadline - time.monotonic()))
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise AssertionError(f"socket ended: {msg.type}")
            response = rtc.SignalResponse.FromString(msg.data)
            if response.WhichOneof("message") == kind:
                return response
