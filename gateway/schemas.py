"""Request bodies of the public API, as pydantic models (field for field as the spec names them).

Unknown fields are refused: a client that sends `duration_minute` should hear about it, not get a
default. Every limit here is a bound a real client can hit; the message names the field.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME = Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")
METADATA = Field(default=None, max_length=4096)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def _check_ip(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None


def _check_uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"{value!r} is not a UUID") from None


class Minutes(Body):
    duration_minutes: float = Field(gt=0, le=24 * 60)


class WebrtcTokenRequest(Minutes):
    room_name: str = NAME
    participant_identity: str = NAME
    metadata: str | None = METADATA
    client_ip: str | None = None

    _ip = field_validator("client_ip")(_check_ip)


class SessionExtend(Body):
    session_id: str
    additional_minutes: float = Field(gt=0, le=24 * 60)

    _id = field_validator("session_id")(_check_uuid)


class SttSessionRequest(Minutes):
    language: str | None = Field(default=None, min_length=1, max_length=16)


class TtsSessionRequest(Body):
    max_characters: int = Field(gt=0, le=10_000_000)
    language: str | None = Field(default=None, min_length=1, max_length=16)


class TtsExtend(Body):
    session_id: str
    additional_characters: int = Field(gt=0, le=10_000_000)

    _id = field_validator("session_id")(_check_uuid)


class AgentSessionRequest(Minutes):
    room_name: str = NAME
    participant_identity: str = NAME
    language: str | None = Field(default=None, min_length=1, max_length=16)
    tts_max_characters: int = Field(default=10_000, gt=0, le=10_000_000)
    metadata: str | None = METADATA
    client_ip: str | None = None
    client_identity: str | None = Field(default=None, min_length=1, max_length=128)

    _ip = field_validator("client_ip")(_check_ip)


class AgentExtend(Body):
    bundle_id: str
    additional_minutes: float = Field(gt=0, le=24 * 60)
    additional_tts_characters: int | None = Field(default=None, gt=0, le=10_000_000)

    _id = field_validator("bundle_id")(_check_uuid)


class Usage(Body):
    duration_seconds: float | None = Field(default=None, ge=0, le=10 * 24 * 3600)
    used_characters: int | None = Field(default=None, ge=0, le=100_000_000)


class UsageEvent(Body):
    session_id: str
    event: Literal["complete", "usage"]
    usage: Usage = Usage()

    _id = field_validator("session_id")(_check_uuid)


class Page(Body):
    limit: int = Field(default=50, ge=1, le=500)
    offset: int = Field(default=0, ge=0, le=1_000_000_000)
    status: Literal["active", "completed", "expired"] | None = None
