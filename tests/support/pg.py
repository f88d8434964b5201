"""A throwaway PostgreSQL server for tests: Debian's binaries, a cluster in a temp dir, listening on
a free port on 127.0.0.1 (and a unix socket in that dir), trust auth, fsync off. Started once per
test session by the ``pg_url`` fixture, removed afterwards. As root the server runs as the
``postgres`` user (PostgreSQL refuses to run as root).

Needs the Debian package ``postgresql`` (any major version): ``apt-get install postgresql``.
Missing binaries fail the tests that need them; they are never skipped.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

INSTALL_HINT = "PostgreSQL server binaries not found: run `apt-get install postgresql`"


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin with initdb and postgres, or PATH's."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    which = shutil.which("initdb")
    if which:
        candidates.append(str(Path(which).parent))
    for c in candidates:
        if (Path(c) / "initdb").exists() and (Path(c) / "postgres").exists():
            return Path(c)
    return None


class PgServer:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="ledger-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.root / "postgres.log"
        self._user: dict[str, object] = {}  # Popen's user/group when we must drop root
        self._owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root needs the `postgres` user "
                    "(created by `apt-get install postgresql`)"
                ) from None
            self._owner = (pw.pw_uid, pw.pw_gid)
            os.chown(self.root, *self._owner)
            self._user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _run(self, *args: str) -> None:
        done = subprocess.run(args, capture_output=True, cwd=self.root, **self._user)
        if done.returncode:
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}):\n"
                + done.stdout.decode(errors="replace")
                + done.stderr.decode(errors="replace")
            )

    def start(self, timeout: float = 30.0) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        with open(self.log, "wb") as log:
            if self._owner:
                os.chown(self.log, *self._owner)
            self.proc = subprocess.Popen(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.root),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                **self._user,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited ({self.proc.returncode}):\n"
                    + self.log.read_text(errors="replace")[-2000:]
                )
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"postgres did not start in {timeout}s:\n"
            + self.log.read_text(errors="replace")[-2000:]
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: disconnects clients
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """An asyncpg URL of a fresh server's ``postgres`` database (superuser, trust auth).
    Tests that need isolation create a database of their own on it."""
    bindir = find_bindir()
    if bindir is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    server = PgServer(bindir)
    try:
        server.start()
        yield server.url()
    finally:
        server.stop()
