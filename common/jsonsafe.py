"""JSON from the network, parsed with a bound on nesting depth.

CPython's C JSON decoder recurses once per nesting level and relies on the interpreter's recursion
limit to stop; some dependencies raise that limit process-wide (py_ecc, pulled in by eth-account,
sets it to 100,000), after which a body of a few hundred thousand '[' crashes the process with a
segmentation fault instead of raising. Every service that parses untrusted JSON uses this.

Only UTF-8 is accepted (RFC 8259 section 8.1 requires it between systems). ``json.loads`` would
also decode UTF-16 and UTF-32 bytes, which the byte scan below cannot read: in those encodings a
character such as U+2222 contains the quote byte, so the scan could think a ``[[[...`` is inside a
string and let a deep document through to the C decoder.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64


class JsonTooDeep(ValueError):
    """The document nests deeper than any request of ours needs."""


class JsonNotUtf8(ValueError):
    """The document is not UTF-8 (invalid bytes, a UTF-16/32 byte order mark, or NUL bytes)."""


_WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")


def utf8_text(data: bytes | str) -> str:
    """The document as text, refusing anything but UTF-8 with a message that says so."""
    if isinstance(data, str):
        if "\x00" in data:  # a UTF-16/32 document sent as a (valid UTF-8) WebSocket text frame
            raise JsonNotUtf8(
                "JSON must be UTF-8: this text contains NUL characters (UTF-16 or UTF-32?)"
            )
        return data
    raw = bytes(data)
    if raw.startswith(_WIDE_BOMS):
        raise JsonNotUtf8(
            "JSON must be UTF-8: this body starts with a UTF-16/UTF-32 byte order mark"
        )
    if b"\x00" in raw:
        raise JsonNotUtf8("JSON must be UTF-8: this body contains NUL bytes (UTF-16 or UTF-32?)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonNotUtf8(f"JSON must be UTF-8: invalid byte at offset {exc.start}") from None


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
    """``json.loads`` of UTF-8 only, bounded in depth: every failure is a ValueError
    (``JsonNotUtf8``, ``JsonTooDeep``, ``json.JSONDecodeError``), never a crash."""
    text = utf8_text(data)
    if nesting_depth_exceeds(text.encode("utf-8", "surrogatepass"), max_depth):
        raise JsonTooDeep(f"JSON nested deeper than {max_depth} levels")
    return json.loads(text)
