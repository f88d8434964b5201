"""Shared fixtures: a real localnet process (the `registry localnet` CLI) with the program deployed.

One localnet serves the whole session; tests that need a fresh chain start their own. Each localnet
deploys the program with an upgrade authority of its own (``Localnet.authority``): the only key
the program lets initialise the registry. The session registry is initialised once by that key,
under the `open` admission policy (nodes are active at once: tests not about admission), with a
short heartbeat TTL so staleness can be observed in seconds.

The fast tier (``make test-fast``: ``pytest -m fast``) is the tests marked ``fast``: unit tests that
start no process and load no model. While a run selects exactly that tier, starting a process or
loading a model fails the test (or fixture) that does it, so a slow test cannot stay in the tier.
"""

from __future__ import annotations

import _posixsubprocess
import asyncio
import contextlib
import importlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import pytest
from solders.keypair import Keypair
from sqlalchemy.engine import make_url

from registry import program as p
from registry.client import RegistryClient
from registry.keys import load_or_create_keypair, save_keypair

# Fixtures shared by several test modules live in tests/support/ and are registered here (a test
# module never imports fixtures from another): a throwaway PostgreSQL server (``pg_url``, for the
# ledger on both databases), the gateway and agents networks, the payment tests' gateway (``pay``)
# and EVM (``evm_chain``, ``evm_gw``), the STT models and the TTS engine.
pytest_plugins = [
    "tests.support.pg",
    "tests.support.gateway_net",
    "tests.support.agents_network",
    "tests.support.payments",
    "tests.support.evm_chain",
    "tests.support.stt_node",
    "tests.support.tts_role",
]

ROOT = Path(__file__).resolve().parent.parent
TEST_TTL = 3
# The URL the tests list their gateway keys at: nothing listens there. A test's gateways run on
# ports of their own, often several on one key; each node learns which key its configured gateway
# signs with from the gateway itself (node/gateways.py), and that wins over the registry's URL.
UNSERVED_GATEWAY_URL = "http://127.0.0.1:9"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_rpc(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    body = b'{"jsonrpc":"2.0","id":1,"method":"getHealth"}'
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"localnet exited with {proc.returncode}")
        try:
            req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"localnet at {url} did not come up in {timeout}s")


@dataclass
class Localnet:
    url: str
    ledger: Path
    proc: subprocess.Popen[bytes]
    port: int
    authority: Keypair  # the program's upgrade authority: `registry init` signs with it
    authority_path: Path

    def stop(self, sig: int = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


def start_localnet_process(ledger: Path, port: int | None = None) -> Localnet:
    """A `registry localnet` process; its upgrade authority's key is kept next to the ledger
    (``<ledger>-authority.json``), so a restart on the same ledger keeps it."""
    port = port or free_port()
    authority_path = ledger.parent / f"{ledger.name}-authority.json"
    authority = load_or_create_keypair(authority_path)
    log = open(ledger.parent / f"localnet-{port}.log", "ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "registry.cli",
            "localnet",
            "--port",
            str(port),
            "--ledger",
            str(ledger),
            "--authority",
            str(authority_path),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_rpc(url, proc)
    except BaseException:
        proc.kill()
        raise
    return Localnet(url, ledger, proc, port, authority, authority_path)


@pytest.fixture(scope="session")
def localnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Localnet]:
    base = tmp_path_factory.mktemp("localnet")
    net = start_localnet_process(base / "ledger")
    yield net
    net.stop()


async def init_registry(net: Localnet, ttl: int, policy: p.Policy = p.Policy.OPEN) -> None:
    """Initialise ``net``'s registry as its upgrade authority (the one key allowed)."""
    async with RegistryClient(net.url) as client:
        await client.ensure_funded(net.authority)
        await client.initialize_registry(net.authority, ttl, policy)


@dataclass
class Chain:
    """The session localnet with an initialised registry (policy `open`) and its authority's key
    on disk."""

    url: str
    authority: Keypair
    authority_path: Path
    issuer: Keypair
    issuer_path: Path
    ttl: int


@pytest.fixture(scope="session")
def chain(localnet: Localnet, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    keys = tmp_path_factory.mktemp("keys")
    authority, issuer = localnet.authority, Keypair()
    save_keypair(issuer, keys / "issuer.json")

    async def setup() -> None:
        await init_registry(localnet, TEST_TTL, p.Policy.OPEN)
        async with RegistryClient(localnet.url) as client:
            await client.add_issuer(authority, issuer.pubkey(), UNSERVED_GATEWAY_URL)

    asyncio.run(setup())
    return Chain(
        localnet.url, authority, localnet.authority_path, issuer, keys / "issuer.json", TEST_TTL
    )


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database: a new SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ledger.db"
        return
    async with new_pg_database(request.getfixturevalue("pg_url")) as url:
        yield url


@pytest.fixture
async def pg_db_url(pg_url: str) -> AsyncIterator[str]:
    """A new, empty database on the session's PostgreSQL (for what only PostgreSQL has)."""
    async with new_pg_database(pg_url) as url:
        yield url


def asyncpg_dsn(url: str) -> str:
    """A ledger URL (``postgresql+asyncpg://``) as a DSN ``asyncpg.connect`` takes."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.asynccontextmanager
async def new_pg_database(pg_url: str) -> AsyncIterator[str]:
    server = make_url(pg_url)
    name = f"ledger_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(asyncpg_dsn(pg_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield server.set(database=name).render_as_string(hide_password=False)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# ---------------------------------------------------------------- the fast tier

# The ledger's own tests on SQLite are unit tests; on PostgreSQL they need the server's process.
LEDGER_MODULES = ("tests.test_gateway_ledger", "tests.test_gateway_payments_ledger")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The ledger modules' tests on SQLite join the fast tier (the others there are marked one by
    one)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        module = getattr(item, "module", None)
        if (
            module is not None
            and module.__name__ in LEDGER_MODULES
            and callspec is not None
            and callspec.params.get("db_url") == "sqlite"
        ):
            item.add_marker(pytest.mark.fast)


# Where a model's weights are loaded (the STT and TTS ONNX sessions, Whisper, the agents' LLM).
MODEL_LOADERS = (
    ("onnxruntime", "InferenceSession"),
    ("ctranslate2.models", "Whisper"),
    ("llama_cpp", "Llama"),
)


@pytest.fixture(scope="session", autouse=True)
def fast_tier_violations(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """In a ``-m fast`` run, every way to start a process or load a model raises, and is noted
    (code under test may catch the error; ``_fast_tier_guard`` fails the test all the same)."""
    violations: list[str] = []
    if request.config.getoption("markexpr") != "fast":
        yield violations
        return

    def refuse(what: str) -> Callable[..., NoReturn]:
        def refused(*args: Any, **kwargs: Any) -> NoReturn:
            violations.append(what)
            raise RuntimeError(
                f"a test of the fast tier {what}: it belongs to the full suite "
                "(remove its `fast` mark)"
            )

        return refused

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "__init__", refuse("started a process (subprocess)"))
        mp.setattr(_posixsubprocess, "fork_exec", refuse("started a process (fork_exec)"))
        for name in ("fork", "posix_spawn", "posix_spawnp", "system"):
            mp.setattr(os, name, refuse(f"started a process (os.{name})"))
        for module, name in MODEL_LOADERS:
            try:
                loader = importlib.import_module(module)
            except ModuleNotFoundError:  # not installed: no model is loaded through it
                continue
            mp.setattr(loader, name, refuse(f"loaded a model ({module}.{name})"))
        yield violations


@pytest.fixture(autouse=True)
def _fast_tier_guard(fast_tier_violations: list[str]) -> Iterator[None]:
    fast_tier_violations.clear()  # one in a wider fixture's setup already failed that test
    yield
    assert not fast_tier_violations, (
        f"a test of the fast tier {fast_tier_violations[0]}: remove its `fast` mark"
    )
