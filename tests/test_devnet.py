"""`make up`'s supervisor (scripts/devnet.py): real child processes that exit, are started again
with a log line, and stop the network only when the chain goes or a child keeps failing. (Its
wait for the gateway to route to every role runs against the real network in
test_agents_room.py.)"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from scripts.devnet import Child, retire_another_build, supervise
from tests.support.program_builds import another_build

PY = sys.executable


def counting(path: Path, then: str) -> list[str]:
    """A child that appends a line to ``path`` each time it starts, then runs ``then``."""
    return [PY, "-c", f"open({str(path)!r}, 'a').write('started\\n')\n{then}"]


def starts(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def started(*children: Child) -> list[Child]:
    for child in children:
        await child.start()
    return list(children)


async def test_a_node_that_dies_is_started_again_with_a_log_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    # exits with 1 on its first start only, like a node killed once
    once = f"import os, sys, time\nif len(open({str(runs)!r}).read().split()) == 1: sys.exit(1)\n"
    node = Child("tts", counting(runs, once + "time.sleep(60)"))
    children = await started(node)
    stop = asyncio.Event()
    watch = asyncio.create_task(supervise(children, stop))
    for _ in range(200):
        if starts(runs) == 2 and node.proc is not None and node.proc.returncode is None:
            break
        await asyncio.sleep(0.05)
    assert starts(runs) == 2 and not watch.done()
    stop.set()
    assert await asyncio.wait_for(watch, 10) == 0
    await node.stop()
    assert "tts exited with code 1; starting it again" in capsys.readouterr().out


async def test_a_child_failing_again_and_again_stops_the_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    steady = Child("gateway", [PY, "-c", "import time; time.sleep(60)"])
    broken = Child("stt", counting(runs, "raise SystemExit(3)"))
    children = await started(steady, broken)
    code = await asyncio.wait_for(supervise(children, asyncio.Event(), restarts=3), 30)
    assert code == 1 and starts(runs) == 3
    assert steady.proc is not None and steady.proc.returncode is None, "the others are untouched"
    await steady.stop()
    assert "stt exited with code 3, 3 times in 300s; stopping" in capsys.readouterr().out


async def test_the_chain_exiting_stops_the_network_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    chain = Child("localnet", [PY, "-c", "raise SystemExit(7)"])
    code = await asyncio.wait_for(supervise(await started(chain), asyncio.Event()), 30)
    assert code == 1
    assert "localnet exited with code 7; stopping" in capsys.readouterr().out


def test_a_local_chain_of_another_build_is_moved_aside_not_lost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from registry import program as p
    from registry.localnet import LocalSvm, deploy_programs

    other = another_build(tmp_path / "other.so")
    ledger = tmp_path / "ledger"
    svm = LocalSvm(ledger)
    deploy_programs(svm, [(other, p.PROGRAM_KEYPAIR_PATH)])
    svm.close()
    retire_another_build(ledger)
    [aside] = tmp_path.glob("ledger-other-build-*")
    assert not ledger.exists() and any(aside.iterdir()), "kept, under another name"
    assert f"moved it to {aside}" in capsys.readouterr().out
    svm = LocalSvm(ledger)  # a fresh chain takes this build
    assert deploy_programs(svm, [(p.SO_PATH, p.PROGRAM_KEYPAIR_PATH)]) == [str(p.PROGRAM_ID)]
    svm.close()
    retire_another_build(ledger)  # the same build stays where it is
    assert ledger.exists() and len(list(tmp_path.glob("ledger-other-build-*"))) == 1
