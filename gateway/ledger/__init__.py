"""The gateway's credits ledger (SQLite or PostgreSQL). See ``ledger.py`` for the balance model."""

from .db import Database, normalize_url
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
from .ledger import Ledger
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
    "Database",
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
