"""The demo web app: serves the static pages (plain HTML and JS, no build step) and tells them
where the gateway is. Today's page is ``/network``, the registry's nodes on a world map, read by
the browser from the gateway's public ``GET /v1/nodes`` every few seconds.

    python -m demo.app --gateway http://127.0.0.1:8402 [--host 127.0.0.1] [--port 8080]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from urllib.parse import urlparse

from aiohttp import web

from demo.vendor import VENDOR

STATIC = Path(__file__).parent / "static"
DEFAULT_GATEWAY = "http://127.0.0.1:8402"  # where `make up` serves it
GATEWAY_URL_KEY = web.AppKey("gateway_url", str)
REFRESH_KEY = web.AppKey("refresh_seconds", float)

log = logging.getLogger("demo")


def check_gateway_url(url: str) -> str:
    """The gateway's base URL, without a trailing slash; the pages fetch from it directly."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"gateway URL {url!r} is not an http(s) URL: pass e.g. "
                         f"--gateway {DEFAULT_GATEWAY}")
    return url.rstrip("/")


async def index(request: web.Request) -> web.Response:
    raise web.HTTPFound("/network")


async def network_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "network.html")


async def config_handler(request: web.Request) -> web.Response:
    """What the pages need to know at load: the gateway they read and how often."""
    return web.json_response({"gateway_url": request.app[GATEWAY_URL_KEY],
                              "refresh_seconds": request.app[REFRESH_KEY]})


def create_app(gateway_url: str = DEFAULT_GATEWAY, refresh_seconds: float = 3.0) -> web.Application:
    """The demo app. Vendor files (livekit-client, the world map) must have been fetched by
    ``make setup`` (``python -m demo.vendor``): a missing one is an error at start, not a blank
    map in the browser."""
    if refresh_seconds <= 0:
        raise ValueError(f"refresh_seconds must be > 0, got {refresh_seconds!r}")
    missing = [name for name in ("countries-110m.json", "topojson-client.min.js")
               if not (VENDOR / name).exists()]
    if missing:
        raise RuntimeError(f"{VENDOR} lacks {', '.join(missing)}: run `make setup` "
                           f"(or `python -m demo.vendor`)")
    app = web.Application()
    app[GATEWAY_URL_KEY] = check_gateway_url(gateway_url)
    app[REFRESH_KEY] = float(refresh_seconds)
    app.router.add_get("/", index)
    app.router.add_get("/network", network_page)
    app.router.add_get("/api/config", config_handler)
    app.router.add_static("/static/", STATIC)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.app", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--gateway", default=DEFAULT_GATEWAY, help="the gateway's base URL")
    parser.add_argument("--refresh", type=float, default=3.0,
                        help="seconds between the map's reads of the node list")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        app = create_app(args.gateway, args.refresh)
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    web.run_app(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
