"""The gateway's credits ledger (SQLite or PostgreSQL). See ``ledger.py`` for the balance model.

The names here are what the rest of the gateway uses; the other records and the database layer
stay in their modules (``records``, ``db``) for the few modules that need them.
"""

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
from .records import Account, Extension, SessionRecord, SessionSpec, Transaction

__all__ = [
    "Account",
    "AccountNotFound",
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
    "uuid7",
]
