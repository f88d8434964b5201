"""The node's durable outbox (node/outbox.py) against stand-in gateways on loopback: each event
goes to the gateway that issued its session's token, a gateway that is down holds back only its
own events, and an outbox file from before events named their issuer still delivers."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

from aiohttp import web
from solders.keypair import Keypair

from node.outbox import Outbox
from registry.tokens import verify_body
from tests.conftest import free_port
from tests.support.serving import serve


def recording_gateway(received: list[dict[str, Any]], node: Keypair) -> web.Application:
    async def events(request: web.Request) -> web.Response:
        body = await request.read()
        assert verify_body(request.headers["Authorization"][7:], body) == str(node.pubkey())
        received.append(json.loads(body))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/internal/events", events)
    return app


async def until(condition: Any, what: str, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


async def test_events_go_to_their_issuers_gateway_and_a_dead_one_holds_back_only_its_own(
    tmp_path: Path,
) -> None:
    node = Keypair()
    at_a: list[dict[str, Any]] = []
    at_b: list[dict[str, Any]] = []
    port_a = free_port()  # A is down at first
    runner_b, port_b = await serve(recording_gateway(at_b, node))
    urls = {"key-a": f"http://127.0.0.1:{port_a}", "key-b": f"http://127.0.0.1:{port_b}"}
    outbox = Outbox(tmp_path / "outbox.sqlite", None, node, max_backoff=1.0)
    outbox.resolve = urls.get
    runner_a = None
    try:
        await outbox.start()
        outbox.report_usage("s-a", False, duration_seconds=1, issuer="key-a")
        outbox.report_usage("s-a", True, duration_seconds=2, issuer="key-a")
        outbox.report_usage("s-b", True, duration_seconds=3, issuer="key-b")
        outbox.report_usage("s-x", True, duration_seconds=4, issuer="key-unknown")
        await until(lambda: len(at_b) == 1, "B got its event while A is down")
        assert at_b[0]["session_id"] == "s-b" and at_a == []
        await until(lambda: outbox.failures >= 1, "a failed delivery to A")
        runner_a, _ = await serve(recording_gateway(at_a, node), port_a)
        await until(lambda: len(at_a) == 2, "A got its events once it came up")
        assert [(e["session_id"], e["event"]) for e in at_a] == [
            ("s-a", "usage"),
            ("s-a", "complete"),
        ], "in order"
        # no gateway_url and no URL for its issuer: kept on disk, not sent anywhere
        assert [e["session_id"] for e in outbox.queued()] == ["s-x"] and outbox.dead() == []
    finally:
        await outbox.stop()
        await runner_b.cleanup()
        if runner_a is not None:
            await runner_a.cleanup()


async def test_an_outbox_file_from_before_issuers_still_delivers(tmp_path: Path) -> None:
    node = Keypair()
    path = tmp_path / "outbox.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL,
            body BLOB NOT NULL, key TEXT, attempts INTEGER NOT NULL DEFAULT 0,
            next_at REAL NOT NULL, created_at REAL NOT NULL);
        """
    )
    body = b'{"event":"complete","session_id":"old","usage":{}}'
    for stored in (body, body.decode().replace("old", "text")):  # a BLOB, and TEXT by hand
        old.execute(
            "INSERT INTO outbox (path, body, key, next_at, created_at) VALUES (?, ?, NULL, 0, 0)",
            ("/internal/events", stored),
        )
    old.commit()
    old.close()
    received: list[dict[str, Any]] = []
    runner, port = await serve(recording_gateway(received, node))
    outbox = Outbox(path, f"http://127.0.0.1:{port}", node)
    try:
        await outbox.start()
        await until(lambda: len(received) == 2, "the queued events were sent")
        assert [e["session_id"] for e in received] == ["old", "text"] and outbox.dead() == []
    finally:
        await outbox.stop()
        await runner.cleanup()
