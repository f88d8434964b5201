"""A node's signed load report: the off-chain half of liveness (README, "How liveness works").

The chain holds what gateways must agree on and what changes rarely (a node's key, role, URL,
location, capacity and a presence renewed every few hours). What changes every second, a node's
live load, travels off chain: every few seconds the node signs a report with its node key and
sends it to each gateway as one UDP datagram. A gateway checks the signature against the key on
chain and routes only to nodes whose last report is fresh, so a node that stops reporting leaves
routing within seconds without any transaction.

One datagram, 141 bytes, little-endian::

    magic "VNL1" | node key 32 | seq u64 | time_ms u64 | role u8 | load u32 | capacity u32
    | version 16 (ASCII, NUL-padded) | Ed25519 signature 64 over everything before it

``seq`` only grows: a node starts it at its start time in microseconds and adds one per report,
so it keeps growing across restarts without state on disk, and a gateway refuses any report whose
``seq`` is not above the last it accepted from that node (a replay). ``time_ms`` bounds how old a
report may be when it arrives (a stale report, or one held back and sent later).

Why UDP and push: a report is small and loses nothing by being lost (the next one follows within
the interval, and the gateway's TTL spans three); the gateway keeps no connection per node, and
ingesting one is a dictionary lookup, a signature check and a store (bench/fleet.py measures
10,000 nodes). A gateway that pulled would have to reach every node, each interval, over HTTP.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature

from registry.program import VERSION_LEN, Role

MAGIC = b"VNL1"
_BODY = struct.Struct(f"<4s32sQQBII{VERSION_LEN}s")
SIGNATURE_LEN = 64
REPORT_LEN = _BODY.size + SIGNATURE_LEN


class BadReport(Exception):
    """A datagram that is not a well-formed, correctly signed report; ``reason`` is its kind
    (the gateway counts refusals by it)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class LoadReport:
    """What a node says of itself every few seconds: signed by its node key, so any gateway can
    route on it without a chain read; ``seq`` and ``time_ms`` make a replay useless."""

    node: Pubkey
    role: Role
    load: int
    capacity: int
    version: str
    seq: int
    time_ms: int

    def sign(self, keypair: Keypair) -> bytes:
        """The datagram: the packed report and the node key's signature over it."""
        if keypair.pubkey() != self.node:
            raise ValueError(f"report for node {self.node} cannot be signed by {keypair.pubkey()}")
        body = _BODY.pack(
            MAGIC,
            bytes(self.node),
            self.seq,
            self.time_ms,
            int(self.role),
            self.load,
            self.capacity,
            self.version.encode("ascii")[:VERSION_LEN],
        )
        return body + bytes(keypair.sign_message(body))


def parse(datagram: bytes) -> tuple[LoadReport, bytes, Signature]:
    """The report in ``datagram``, the bytes its signature covers, and the signature; the caller
    verifies it (``verify``) after its cheap checks, so a replayed datagram costs no Ed25519."""
    if len(datagram) != REPORT_LEN:
        raise BadReport("malformed", f"{len(datagram)} bytes, a report has {REPORT_LEN}")
    body = datagram[: _BODY.size]
    magic, node, seq, time_ms, role, load, capacity, version = _BODY.unpack(body)
    if magic != MAGIC:
        raise BadReport("malformed", f"magic {magic!r}, expected {MAGIC!r}")
    try:
        role = Role(role)
    except ValueError:
        raise BadReport("malformed", f"role {role} is none of {[int(r) for r in Role]}") from None
    if load > capacity:
        raise BadReport("malformed", f"load {load} is above capacity {capacity}")
    try:
        text = version.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        raise BadReport("malformed", "version is not ASCII") from None
    report = LoadReport(Pubkey.from_bytes(node), role, load, capacity, text, seq, time_ms)
    return report, body, Signature.from_bytes(datagram[_BODY.size :])


def verify(report: LoadReport, body: bytes, signature: Signature) -> None:
    """Raise ``BadReport("forged")`` unless the report's own node key signed ``body``."""
    if not signature.verify(report.node, body):
        raise BadReport("forged", f"signature does not verify for node {report.node}")


__all__ = ["MAGIC", "REPORT_LEN", "BadReport", "LoadReport", "parse", "verify"]
