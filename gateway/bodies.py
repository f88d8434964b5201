"""Request bodies in, errors out, in the API's shape (``{"error": "..."}``), for every handler."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from common import jsonsafe
from common.settings import format_validation_error
from gateway import schemas


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def http_error(cls: type[web.HTTPError], message: str) -> web.HTTPError:
    """An aiohttp HTTP exception carrying the API's ``{"error": ...}`` body, ready to raise."""
    return cls(text=json.dumps({"error": message}), content_type="application/json")


def bad_request(message: str) -> web.HTTPError:
    return http_error(web.HTTPBadRequest, message)


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object (an empty body is ``{}``); 400 naming what is wrong."""
    try:
        data = jsonsafe.loads(raw) if raw else {}
    except (jsonsafe.JsonNotUtf8, jsonsafe.JsonTooDeep) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    except ValueError:
        raise bad_request("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    return data


def validated(raw: bytes, model: type[schemas.Body]) -> Any:
    try:
        return model.model_validate(json_object(raw))
    except ValidationError as exc:
        raise bad_request(format_validation_error(exc)) from None


async def parse_body(request: web.Request, model: type[schemas.Body]) -> Any:
    return validated(await request.read(), model)
