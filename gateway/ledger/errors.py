"""Typed ledger errors. ``http_status`` is the answer the public API gives for each."""

from __future__ import annotations


class LedgerError(Exception):
    http_status = 500


class InsufficientCredits(LedgerError):
    http_status = 402

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(f"insufficient credits: need {needed} microcredits, {available} available")
        self.needed = needed
        self.available = available


class ConcurrencyLimit(LedgerError):
    http_status = 429

    def __init__(self, limit: int) -> None:
        super().__init__(f"concurrent session limit reached ({limit})")
        self.limit = limit


class AccountNotFound(LedgerError):
    http_status = 404

    def __init__(self, account: str) -> None:
        super().__init__(f"unknown account {account}")
        self.account = account


class UnknownSession(LedgerError):
    http_status = 404

    def __init__(self, session_id: str) -> None:
        super().__init__(f"unknown session {session_id}")
        self.session_id = session_id


class NotSessionNode(LedgerError):
    """A usage report from a node other than the one the session was routed to."""

    http_status = 403

    def __init__(self, session_id: str, node_pubkey: str) -> None:
        super().__init__(f"node {node_pubkey} does not serve session {session_id}")
        self.session_id = session_id
        self.node_pubkey = node_pubkey


class SessionClosed(LedgerError):
    http_status = 409

    def __init__(self, session_id: str, status: str) -> None:
        super().__init__(f"session {session_id} is {status}")
        self.session_id = session_id
        self.status = status


class DuplicatePayment(LedgerError):
    http_status = 409

    def __init__(self, reference: str) -> None:
        super().__init__(f"payment {reference} was already credited")
        self.reference = reference
