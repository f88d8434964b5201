"""Row ids for the ledger's tables.

Session and bundle ids are UUIDv7 (RFC 9562: 48 bits of Unix milliseconds, then random bits)
rather than UUIDv4. Why: the ids are keys of the sessions table and of the transactions table's
session index; ids that grow with time land on the right-most B-tree page instead of a random one,
so opening a session dirties (and writes to SQLite's WAL, or PostgreSQL's) far fewer pages. They
are still unguessable (74 random bits) and still standard UUID strings.
"""

from __future__ import annotations

import os
import time
import uuid

_RANDOM_BITS = 74  # 12 in rand_a, 62 in rand_b


def uuid7() -> str:
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big") >> (80 - _RANDOM_BITS)
    value = (
        (ms & ((1 << 48) - 1)) << 80
        | 0x7 << 76  # version 7
        | (rand >> 62) << 64  # rand_a: 12 bits
        | 0b10 << 62  # variant (RFC 9562)
        | rand & ((1 << 62) - 1)  # rand_b: 62 bits
    )
    return str(uuid.UUID(int=value))
