"""Which public URLs a node may register, and so which URLs a gateway may route to or POST to.

A node's URL is where clients connect and where the gateway pushes refreshed and revoked tokens.
Anything but TLS would hand tokens to whoever sits on the path, so only ``https://`` and ``wss://``
are accepted, and plain ``http://``/``ws://`` only on loopback (a local network for development).
The registry program enforces the same rule on chain; this is the off-chain copy that the gateway
and the node agent apply to entries read from chain.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

SECURE_SCHEMES = ("https", "wss")
PLAIN_SCHEMES = ("http", "ws")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def node_url_problem(url: str) -> str | None:
    """Why ``url`` may not be a node's public URL, or None when it may."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"node URL {url!r} does not parse: {exc}"
    if not host:
        return f"node URL {url!r} has no host"
    if parts.scheme in SECURE_SCHEMES:
        return None
    if parts.scheme in PLAIN_SCHEMES:
        if is_loopback_host(host):
            return None
        return (
            f"node URL {url!r} is plain {parts.scheme}:// on a non-loopback host: use "
            "https:// or wss:// (plain http only for 127.0.0.0/8, ::1 or localhost)"
        )
    return f"node URL {url!r} must start with https:// or wss:// (http:// only on loopback)"


def check_node_url(url: str) -> str:
    """``url`` unchanged when a node may register it; ValueError naming the fix otherwise."""
    problem = node_url_problem(url)
    if problem:
        raise ValueError(problem)
    return url
