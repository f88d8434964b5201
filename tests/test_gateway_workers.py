"""``gateway serve --workers N`` as a real process tree on PostgreSQL: the workers share one port,
every worker routes to a node whose reports reach the supervisor, a signed request is answered
once whichever worker gets its copy, and SQLite is refused with the reason."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import yaml
from solders.keypair import Keypair

from gateway.auth import sign_request
from gateway.ledger import Ledger
from node.liveness import LoadReporter
from registry import program as p
from registry.keys import save_keypair
from tests.conftest import ROOT, free_port
from tests.support.gateway_net import Net


def gateway_process(tmp: Path, net: Net, db: str, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    save_keypair(net.issuer, tmp / "issuer.json")
    config = tmp / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen_port": port,
                "rpc_url": net.url,
                "database_url": db,
                "issuer_keypair": str(tmp / "issuer.json"),
                "registry_refresh_seconds": 0.5,
                "load_report_port": 0,
                "refresh_sfu_tokens": False,
            }
        )
    )
    log = open(tmp / "gateway.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), *args],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return proc, f"http://127.0.0.1:{port}"


async def fresh_get(url: str) -> dict:
    """One request on a connection of its own, so the kernel may hand it to any worker."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http, http.get(url) as r:
        return await r.json()


async def test_workers_share_the_port_the_load_reports_and_the_answered_signatures(
    gateway_net: Net, tmp_path: Path, pg_db_url: str
) -> None:
    proc, url = gateway_process(tmp_path, gateway_net, pg_db_url, "serve", "--workers", "2")
    reporter = None
    try:
        for _ in range(150):
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
            try:
                await fresh_get(url + "/internal/health")
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.2)
        pids = {(await fresh_get(url + "/internal/health"))["pid"] for _ in range(40)}
        assert len(pids) == 2, f"connections should reach both workers: {pids}"
        assert proc.pid not in pids  # the supervisor serves no HTTP

        key = gateway_net.nodes["tts-de"]
        reporter = LoadReporter(key, p.Role.TTS, lambda: (1, 4), "0.1.0", [url], interval=0.2)
        await reporter.start()
        for _ in range(100):
            counts = [
                (await fresh_get(url + "/v1/servers/status"))["services"]["tts"]["healthy"]
                for _ in range(10)
            ]
            if counts == [1] * 10:
                break
            await asyncio.sleep(0.2)
        assert counts == [1] * 10, f"every worker routes to the reporting node: {counts}"

        wallet = Keypair()
        async with Ledger(pg_db_url) as ledger:
            await ledger.grant("solana", str(wallet.pubkey()), 1_000_000, memo="test")
        spend = {
            **sign_request("POST", "/v1/tts/session", wallet),
            "Content-Type": "application/json",
        }
        body = json.dumps({"max_characters": 50}).encode()
        statuses = []
        for _ in range(6):  # copies of one signed request, each on a new connection
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.post(url + "/v1/tts/session", data=body, headers=spend) as r:
                    statuses.append(r.status)
        assert sorted(statuses) == [200, 401, 401, 401, 401, 401], statuses
    finally:
        if reporter is not None:
            await reporter.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "gateway.log").read_text()


async def test_workers_on_sqlite_are_refused_with_the_reason(
    gateway_net: Net, tmp_path: Path
) -> None:
    proc, _ = gateway_process(
        tmp_path, gateway_net, f"sqlite+aiosqlite:///{tmp_path}/gw.db", "serve", "--workers", "2"
    )
    assert proc.wait(timeout=60) != 0
    text = (tmp_path / "gateway.log").read_text()
    assert "--workers 2 needs a PostgreSQL ledger" in text and "Traceback" not in text
