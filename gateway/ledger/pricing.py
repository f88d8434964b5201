"""Prices, in integer microcredits (1 USD = 1,000,000 microcredits), as the public API lists them.

Units the ledger meters: seconds for ``webrtc`` (per participant: each participant token is one
session) and ``stt``; characters for ``tts``. ``cost`` rounds UP to the next microcredit, so a
reservation for N whole minutes is exactly N x the per-minute rate and the cost of any usage inside
it never exceeds it (ceil(a + b) <= ceil(a) + ceil(b), so extensions stay covered too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from typing import Any

MICROCREDITS_PER_USD = 1_000_000
MIN_PURCHASE_USD = Decimal("0.1")


@dataclass(frozen=True)
class Rate:
    service: str
    microcredits: int  # price of `per` base units
    per: int  # base units the price is for: 60 seconds or 1,000 characters
    unit: str  # as /v1/pricing names it
    base_unit: str  # what `units` counts in cost()

    @property
    def usd(self) -> float:
        return self.microcredits / MICROCREDITS_PER_USD


RATES: dict[str, Rate] = {
    "webrtc": Rate("webrtc", 1_000, 60, "per_minute", "second"),
    "stt": Rate("stt", 6_000, 60, "per_minute", "second"),
    "tts": Rate("tts", 8_000, 1_000, "per_1k_characters", "character"),
}
SERVICES = tuple(RATES)
TIME_SERVICES = ("webrtc", "stt")


def rate(service: str) -> Rate:
    try:
        return RATES[service]
    except KeyError:
        raise ValueError(f"unknown service {service!r}; expected one of {SERVICES}") from None


def _check_units(units: int) -> int:
    if isinstance(units, bool) or not isinstance(units, int) or units < 0:
        raise ValueError(f"units must be a non-negative int, got {units!r}")
    return units


def cost(service: str, units: int) -> int:
    """Microcredits for ``units`` (seconds for webrtc/stt, characters for tts), rounded up."""
    r = rate(service)
    return -(-_check_units(units) * r.microcredits // r.per)


def seconds_for_minutes(minutes: int | float | Decimal | str) -> int:
    """Whole seconds covering ``minutes`` (fractions of a second round up)."""
    m = Decimal(str(minutes))
    if not m.is_finite() or m <= 0:
        raise ValueError(f"minutes must be positive, got {minutes!r}")
    return math.ceil(m * 60)


def reservation_for_minutes(service: str, minutes: int | float | Decimal | str) -> int:
    """What a time-based session of ``minutes`` reserves (whole minutes: exactly minutes x rate)."""
    if service not in TIME_SERVICES:
        raise ValueError(f"{service!r} is not billed by time")
    return cost(service, seconds_for_minutes(minutes))


def usd_to_microcredits(amount_usd: int | float | Decimal | str) -> int:
    """USD to microcredits; fractions of a microcredit are dropped (never credit more than paid)."""
    d = Decimal(str(amount_usd))
    if not d.is_finite() or d < 0:
        raise ValueError(f"amount must be a non-negative number, got {amount_usd!r}")
    return int((d * MICROCREDITS_PER_USD).to_integral_value(rounding=ROUND_DOWN))


def pricing_document() -> dict[str, Any]:
    """The body of GET /v1/pricing."""
    return {
        "microcredits_per_usd": MICROCREDITS_PER_USD,
        "rates": {
            name: {"unit": r.unit, "microcredits": r.microcredits, "usd": r.usd}
            for name, r in RATES.items()
        },
    }
