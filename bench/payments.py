"""x402 credit purchases end to end on the localnet: purchases per second and time to credit.

    .venv/bin/python bench/payments.py [--purchases 200] [--concurrency 8] [--db sqlite|URL]

Runs the localnet as its own process (`registry localnet`, as `make up` does), the gateway app
in this process on loopback with a SQLite ledger, and N concurrent agents, each with its own
funded wallet, doing what `GatewayClient.purchase_credits` does: POST -> 402 -> build and sign
the TransferChecked transaction (blockhash and mint read from the RPC) -> POST with
PAYMENT-SIGNATURE -> 200 once the transfer is confirmed on chain and credited. Prints:

* purchases/s: completed purchases over wall time;
* request -> credit: from the first POST to the 200 (p50/p95/p99), what an agent waits;
* settle: from the paid POST to the 200 (verify, co-sign, record, send, confirm, credit).

Figures only, never asserted; compare runs on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402
from solders.keypair import Keypair  # noqa: E402

from gateway.app import create_app  # noqa: E402
from gateway.auth import sign_request  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.payments import payer  # noqa: E402
from gateway.payments.config import PaymentsConfig, SolanaPayments  # noqa: E402
from gateway.payments.wiring import setup_payments  # noqa: E402
from registry import usdc  # noqa: E402
from registry.client import RegistryClient  # noqa: E402
from tests.conftest import free_port, start_localnet_process  # noqa: E402

PATH = "/v1/credits/purchase"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--purchases", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--amount", type=float, default=0.1)
    ap.add_argument("--db", default="sqlite", help="sqlite, or a PostgreSQL URL")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-payments-"))
    net = start_localnet_process(tmp / "ledger")
    keys = tmp / "keys"
    try:
        chain = RegistryClient(net.url)
        mint, _ = await usdc.ensure_test_usdc(chain, keys / "mint.json", keys / "auth.json")
        # The gateway answers one signed request per (wallet, path, second), so an agent's
        # wallet buys at most about once a second; each agent rotates over a few wallets.
        n_wallets = max(args.concurrency, -(-args.purchases // 20))
        wallets = [Keypair() for _ in range(n_wallets)]
        per_wallet = -(-args.purchases // n_wallets)
        for w in wallets:
            await usdc.mint_test_usdc(
                chain,
                w.pubkey(),
                f"{per_wallet * args.amount + 1:.6f}",
                keys / "mint.json",
                keys / "auth.json",
            )
        db = args.db if args.db != "sqlite" else f"sqlite+aiosqlite:///{tmp}/gateway.db"
        config = GatewayConfig(
            database_url=db,
            rpc_url=net.url,
            load_report_port=0,  # served by a TestServer on a free port
            payments=PaymentsConfig(
                solana=SolanaPayments(
                    asset_keypair=keys / "mint.json",
                    pay_to_keypair=keys / "pay-to.json",
                    fee_payer_keypair=keys / "fee-payer.json",
                )
            ),
        )

        async def no_nodes() -> list[Any]:
            return []

        app = create_app(config, Keypair(), no_nodes)
        setup_payments(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}"
        pay_to = app[
            __import__("gateway.payments", fromlist=["PAYMENTS_KEY"]).PAYMENTS_KEY
        ].service.pay_to
        to_before = (await chain.rpc.get_token_account_balance(usdc.ata(pay_to, mint))).value
        total, settle = [], []
        failures: list[str] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(args.purchases):
            queue.put_nowait(i)

        last_ts = {w.pubkey(): int(time.time()) - 25 for w in wallets}

        async def agent(mine: list[Keypair], http: aiohttp.ClientSession) -> None:
            n = 0
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                key = mine[n % len(mine)]
                n += 1
                body = {
                    "wallet_address": str(key.pubkey()),
                    "wallet_chain": "solana",
                    "amount_usd": args.amount,
                }
                ts = last_ts[key.pubkey()] = max(int(time.time()) - 25, last_ts[key.pubkey()] + 1)
                auth = sign_request("POST", PATH, key, now=ts)
                t0 = time.perf_counter()
                async with http.post(url + PATH, json=body, headers=auth) as r:
                    data = await r.json()
                    version, accepts = payer.requirements_from_402(r.headers, data)
                tx = await payer.svm_transaction(key, accepts[0], net.url)
                name, value = payer.payment_header(version, accepts[0], {"transaction": tx})
                t1 = time.perf_counter()
                async with http.post(url + PATH, json=body, headers={**auth, name: value}) as r:
                    data = await r.json()
                t2 = time.perf_counter()
                if r.status != 200:
                    failures.append(f"{r.status}: {data.get('error', '')[:200]}")
                    continue
                total.append(t2 - t0)
                settle.append(t2 - t1)

        async with aiohttp.ClientSession() as http:
            start = time.perf_counter()
            await asyncio.gather(
                *(agent(wallets[k :: args.concurrency], http) for k in range(args.concurrency))
            )
            wall = time.perf_counter() - start
        to_after = (await chain.rpc.get_token_account_balance(usdc.ata(pay_to, mint))).value
        await runner.cleanup()
        await chain.close()
        n = len(total)
        moved = int(to_after.amount) - int(to_before.amount)
        print(
            f"purchases: {n} ok, {len(failures)} failed, concurrency {args.concurrency}, "
            f"${args.amount} each, ledger {'SQLite' if args.db == 'sqlite' else 'PostgreSQL'}"
        )
        print(f"purchases/s:        {n / wall:8.1f}   ({wall:.2f} s wall)")
        if n:
            print(
                f"request -> credit:  p50 {pct(total, 50) * 1e3:7.1f} ms  "
                f"p95 {pct(total, 95) * 1e3:7.1f} ms  p99 {pct(total, 99) * 1e3:7.1f} ms  "
                f"(mean {statistics.mean(total) * 1e3:.1f})"
            )
            print(
                f"settle (paid POST): p50 {pct(settle, 50) * 1e3:7.1f} ms  "
                f"p95 {pct(settle, 95) * 1e3:7.1f} ms  p99 {pct(settle, 99) * 1e3:7.1f} ms"
            )
        print(f"pay-to USDC moved:  {moved / 1e6} (expected {n * args.amount:.6f})")
        for f in failures[:5]:
            print("  failure:", f)
        print(f"machine: {os.cpu_count()} CPUs; localnet in its own process")
    finally:
        net.stop()


if __name__ == "__main__":
    asyncio.run(main())
