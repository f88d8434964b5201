"""Typed values the ledger returns (frozen dataclasses; amounts are int microcredits), and
``from_row``, the one way a record is read from a database row."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, TypeVar

R = TypeVar("R")


def from_row(record: type[R], row: Mapping[str, Any], **given: Any) -> R:
    """A ``record`` whose fields are the row's columns of the same names, but for those
    ``given`` (a field the row names differently, or one computed)."""
    names = [f.name for f in fields(record)]  # type: ignore[arg-type]
    return record(**{n: row[n] for n in names if n not in given}, **given)


@dataclass(frozen=True)
class Account:
    id: str
    wallet_chain: str
    wallet_address: str
    credit_balance: int
    held_microcredits: int
    max_concurrent_sessions: int
    max_api_rate: int
    created_at: datetime

    @property
    def available_balance(self) -> int:
        return self.credit_balance - self.held_microcredits


@dataclass(frozen=True)
class Transaction:
    id: int
    account_id: str
    kind: str  # purchase | grant | reserve | charge | refund
    amount: int  # change of credit_balance
    hold: int  # change of the amount held for active sessions
    balance_after: int
    available_after: int
    session_id: str | None
    reference: str | None
    memo: str | None
    created_at: datetime


PUBLIC_SESSION_FIELDS = (
    "session_id",
    "service",
    "bundle_id",
    "status",
    "room_name",
    "server_url",
    "reserved_microcredits",
    "charged_microcredits",
    "token_expires_at",
    "started_at",
    "ended_at",
)


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    account_id: str
    service: str  # webrtc | stt | tts
    bundle_id: str | None
    status: str  # active | completed | expired
    room_name: str | None
    participant_identity: str | None
    server_url: str
    node_pubkey: str
    reserved_microcredits: int
    charged_microcredits: int  # the running charge while active; final once settled
    usage_units: int  # seconds (webrtc, stt) or characters (tts) reported so far
    limit_units: int  # seconds or characters bought
    token_expires_at: datetime
    started_at: datetime
    ended_at: datetime | None
    metadata: Any

    def public(self) -> dict[str, Any]:
        """The fields GET /v1/account/sessions lists."""
        return {name: getattr(self, name) for name in PUBLIC_SESSION_FIELDS}


@dataclass(frozen=True)
class Credit:
    """Credits that come in to a wallet's account: an operator's ``grant``, or a ``purchase``
    that a payment paid for (its ``reference``, the payment's signature or hash, is credited
    once)."""

    kind: str  # "grant" | "purchase"
    wallet_chain: str
    wallet_address: str
    amount: int
    reference: str | None = None
    memo: str | None = None


@dataclass(frozen=True)
class SessionSpec:
    """What a session is opened with (``Ledger.open_session``; several: ``create_bundle``)."""

    service: str
    reserve_microcredits: int
    limit_units: int
    token_expires_at: datetime
    node_pubkey: str
    server_url: str
    room_name: str | None = None
    participant_identity: str | None = None
    metadata: Any = None
    session_id: str | None = None


@dataclass(frozen=True)
class Extension:
    """One session of ``Ledger.extend_bundle``. ``reserve_microcredits`` defaults to the price of
    ``additional_units``; ``token_expires_at`` None keeps the current expiry."""

    session_id: str
    additional_units: int
    token_expires_at: datetime | None = None
    reserve_microcredits: int | None = None


@dataclass(frozen=True)
class Bundle:
    bundle_id: str
    sessions: list[SessionRecord] = field(default_factory=list)


@dataclass(frozen=True)
class UsageResult:
    """What ``record_usage`` (and the sweeper, per session) did.

    ``changed`` is False when the call changed nothing (a lower total, a report on a settled
    session, a repeated final). ``refunded_microcredits`` is set once the session is settled.
    ``overage_units``/``overage_microcredits``: usage reported beyond what was bought (not charged).
    """

    session_id: str
    account_id: str
    service: str
    status: str
    usage_units: int
    limit_units: int
    reserved_microcredits: int
    charged_microcredits: int
    refunded_microcredits: int | None
    overage_units: int
    overage_microcredits: int
    settled: bool
    changed: bool


@dataclass(frozen=True)
class Audit:
    """The invariants of one account, read in one transaction."""

    account_id: str
    credit_balance: int
    held_microcredits: int
    sum_amount: int  # sum(transactions.amount)
    sum_hold: int  # sum(transactions.hold)
    active_reserved: int  # sum(reserved_microcredits) of the active sessions
    active_sessions: int  # the account's counter of active sessions
    active_keys: int  # its active sessions counted (a bundle once)
    min_after: int | None  # lowest balance_after / available_after ever recorded

    @property
    def ok(self) -> bool:
        return (
            self.credit_balance == self.sum_amount
            and self.held_microcredits == self.sum_hold == self.active_reserved
            and self.active_sessions == self.active_keys
            and 0 <= self.held_microcredits <= self.credit_balance
            and (self.min_after is None or self.min_after >= 0)
        )
