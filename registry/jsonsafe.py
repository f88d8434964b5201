"""JSON from the network, parsed with a bound on nesting depth.

CPython's C JSON decoder recurses once per nesting level and relies on the interpreter's recursion
limit to stop; some dependencies raise that limit process-wide (py_ecc, pulled in by eth-account,
sets it to 100,000), after which a body of a few hundred thousand '[' crashes the process with a
segmentation fault instead of raising. Every service that parses untrusted JSON uses this.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64


class JsonTooDeep(ValueError):
    """The document nests deeper than any request of ours needs."""


def nesting_depth_exceeds(data: bytes | str, max_depth: int = MAX_DEPTH) -> bool:
    raw = data.encode() if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False  # cannot nest deeper than the number of openers
    depth, in_string, escaped = 0, False, False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > max_depth:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


def loads(data: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that raises ``JsonTooDeep`` (a ValueError) instead of overflowing the C stack."""
    if nesting_depth_exceeds(data, max_depth):
        raise JsonTooDeep(f"JSON nested deeper than {max_depth} levels")
    return json.loads(data)
