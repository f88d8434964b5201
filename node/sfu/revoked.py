"""Sessions the gateway settled: their tokens are refused from then on (``POST /rtc/revoke``).

A WebRTC session settles when its participant left (or its token expired); its token would
otherwise still join, unbilled, until it expires. The gateway tells the node which session ids
(token ``jti``) are over, in a body signed by a trusted issuer key. The set is bounded: an id is
kept for ``KEEP_SECONDS`` (a day, longer than any token the gateway issues lives), and it is saved
in the node's state dir (``node.outbox.SessionStore``) so a restart does not forget it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from node.outbox import SessionStore

KEEP_SECONDS = 86_400
MAX_IDS_PER_REQUEST = 1000
MAX_ID_LENGTH = 128


class BadRevocation(ValueError):
    """The revoke body is not ``{"session_ids": [...]}`` within the limits."""


def session_ids(body: Any) -> list[str]:
    """The distinct ids of a revoke body, or BadRevocation naming what is wrong."""
    ids = body.get("session_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not ids:
        raise BadRevocation(
            'body must be {"session_ids": ["<session id>", ...]} with at least one id'
        )
    if len(ids) > MAX_IDS_PER_REQUEST:
        raise BadRevocation(f"{len(ids)} session ids: at most {MAX_IDS_PER_REQUEST} per request")
    for sid in ids:
        if not isinstance(sid, str) or not 0 < len(sid) <= MAX_ID_LENGTH:
            raise BadRevocation(
                f"session id {str(sid)[:40]!r} is not a string of 1 to {MAX_ID_LENGTH} characters"
            )
    return list(dict.fromkeys(ids))


class Revocations:
    def __init__(self, store: Path | None) -> None:
        self._store = SessionStore(store, table="revoked")
        self._until: dict[str, float] = self._store.completed_since(time.time())

    def __contains__(self, session_id: str) -> bool:
        until = self._until.get(session_id)
        return until is not None and until >= time.time()

    def __len__(self) -> int:
        return len(self._until)

    def revoke(self, ids: list[str], now: float | None = None) -> None:
        now = time.time() if now is None else now
        for sid in ids:
            self._until[sid] = now + KEEP_SECONDS
            self._store.save(sid, 0.0, True, now + KEEP_SECONDS)
        self.prune(now)

    def prune(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for sid in [s for s, until in self._until.items() if until < now]:
            del self._until[sid]

    def close(self) -> None:
        self._store.close()
