"""Where is the client? An IP address in, a point on the globe out, offline.

Routing picks the node nearest the user, so the gateway needs a location for every token it
mints. Nothing here goes to the network (the gateway may run where it cannot, and a per-request
web lookup would add latency and leak users' addresses). Lookup order for a public address:

1. a MaxMind/DB-IP ``.mmdb`` file named in the config (GeoLite2-City, DB-IP City Lite, ...):
   city-level coordinates, or country level if the file only has countries;
2. the embedded database that ships inside the ``geoip2fast`` package (country level, MaxMind
   GeoLite2 data of 2024-06): the country is mapped to its population-weighted centre from
   ``data/country_centroids.csv`` (GeoNames, CC BY 4.0; see ``data/gen_country_centroids.py``);
3. the configured default location.

Private, loopback, link-local, CGNAT, reserved and unparsable addresses go straight to the default:
in the local setup every client is 127.0.0.1 and the default says where "here" is.

dTelecom's peer resolves node domains by DNS and looks them up in GeoLite2; our nodes publish their
coordinates on chain, so only the client side needs an IP database.
"""

from __future__ import annotations

import csv
import ipaddress
import logging
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
CENTROIDS_PATH = DATA_DIR / "country_centroids.csv"
# geoip2fast's IPv6 file holds the IPv4 ranges too (checked: 8.8.8.8 -> US from that file).
EMBEDDED_DATA_FILE = "geoip2fast-ipv6.dat.gz"

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class GeoConfigError(ValueError):
    """The geo configuration names something that cannot be used (a missing or unreadable file)."""


class InvalidClientIP(ValueError):
    """An explicit ``client_ip`` that is not an IP address: a 400 for the caller, not a guess."""


@dataclass(frozen=True)
class Location:
    """A point plus where it came from. ``country`` is ISO 3166-1 alpha-2, "" when unknown.

    ``source`` is one of ``mmdb-city``, ``mmdb-country``, ``embedded-country`` or
    ``default:<reason>`` (private, loopback, link-local, cgnat, reserved, multicast, invalid,
    not-found, no-centroid), so a routing log line says how much to trust it.
    """

    lat: float
    lon: float
    country: str = ""
    source: str = "default"

    def __str__(self) -> str:
        return f"({self.lat:.2f},{self.lon:.2f} {self.country or '??'} via {self.source})"


# ---------------------------------------------------------------- addresses


def parse_ip(text: str | None) -> IP | None:
    """Parse ``1.2.3.4``, ``1.2.3.4:5678``, ``[2001:db8::1]:443``, ``fe80::1%eth0`` and unwrap
    IPv4-mapped IPv6 (``::ffff:1.2.3.4``); None when it is not an address at all."""
    if text is None:
        return None
    t = text.strip().strip('"')
    if t.startswith("["):
        end = t.find("]")
        if end < 0:
            return None
        t = t[1:end]
    elif t.count(":") == 1:  # IPv4 with a port; a bare IPv6 has at least two colons
        t = t.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(t)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def non_public_reason(addr: IP) -> str | None:
    """Why an address cannot be geolocated (``"private"``, ``"cgnat"``, ...); None if public."""
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT:
        return "cgnat"
    if addr.is_multicast:
        return "multicast"
    if addr.is_private:
        return "private"
    if addr.is_unspecified or addr.is_reserved or not addr.is_global:
        return "reserved"
    return None


def client_address(
    request: web.Request,
    client_ip_field: str | None = None,
    *,
    trust_forwarded_for: bool = True,
) -> str:
    """The address to geolocate for one request, as a normalised string ("" if none is known).

    Order: the explicit ``client_ip`` body field (a server minting a token for a remote user),
    else the first (left-most: the original client) address in ``X-Forwarded-For``, else the TCP
    peer. ``X-Forwarded-For`` is written by whoever sends the request, so it is only honest behind
    a proxy that overwrites it: ``trust_forwarded_for`` (config ``trust_forwarded_for``, default
    true for the local setup) turns it off for a gateway exposed directly. An unparsable
    forwarded value (e.g. ``unknown``) is skipped. For ``/v1/agent-session`` with
    ``client_identity`` the agent's token uses ``client_address(request, None)`` and the client's
    ``client_address(request, body.client_ip)``.

    Raises ``InvalidClientIP`` for a ``client_ip`` that is not an address.
    """
    if client_ip_field is not None and str(client_ip_field).strip():
        addr = parse_ip(str(client_ip_field))
        if addr is None:
            raise InvalidClientIP(f"client_ip {client_ip_field!r} is not an IP address")
        return str(addr)
    forwarded = request.headers.get("X-Forwarded-For") if trust_forwarded_for else None
    if forwarded:
        addr = parse_ip(forwarded.split(",", 1)[0])
        if addr is not None:
            return str(addr)
        log.debug("ignoring unparsable X-Forwarded-For %r", forwarded[:100])
    peer = parse_ip(request.remote)
    return str(peer) if peer is not None else ""


# ---------------------------------------------------------------- databases


@cache
def load_country_centroids(path: Path = CENTROIDS_PATH) -> dict[str, tuple[float, float]]:
    """ISO alpha-2 -> (lat, lon) from the shipped CSV (comment lines start with '#')."""
    out: dict[str, tuple[float, float]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        for row in rows:
            out[row["country"].upper()] = (float(row["lat"]), float(row["lon"]))
    return out


_MAX_REMEMBERED = 65_536  # addresses whose location a Locator keeps


class Locator:
    """IP -> ``Location``. The embedded database loads lazily on the first public address (about
    0.1 s and 75 MB of memory, IPv4 and IPv6), so a local setup that only sees 127.0.0.1 never
    pays for it; ``embedded=False`` turns it off where an ``.mmdb`` covers everything."""

    def __init__(
        self,
        default: Location,
        mmdb_path: str | Path | None = None,
        *,
        embedded: bool = True,
        centroids: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        self.default = replace(default, country=default.country.upper())
        self.embedded = embedded
        self.centroids = load_country_centroids() if centroids is None else centroids
        self._mmdb: Any = None
        self._fast: Any = None
        self._seen: dict[str | None, Location] = {}  # the databases never change while we run
        if mmdb_path:
            import maxminddb

            path = Path(mmdb_path).expanduser()
            if not path.is_file():
                raise GeoConfigError(f"mmdb file {str(path)!r} does not exist")
            try:
                self._mmdb = maxminddb.open_database(str(path))
            except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
                raise GeoConfigError(f"mmdb file {str(path)!r} is not a MaxMind DB: {exc}") from exc

    def preload(self) -> None:
        """Load the embedded database now (gateway start-up) rather than on the first request."""
        if self.embedded and self._fast is None:
            from geoip2fast import GeoIP2Fast

            self._fast = GeoIP2Fast(verbose=False, geoip2fast_data_file=EMBEDDED_DATA_FILE)

    def close(self) -> None:
        if self._mmdb is not None:
            self._mmdb.close()
            self._mmdb = None

    def _fallback(self, reason: str, country: str = "") -> Location:
        return replace(
            self.default, country=country or self.default.country, source=f"default:{reason}"
        )

    def locate(self, ip: str | None) -> Location:
        """Never raises for bad input: an address that cannot be placed gets the default."""
        hit = self._seen.get(ip)
        if hit is None:
            if len(self._seen) >= _MAX_REMEMBERED:
                self._seen.clear()
            hit = self._seen[ip] = self._lookup(ip)
        return hit

    def _lookup(self, ip: str | None) -> Location:
        addr = parse_ip(ip)
        if addr is None:
            return self._fallback("invalid")
        reason = non_public_reason(addr)
        if reason is not None:
            return self._fallback(reason)
        found = self._from_mmdb(addr) if self._mmdb is not None else None
        if found is None and self.embedded:
            found = self._from_embedded(addr)
        return found if found is not None else self._fallback("not-found")

    def _from_country(self, country: str, source: str) -> Location:
        point = self.centroids.get(country)
        if point is None:
            return self._fallback("no-centroid", country)
        return Location(point[0], point[1], country, source)

    def _from_mmdb(self, addr: IP) -> Location | None:
        rec = self._mmdb.get(str(addr))
        if not isinstance(rec, dict):
            return None
        country = (rec.get("country") or rec.get("registered_country") or {}).get("iso_code") or ""
        country = str(country).upper()
        loc = rec.get("location") or {}
        lat, lon = loc.get("latitude"), loc.get("longitude")
        if lat is not None and lon is not None:
            return Location(float(lat), float(lon), country, "mmdb-city")
        if country:
            return self._from_country(country, "mmdb-country")
        return None

    def _from_embedded(self, addr: IP) -> Location | None:
        self.preload()
        code = str(self._fast.lookup(str(addr)).country_code or "").upper()
        if len(code) != 2 or not code.isalpha():  # '--' = private/not found, '' = invalid
            return None
        return self._from_country(code, "embedded-country")
