"""`registry airdrop --usdc`: test USDC from the mint `make up` keeps under .local/ (localnet
only)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from solders.keypair import Keypair

from registry import usdc
from registry.client import RegistryClient
from tests.conftest import ROOT, Localnet


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "registry.cli", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_airdrop_usdc_and_sol(localnet: Localnet, tmp_path: Path) -> None:
    wallet = Keypair().pubkey()
    keys = tmp_path / ".local" / "keys"
    missing = cli(tmp_path, "airdrop", "--rpc", localnet.url, "--to", str(wallet), "--usdc", "1")
    assert missing.returncode != 0 and "make up" in missing.stderr

    async def make_mint() -> None:
        async with RegistryClient(localnet.url) as c:
            await usdc.ensure_test_usdc(
                c, keys / "usdc-mint.json", keys / "usdc-mint-authority.json"
            )

    asyncio.run(make_mint())
    out = cli(tmp_path, "airdrop", "--rpc", localnet.url, "--to", str(wallet), "--usdc", "2.5")
    assert out.returncode == 0, out.stderr
    assert "minted 2.5 test USDC" in out.stdout and "balance 2.5 USDC" in out.stdout
    assert "SOL" not in out.stdout  # --usdc alone airdrops no SOL
    out = cli(
        tmp_path,
        "airdrop",
        "--rpc",
        localnet.url,
        "--to",
        str(wallet),
        "--sol",
        "0.5",
        "--usdc",
        "1",
    )
    assert out.returncode == 0 and "balance 3.5 USDC" in out.stdout and "0.5 SOL" in out.stdout
    bad = cli(
        tmp_path, "airdrop", "--rpc", localnet.url, "--to", str(wallet), "--usdc", "0.0000001"
    )
    assert bad.returncode != 0 and "6 decimals" in bad.stderr
    remote = cli(
        tmp_path,
        "airdrop",
        "--rpc",
        "https://api.devnet.solana.com",
        "--to",
        str(wallet),
        "--usdc",
        "1",
    )
    assert remote.returncode != 0 and "localnet only" in remote.stderr
