"""`make up`: the whole network on this machine, in the foreground.

Starts the localnet (registry program deployed with .local/keys/authority.json as its upgrade
authority), initialises the registry under the `approval` admission policy, lists the gateway's key
as a trusted issuer, then starts the gateway and one node of each role that this build has,
approving each of its own nodes (their keys are .local/keys/node-<role>.json) once they register.
Each child's output is prefixed with its name. `ready` is printed once the gateway routes to a
node of every role it started (a node answering /health is not yet one the gateway has read from
the registry). A node, the gateway or the demo app that exits is started again, with a log line
(`supervise`); only the localnet's exit, or a child failing again and again, stops the network.
Ctrl-C (or SIGTERM) stops the children in reverse order, so nodes drain and deregister while the
chain is still up. State lives under `.local/`.

`make demo` runs it with `--demo`: the same network, then the demo web app (demo/app.py) on
http://127.0.0.1:8080 with its wallet (.local/keys/demo-wallet.json) funded by an x402 purchase.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from solders.keypair import Keypair  # noqa: E402

from node.roles import ROLE_SERVICE  # noqa: E402
from registry import program as p  # noqa: E402
from registry.client import DEFAULT_PRESENCE_TTL_HOURS, RegistryClient, RegistryError  # noqa: E402
from registry.keys import load_or_create_keypair  # noqa: E402
from registry.localnet import holds_another_build  # noqa: E402

LOCAL = ROOT / ".local"
RPC_PORT = 8899
RPC_URL = f"http://127.0.0.1:{RPC_PORT}"
GATEWAY_URL = "http://127.0.0.1:8402"
PRESENCE_TTL = round(DEFAULT_PRESENCE_TTL_HOURS * 3600)
NODE_PORTS = {"sfu": 7880, "stt": 8001, "tts": 8002}
RESTARTS = 5  # a child that exits this many times within RESTART_WINDOW stops the network
RESTART_WINDOW = 300.0
DEMO_URL = "http://127.0.0.1:8080"
AUTHORITY_KEY = LOCAL / "keys" / "authority.json"


class Child:
    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Own process group: Ctrl-C reaches only this supervisor, which then stops the
            # children in reverse order (nodes deregister while the chain is still up).
            start_new_session=True,
        )
        self._pump = asyncio.create_task(self._prefix_output())

    async def _prefix_output(self) -> None:
        assert self.proc and self.proc.stdout
        async for line in self.proc.stdout:
            print(f"[{self.name}] {line.decode(errors='replace').rstrip()}", flush=True)

    async def stop(self, timeout: float = 40.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            print(f"[{self.name}] did not stop in {timeout:.0f}s; killing", flush=True)
            self.proc.kill()
            await self.proc.wait()
        if self._pump:
            await self._pump


async def wait_http(url: str, what: str, timeout: float = 60.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{what} did not come up at {url} within {timeout:.0f}s")


async def wait_routable(
    roles: list[str], gateway_url: str = GATEWAY_URL, timeout: float = 120.0
) -> None:
    """Until the gateway counts a healthy node of each of ``roles`` (its registry view lags the
    nodes' start by up to a refresh: an agent session asked for right then was refused with
    "no healthy tts node")."""
    import aiohttp

    wanted = {ROLE_SERVICE[r] for r in roles}
    services: dict[str, dict[str, int]] = {}
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{gateway_url}/v1/servers/status") as resp:
                    services = (await resp.json()).get("services", {}) if resp.ok else {}
            except (aiohttp.ClientError, ValueError):
                services = {}
            if all(services.get(s, {}).get("healthy", 0) >= 1 for s in wanted):
                return
            await asyncio.sleep(0.5)
    missing = sorted(s for s in wanted if services.get(s, {}).get("healthy", 0) < 1)
    raise RuntimeError(
        f"the gateway did not route to a {', '.join(missing)} node within {timeout:.0f}s "
        f"(its /v1/servers/status: {services}); see the nodes' output above"
    )


async def supervise(
    children: list[Child],
    stop: asyncio.Event,
    essential: frozenset[str] = frozenset({"localnet"}),
    restarts: int = RESTARTS,
    window: float = RESTART_WINDOW,
) -> int:
    """Watch the children until ``stop`` is set (0). One that exits is started again with a log
    line; the exit of an ``essential`` one (the chain everything stands on), or ``restarts``
    exits of one child within ``window`` seconds, ends the watch (1)."""
    exits: dict[str, list[float]] = {}
    while not stop.is_set():
        for child in children:
            if child.proc is None or child.proc.returncode is None:
                continue
            code = child.proc.returncode
            if child.name in essential:
                print(f"{child.name} exited with code {code}; stopping", flush=True)
                return 1
            now = time.monotonic()
            recent = [t for t in exits.get(child.name, []) if now - t < window] + [now]
            exits[child.name] = recent
            if len(recent) >= restarts:
                print(
                    f"{child.name} exited with code {code}, {len(recent)} times in "
                    f"{window:.0f}s; stopping",
                    flush=True,
                )
                return 1
            print(
                f"{child.name} exited with code {code}; starting it again "
                f"(exit {len(recent)} of {restarts} allowed in {window:.0f}s)",
                flush=True,
            )
            await child.start()
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass
    return 0


async def wait_rpc(client: RegistryClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await client.rpc.get_slot()
            return
        except Exception:  # noqa: BLE001 - any failure means "not up yet"
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the localnet did not answer at {RPC_URL} within {timeout:.0f}s")


async def bootstrap_registry(client: RegistryClient) -> str:
    """Initialise the registry and list the gateway key as an issuer at the gateway's URL;
    idempotent across restarts."""
    authority = load_or_create_keypair(AUTHORITY_KEY)
    issuer = load_or_create_keypair(LOCAL / "keys" / "gateway-issuer.json")
    await client.ensure_funded(authority)
    registry = await client.get_registry()
    if registry is None:
        await client.initialize_registry(authority, PRESENCE_TTL, p.Policy.APPROVAL)
        print(
            f"registry initialised (authority {authority.pubkey()}, presence TTL {PRESENCE_TTL}s, "
            "policy approval)"
        )
    listed = (await client.issuer_urls()).get(str(issuer.pubkey()))
    if listed is None:
        await client.add_issuer(authority, issuer.pubkey(), GATEWAY_URL)
        print(f"gateway issuer {issuer.pubkey()} listed on the registry at {GATEWAY_URL}")
    elif listed != GATEWAY_URL:
        await client.update_issuer(authority, issuer.pubkey(), GATEWAY_URL)
        print(f"gateway issuer {issuer.pubkey()} moved on the registry to {GATEWAY_URL}")
    return str(issuer.pubkey())


async def bootstrap_payments(client: RegistryClient) -> str:
    """Test USDC (a 6-decimal SPL mint, its keys under .local/keys) and SOL for the gateway's fee
    payer, so x402 purchases work on the localnet; idempotent across restarts."""
    from registry import usdc

    mint, created = await usdc.ensure_test_usdc(
        client, LOCAL / "keys" / "usdc-mint.json", LOCAL / "keys" / "usdc-mint-authority.json"
    )
    if created:
        print(
            f"test USDC mint {mint} created (fund a wallet: registry airdrop --to ADDR --usdc 10)"
        )
    fee_payer = load_or_create_keypair(LOCAL / "keys" / "gateway-fee-payer.json")
    await client.ensure_funded(fee_payer, min_sol=1.0)
    return str(mint)


def node_key_path(role: str) -> Path:
    """The keypair file the role's shipped config names (configs/node-<role>.yaml)."""
    from node.config import load_config

    return ROOT / load_config(ROOT / "configs" / f"node-{role}.yaml", role).keypair


async def approve_own_node(
    client: RegistryClient, authority: Keypair, role: str, node_key: Keypair, timeout: float = 180.0
) -> None:
    """Wait for this network's own node to register, and admit it if it is pending: the same
    instruction as `registry node approve KEY`. Nobody else's node is approved."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        node = await client.get_node(node_key.pubkey())
        if node is not None and node.status is p.NodeStatus.PENDING:
            await client.approve_node(authority, node_key.pubkey())
            print(f"{role} node {node_key.pubkey()} approved")
            return
        if node is not None:
            return
        await asyncio.sleep(0.3)
    raise RuntimeError(
        f"the {role} node {node_key.pubkey()} did not register within {timeout:.0f}s"
    )


def built(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def demo_child(py: str) -> Child:
    """The demo web app, paying with its own wallet, which it funds first (test USDC, x402)."""
    return Child(
        "demo",
        [
            py,
            "-m",
            "demo.app",
            "--gateway",
            GATEWAY_URL,
            "--rpc",
            RPC_URL,
            "--wallet",
            str(LOCAL / "keys" / "demo-wallet.json"),
            "--fund",
            "--port",
            DEMO_URL.rsplit(":", 1)[1],
        ],
    )


def retire_another_build(ledger: Path) -> None:
    """A local chain made by another build of the registry program cannot run this checkout's
    accounts (the localnet refuses it): move it aside, kept, and let a fresh one start."""
    programs = [(p.SO_PATH, p.PROGRAM_KEYPAIR_PATH)]
    if holds_another_build(ledger, programs):
        aside = ledger.with_name(f"{ledger.name}-other-build-{int(time.time())}")
        ledger.rename(aside)
        print(
            f"{ledger} holds another build of the registry program; moved it to {aside} and "
            "starting a fresh local chain",
            flush=True,
        )


async def main(demo: bool = False) -> int:
    LOCAL.mkdir(exist_ok=True)
    retire_another_build(LOCAL / "ledger")
    py = sys.executable
    children: list[Child] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def start(child: Child) -> None:
        children.append(child)
        await child.start()

    try:
        await start(
            Child(
                "localnet",
                [
                    py,
                    "-m",
                    "registry.cli",
                    "localnet",
                    "--port",
                    str(RPC_PORT),
                    "--ledger",
                    str(LOCAL / "ledger"),
                    "--authority",
                    str(AUTHORITY_KEY),
                ],
            )
        )
        async with RegistryClient(RPC_URL) as client:
            await wait_rpc(client)
            issuer = await bootstrap_registry(client)
            usdc_mint = await bootstrap_payments(client)
        urls = {"localnet (Solana JSON-RPC)": RPC_URL}
        if built("gateway.app"):
            await start(
                Child("gateway", [py, "-m", "gateway.cli", "--config", "configs/gateway.yaml"])
            )
            await wait_http(f"{GATEWAY_URL}/internal/health", "the gateway")
            urls["gateway"] = GATEWAY_URL
        else:
            print("gateway: not built in this version; skipped")
        roles = []
        for role, port in NODE_PORTS.items():
            if not built(f"node.{role}"):
                print(f"{role} node: role not built in this version; skipped")
                continue
            # Created here if missing, so the key to approve is known before the node starts.
            node_key = load_or_create_keypair(node_key_path(role))
            await start(
                Child(
                    role,
                    [py, "-m", "node.cli", "--role", role, "--config", f"configs/node-{role}.yaml"],
                )
            )
            async with RegistryClient(RPC_URL) as client:
                await approve_own_node(
                    client, load_or_create_keypair(AUTHORITY_KEY), role, node_key
                )
            await wait_http(f"http://127.0.0.1:{port}/health", f"the {role} node", timeout=180)
            urls[f"{role} node"] = f"http://127.0.0.1:{port}"
            roles.append(role)
        if roles and "gateway" in urls:
            await wait_routable(roles)
        if demo:
            await start(demo_child(py))
            await wait_http(f"{DEMO_URL}/api/config", "the demo app", timeout=180)
            urls["demo: talk to a tutor"] = f"{DEMO_URL}/talk"
            urls["demo: the network map"] = f"{DEMO_URL}/network"
        for name, url in urls.items():
            print(f"  {name:28} {url}")
        print(f"  {'trusted issuer (gateway key)':28} {issuer}")
        print(f"  {'test USDC mint (x402)':28} {usdc_mint}")
        print("ready", flush=True)
        return await supervise(children, stop)
    except (RuntimeError, RegistryError) as exc:
        print(f"make up: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping...", flush=True)
        for child in reversed(children):
            await child.stop()
        print("stopped", flush=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(demo="--demo" in sys.argv[1:])))
