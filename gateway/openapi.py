"""``GET /openapi.json``: the API described from the route table and the request models.

Built from the same ``ROUTES`` list the app registers and the same pydantic models it validates
with, so the document cannot drift from what is served (a test compares both).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import schemas

REQUEST_MODELS: dict[str, type[schemas.Body]] = {
    "/v1/webrtc/token": schemas.WebrtcTokenRequest,
    "/v1/webrtc/token/extend": schemas.SessionExtend,
    "/v1/stt/session": schemas.SttSessionRequest,
    "/v1/stt/session/extend": schemas.SessionExtend,
    "/v1/tts/session": schemas.TtsSessionRequest,
    "/v1/tts/session/extend": schemas.TtsExtend,
    "/v1/agent-session": schemas.AgentSessionRequest,
    "/v1/agent-session/extend": schemas.AgentExtend,
    "/internal/events": schemas.UsageEvent,
}
from gateway.payments.routes import PAYMENT_REQUEST_MODELS  # noqa: E402

REQUEST_MODELS.update(PAYMENT_REQUEST_MODELS)
PUBLIC = {"/v1/pricing", "/v1/servers/status", "/internal/health"}
NODE_SIGNED = {"/internal/events", "/v1/webhooks/sfu"}
PAGED = {"/v1/account/transactions", "/v1/account/sessions"}

ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
ERRORS = {
    "400": "Bad request / validation error", "401": "Invalid or missing authentication",
    "402": "Insufficient credits", "404": "Resource not found",
    "429": "Rate limit exceeded / concurrent session limit",
    "503": "No servers available for requested service",
}


def build_document(routes: list[tuple[str, str, Any, str]]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for method, path, _handler, summary in routes:
        op: dict[str, Any] = {
            "summary": summary,
            "responses": {"200": {"description": "OK"},
                          **{code: {"description": text,
                                    "content": {"application/json": {"schema": ERROR}}}
                             for code, text in ERRORS.items()}},
        }
        if path in NODE_SIGNED:
            op["security"] = [{"nodeSignature": []}]
        elif path not in PUBLIC:
            op["security"] = [{"walletSignature": []}]
        model = REQUEST_MODELS.get(path)
        if model is not None:
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": model.model_json_schema()}}}
        if path in PAGED:
            op["parameters"] = [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                            "maximum": 500, "default": 50}},
                {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                             "default": 0}},
            ]
            if path.endswith("/sessions"):
                op["parameters"].append({"name": "status", "in": "query", "schema": {
                    "type": "string", "enum": ["active", "completed", "expired"]}})
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "voicenet gateway", "version": "0.1.0",
                 "description": "Pay-per-use WebRTC, STT and TTS sessions on an open node network."},
        "paths": paths,
        "components": {"securitySchemes": {
            "walletSignature": {
                "type": "apiKey", "in": "header", "name": "Authorization",
                "description": "`<chain>:<signature>` over `METHOD\\nPATH\\nTIMESTAMP`, with "
                               "X-Wallet-Address, X-Wallet-Chain and X-Timestamp headers"},
            "nodeSignature": {
                "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "EdDSA JWT by a node key registered and active on chain; its "
                               "`sha256` claim is base64(SHA-256(body))"},
        }},
    }


async def openapi_handler(request: web.Request) -> web.Response:
    from gateway.app import ROUTES

    return web.json_response(build_document(ROUTES))
