"""A node agent as a process of its own in a test: its YAML config on the session localnet (fast
heartbeats, short drain) and the wait until its /health answers 200."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import aiohttp
import yaml

from tests.conftest import Chain, free_port


def node_config(tmp: Path, chain: Chain, name: str, **over: object) -> tuple[Path, int]:
    port = free_port()
    config = {
        "role": "stt",
        "keypair": str(tmp / f"{name}.json"),
        "rpc_url": chain.url,
        "listen_port": port,
        "public_url": f"http://127.0.0.1:{port}",
        "location": {"lat": 50.1, "lon": 8.7, "country": "DE"},
        "capacity": 5,
        "report_interval": 0.5,
        "drain_timeout": 5,
        "issuer_cache_seconds": 1,
        **over,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


async def wait_health(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"node exited with {proc.returncode}"
            try:
                async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                    if resp.status == 200:
                        return await resp.json()
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("node did not become healthy")
