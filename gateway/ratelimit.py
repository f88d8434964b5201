"""Per-wallet request rate limits (token buckets in memory; one bucket per wallet per process).

The limit is the account's ``max_api_rate`` (requests per second, bursts up to one second's
worth). Several gateway processes each enforce it on their own share of the traffic.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._max_keys = max_keys

    def allow(self, key: str, rate: float) -> bool:
        now = self._clock()
        tokens, last = self._buckets.get(key, (float(rate), now))
        tokens = min(float(rate), tokens + (now - last) * rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        if len(self._buckets) >= self._max_keys and key not in self._buckets:
            self._evict(now)
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def _evict(self, now: float) -> None:
        """Forget buckets idle for over a minute (they are full again by then anyway)."""
        for key in [k for k, (_, last) in self._buckets.items() if now - last > 60]:
            del self._buckets[key]
