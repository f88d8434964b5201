"""`gateway`: run the gateway, and the operator's ledger commands.

gateway --config configs/gateway.yaml                 serve (default command)
gateway credits grant --wallet ADDR --chain solana --usd 5
gateway accounts
gateway sessions [--status active]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

import uvloop
from aiohttp import web
from solders.pubkey import Pubkey

from common.cli import add_log_level, run_command
from common.settings import SettingsError
from gateway.config import GatewayConfig, load_gateway_config
from gateway.ledger import Ledger, pricing
from registry import program as p
from registry.client import RegistryClient
from registry.keys import load_or_create_keypair

log = logging.getLogger("gateway")


async def serve(config: GatewayConfig) -> None:
    from gateway.app import create_app

    issuer = load_or_create_keypair(config.issuer_keypair)
    program_id = Pubkey.from_string(config.program_id) if config.program_id else p.PROGRAM_ID
    client = RegistryClient(config.rpc_url, program_id)
    app = create_app(config, issuer, client.list_nodes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.listen_host, config.listen_port)
    await site.start()
    issuers = await client.issuer_keys()
    if str(issuer.pubkey()) not in issuers:
        log.warning(
            "issuer key %s is not listed on the registry: nodes will refuse our tokens "
            "(run `registry issuer add %s`)",
            issuer.pubkey(),
            issuer.pubkey(),
        )
    print(
        f"gateway listening on http://{config.listen_host}:{config.listen_port} "
        f"(issuer {issuer.pubkey()}, ledger {config.database_url})",
        flush=True,
    )
    # Everything built so far (SQLAlchemy, pydantic, the registry view, ...) lives as long as
    # the process: move it out of the collector's sight, or each full collection walks all of it
    # while requests wait (bench/gateway.py: token p99 ~40-55 ms without this, ~16-19 ms with).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await client.close()


def _usd(value: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{value!r} is not an amount in USD") from None
    if amount <= 0:
        raise argparse.ArgumentTypeError(f"--usd must be positive, got {value}")
    return amount


async def grant(config: GatewayConfig, wallet: str, chain: str, usd: Decimal, memo: str) -> None:
    micro = pricing.usd_to_microcredits(usd)
    async with Ledger(config.database_url) as ledger:
        await ledger.migrate()
        tx = await ledger.grant(chain, wallet, micro, memo=memo)
        print(
            f"granted {micro} microcredits (${usd}) to {chain} wallet {wallet}; "
            f"balance {tx.balance_after}, available {tx.available_after}"
        )


async def accounts(config: GatewayConfig) -> None:
    async with Ledger(config.database_url) as ledger:
        await ledger.migrate()
        rows = await ledger.list_accounts()
        if not rows:
            print("no accounts")
        for a in rows:
            print(
                f"{a.id}  {a.wallet_chain:6} {a.wallet_address:44}  balance {a.credit_balance:>12}"
                f"  available {a.available_balance:>12}  created {a.created_at:%Y-%m-%d %H:%M}"
            )


async def sessions(config: GatewayConfig, status: str | None) -> None:
    async with Ledger(config.database_url) as ledger:
        await ledger.migrate()
        rows = await ledger.list_all_sessions(status=status)
        if not rows:
            print("no sessions")
        for s in rows:
            print(
                f"{s.session_id}  {s.service:6} {s.status:9} reserved {s.reserved_microcredits:>9}"
                f"  charged {s.charged_microcredits:>9}  usage {s.usage_units:>6}"
                f"  node {s.node_pubkey[:8]}..  expires {s.token_expires_at:%Y-%m-%d %H:%M:%S}"
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="voicenet gateway")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML config (configs/gateway.yaml); built-in local defaults if absent",
    )
    add_log_level(parser)
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("serve", help="run the HTTP gateway (the default)")
    credits = sub.add_parser("credits", help="credits").add_subparsers(
        dest="credits_cmd", required=True
    )
    g = credits.add_parser("grant", help="grant credits to a wallet (recorded as a grant)")
    g.add_argument("--wallet", required=True)
    g.add_argument("--chain", choices=["solana", "evm"], required=True)
    g.add_argument("--usd", type=_usd, required=True)
    g.add_argument("--memo", default="operator grant")
    sub.add_parser("accounts", help="list accounts and balances")
    s = sub.add_parser("sessions", help="list sessions, newest first")
    s.add_argument("--status", choices=["active", "completed", "expired"])
    return parser


def run(args: argparse.Namespace) -> None:
    """The command asked for (``serve`` by default); ``main`` turns its errors into one line."""
    config = load_gateway_config(args.config)
    if args.cmd in (None, "serve"):
        uvloop.run(serve(config))  # libuv's loop: less CPU per request than asyncio's
    elif args.cmd == "credits":
        asyncio.run(grant(config, args.wallet, args.chain, args.usd, args.memo))
    elif args.cmd == "accounts":
        asyncio.run(accounts(config))
    else:
        asyncio.run(sessions(config, args.status))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(
        "gateway",
        lambda: run(args),
        (SettingsError, ValueError, FileNotFoundError),
        status=2,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    sys.exit(main())
