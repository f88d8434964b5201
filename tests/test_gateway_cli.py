"""The operator's `gateway` command: grants, accounts, sessions, and a clear refusal of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from solders.keypair import Keypair

from tests.conftest import ROOT


def gateway(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp / "gateway.yaml"
    if not config.exists():
        config.write_text(f"database_url: sqlite+aiosqlite:///{tmp}/gw.db\n")
    return subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_grant_then_list(tmp_path: Path) -> None:
    wallet = str(Keypair().pubkey())
    out = gateway(tmp_path, "credits", "grant", "--wallet", wallet, "--chain", "solana", "--usd", "2.5")
    assert out.returncode == 0, out.stderr
    assert "granted 2500000 microcredits" in out.stdout
    accounts = gateway(tmp_path, "accounts")
    assert wallet in accounts.stdout and "2500000" in accounts.stdout
    assert "no sessions" in gateway(tmp_path, "sessions").stdout


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    out = gateway(tmp_path, "credits", "grant", "--wallet", "w", "--chain", "solana", "--usd", "-1")
    assert out.returncode == 2 and "must be positive" in out.stderr
    (tmp_path / "gateway.yaml").write_text("listen_prot: 1\n")
    out = gateway(tmp_path, "accounts")
    assert out.returncode == 2 and "unknown key 'listen_prot'" in out.stderr
    assert "Traceback" not in out.stderr
