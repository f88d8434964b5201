"""YAML config files validated by pydantic: the one loader every service (node, gateway) uses.

It holds no service's settings: each service declares its own model and loads it through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class SettingsError(Exception):
    """A config file that cannot be used; the message names the file, the key and the problem."""


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise SettingsError(
            f"config file {p} not found (see configs/ for commented examples)"
        ) from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{p}: the top level must be a mapping of keys to values")
    return raw


def validate_settings(model: type[M], raw: dict[str, Any], source: str | Path) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise SettingsError(f"{source}: {format_validation_error(exc)}") from None


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, naming the key: 'unknown key', 'missing required key', or the value."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r} (check the spelling against configs/)")
        elif err["type"] == "missing":
            parts.append(f"missing required key {key!r}")
        else:
            parts.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)
