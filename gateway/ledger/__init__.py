"""The gateway's credits ledger (SQLite or PostgreSQL). See ``ledger.py`` for the balance model."""

from .errors import (
    AccountNotFound,
    ConcurrencyLimit,
    DuplicatePayment,
    InsufficientCredits,
    LedgerError,
    NotSessionNode,
    SessionClosed,
    UnknownSession,
)
from .ids import uuid7
from .ledger import Ledger, normalize_url
from .records import (
    Account,
    AccountView,
    Audit,
    Bundle,
    Extension,
    SessionRecord,
    SessionSpec,
    Transaction,
    UsageResult,
)

__all__ = [
    "Account",
    "AccountNotFound",
    "AccountView",
    "Audit",
    "Bundle",
    "ConcurrencyLimit",
    "DuplicatePayment",
    "Extension",
    "InsufficientCredits",
    "Ledger",
    "LedgerError",
    "NotSessionNode",
    "SessionClosed",
    "SessionRecord",
    "SessionSpec",
    "Transaction",
    "UnknownSession",
    "UsageResult",
    "normalize_url",
    "uuid7",
]
