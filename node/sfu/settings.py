"""The ``sfu:`` section of a node's YAML config (every key checked: a typo is an error)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from pydantic import BaseModel, ConfigDict, Field


class IceServer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    urls: list[str]
    username: str = ""
    credential: str = ""


class SfuSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ice_servers: list[IceServer] = Field(
        default_factory=list,
        description="STUN/TURN servers handed to clients in the JoinResponse (none on a LAN)",
    )
    ice_addresses: list[IPv4Address | IPv6Address] = Field(
        default_factory=list,
        description="the addresses offered to clients as ICE host candidates (loopback allowed); "
        "empty: every interface address but loopback",
    )
    ping_interval: int = Field(default=5, ge=1, description="seconds between client pings")
    ping_timeout: int = Field(
        default=15, ge=2, description="seconds without a ping: drop the client"
    )
    resume_grace: float = Field(
        default=10.0,
        ge=0,
        description="seconds a participant whose signal socket dropped stays in its room, for "
        "the client's resume (reconnect=1); 0: it leaves at once",
    )
    empty_timeout: float = Field(
        default=20.0, ge=0, description="seconds an empty room lives before room_finished"
    )
    max_participants: int = Field(default=0, ge=0, description="per room; 0 = no limit")
    speaker_interval: float = Field(default=0.3, gt=0, description="seconds between speaker checks")
    speaker_threshold_dbov: int = Field(
        default=50,
        ge=0,
        le=127,
        description="RFC 6464 level (-dBov) at or under which a publisher counts as speaking",
    )
    subscriber_queue: int = Field(
        default=10, ge=1, description="frames queued per subscriber; past it, drop oldest"
    )
    webhooks: bool = Field(default=True, description="send LiveKit webhooks to the gateway")
    region: str = ""
