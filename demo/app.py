"""The demo web app: serves the static pages (plain HTML and JS, no build step) and the one API
they need. Two pages:

* ``/talk``: a person talks to a tutor agent (demo/talk.py): ``POST /api/start`` starts the
  agent and answers the page's token; ``GET /api/credit`` is what the demo wallet has left;
* ``/network``: the registry's nodes on a world map, read by the browser from the gateway's
  public ``GET /v1/nodes`` every few seconds.

    python -m demo.app --gateway http://127.0.0.1:8402 --wallet .local/keys/demo-wallet.json \
        [--fund --rpc http://127.0.0.1:8899] [--host 127.0.0.1] [--port 8080]

Without ``--wallet`` only the map works (``/api/start`` answers 503 saying so). ``--fund`` buys
the wallet credits first (demo/wallet.py: test USDC and an x402 purchase, localnet only).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

from aiohttp import web

from demo.talk import StartError, Tutors, parse_start
from demo.vendor import VENDOR
from gateway.client import GatewayClient, GatewayError, NotFound

STATIC = Path(__file__).parent / "static"
DEFAULT_GATEWAY = "http://127.0.0.1:8402"  # where `make up` serves it
GATEWAY_URL_KEY = web.AppKey("gateway_url", str)
REFRESH_KEY = web.AppKey("refresh_seconds", float)
TUTORS_KEY = web.AppKey("tutors", Tutors)
MAX_BODY = 4096

log = logging.getLogger("demo")


def check_gateway_url(url: str) -> str:
    """The gateway's base URL, without a trailing slash; the pages fetch from it directly."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(
            f"gateway URL {url!r} is not an http(s) URL: pass e.g. --gateway {DEFAULT_GATEWAY}"
        )
    return url.rstrip("/")


async def index(request: web.Request) -> web.Response:
    raise web.HTTPFound("/talk" if TUTORS_KEY in request.app else "/network")


async def network_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "network.html")


async def talk_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "talk.html")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _tutors(request: web.Request) -> Tutors | None:
    return request.app.get(TUTORS_KEY)


async def start_handler(request: web.Request) -> web.Response:
    """Start a tutor for the page's identity; the browser's address routes the session."""
    tutors = _tutors(request)
    if tutors is None:
        return _error(
            503, "this demo server has no wallet: start it with --wallet FILE (`make demo` does)"
        )
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _error(413, f'the body is over {MAX_BODY} bytes: send {{"identity": "..."}}')
    try:
        body = json.loads(await request.text())
    except ValueError as exc:
        return _error(400, f'the body is not JSON ({exc}): send {{"identity": "student-42"}}')
    try:
        identity = parse_start(body)
    except StartError as exc:
        return _error(400, str(exc))
    try:
        grant = await tutors.start(identity, request.remote)
    except GatewayError as exc:
        log.warning("start for %s refused by the gateway: %s", identity, exc)
        return _error(502, f"the gateway refused the session: {exc}")
    return web.json_response(grant)


async def credit_handler(request: web.Request) -> web.Response:
    """What the demo wallet can still spend (USD), for the page's "credit left"."""
    tutors = _tutors(request)
    if tutors is None:
        return _error(503, "this demo server has no wallet: start it with --wallet FILE")
    try:
        account = await tutors.gateway.account()
    except NotFound:
        return web.json_response({"available_usd": 0.0, "balance_usd": 0.0})
    except GatewayError as exc:
        return _error(502, f"the gateway did not answer the balance: {exc}")
    return web.json_response(
        {
            "available_usd": account.available_balance / 1e6,
            "balance_usd": account.credit_balance / 1e6,
        }
    )


async def config_handler(request: web.Request) -> web.Response:
    """What the pages need to know at load: the gateway they read and how often."""
    return web.json_response(
        {"gateway_url": request.app[GATEWAY_URL_KEY], "refresh_seconds": request.app[REFRESH_KEY]}
    )


def create_app(
    gateway_url: str = DEFAULT_GATEWAY, refresh_seconds: float = 3.0, tutors: Tutors | None = None
) -> web.Application:
    """The demo app; ``tutors`` (a wallet's conversations) enables ``/api/start``, and ends its
    conversations when the app stops. Vendor files (livekit-client, the world map) must have
    been fetched by ``make setup`` (``python -m demo.vendor``): a missing one is an error at
    start, not a blank page in the browser."""
    if refresh_seconds <= 0:
        raise ValueError(f"refresh_seconds must be > 0, got {refresh_seconds!r}")
    missing = [
        name
        for name in ("countries-110m.json", "topojson-client.min.js", "livekit-client.umd.js")
        if not (VENDOR / name).exists()
    ]
    if missing:
        raise RuntimeError(
            f"{VENDOR} lacks {', '.join(missing)}: run `make setup` (or `python -m demo.vendor`)"
        )
    app = web.Application()
    app[GATEWAY_URL_KEY] = check_gateway_url(gateway_url)
    app[REFRESH_KEY] = float(refresh_seconds)
    app.router.add_get("/", index)
    app.router.add_get("/network", network_page)
    app.router.add_get("/talk", talk_page)
    app.router.add_get("/api/config", config_handler)
    app.router.add_post("/api/start", start_handler)
    app.router.add_get("/api/credit", credit_handler)
    if tutors is not None:
        app[TUTORS_KEY] = tutors

        async def end_conversations(app: web.Application) -> None:
            await tutors.aclose()

        app.on_shutdown.append(end_conversations)
    app.router.add_static("/static/", STATIC)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.app", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--gateway", default=DEFAULT_GATEWAY, help="the gateway's base URL")
    parser.add_argument(
        "--refresh",
        type=float,
        default=3.0,
        help="seconds between the map's reads of the node list",
    )
    parser.add_argument(
        "--wallet",
        type=Path,
        help="Solana keypair file that pays for the tutors (created if missing)",
    )
    parser.add_argument(
        "--fund",
        action="store_true",
        help="buy the wallet credits first: test USDC, then an x402 purchase (localnet only)",
    )
    parser.add_argument(
        "--rpc", default="http://127.0.0.1:8899", help="the localnet's RPC URL, for --fund"
    )
    args = parser.parse_args(argv)
    if args.fund and args.wallet is None:
        parser.error("--fund needs --wallet FILE (the wallet to fund)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # every RPC call of the purchase
    try:
        check_gateway_url(args.gateway)
        create_app(args.gateway, args.refresh)  # checks the vendor files before any purchase
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    web.run_app(serve(args), host=args.host, port=args.port)


async def serve(args: argparse.Namespace) -> web.Application:
    """The app, with the wallet's tutors (the embedded LLM) when ``--wallet`` is given."""
    if args.wallet is None:
        return create_app(args.gateway, args.refresh)
    if args.fund:
        from demo.wallet import fund

        await fund(args.wallet, args.gateway, args.rpc)
    from agents.llm import EmbeddedLLM
    from registry.keys import load_or_create_keypair

    gateway = GatewayClient(args.gateway, load_or_create_keypair(args.wallet))
    app = create_app(args.gateway, args.refresh, Tutors(gateway, EmbeddedLLM))

    async def close_gateway(app: web.Application) -> AsyncIterator[None]:
        yield
        await gateway.close()

    app.cleanup_ctx.append(close_gateway)
    return app


if __name__ == "__main__":
    main()
