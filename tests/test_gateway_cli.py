"""The operator's `gateway` command: serving (the real process), grants, accounts, sessions, and a
clear refusal of bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from solders.keypair import Keypair

from gateway.auth import sign_request
from tests.conftest import ROOT, Chain, free_port


def gateway(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp / "gateway.yaml"
    if not config.exists():
        config.write_text(f"database_url: sqlite+aiosqlite:///{tmp}/gw.db\n")
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_grant_then_list(tmp_path: Path) -> None:
    wallet = str(Keypair().pubkey())
    out = gateway(
        tmp_path, "credits", "grant", "--wallet", wallet, "--chain", "solana", "--usd", "2.5"
    )
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


def test_serve_answers_then_stops_cleanly_on_sigterm(tmp_path: Path, chain: Chain) -> None:
    """`gateway serve` as operators run it (uvloop, frozen start-up heap, the SQLite writer
    threads): it answers signed requests, and SIGTERM stops it with status 0 and the ledger
    intact for the next command."""
    port = free_port()
    (tmp_path / "gateway.yaml").write_text(
        f"listen_port: {port}\nrpc_url: {chain.url}\nissuer_keypair: {chain.issuer_path}\n"
        f"database_url: sqlite+aiosqlite:///{tmp_path}/gw.db\n"
    )
    wallet = Keypair()
    assert (
        gateway(
            tmp_path,
            "credits",
            "grant",
            "--wallet",
            str(wallet.pubkey()),
            "--chain",
            "solana",
            "--usd",
            "1",
        ).returncode
        == 0
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "--config", str(tmp_path / "gateway.yaml")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                with urllib.request.urlopen(url + "/internal/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("gateway serve did not answer /internal/health")
        request = urllib.request.Request(
            url + "/v1/account", headers=sign_request("GET", "/v1/account", wallet)
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            account = json.load(r)
        assert account["wallet_address"] == str(wallet.pubkey())
        assert account["credit_balance"] == "1000000"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert f"gateway listening on http://127.0.0.1:{port}" in out
    assert "1000000" in gateway(tmp_path, "accounts").stdout
