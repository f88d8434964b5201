"""A node's YAML config, validated with pydantic so a typo names the key and the fix.

Unknown keys are errors (a misspelt ``capcity`` silently ignored would register the wrong node).
The role's own settings live under a key named for the role (``stt:``, ``tts:``, ``sfu:``) and are
validated by the role plug-in, not here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.settings import SettingsError, read_yaml_mapping, validate_settings
from registry.client import DEFAULT_RPC_URL
from registry.nodeurl import node_url_problem
from registry.program import MAX_URL_LEN, VERSION_LEN

ROLE_NAMES = ("sfu", "stt", "tts")


ConfigError = SettingsError


class Location(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lat: float = Field(ge=-90, le=90, description="latitude in degrees")
    lon: float = Field(ge=-180, le=180, description="longitude in degrees")
    country: str = Field(description="ISO 3166-1 alpha-2 code, e.g. DE")

    @field_validator("country")
    @classmethod
    def _country(cls, v: str) -> str:
        v = v.strip().upper()
        if len(v) != 2 or not v.isascii() or not v.isalpha():
            raise ValueError(f"{v!r} is not a two-letter ISO country code such as DE or US")
        return v


class NodeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["sfu", "stt", "tts"] | None = None
    keypair: Path = Field(description="the node's key; created on first start if missing")
    rpc_url: str = DEFAULT_RPC_URL
    program_id: str | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(ge=0, le=65535)
    public_url: str = Field(min_length=1, max_length=MAX_URL_LEN)
    location: Location
    capacity: int = Field(
        ge=1,
        description="the most sessions this node takes; it advertises "
        "less when its start-up calibration measures less",
    )
    calibrate: bool = Field(
        default=True,
        description="measure the capacity at start (cached per "
        "machine and model); false: advertise "
        "`capacity` as typed",
    )
    version: str | None = Field(default=None, min_length=1, max_length=VERSION_LEN)
    gateway_url: str | None = Field(
        default=None,
        description="a gateway this node serves for sure: it gets the load reports, and the "
        "usage and webhooks of sessions whose issuer has no URL on the registry (every gateway "
        "listed there is served too)",
    )
    report_to: list[str] = Field(
        default_factory=list,
        description="more gateways to report load to, besides those listed on the registry",
    )
    report_interval: float | None = Field(
        default=None,
        gt=0,
        description="seconds between load reports; unset: as often as the gateways ask "
        "(GET /v1/liveness, 5 s by default)",
    )
    presence_interval: float = Field(
        default=6 * 3600,
        gt=0,
        description="seconds between presence renewals on chain (one transaction each); "
        "kept under half the registry's presence TTL",
    )
    drain_timeout: float = Field(default=30.0, ge=0)
    deregister_on_exit: bool = True
    issuer_cache_seconds: float = Field(default=10.0, gt=0)
    state_dir: Path = Path(".local/node")
    sfu: dict[str, Any] = Field(default_factory=dict)
    stt: dict[str, Any] = Field(default_factory=dict)
    tts: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "heartbeat_interval" in data:
            raise ValueError(
                "heartbeat_interval is gone: liveness is off chain now. Use report_interval "
                "(seconds between signed load reports to the gateways; default: as they ask) "
                "and presence_interval (seconds between presence renewals on chain; default "
                "6 hours)"
            )
        return data

    @field_validator("gateway_url", "report_to")
    @classmethod
    def _gateway_urls(cls, v: str | list[str] | None) -> str | list[str] | None:
        for url in [v] if isinstance(v, str) else v or []:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"{url!r} is not a gateway URL: give its http:// or https:// address, "
                    "e.g. https://gateway.example.net (http://127.0.0.1:8402 on this machine)"
                )
        return v

    @field_validator("public_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.isascii() or any(c.isspace() for c in v):
            raise ValueError("public_url must be printable ASCII without spaces")
        if "://" not in v:
            raise ValueError(
                f"public_url {v!r} needs a scheme, e.g. https://stt.example.net "
                "(http://127.0.0.1:8001 on this machine)"
            )
        # The registry program refuses the same URLs; say so before the node tries.
        problem = node_url_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    def role_settings(self, role: str) -> dict[str, Any]:
        return dict(getattr(self, role))


def load_config(path: str | Path, role: str | None = None) -> NodeConfig:
    """Read and validate a node config; ``role`` from the command line wins over the file's.

    Relative paths in the file are relative to the working directory (the repository root under
    `make up`), like every other path the CLIs take.
    """
    raw = read_yaml_mapping(path)
    if role is not None:
        if role not in ROLE_NAMES:
            raise ConfigError(f"unknown role {role!r}: expected one of {', '.join(ROLE_NAMES)}")
        raw["role"] = role
    config = validate_settings(NodeConfig, raw, path)
    if config.role is None:
        raise ConfigError(
            f"{path}: no role: pass --role {{sfu,stt,tts}} or set `role:` in the file"
        )
    return config
