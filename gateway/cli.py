"""`gateway`: run the gateway, and the operator's ledger commands.

gateway --config configs/gateway.yaml                 serve (default command)
gateway --config configs/gateway.yaml serve --workers 4   four processes on one port (PostgreSQL)
gateway credits grant --wallet ADDR --chain solana --usd 5
gateway accounts
gateway sessions [--status active]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

import uvloop

from common.cli import add_log_level, run_command
from common.settings import SettingsError
from gateway.config import GatewayConfig, load_gateway_config
from gateway.ledger import Ledger, pricing
from gateway.server import serve
from gateway.workers import serve_workers


def _workers(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers takes a number, got {value!r}") from None
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"--workers must be 1..64, got {n}")
    return n


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
    sv = sub.add_parser("serve", help="run the HTTP gateway (the default)")
    sv.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="gateway processes sharing the port (SO_REUSEPORT), each with its own event loop; "
        "more than 1 needs a PostgreSQL ledger (default 1)",
    )
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
    workers = getattr(args, "workers", 1)
    if args.cmd in (None, "serve") and workers > 1:
        serve_workers(config, workers)
    elif args.cmd in (None, "serve"):
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
