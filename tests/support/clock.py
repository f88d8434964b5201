"""A clock a test can move: the wall clock plus an offset, handed to an in-process localnet
(``start_localnet(now=...)``) so a test jumps minutes ahead (an expired blockhash) without
waiting."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Clock:
    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset
