"""The demo's wallet, funded on the localnet the way a real agent pays: test USDC minted to it
(the localnet's airdrop), then credits bought from the gateway with an x402 payment
(``GatewayClient.purchase_credits``: a USDC transfer signed by the wallet, settled on chain by
the gateway). No grant: what the page spends is what the wallet bought.

Only on the localnet: ``registry.usdc`` refuses any other RPC.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gateway.client import GatewayClient, NotFound
from registry import usdc
from registry.client import RegistryClient
from registry.keys import load_or_create_keypair

log = logging.getLogger("demo.wallet")

MIN_CREDITS = 1_000_000  # microcredits ($1): below this, buy more
BUY_USD = 2.0


async def fund(
    wallet_path: Path,
    gateway_url: str,
    rpc_url: str,
    *,
    min_credits: int = MIN_CREDITS,
    buy_usd: float = BUY_USD,
) -> int:
    """Top the wallet's credits up to at least ``min_credits`` (test USDC first, then an x402
    purchase of ``buy_usd``); returns the available balance in microcredits."""
    wallet = load_or_create_keypair(wallet_path)
    async with GatewayClient(gateway_url, wallet) as gw:
        try:
            available = (await gw.account()).available_balance
        except NotFound:
            available = 0
        if available >= min_credits:
            log.info("demo wallet %s has %.2f USD of credit", wallet.pubkey(), available / 1e6)
            return available
        async with RegistryClient(rpc_url) as chain:
            await usdc.mint_test_usdc(chain, wallet.pubkey(), str(buy_usd))
        bought = await gw.purchase_credits(buy_usd, rpc_url=rpc_url)
        available = (await gw.account()).available_balance
    log.info(
        "demo wallet %s bought %.2f USD of credit with test USDC (x402); %.2f USD available",
        wallet.pubkey(),
        int(bought["credited_microcredits"]) / 1e6,
        available / 1e6,
    )
    return available
