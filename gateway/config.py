"""The gateway's YAML config, validated key by key (a misspelt key is an error, not a default)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from common.settings import SettingsError, read_yaml_mapping, validate_settings
from gateway.payments.config import PaymentsConfig
from registry.client import DEFAULT_RPC_URL

GatewayConfigError = SettingsError


class DefaultLocation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    country: str = Field(min_length=2, max_length=2)


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8402, ge=0, le=65535)
    rpc_url: str = DEFAULT_RPC_URL
    program_id: str | None = None
    issuer_keypair: Path = Path(".local/keys/gateway-issuer.json")
    database_url: str = "sqlite+aiosqlite:///.local/gateway.db"
    # PostgreSQL connections this gateway process keeps open (a fixed pool; requests beyond it
    # wait for one). Unused on SQLite.
    database_pool_size: int = Field(default=16, ge=1)
    registry_refresh_seconds: float = Field(default=3.0, gt=0)
    # Nodes' signed load reports (gateway/liveness.py): the UDP port they are sent to (unset: the
    # HTTP port's number, as QUIC sits beside HTTPS; 0: any free port; nodes learn it from
    # GET /v1/liveness), how often nodes send one, and how old the last one may be before the node
    # leaves routing.
    load_report_port: int | None = Field(default=None, ge=0, le=65535)
    load_report_interval_seconds: float = Field(default=5.0, gt=0)
    load_report_ttl_seconds: float = Field(default=15.0, gt=0)
    default_location: DefaultLocation = DefaultLocation(lat=50.11, lon=8.68, country="DE")
    geoip_mmdb: Path | None = None
    trust_forwarded_for: bool = True
    auth_window_seconds: int = Field(default=30, ge=1)
    sweep_interval_seconds: float = Field(default=5.0, gt=0)
    settle_grace_seconds: int = Field(default=30, ge=0)
    tts_session_minutes: int = Field(default=60, ge=1)
    # On WebRTC extend, push the new token to the SFU holding the participant (POST /rtc/refresh).
    refresh_sfu_tokens: bool = True
    # Requests per second for wallets without an account yet (accounts carry their own limit).
    default_max_api_rate: int = Field(default=50, ge=1)
    # How long a wallet's account id and limits are reused without a ledger read: a changed
    # max_api_rate applies within this. Balances and the concurrent-session limit are checked in
    # the ledger's transaction on every request regardless.
    account_cache_seconds: float = Field(default=10.0, ge=0)
    # Where answered wallet signatures are remembered: "memory" (this process only) or "ledger"
    # (the used_signatures table, shared by every gateway process on the ledger). Unset: the
    # ledger on PostgreSQL, where several processes may share it, memory on SQLite. Several
    # processes on one ledger with "memory" would each answer a copy of a signed request.
    replay_guard: Literal["memory", "ledger"] | None = None
    # Credit purchases: x402 on Solana (and EVM), MPP and TRON challenges (gateway/payments).
    payments: PaymentsConfig = PaymentsConfig()

    def report_port(self) -> int:
        """The UDP port load reports are sent to (see ``load_report_port``)."""
        return self.listen_port if self.load_report_port is None else self.load_report_port

    def shared_replay_guard(self, postgres: bool) -> bool:
        """Whether answered signatures are kept in the ledger (see ``replay_guard``)."""
        return self.replay_guard == "ledger" or (self.replay_guard is None and postgres)


def load_gateway_config(path: str | Path | None) -> GatewayConfig:
    """Read the gateway config; no path gives the built-in local defaults."""
    if path is None:
        return GatewayConfig()
    return validate_settings(GatewayConfig, read_yaml_mapping(path), path)
