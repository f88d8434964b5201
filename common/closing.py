"""``async with`` for the clients that own a connection."""

from __future__ import annotations

from typing import Self


class AsyncClosing:
    """A client whose end is ``await close()`` can also be used as ``async with Client(...) as c``;
    the block's end closes it, whatever ended the block."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
