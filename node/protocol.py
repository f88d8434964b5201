"""What every role's client protocol shares: reading one client message as a JSON object.

Client text (a WebSocket message, a signal's JSON field) goes through ``common.jsonsafe`` (UTF-8,
depth-bounded); a message that is not a JSON object is refused with a :class:`BadMessage` that says
so, and each role answers it in its own protocol's error shape.
"""

from __future__ import annotations

from typing import Any

from common import jsonsafe


class BadMessage(ValueError):
    """A client message that is not a JSON object."""


def json_object(text: str | bytes, what: str = "message") -> dict[str, Any]:
    """``text`` as a JSON object, or BadMessage naming ``what`` and what was wrong."""
    try:
        data = jsonsafe.loads(text)
    except ValueError as exc:
        raise BadMessage(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadMessage(f"{what} must be a JSON object")
    return data
