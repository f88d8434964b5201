"""The payment service's life in the app: started with it (pending payments reconciled at start)
and stopped with it, or started by the first purchase where the app was not set up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.context import GATEWAY_KEY

if TYPE_CHECKING:
    from .service import PaymentService


class _Holder:
    def __init__(self) -> None:
        self.service: PaymentService | None = None
        self.lock = asyncio.Lock()


PAYMENTS_KEY = web.AppKey("payments", _Holder)
_LAZY: dict[int, _Holder] = {}  # apps that were not set up: holder by id(app)


def _build(app: web.Application) -> PaymentService:
    from .service import PaymentService  # the chain clients load with the first purchase

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
