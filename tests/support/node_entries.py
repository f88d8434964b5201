"""Registry node entries made up for the routing tests (no chain): a node named for a city,
with the role, load, capacity, staleness and status a test asks for."""

from __future__ import annotations

from solders.pubkey import Pubkey

from registry.program import NodeAccount, NodeStatus, Role

CITIES = {
    "london": (51.51, -0.13, "GB"),
    "frankfurt": (50.11, 8.68, "DE"),
    "cologne": (50.94, 6.96, "DE"),
    "munich": (48.14, 11.58, "DE"),
    "strasbourg": (48.58, 7.75, "FR"),
    "newyork": (40.71, -74.01, "US"),
}


def node(
    name: str,
    city: str | None = None,
    *,
    role: Role = Role.SFU,
    load: int = 0,
    capacity: int = 10,
    stale: bool = False,
    status: NodeStatus = NodeStatus.ACTIVE,
    owner: Pubkey | None = None,
) -> NodeAccount:
    lat, lon, country = CITIES[city or name]
    owner = owner or Pubkey.new_unique()
    return NodeAccount(
        address=Pubkey.new_unique(),
        owner=owner,
        role=role,
        status=status,
        url=f"wss://{name}.example",
        lat=lat,
        lon=lon,
        country=country,
        capacity=capacity,
        load=load,
        version="0.1.0",
        registered_at=0,
        last_heartbeat=0,
        last_heartbeat_slot=0,
        stale=stale,
    )
