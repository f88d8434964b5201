"""Gateway load benchmark: POST /v1/webrtc/token on SQLite and PostgreSQL, /internal/health as the
baseline of the same server.

    .venv/bin/python bench/gateway.py [--seconds 5] [--concurrency 32] [--backends sqlite,postgresql]

Method: a localnet process with one registered SFU node, a gateway *process* per backend (the real
`gateway` CLI), and this process as the load generator on loopback (so the two share the machine's
2 cores). Every token request is a real wallet-signed request (400 funded wallets, each signature
used once, as the gateway demands), reserving credits in the ledger and minting an Ed25519 token.
Each phase runs for a fixed time; figures are requests per second and p50/p99 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from solders.keypair import Keypair  # noqa: E402

from gateway.auth import sign_request  # noqa: E402
from gateway.ledger import Ledger  # noqa: E402
from registry import program as p  # noqa: E402
from registry.client import RegistryClient  # noqa: E402
from registry.keys import save_keypair  # noqa: E402
from tests.conftest import free_port, start_localnet_process  # noqa: E402
from tests.pg import PgServer, find_bindir  # noqa: E402

WALLETS = 400


async def setup_chain(url: str, issuer: Keypair) -> None:
    authority, node = Keypair(), Keypair()
    async with RegistryClient(url) as client:
        await client.ensure_funded(authority)
        await client.initialize_registry(authority, 3600)
        await client.add_issuer(authority, issuer.pubkey())
        await client.ensure_funded(node)
        await client.register_node(node, p.Role.SFU,
                                   p.NodeFields("https://sfu.bench", 50.1, 8.7, "DE", 100000, "0.1.0"))


async def fund(db_url: str, wallets: list[Keypair]) -> None:
    async with Ledger(db_url) as ledger:
        await ledger.migrate()
        for w in wallets:
            tx = await ledger.grant("solana", str(w.pubkey()), 10**12, memo="bench")
            await ledger.set_limits(tx.account_id, max_concurrent_sessions=10**6, max_api_rate=10**6)


def start_gateway(tmp: Path, rpc: str, db_url: str, issuer_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = tmp / f"gateway-{port}.yaml"
    config.write_text(json.dumps({
        "listen_port": port, "rpc_url": rpc, "database_url": db_url,
        "issuer_keypair": str(issuer_path), "sweep_interval_seconds": 3600,
    }))
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "--config", str(config),
                             "--log-level", "WARNING"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


async def wait_up(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(url + "/internal/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"gateway at {url} did not start")


class Signer:
    """Hands out a never-used (wallet, timestamp) pair per request."""

    def __init__(self, wallets: list[Keypair]) -> None:
        self.wallets = wallets
        self.i = 0
        self.base = int(time.time())

    def headers(self, path: str) -> dict[str, str]:
        wallet = self.wallets[self.i % len(self.wallets)]
        offset = (self.i // len(self.wallets)) % 50 - 25  # 50 timestamps inside the +-30 s window
        if self.i and self.i % (len(self.wallets) * 50) == 0:
            self.base = int(time.time())
        self.i += 1
        return sign_request("POST", path, wallet, now=int(time.time()) + offset)


async def load(url: str, method: str, path: str, seconds: float, concurrency: int,
               signer: Signer | None) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    body = json.dumps({"room_name": "bench", "participant_identity": "p",
                       "duration_minutes": 1}).encode()
    deadline = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as http:
        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                headers = {"Content-Type": "application/json"}
                if signer is not None:
                    headers.update(signer.headers(path))
                t0 = time.perf_counter()
                async with http.request(method, url + path, headers=headers,
                                        data=body if method == "POST" else None) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return len(latencies) / elapsed, latencies, errors


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if len(values) > 2 else float("nan")


async def bench_backend(name: str, url: str, seconds: float, concurrency: int,
                        wallets: list[Keypair]) -> None:
    await wait_up(url)
    await load(url, "GET", "/internal/health", 1, concurrency, None)  # warm up
    rps_h, lat_h, _ = await load(url, "GET", "/internal/health", seconds, concurrency, None)
    rps_t, lat_t, err = await load(url, "POST", "/v1/webrtc/token", seconds, concurrency,
                                   Signer(wallets))
    print(f"{name:10}  /internal/health  {rps_h:7.0f} req/s  p50 {pct(lat_h, 50):6.1f} ms"
          f"  p99 {pct(lat_h, 99):6.1f} ms")
    print(f"{name:10}  /v1/webrtc/token  {rps_t:7.0f} req/s  p50 {pct(lat_t, 50):6.1f} ms"
          f"  p99 {pct(lat_t, 99):6.1f} ms  errors {err}  ({rps_t / rps_h:.2f}x of health)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    wallets = [Keypair() for _ in range(WALLETS)]
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        issuer = Keypair()
        save_keypair(issuer, tmp / "issuer.json")
        net = start_localnet_process(tmp / "ledger")
        pg = None
        try:
            asyncio.run(setup_chain(net.url, issuer))
            print(f"loopback, {args.concurrency} concurrent connections, {args.seconds:.0f} s per "
                  "phase; gateway and load generator share the machine")
            for backend in args.backends.split(","):
                if backend == "sqlite":
                    db_url = f"sqlite+aiosqlite:///{tmp}/gateway.db"
                else:
                    bindir = find_bindir()
                    if bindir is None:
                        print("postgresql: not installed (apt-get install postgresql); skipped")
                        continue
                    pg = PgServer(bindir)
                    pg.start()
                    db_url = pg.url()
                asyncio.run(fund(db_url, wallets))
                proc, url = start_gateway(tmp, net.url, db_url, tmp / "issuer.json")
                try:
                    asyncio.run(bench_backend(backend, url, args.seconds, args.concurrency, wallets))
                finally:
                    proc.terminate()
                    proc.wait()
        finally:
            net.stop()
            if pg is not None:
                pg.stop()


if __name__ == "__main__":
    main()
