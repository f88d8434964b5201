"""``GET /openapi.json``: the API described from the route table and the request models.

Built from the same ``Route`` table the app registers (``gateway.routes``, handed over in the app)
and the same pydantic models it validates with, so the document cannot drift from what is served
(a test compares both).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from gateway.context import ROUTES_KEY
from gateway.routes import Route

ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
ERRORS = {
    "400": "Bad request / validation error",
    "401": "Invalid or missing authentication",
    "402": "Insufficient credits",
    "404": "Resource not found",
    "429": "Rate limit exceeded / concurrent session limit",
    "503": "No servers available for requested service",
}


def build_document(routes: Iterable[Route]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in routes:
        path = route.path
        op: dict[str, Any] = {
            "summary": route.summary,
            "responses": {
                "200": {"description": "OK"},
                **{
                    code: {"description": text, "content": {"application/json": {"schema": ERROR}}}
                    for code, text in ERRORS.items()
                },
            },
        }
        if route.auth == "node":
            op["security"] = [{"nodeSignature": []}]
        elif route.auth == "wallet":
            op["security"] = [{"walletSignature": []}]
        if route.model is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": route.model.model_json_schema()}},
            }
        if route.paged:
            op["parameters"] = [
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                },
                {
                    "name": "offset",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 0, "default": 0},
                },
            ]
            if path.endswith("/sessions"):
                op["parameters"].append(
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["active", "completed", "expired"]},
                    }
                )
        paths.setdefault(path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "voicenet gateway",
            "version": "0.1.0",
            "description": "Pay-per-use WebRTC, STT and TTS sessions on an open node network.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "walletSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "`<chain>:<signature>` over `METHOD\\nPATH\\nTIMESTAMP`, with "
                    "X-Wallet-Address, X-Wallet-Chain and X-Timestamp headers",
                },
                "nodeSignature": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "EdDSA JWT by a node key registered and active on chain; its "
                    "`sha256` claim is base64(SHA-256(body))",
                },
            }
        },
    }


async def openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(build_document(request.app[ROUTES_KEY]))
