"""Gateway load benchmark: POST /v1/webrtc/token and POST /v1/agent-session on SQLite and
PostgreSQL, /internal/health as the baseline of the same server.

    .venv/bin/python bench/gateway.py [--seconds 8] [--concurrency 16,32]
        [--backends sqlite,postgresql,postgresqlx2] [--endpoints webrtc-token,agent-session]

Method: a localnet process with one registered node of each role, reporting its load from a thread;
one gateway *process* per backend (the real `gateway` CLI; `postgresqlx2`: `gateway serve --workers
2` on the same PostgreSQL, next to one process); `wrk` (one thread, Debian's package, installed by
`make setup`) as the load generator on loopback, sharing the machine's cores with the gateway.
Every request is a real wallet-signed request: 3,000 funded wallets, each (wallet, timestamp) pair
used once, as the gateway demands; the requests are signed before each phase (signing is the
client's cost, not the server's). A token request reserves credits for one session in the ledger
and mints an Ed25519 token; an agent session opens a bundle of three sessions (WebRTC, STT, TTS)
and mints a token for each. Each phase runs for a fixed time after a 2 s warm-up. Figures: wrk's
requests per second and latency percentiles, the gateway process's CPU time per request (and the
PostgreSQL server's, all its processes), and, as a check, the sessions the ledger stored per
answer. The PostgreSQL server is the tests' throwaway one (fsync off) on the same machine."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from solders.keypair import Keypair  # noqa: E402

from gateway.auth import sign_request  # noqa: E402
from gateway.ledger import Ledger  # noqa: E402
from gateway.ledger.models import sessions  # noqa: E402
from node.liveness import LoadReporter  # noqa: E402
from registry import program as p  # noqa: E402
from registry.client import RegistryClient  # noqa: E402
from registry.keys import save_keypair  # noqa: E402
from tests.conftest import free_port, start_localnet_process  # noqa: E402
from tests.support.pg import PgServer, find_bindir  # noqa: E402

WALLETS = 3000
MAX_RPS = 3000  # requests signed per second of a phase (a faster run would replay: non-2xx)


@dataclass(frozen=True)
class Endpoint:
    path: str
    body: bytes
    sessions: int  # sessions the ledger stores per answer


ENDPOINTS = {
    # the figure the target is about
    "webrtc-token": Endpoint(
        "/v1/webrtc/token",
        json.dumps(
            {"room_name": "bench", "participant_identity": "p", "duration_minutes": 1}
        ).encode(),
        1,
    ),
    # what an agent calls: a bundle of WebRTC + STT + TTS sessions, a token for each
    "agent-session": Endpoint(
        "/v1/agent-session",
        json.dumps(
            {
                "room_name": "bench",
                "participant_identity": "agent",
                "duration_minutes": 1,
                "tts_max_characters": 2000,
            }
        ).encode(),
        3,
    ),
}
WRK_SCRIPT = ROOT / "bench" / "wrk_replay.lua"


async def setup_chain(
    url: str, authority: Keypair, issuer: Keypair
) -> list[tuple[Keypair, p.Role]]:
    """``authority``: the localnet program's upgrade authority, the one key that may init.
    The nodes registered, for their load reports."""
    nodes = []
    async with RegistryClient(url) as client:
        await client.ensure_funded(authority)
        await client.initialize_registry(authority, 3600, p.Policy.OPEN)
        await client.add_issuer(authority, issuer.pubkey(), "http://127.0.0.1:9")  # unused
        for role in (p.Role.SFU, p.Role.STT, p.Role.TTS):
            node = Keypair()
            await client.ensure_funded(node)
            await client.register_node(
                node,
                role,
                p.NodeFields(f"https://{role.name.lower()}.bench", 50.1, 8.7, "DE", 10**6, "0.1.0"),
            )
            nodes.append((node, role))
    return nodes


class Reporting(threading.Thread):
    """The registered nodes' load reports to the gateway at ``url`` (idle, every second), from a
    thread of their own while wrk runs: a gateway routes only to nodes that report."""

    def __init__(self, nodes: list[tuple[Keypair, p.Role]], url: str) -> None:
        super().__init__(daemon=True)
        self.nodes, self.url = nodes, url
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self._done = asyncio.Event()

    def run(self) -> None:
        self.loop.run_until_complete(self._report())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._done.set)
        self.join()

    async def _report(self) -> None:
        reporters = [
            LoadReporter(key, role, lambda: (0, 10**6), "0.1.0", [self.url], interval=1.0)
            for key, role in self.nodes
        ]
        for reporter in reporters:
            await reporter.start()
        self.ready.set()
        await self._done.wait()
        for reporter in reporters:
            await reporter.close()


async def fund(db_url: str, wallets: list[Keypair]) -> None:
    async with Ledger(db_url) as ledger:
        await ledger.migrate()
        for w in wallets:
            tx = await ledger.grant("solana", str(w.pubkey()), 10**12, memo="bench")
            await ledger.set_limits(
                tx.account_id, max_concurrent_sessions=10**6, max_api_rate=10**6
            )


async def count_sessions(db_url: str) -> int:
    async with Ledger(db_url) as ledger:
        return await ledger.db.read(
            lambda conn: conn.execute(sa.select(sa.func.count()).select_from(sessions)).scalar()
        )


def start_gateway(
    tmp: Path, rpc: str, db_url: str, issuer_path: Path, workers: int = 1
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = tmp / f"gateway-{port}.yaml"
    config.write_text(
        json.dumps(
            {
                "listen_port": port,
                "rpc_url": rpc,
                "database_url": db_url,
                "issuer_keypair": str(issuer_path),
                "sweep_interval_seconds": 3600,
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), "--log-level", "WARNING"]
        + (["serve", "--workers", str(workers)] if workers > 1 else []),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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
    """Signs token requests ahead of a phase, each with a (wallet, timestamp) pair never used
    before (the gateway refuses a replayed signature). Per wallet the timestamps move forward
    about as fast as the clock, so every one is well inside the gateway's +-30 s window."""

    def __init__(self, wallets: list[Keypair]) -> None:
        self.wallets = wallets
        self.next_ts = [0] * len(wallets)

    def write(self, path: Path, url: str, seconds: float, endpoint: Endpoint) -> None:
        host = url.split("//", 1)[1]
        per_wallet = -(-int(MAX_RPS * seconds) // len(self.wallets))
        now = int(time.time())
        start = [max(ts, now - 5) for ts in self.next_ts]
        with open(path, "wb") as out:
            for j in range(per_wallet):
                for i, wallet in enumerate(self.wallets):
                    headers = sign_request("POST", endpoint.path, wallet, now=start[i] + j)
                    head = (
                        f"POST {endpoint.path} HTTP/1.1\r\nHost: {host}\r\n"
                        "Content-Type: application/json\r\n"
                        f"Content-Length: {len(endpoint.body)}\r\n"
                        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                        + "\r\n"
                    )
                    out.write(head.encode() + endpoint.body + b"\0")
        self.next_ts = [s + per_wallet for s in start]


@dataclass
class Run:
    done: int
    rps: float
    non_2xx: int
    p50_ms: float
    p99_ms: float
    cpu_us: float  # gateway process CPU time per request
    db_cpu_us: float | None  # the PostgreSQL server's (all its processes) per request


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if found is None:
        raise ValueError(f"wrk latency {text!r} is not a number with a unit")
    value, unit = found.groups()
    return float(value) * _UNITS[unit]


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def server_cpu(pid: int) -> float:
    """CPU time of a server and its child processes (PostgreSQL: one backend per connection; a
    gateway under --workers N: its workers), including children that have exited."""
    fields = _stat(pid)
    total = sum(int(f) for f in fields[11:15])
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(pid):
            try:
                child = _stat(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
            if child[1] == str(pid):
                total += int(child[11]) + int(child[12])
    return total / os.sysconf("SC_CLK_TCK")


def wrk(
    url: str,
    pid: int,
    seconds: float,
    concurrency: int,
    requests: Path | None,
    db_pid: int | None = None,
) -> Run:
    """``requests``: a file of pre-signed requests to replay; None: GET /internal/health."""
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency"]
    if requests is not None:
        cmd += ["-s", str(WRK_SCRIPT), url, "--", str(requests)]
    else:
        cmd += [url + "/internal/health"]
    cpu0 = server_cpu(pid)  # with its workers, under --workers N
    db0 = server_cpu(db_pid) if db_pid else 0.0
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    cpu = server_cpu(pid) - cpu0
    db_cpu = server_cpu(db_pid) - db0 if db_pid else None
    done = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if errors:
        print(f"    wrk socket errors: {errors.group(1)}")
    return Run(
        done=done,
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        non_2xx=int(bad.group(1)) if bad else 0,
        p50_ms=_ms(re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE).group(1)),
        p99_ms=_ms(re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE).group(1)),
        cpu_us=cpu / max(done, 1) * 1e6,
        db_cpu_us=None if db_cpu is None else db_cpu / max(done, 1) * 1e6,
    )


def machine_speed() -> float:
    """Microseconds for a fixed pure-Python loop: this machine's speed varies by a fifth or more
    from minute to minute (other tenants of the host), and every figure here moves with it."""
    return min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6


def line(backend: str, what: str, r: Run, extra: str = "") -> str:
    return (
        f"{backend:10}  {what:24} {r.rps:7.0f} req/s  p50 {r.p50_ms:6.1f} ms  "
        f"p99 {r.p99_ms:6.1f} ms  cpu {r.cpu_us:5.0f} us/req"
        + ("" if r.db_cpu_us is None else f" (+ database server {r.db_cpu_us:4.0f})")
        + extra
    )


def bench_backend(
    name: str,
    url: str,
    pid: int,
    db_url: str,
    tmp: Path,
    seconds: float,
    levels: list[int],
    endpoints: list[Endpoint],
    signer: Signer,
    db_pid: int | None,
) -> None:
    asyncio.run(wait_up(url))
    print(f"{name:10}  machine speed: sum(range(1000)) takes {machine_speed():.1f} us", flush=True)
    wrk(url, pid, 2, 32, None)  # warm-up
    health = wrk(url, pid, seconds, 32, None)
    print(line(name, "/internal/health c=32", health), flush=True)
    requests = tmp / "requests.bin"
    for endpoint in endpoints:
        for concurrency in levels:
            signer.write(requests, url, 2, endpoint)
            wrk(url, pid, 2, concurrency, requests)  # warm-up
            before = asyncio.run(count_sessions(db_url))
            signer.write(requests, url, seconds, endpoint)
            run = wrk(url, pid, seconds, concurrency, requests, db_pid)
            stored = asyncio.run(count_sessions(db_url)) - before
            answered = run.done - run.non_2xx
            print(
                line(
                    name,
                    f"{endpoint.path} c={concurrency}",
                    run,
                    f"  non-2xx {run.non_2xx}  sessions stored {stored}"
                    f" ({stored / max(answered, 1):.2f} per answer, {endpoint.sessions} expected)"
                    f"  ({run.rps / health.rps:.2f}x of health)",
                ),
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument(
        "--concurrency",
        default="16,32",
        help="comma-separated connection counts for the token phases",
    )
    parser.add_argument(
        "--backends",
        default="sqlite,postgresql,postgresqlx2",
        help="comma-separated: sqlite, postgresql, postgresqlxN (N worker processes)",
    )
    parser.add_argument(
        "--endpoints",
        default=",".join(ENDPOINTS),
        help=f"comma-separated, of: {', '.join(ENDPOINTS)}",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/gateway.py needs wrk (apt-get install wrk; `make setup` installs it)")
    levels = [int(c) for c in args.concurrency.split(",")]
    try:
        endpoints = [ENDPOINTS[e] for e in args.endpoints.split(",")]
    except KeyError as e:
        sys.exit(f"unknown endpoint {e}: choose from {', '.join(ENDPOINTS)}")
    wallets = [Keypair() for _ in range(WALLETS)]
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        issuer = Keypair()
        save_keypair(issuer, tmp / "issuer.json")
        net = start_localnet_process(tmp / "ledger")
        pg = None
        try:
            nodes = asyncio.run(setup_chain(net.url, net.authority, issuer))
            # one signer for every backend: the PostgreSQL ones share a ledger, and with it the
            # signatures already answered
            signer = Signer(wallets)
            print(
                f"loopback, wrk -t1, {args.seconds:g} s per phase; gateway (one process) and wrk "
                f"share the machine's {os.cpu_count()} cores"
            )
            for backend in args.backends.split(","):
                db_pid, workers = None, int(backend.split("x")[1]) if "x" in backend else 1
                if backend == "sqlite":
                    db_url = f"sqlite+aiosqlite:///{tmp}/gateway.db"
                else:
                    bindir = find_bindir()
                    if bindir is None:
                        print("postgresql: not installed (apt-get install postgresql); skipped")
                        continue
                    if pg is None:
                        pg = PgServer(bindir)
                        pg.start()
                    db_url, db_pid = pg.url(), pg.proc.pid if pg.proc else None
                asyncio.run(fund(db_url, wallets))
                proc, url = start_gateway(tmp, net.url, db_url, tmp / "issuer.json", workers)
                asyncio.run(wait_up(url))
                reporting = Reporting(nodes, url)
                reporting.start()
                reporting.ready.wait(30)
                try:
                    bench_backend(
                        backend,
                        url,
                        proc.pid,
                        db_url,
                        tmp,
                        args.seconds,
                        levels,
                        endpoints,
                        signer,
                        db_pid,
                    )
                finally:
                    proc.terminate()
                    proc.wait()
                    reporting.stop()
        finally:
            net.stop()
            if pg is not None:
                pg.stop()


if __name__ == "__main__":
    main()
