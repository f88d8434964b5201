"""Embedded Solana localnet: LiteSVM (the real Agave SVM) behind JSON-RPC.

Use :func:`start_localnet` in-process (e.g. as a pytest fixture) or
:func:`run_localnet` from the CLI (``registry localnet``).  State lives in a
ledger directory and survives restarts; programs given on the first start are
deployed through the real upgradeable loader at their fixed program ids, with
an upgrade authority of the caller's choosing: the only key the registry
program lets initialise its registry.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from registry.keys import load_keypair
from registry.program import programdata_address

from .deploy import PROGRAMDATA_METADATA_SIZE, SvmTarget, deploy_program, is_deployed
from .journal import LedgerLockedError
from .rpc import make_app
from .svm import LocalSvm, PreflightError

__all__ = [
    "LedgerLockedError",
    "LocalSvm",
    "Localnet",
    "PreflightError",
    "StaleProgram",
    "deploy_programs",
    "holds_another_build",
    "run_localnet",
    "start_localnet",
]

log = logging.getLogger(__name__)

ProgramSpec = tuple[str | Path, str | Path]  # (.so path, program keypair path)


class StaleProgram(Exception):
    """A ledger's deployed program is not the one this checkout ships."""


def _another_build(target: SvmTarget, program_id: Pubkey, so: Path) -> bool:
    """Whether a program runs at ``program_id`` that is not exactly ``so`` (its ProgramData
    account holds a header, then the ELF, zero-padded to the account's size)."""
    if not is_deployed(target, program_id) or not so.is_file():
        return False
    data = target.get_account(programdata_address(program_id))
    if data is None:
        return True
    elf = so.read_bytes()
    body = bytes(data.data)[PROGRAMDATA_METADATA_SIZE:]
    return body[: len(elf)] != elf or any(body[len(elf) :])


def holds_another_build(ledger_dir: Path, programs: Sequence[ProgramSpec]) -> bool:
    """Whether the ledger in ``ledger_dir`` runs another build of one of ``programs`` than the
    .so files this checkout ships (``deploy_programs`` would refuse it)."""
    if not Path(ledger_dir).exists():
        return False
    svm = LocalSvm(Path(ledger_dir))
    try:
        target = SvmTarget(svm)
        return any(
            _another_build(target, load_keypair(kp).pubkey(), Path(so)) for so, kp in programs
        )
    finally:
        svm.close()


def deploy_programs(
    svm: LocalSvm, programs: Sequence[ProgramSpec], upgrade_authority: Keypair | None = None
) -> list[str]:
    """Deploy each (so, keypair) whose program id is not on chain yet.

    The faucet pays; ``upgrade_authority`` (default: the faucet) becomes the
    programs' upgrade authority.  Returns the ids deployed.
    """
    deployed = []
    target = SvmTarget(svm)
    for so_path, kp_path in programs:
        kp = load_keypair(kp_path)
        so = Path(so_path)
        if _another_build(target, kp.pubkey(), so):
            raise StaleProgram(
                f"this ledger holds another build of {so.name} at {kp.pubkey()} than {so}: its "
                "accounts may not fit this one. Remove the ledger directory to start a fresh "
                "local chain (on `make up`: .local/ledger)"
            )
        if is_deployed(target, kp.pubkey()):
            continue
        if not so.is_file():
            raise FileNotFoundError(
                f"program binary {so} not found (needed to deploy {kp.pubkey()})"
            )
        authority = upgrade_authority or svm.faucet
        deploy_program(target, so, kp, svm.faucet, upgrade_authority=authority)
        log.info(
            "deployed %s at %s (upgrade authority %s)", so.name, kp.pubkey(), authority.pubkey()
        )
        deployed.append(str(kp.pubkey()))
    return deployed


@dataclass
class Localnet:
    """Handle of a running in-process localnet."""

    svm: LocalSvm
    url: str
    host: str
    port: int
    _runner: web.AppRunner

    async def close(self) -> None:
        """Stop serving and release the ledger (idempotent)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None  # type: ignore[assignment]
            await runner.cleanup()
            self.svm.close()


async def start_localnet(
    port: int = 0,
    ledger_dir: str | Path | None = None,
    programs: Sequence[ProgramSpec] = (),
    *,
    host: str = "127.0.0.1",
    now: Callable[[], float] = time.time,
    upgrade_authority: Keypair | None = None,
) -> Localnet:
    """Start serving on ``host:port`` (0 = any free port) in the running loop.

    ``ledger_dir=None`` keeps state in memory only.  ``now`` replaces the wall
    clock (tests use it to age blockhashes without sleeping).  Programs are
    deployed with ``upgrade_authority`` (default: the faucet).
    """
    svm = LocalSvm(Path(ledger_dir) if ledger_dir is not None else None, now=now)
    try:
        deploy_programs(svm, programs, upgrade_authority)
        runner = web.AppRunner(make_app(svm), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
    except BaseException:
        svm.close()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    return Localnet(svm=svm, url=f"http://{host}:{bound}", host=host, port=bound, _runner=runner)


def run_localnet(
    port: int,
    ledger: Path,
    programs: list[tuple[Path, Path]],
    host: str = "127.0.0.1",
    upgrade_authority: Keypair | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (blocking); for ``registry localnet``."""

    async def main() -> None:
        net = await start_localnet(
            port, ledger, programs, host=host, upgrade_authority=upgrade_authority
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        print(
            f"localnet listening on {net.url} (ledger {ledger}, slot {net.svm.current_slot()})",
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            await net.close()

    asyncio.run(main())
