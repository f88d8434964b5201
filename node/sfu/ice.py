"""Which of the host's addresses the SFU offers as ICE host candidates (LiveKit's ``rtc.ips``).

aioice gathers a candidate on every interface address but loopback, and has no per-connection
choice: on a host with private, container or test-net interfaces the SFU then offers addresses
a client may not reach, and with several usable pairs the two ICE agents can settle on different
ones (seen on this kind of machine: a browser's microphone that never reached the SFU, one join
in three). An operator lists the addresses clients reach instead; the local network lists
127.0.0.1, which aioice would otherwise never offer. The choice is process-wide because aioice's
is (``aioice.ice.get_host_addresses``), and the SFU role owns its process.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence

import aioice.ice

log = logging.getLogger("node.sfu")

_GATHER: Callable[[bool, bool], list[str]] = aioice.ice.get_host_addresses


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def offer_host_addresses(addresses: Sequence[Address]) -> None:
    """Offer exactly ``addresses`` as host candidates (all of them, loopback included); an empty
    list restores aioice's own choice (every interface address but loopback)."""
    if not addresses:
        aioice.ice.get_host_addresses = _GATHER
        return
    chosen = [(str(a), a.version) for a in addresses]

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        wanted = {4} if use_ipv4 else set()
        wanted |= {6} if use_ipv6 else set()
        return [a for a, version in chosen if version in wanted]

    aioice.ice.get_host_addresses = host_addresses
    log.info("ICE host candidates on %s only", ", ".join(a for a, _ in chosen))
