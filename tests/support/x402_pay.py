"""Pay the gateway with the official ``x402`` client (run in .venv-x402, not the project venv).

    .venv-x402/bin/python tests/support/x402_pay.py --url http://127.0.0.1:PORT \
        --keypair payer.json --rpc http://127.0.0.1:RPCPORT --asset MINT --amount 0.25 \
        [--x402-version 1]

Sends ``POST /v1/credits/purchase`` through ``x402HttpxClient`` (the package's own httpx
transport: on 402 it builds the payment with ``ExactSvmScheme`` and retries the same request with
``PAYMENT-SIGNATURE``, or ``X-PAYMENT`` for v1). The wallet-auth headers are signed once; the
gateway gives a signature back on 402, so the retry carries the same ones. With
``--x402-version 1`` the ``PAYMENT-REQUIRED`` header is dropped from the 402 so the client
takes the v1 body. Prints one JSON line: status, body, the decoded settlement header.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from pathlib import Path

import httpx
from solders.keypair import Keypair
from x402 import x402Client
from x402.http.clients.httpx import x402AsyncTransport
from x402.mechanisms.svm.exact.register import register_exact_svm_client
from x402.mechanisms.svm.signers import KeypairSigner

PATH = "/v1/credits/purchase"


class DropV2Header(httpx.AsyncBaseTransport):
    """A v1-only server, as seen by the client: 402s without PAYMENT-REQUIRED."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        resp = await self.inner.handle_async_request(request)
        if resp.status_code == 402:
            await resp.aread()
            headers = [
                (k, v) for k, v in resp.headers.multi_items() if k.lower() != "payment-required"
            ]
            return httpx.Response(402, headers=headers, content=resp.content)
        return resp

    async def aclose(self) -> None:
        await self.inner.aclose()


def auth_headers(key: Keypair, method: str, path: str) -> dict[str, str]:
    ts = str(int(time.time()))
    sig = key.sign_message(f"{method}\n{path}\n{ts}".encode())
    return {
        "Authorization": "solana:" + base64.b64encode(bytes(sig)).decode(),
        "X-Wallet-Address": str(key.pubkey()),
        "X-Wallet-Chain": "solana",
        "X-Timestamp": ts,
    }


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--keypair", required=True, type=Path)
    ap.add_argument("--rpc", required=True)
    ap.add_argument("--amount", required=True, type=float)
    ap.add_argument("--wallet", help="wallet_address in the body (default: the payer)")
    ap.add_argument("--x402-version", type=int, choices=[1, 2], default=2)
    ap.add_argument(
        "--asset",
        required=True,
        help="the localnet test-USDC mint: the client pays only default assets "
        "(real USDC) unless the payer opts into another one",
    )
    ap.add_argument("--max-atomic", default="10000000", help="per-payment cap for that asset")
    args = ap.parse_args()

    key = Keypair.from_bytes(bytes(json.loads(args.keypair.read_text())))
    client = x402Client()
    register_exact_svm_client(client, KeypairSigner(key), rpc_url=args.rpc)
    client.set_spend_controls(
        {
            "allowed_assets": [
                {"network": network, "asset": args.asset, "max_amount_per_payment": args.max_atomic}
                for network in ("solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1", "solana-devnet")
            ]
        }
    )
    inner = DropV2Header() if args.x402_version == 1 else None
    transport = x402AsyncTransport(client, transport=inner)
    body = {
        "wallet_address": args.wallet or str(key.pubkey()),
        "wallet_chain": "solana",
        "amount_usd": args.amount,
    }
    async with httpx.AsyncClient(transport=transport, timeout=60) as http:
        resp = await http.post(
            args.url.rstrip("/") + PATH, json=body, headers=auth_headers(key, "POST", PATH)
        )
    settle = resp.headers.get("PAYMENT-RESPONSE") or resp.headers.get("X-PAYMENT-RESPONSE")
    out = {
        "status": resp.status_code,
        "body": resp.json(),
        "payment_response": json.loads(base64.b64decode(settle)) if settle else None,
        "x_payment_response": resp.headers.get("X-PAYMENT-RESPONSE") is not None,
        "x402_version": args.x402_version,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
