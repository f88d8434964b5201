"""Node agents as real processes on the localnet: register, renew presence, drain, die.

The role is tests/support/probe_role.py (the real roles have their own tests); everything the agent
does on chain — keys, registration, presence renewals (every half of the session registry's 3 s
TTL here) with the role's capacity and load, health, metrics, SIGTERM drain and deregistration,
an expired presence after SIGKILL — runs for real. Its load reports to a gateway are tested in
test_gateway_liveness.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from registry import program as p
from registry.client import RegistryClient
from registry.keys import load_keypair
from registry.tokens import Grant, mint_token
from tests.conftest import (
    ROOT,
    UNSERVED_GATEWAY_URL,
    Chain,
    Localnet,
    init_registry,
    start_localnet_process,
)
from tests.support.node_process import node_config, wait_health


def start_node(config: Path, tmp: Path) -> subprocess.Popen[bytes]:
    log = open(tmp / f"{config.stem}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.probe_role", str(config)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_two_agents_register_renew_presence_and_one_dies(
    chain: Chain, tmp_path: Path
) -> None:
    cfg_a, port_a = node_config(tmp_path, chain, "a")
    cfg_b, port_b = node_config(tmp_path, chain, "b", role="tts")
    a, b = start_node(cfg_a, tmp_path), start_node(cfg_b, tmp_path)
    try:
        health_a = await wait_health(port_a, a)
        health_b = await wait_health(port_b, b)
        key_a = load_keypair(tmp_path / "a.json").pubkey()  # created by the agent on first start
        key_b = load_keypair(tmp_path / "b.json").pubkey()
        assert health_a["pubkey"] == str(key_a) and health_b["role"] == "tts"

        async with aiohttp.ClientSession() as http:
            await http.post(f"http://127.0.0.1:{port_a}/probe/load", json={"load": 3})
            async with RegistryClient(chain.url) as client:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    node = await client.get_node(key_a)
                    if node.load == 3:
                        break
                    await asyncio.sleep(0.3)
                assert node.load == 3 and node.capacity == 5 and node.url.endswith(str(port_a))
                first_beat = node.last_heartbeat
                await asyncio.sleep(1.5)
                assert (await client.get_node(key_a)).last_heartbeat > first_beat

                async with http.get(f"http://127.0.0.1:{port_a}/metrics") as resp:
                    text = await resp.text()
                assert 'voicenet_node_load{role="stt"} 3.0' in text
                assert 'voicenet_node_presence_renewals_total{result="ok",role="stt"}' in text

                a.send_signal(signal.SIGKILL)
                a.wait()
                await asyncio.sleep(chain.ttl + 2)
                nodes = {n.owner: n for n in await client.list_nodes()}
                assert nodes[key_a].stale, "a killed node's presence expires after the TTL"
                assert not nodes[key_b].stale, "the live node keeps renewing its presence"
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()


async def test_sigterm_drains_and_deregisters(chain: Chain, tmp_path: Path) -> None:
    cfg, port = node_config(tmp_path, chain, "c", drain_timeout=3)
    proc = start_node(cfg, tmp_path)
    try:
        await wait_health(port, proc)
        key = load_keypair(tmp_path / "c.json").pubkey()
        async with aiohttp.ClientSession() as http, RegistryClient(chain.url) as client:
            token = mint_token(chain.issuer, "agent", Grant("stt", limit=60), 60)
            async with http.post(
                f"http://127.0.0.1:{port}/probe/verify", json={"token": token}
            ) as r:
                assert r.status == 200 and (await r.json())["identity"] == "agent"
            await http.post(f"http://127.0.0.1:{port}/probe/load", json={"load": 1})
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            async with http.get(f"http://127.0.0.1:{port}/health") as r:
                assert r.status == 503 and (await r.json())["status"] == "draining"
            assert proc.wait(timeout=30) == 0
            assert time.monotonic() - started >= 2.5  # waited out the live session (drain_timeout)
            assert await client.get_node(key) is None, "a stopped node leaves the registry"
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_restart_updates_the_entry_when_config_changes(chain: Chain, tmp_path: Path) -> None:
    cfg, port = node_config(tmp_path, chain, "d", deregister_on_exit=False)
    proc = start_node(cfg, tmp_path)
    await wait_health(port, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    key = load_keypair(tmp_path / "d.json").pubkey()
    async with RegistryClient(chain.url) as client:
        assert (await client.get_node(key)).capacity == 5  # kept: deregister_on_exit is false
        config = yaml.safe_load(cfg.read_text())
        config["capacity"] = 9
        config["location"]["country"] = "NL"
        cfg.write_text(yaml.safe_dump(config))
        proc = start_node(cfg, tmp_path)
        try:
            await wait_health(port, proc)
            node = await client.get_node(key)
            assert (node.capacity, node.country) == (9, "NL")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


async def test_foreign_token_is_refused_by_the_node(chain: Chain, tmp_path: Path) -> None:
    from solders.keypair import Keypair

    cfg, port = node_config(tmp_path, chain, "e")
    proc = start_node(cfg, tmp_path)
    try:
        await wait_health(port, proc)
        async with aiohttp.ClientSession() as http:
            for token, code in [
                (mint_token(Keypair(), "x", Grant("stt", limit=5), 60), "untrusted_issuer"),
                (mint_token(chain.issuer, "x", Grant("tts", limit=5), 60), "wrong_service"),
                (
                    mint_token(chain.issuer, "x", Grant("stt", limit=5), 60, now=time.time() - 600),
                    "token_expired",
                ),
            ]:
                async with http.post(
                    f"http://127.0.0.1:{port}/probe/verify", json={"token": token}
                ) as r:
                    assert r.status == 401
                    assert (await r.json())["error"] == code
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


async def test_a_removed_issuers_tokens_are_refused_by_every_node_within_the_cache_ttl(
    chain: Chain, tmp_path: Path
) -> None:
    """A gateway's key taken off the registry: every node stops accepting its tokens once its
    issuer cache (1 s here, ``issuer_cache_seconds``) has expired, with no restart."""
    from solders.keypair import Keypair

    retired = Keypair()
    configs = [node_config(tmp_path, chain, name) for name in ("g", "h")]
    procs = [start_node(cfg, tmp_path) for cfg, _ in configs]
    try:
        for (_, port), proc in zip(configs, procs, strict=True):
            await wait_health(port, proc)
        async with RegistryClient(chain.url) as client, aiohttp.ClientSession() as http:

            async def answers(token: str) -> list[tuple[int, str | None]]:
                out = []
                for _, port in configs:
                    async with http.post(
                        f"http://127.0.0.1:{port}/probe/verify", json={"token": token}
                    ) as r:
                        out.append((r.status, (await r.json()).get("error")))
                return out

            await client.add_issuer(chain.authority, retired.pubkey(), UNSERVED_GATEWAY_URL)
            await asyncio.sleep(1.5)  # past every node's issuer cache
            token = mint_token(retired, "x", Grant("stt", limit=5), 60)
            assert await answers(token) == [(200, None), (200, None)]
            await client.remove_issuer(chain.authority, retired.pubkey())
            deadline = time.monotonic() + 10
            while (got := await answers(token)) != [(401, "untrusted_issuer")] * 2:
                assert time.monotonic() < deadline, got
                await asyncio.sleep(0.2)
            fresh = mint_token(retired, "y", Grant("stt", limit=5), 60)
            assert await answers(fresh) == [(401, "untrusted_issuer")] * 2
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory):
    """A localnet of its own whose registry admits nodes only on the authority's approval."""
    net = start_localnet_process(tmp_path_factory.mktemp("gated") / "ledger")
    asyncio.run(init_registry(net, 3, p.Policy.APPROVAL))
    yield net
    net.stop()


async def get_health(port: int) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/health") as r:
        return r.status, await r.json()


async def test_pending_node_waits_for_approval_then_serves(gated: Localnet, tmp_path: Path) -> None:
    cfg, port = node_config(tmp_path, gated, "f")  # type: ignore[arg-type]
    proc = start_node(cfg, tmp_path)
    try:
        async with RegistryClient(gated.url) as client:
            deadline = time.monotonic() + 60
            node = None
            while node is None and time.monotonic() < deadline:
                assert proc.poll() is None, f"a pending node must not exit ({proc.returncode})"
                if (tmp_path / "f.json").exists():
                    node = await client.get_node(load_keypair(tmp_path / "f.json").pubkey())
                await asyncio.sleep(0.2)
            assert node is not None and node.status is p.NodeStatus.PENDING
            key = node.owner
            # Up, not ready, and it says what the authority must run.
            status, body = 0, {}
            while time.monotonic() < deadline:
                try:
                    status, body = await get_health(port)
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.2)
            assert (status, body["status"], body["pubkey"]) == (503, "pending", str(key))
            await asyncio.sleep(1.5)  # several polls: it keeps waiting, never renews
            assert proc.poll() is None
            assert (await get_health(port))[1]["status"] == "pending"
            still = await client.get_node(key)
            assert (still.status, still.last_heartbeat) == (
                p.NodeStatus.PENDING,
                node.last_heartbeat,
            )
            log_text = (tmp_path / "f.log").read_text()
            assert f"registry node approve {key} --rpc {gated.url}" in log_text

            await client.approve_node(gated.authority, key)
            health = await wait_health(port, proc)
            assert health["status"] == "ok"
            async with aiohttp.ClientSession() as http:
                await http.post(f"http://127.0.0.1:{port}/probe/load", json={"load": 2})
            while time.monotonic() < deadline:
                node = await client.get_node(key)
                if node.load == 2:
                    break
                await asyncio.sleep(0.3)
            assert (node.status, node.load) == (p.NodeStatus.ACTIVE, 2)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
