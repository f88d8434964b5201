"""Credit purchases: x402 on Solana (settled on chain here), EVM (verified; settled through a
configured RPC), and the MPP / TRON challenges. See ``service.py`` for the payment states.

Wiring: ``create_app`` calls ``setup_payments(app)`` so the service starts with the app (and
reconciles pending payments at startup) and stops with it. Without that call the service starts
on the first purchase request instead, and reconciles then.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .service import PaymentService


class _Holder:
    def __init__(self) -> None:
        self.service: PaymentService | None = None
        self.lock = asyncio.Lock()


PAYMENTS_KEY = web.AppKey("payments", _Holder)
_LAZY: dict[int, _Holder] = {}  # apps that were not set up: holder by id(app)


def _build(app: web.Application) -> PaymentService:
    from gateway.app import GATEWAY_KEY

    from .service import PaymentService

    gw = app[GATEWAY_KEY]
    return PaymentService(gw.config.payments, gw.config.rpc_url, gw.ledger)


def setup_payments(app: web.Application) -> None:
    """Start the payment service with the app, stop it with the app. Idempotent."""
    if PAYMENTS_KEY in app:
        return
    holder = _Holder()
    app[PAYMENTS_KEY] = holder

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with holder.lock:
            if holder.service is None:
                service = _build(app)
                await service.start()
                holder.service = service
        yield
        if holder.service is not None:
            await holder.service.close()
            holder.service = None

    app.cleanup_ctx.append(ctx)


async def payments_of(request: web.Request) -> PaymentService:
    app = request.app
    holder = app.get(PAYMENTS_KEY) or _LAZY.setdefault(id(app), _Holder())
    if holder.service is None:
        async with holder.lock:
            if holder.service is None:
                service = _build(app)
                await service.start(background=False)
                holder.service = service
    return holder.service


__all__ = ["PAYMENTS_KEY", "payments_of", "setup_payments"]
