"""The official ``x402`` Python client pays the gateway on the localnet.

The client (x402 2.25.0 with its ``svm`` and ``httpx`` extras) cannot share the project's venv
(anchorpy pins construct-typing<0.6), so it lives in ``.venv-x402`` and runs as a subprocess:
``tests/support/x402_pay.py`` with its own ``x402HttpxClient`` transport, ``ExactSvmScheme`` and
``KeypairSigner``, reading the mint and blockhash from our localnet. The gateway advertises the
devnet CAIP-2 id (the client accepts no other Solana id).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from gateway.payments.book import PaymentBook
from registry.keys import save_keypair
from tests.support.payments import DEVNET, Pay

ROOT = Path(__file__).resolve().parent.parent
X402_PYTHON = Path(os.environ.get("X402_PYTHON", ROOT / ".venv-x402" / "bin" / "python"))
SCRIPT = ROOT / "tests" / "support" / "x402_pay.py"


@pytest.fixture(autouse=True)
def _official_client_installed() -> None:
    """`make setup` installs it; a missing venv fails these tests rather than skipping them."""
    if not X402_PYTHON.exists():
        pytest.fail(f"the official x402 client's venv is missing ({X402_PYTHON}): run `make setup`")


async def official_client(
    pay: Pay, keypair: Path, amount: float, version: int, wallet: str | None = None
) -> dict[str, Any]:
    # -P: the script's folder (tests/support) is not put first on sys.path, where a module named
    # like a standard one (signal.py) would shadow it.
    args = [
        str(X402_PYTHON),
        "-P",
        str(SCRIPT),
        "--url",
        pay.url,
        "--keypair",
        str(keypair),
        "--rpc",
        pay.net.url,
        "--asset",
        str(pay.mint),
        "--amount",
        str(amount),
        "--x402-version",
        str(version),
    ]
    if wallet:
        args += ["--wallet", wallet]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("version", [2, 1])
async def test_official_x402_client_pays_on_the_localnet(pay: Pay, version: int) -> None:
    key = await pay.wallet("2")
    path = pay.tmp / "payer.json"
    save_keypair(key, path)
    to_before, payer_before = await pay.usdc_of(pay.pay_to), await pay.usdc_of(key.pubkey())

    result = await official_client(pay, path, 0.75, version)

    assert result["status"] == 200, result
    assert result["body"]["credited_microcredits"] == "750000"
    assert result["body"]["amount_usd"] == 0.75
    settle = result["payment_response"]
    assert settle["success"] is True and settle["payer"] == str(key.pubkey())
    assert settle["network"] == (DEVNET if version == 2 else "solana-devnet")
    # The pay-to wallet's USDC rose by exactly the amount; the payer's fell by it.
    assert await pay.usdc_of(pay.pay_to) == to_before + 750_000
    assert await pay.usdc_of(key.pubkey()) == payer_before - 750_000
    acct = await pay.ledger.get_account("solana", str(key.pubkey()))
    assert acct is not None and acct.id == result["body"]["account_id"]
    assert (acct.credit_balance, acct.available_balance) == (750_000, 750_000)
    assert (await pay.ledger.audit(acct.id)).ok
    rec = await PaymentBook(pay.ledger).get(settle["transaction"])
    assert rec is not None and rec.status == "credited"
    # What the official client built is what the gateway verified: a v0 transaction with the
    # client's random memo, the gateway's fee payer in slot 0.
    from solders.transaction import VersionedTransaction

    tx = VersionedTransaction.from_bytes(base64.b64decode(rec.detail["tx"]))
    assert tx.message.account_keys[0] == pay.service.fee_payer.pubkey()


async def test_official_client_refusal_changes_nothing(pay: Pay) -> None:
    """The official client paying for someone else's wallet: refused, nothing moves."""
    key, other = await pay.wallet("2"), await pay.wallet(None)
    path = pay.tmp / "payer.json"
    save_keypair(key, path)
    before = await pay.snapshot(key.pubkey(), other.pubkey())
    result = await official_client(pay, path, 0.5, 2, wallet=str(other.pubkey()))
    assert result["status"] == 402 and "payer_mismatch" in result["body"]["error"]
    assert await pay.snapshot(key.pubkey(), other.pubkey()) == before
