"""The whole network on loopback, as real processes, for the voice-agent tests.

``running_network(chain, tmp)`` starts, on the session localnet (``chain`` fixture):

* the gateway (`python -m gateway.cli`, SQLite ledger, Solana purchases off: credits are granted
  with `gateway credits grant`, the operator's command);
* three node agents (`python -m node.cli`): an SFU, an STT node (Whisper tiny.en) and a TTS node
  (Kokoro), each registered on chain, heartbeating, posting usage to the gateway;

and grants ``credits_usd`` to a fresh wallet. Every piece is a process of its own: the test's
event loop shares nothing with them (any loop scope works), and a node can be killed
(``net.kill("stt")``) and started again on the same port with the same key (``net.start("stt")``),
so tokens the gateway issued stay valid across the restart.

For test modules: import the module-scoped fixture ``network`` from here
(``from tests.support.agents_network import network  # noqa: F401``); it yields a ``Network``.
``net.gateway()`` is a ``GatewayClient`` signed by the funded wallet; ``net.agent_session(room)``
buys an agent-session bundle with a client token (``client_identity="caller"``).

The nodes sit at ``WHERE`` (Reykjavik), and the gateway places loopback clients there, so its
sessions go to these nodes even if other tests' nodes are registered elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from solders.keypair import Keypair

from gateway.client import AgentSession, GatewayClient
from node.roles import ROLE_SERVICE
from registry.keys import save_keypair
from tests.conftest import ROOT, Chain, free_port

WHERE = {"lat": 64.15, "lon": -21.94, "country": "IS"}
ROLES = ("sfu", "stt", "tts")
START_TIMEOUT = 120.0


def _role_settings(role: str) -> dict[str, Any]:
    if role == "sfu":
        return {"sfu": {"empty_timeout": 1.0, "ping_timeout": 15, "ice_addresses": ["127.0.0.1"]}}
    if role == "stt":
        return {"stt": {"whisper": {"models": ["tiny.en"], "cpu_threads": 1}}}
    return {"tts": {"voice": "af_heart", "threads": 1, "usage_interval": 1, "reconnect_grace": 2}}


def _get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError):
        return 0, None


@dataclass
class Network:
    chain: Chain
    tmp: Path
    gateway_url: str
    wallet: Keypair
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    where: dict[str, Any] = field(default_factory=lambda: dict(WHERE))

    # ------------------------------------------------------------ addresses

    def url(self, role: str) -> str:
        """The node's HTTP URL (what the gateway hands out as ``server_url``)."""
        return f"http://127.0.0.1:{self.ports[role]}"

    def log(self, name: str) -> str:
        """The last part of a process's log (``gateway`` or a role), for assertion messages."""
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def gateway(self, **kwargs: Any) -> GatewayClient:
        """A gateway client signed by the funded wallet (close it, or use ``async with``). Clients
        of one wallet in one process share the record of timestamps already signed."""
        return GatewayClient(self.gateway_url, self.wallet, **kwargs)

    async def agent_session(
        self,
        room: str | None = None,
        minutes: float = 5,
        tts_max_characters: int = 2000,
        client_identity: str = "caller",
    ) -> AgentSession:
        """A bundle (WebRTC for agent and caller, STT, TTS) routed to this network's nodes."""
        async with self.gateway() as gw:
            return await gw.create_agent_session(
                room or f"room-{uuid.uuid4().hex[:8]}",
                "agent",
                minutes,
                language="en",
                tts_max_characters=tts_max_characters,
                client_identity=client_identity,
            )

    # ------------------------------------------------------------ processes

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "ab") as log:  # the child keeps its own handle
            return subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def start_gateway(self) -> None:
        port = free_port()
        self.gateway_url = f"http://127.0.0.1:{port}"
        config = {
            "listen_port": port,
            "rpc_url": self.chain.url,
            "issuer_keypair": str(self.chain.issuer_path),
            "database_url": f"sqlite+aiosqlite:///{self.tmp}/gateway.db",
            "registry_refresh_seconds": 0.5,
            "sweep_interval_seconds": 0.5,
            "settle_grace_seconds": 0,
            "default_location": self.where,
            "payments": {"solana": {"enabled": False}},
        }
        path = self.tmp / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        self.procs["gateway"] = self._spawn("gateway", ["-m", "gateway.cli", "--config", str(path)])

    def grant(self, usd: float) -> None:
        """Credit the wallet (the operator's `gateway credits grant`)."""
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "--config",
                str(self.tmp / "gateway.yaml"),
                "credits",
                "grant",
                "--wallet",
                str(self.wallet.pubkey()),
                "--chain",
                "solana",
                "--usd",
                str(usd),
                "--memo",
                "agents test",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"gateway credits grant failed: {out.stderr}")

    def start(self, role: str, wait: bool = True) -> None:
        """Start (or restart) the ``role`` node on its port with its key."""
        if role in self.procs and self.procs[role].poll() is None:
            raise RuntimeError(f"the {role} node is already running: kill it first")
        port = self.ports.setdefault(role, free_port())
        config = {
            "role": role,
            "keypair": str(self.tmp / f"{role}.json"),
            "rpc_url": self.chain.url,
            "listen_port": port,
            "public_url": f"http://127.0.0.1:{port}",
            # A typed capacity: these tests are about conversations, not about what this machine
            # can hold (calibration is tested in test_node_capacity and the roles' tests), and
            # a test's session must not wait for the previous one's load to reach the chain.
            "location": self.where,
            "capacity": 8,
            "calibrate": False,
            "report_interval": 0.5,
            "drain_timeout": 1,
            "issuer_cache_seconds": 1,
            "state_dir": str(self.tmp / f"state-{role}"),
            "gateway_url": self.gateway_url,
            **_role_settings(role),
        }
        path = self.tmp / f"node-{role}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.procs[role] = self._spawn(role, ["-m", "node.cli", "--config", str(path)])
        if wait:
            self.wait_ready([role])

    def kill(self, role: str, sig: int = signal.SIGKILL) -> None:
        """Stop a node at once (SIGKILL: no drain, no deregistration), or gracefully (SIGTERM)."""
        proc = self.procs[role]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)

    def wait_ready(self, roles: list[str], timeout: float = START_TIMEOUT) -> None:
        """Each node answers /health 200 and the gateway counts it healthy."""
        deadline = time.monotonic() + timeout
        for role in roles:
            while True:
                if self.procs[role].poll() is not None:
                    raise RuntimeError(f"the {role} node exited:\n{self.log(role)}")
                status, _ = _get_json(self.url(role) + "/health")
                if status == 200:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {role} node did not become healthy:\n{self.log(role)}")
                time.sleep(0.3)
        while True:
            status, body = _get_json(self.gateway_url + "/v1/servers/status")
            services = (body or {}).get("services", {})
            if status == 200 and all(
                services.get(ROLE_SERVICE[r], {}).get("healthy", 0) >= 1 for r in roles
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the gateway does not route to {roles}: {body}\n{self.log('gateway')}"
                )
            time.sleep(0.3)

    def stop(self) -> None:
        for name in (*ROLES, "gateway"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def running_network(chain: Chain, tmp: Path, credits_usd: float = 20.0) -> Iterator[Network]:
    """Gateway + SFU, STT and TTS nodes as processes, and a funded wallet; stopped on exit."""
    wallet = Keypair()
    save_keypair(wallet, tmp / "wallet.json")
    net = Network(chain, tmp, "", wallet)
    try:
        net.start_gateway()
        deadline = time.monotonic() + 60
        while _get_json(net.gateway_url + "/internal/health")[0] != 200:
            if net.procs["gateway"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start:\n{net.log('gateway')}")
            time.sleep(0.2)
        net.grant(credits_usd)
        for role in ROLES:  # model loading overlaps
            net.start(role, wait=False)
        net.wait_ready(list(ROLES))
        yield net
    finally:
        net.stop()


@pytest.fixture(scope="module")
def network(chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """One network per test module (see the module docstring)."""
    with running_network(chain, tmp_path_factory.mktemp("agents-net")) as net:
        yield net
