"""`registry`: the operator's command line for the on-chain registry and the embedded localnet.

Every command takes ``--rpc`` (default: the localnet on 127.0.0.1:8899) and, where it signs,
``--keypair``. Errors print one line naming what was wrong and exit non-zero; no tracebacks for
mistakes an operator can make.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from solana.exceptions import SolanaRpcException
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from common.cli import run_command
from registry import program as p
from registry.client import (
    DEFAULT_PRESENCE_TTL_HOURS,
    DEFAULT_RPC_URL,
    LAMPORTS_PER_SOL,
    RegistryClient,
    RegistryError,
    is_local_rpc,
)
from registry.keys import load_keypair, load_or_create_keypair, save_keypair
from registry.nodeurl import check_node_url
from registry.tokens import SERVICES, Grant, mint_token

DEFAULT_KEYPAIR = Path(".local/keys/authority.json")


class CliError(Exception):
    """A mistake the operator can fix; printed as one line."""


def _pubkey(value: str) -> Pubkey:
    try:
        return Pubkey.from_string(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a base58 Solana public key") from None


def _gateway_url(value: str) -> str:
    """The chain refuses what ``check_node_url`` refuses: say so before a transaction."""
    try:
        check_node_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _role(value: str) -> p.Role:
    try:
        return p.Role.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


MAX_PRESENCE_TTL_HOURS = 24 * 365


def _presence_ttl(value: str) -> int:
    """``--presence-ttl-hours``: a number of hours, as the registry's seconds."""
    try:
        hours = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of hours") from None
    if not 1 / 3600 <= hours <= MAX_PRESENCE_TTL_HOURS:  # also false for nan
        raise argparse.ArgumentTypeError(
            f"--presence-ttl-hours {value} is outside 1 second .. {MAX_PRESENCE_TTL_HOURS} hours"
        )
    return round(hours * 3600)


def _policy(value: str) -> p.Policy:
    try:
        return p.Policy.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ------------------------------------------------------------------ commands


def cmd_keygen(args: argparse.Namespace) -> None:
    keypair = Keypair()
    save_keypair(keypair, args.out, overwrite=args.force)
    print(f"wrote {args.out}\npubkey {keypair.pubkey()}")


def cmd_localnet(args: argparse.Namespace) -> None:
    from registry.localnet import StaleProgram, run_localnet

    programs = [] if args.no_program else [(p.SO_PATH, p.PROGRAM_KEYPAIR_PATH)]
    # The upgrade authority is the one key `registry init` accepts: by default the same file
    # `registry init --keypair` reads, so `make up` (and an operator) can initialise.
    authority = load_or_create_keypair(args.authority)
    try:
        run_localnet(
            args.port, Path(args.ledger), programs, host=args.host, upgrade_authority=authority
        )
    except StaleProgram as exc:
        raise CliError(str(exc)) from None


async def cmd_init(args: argparse.Namespace, client: RegistryClient) -> None:
    authority = load_keypair(args.keypair)
    existing = await client.get_registry()
    if existing is not None:
        if existing.authority != authority.pubkey():
            raise CliError(
                f"registry already initialised with authority {existing.authority}, "
                f"not {authority.pubkey()}"
            )
        print(
            f"registry already initialised: authority {existing.authority}, "
            f"presence TTL {_hours(existing.heartbeat_ttl)}, policy {existing.policy.label}"
        )
        return
    ttl = args.presence_ttl
    await client.ensure_funded(authority)
    try:
        sig = await client.initialize_registry(authority, ttl, args.policy)
    except p.RegistryProgramError as exc:
        if exc.name != "NotUpgradeAuthority":
            raise
        raise CliError(
            f"{authority.pubkey()} is not the registry program's upgrade authority: only that "
            "key may run `registry init` (on the localnet: the --authority key it was started "
            f"with, default {DEFAULT_KEYPAIR})"
        ) from None
    print(
        f"registry initialised: authority {authority.pubkey()}, presence TTL {_hours(ttl)}, "
        f"policy {args.policy.label}\nsignature {sig}"
    )


async def cmd_issuer(args: argparse.Namespace, client: RegistryClient) -> None:
    if args.issuer_cmd == "list":
        issuers = await client.list_issuers()
        if args.json:
            listed = [{"key": str(i.key), "url": i.url, "added_at": i.added_at} for i in issuers]
            print(json.dumps(listed, indent=2))
        else:
            for i in issuers:
                print(f"{i.key}  {i.url}  added {_ago(i.added_at)}")
            if not issuers:
                print("no issuers")
        return
    authority = load_keypair(args.keypair)
    await client.ensure_funded(authority)
    if args.issuer_cmd == "add":
        if str(args.key) in await client.issuer_keys():
            print(f"issuer {args.key} already listed (change its URL: registry issuer update)")
            return
        sig = await client.add_issuer(authority, args.key, args.url)
        print(f"issuer {args.key} added at {args.url}\nsignature {sig}")
    elif args.issuer_cmd == "update":
        sig = await client.update_issuer(authority, args.key, args.url)
        print(f"issuer {args.key} now at {args.url}\nsignature {sig}")
    else:
        sig = await client.remove_issuer(authority, args.key)
        print(f"issuer {args.key} removed\nsignature {sig}")


def _fields(args: argparse.Namespace) -> p.NodeFields:
    try:
        check_node_url(args.url)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return p.NodeFields(
        url=args.url,
        lat=args.lat,
        lon=args.lon,
        country=args.country.upper(),
        capacity=args.capacity,
        version=args.version,
    )


async def cmd_node(args: argparse.Namespace, client: RegistryClient) -> None:
    if args.node_cmd == "approve":
        authority = load_keypair(args.keypair)
        sig = await client.approve_node(authority, args.owner)
        print(f"node {args.owner} approved: active\nsignature {sig}")
        return
    if args.node_cmd in ("suspend", "activate"):
        authority = load_keypair(args.keypair)
        status = p.NodeStatus.SUSPENDED if args.node_cmd == "suspend" else p.NodeStatus.ACTIVE
        sig = await client.set_node_status(authority, args.owner, status)
        print(f"node {args.owner} {status.label}\nsignature {sig}")
        return
    owner = load_keypair(args.keypair)
    await client.ensure_funded(owner)
    if args.node_cmd == "register":
        sig = await client.register_node(owner, args.role, _fields(args))
        node = await client.get_node(owner.pubkey())
        status = node.status.label if node else "unknown"
        print(f"node {owner.pubkey()} registered as {args.role.label} ({status})\nsignature {sig}")
        if node is not None and node.status is p.NodeStatus.PENDING:
            print(f"waiting for the registry authority: registry node approve {owner.pubkey()}")
    elif args.node_cmd == "update":
        sig = await client.update_node(owner, _fields(args))
        print(f"node {owner.pubkey()} updated\nsignature {sig}")
    else:
        sig = await client.deregister_node(owner)
        print(f"node {owner.pubkey()} deregistered\nsignature {sig}")


async def cmd_nodes(args: argparse.Namespace, client: RegistryClient) -> None:
    nodes = await client.list_nodes(args.role)
    if args.json:
        print(json.dumps([n.to_json() for n in nodes], indent=2))
        return
    print(format_nodes_table(nodes))


def format_nodes_table(nodes: list[p.NodeAccount], now: float | None = None) -> str:
    if not nodes:
        return "no nodes registered"
    header = ("ROLE", "URL", "LOCATION", "CAPACITY", "PRESENCE", "STATUS", "VERSION", "PUBKEY")
    rows = [header]
    for n in nodes:
        status = n.status.label + (" (presence expired)" if n.stale else "")
        rows.append(
            (
                n.role.label,
                n.url,
                f"{n.country} {n.lat:.2f},{n.lon:.2f}",
                str(n.capacity),
                _ago(n.last_heartbeat, now),
                status,
                n.version,
                str(n.owner),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows
    )


def _hours(seconds: int) -> str:
    return f"{seconds / 3600:g}h ({seconds}s)"


def _ago(ts: int, now: float | None = None) -> str:
    age = int((time.time() if now is None else now) - ts)
    if age < 120:
        return f"{age}s ago"
    if age < 7200:
        return f"{age // 60}m ago"
    return f"{age // 3600}h ago"


async def cmd_airdrop(args: argparse.Namespace, client: RegistryClient) -> None:
    if not is_local_rpc(client.rpc_url):
        raise CliError(f"airdrop is for the localnet only; {client.rpc_url} is not a loopback RPC")
    sol = args.sol if args.sol is not None else (0 if args.usdc else 1.0)
    if sol < 0 or (sol == 0 and not args.usdc):
        raise CliError(f"--sol must be positive, got {args.sol}")
    if args.usdc is not None and args.usdc <= 0:
        raise CliError(f"--usdc must be positive, got {args.usdc}")
    if sol:
        sig = await client.airdrop(args.to, int(sol * LAMPORTS_PER_SOL))
        balance = (await client.rpc.get_balance(args.to)).value / LAMPORTS_PER_SOL
        print(f"airdropped {sol} SOL to {args.to} (balance {balance} SOL)\nsignature {sig}")
    if args.usdc:
        from registry import usdc

        try:
            account = await usdc.mint_test_usdc(client, args.to, str(args.usdc))
        except ValueError as exc:
            raise CliError(str(exc)) from None
        held = (await client.rpc.get_token_account_balance(account)).value.ui_amount_string
        print(
            f"minted {args.usdc} test USDC ({usdc.test_usdc_mint()}) to {args.to} "
            f"(token account {account}, balance {held} USDC)"
        )


def cmd_token_mint(args: argparse.Namespace) -> None:
    issuer = load_keypair(args.issuer_key)
    try:
        grant = Grant(service=args.service, room=args.room, limit=args.limit)
        print(mint_token(issuer, args.identity, grant, args.ttl, audience=str(args.audience)))
    except ValueError as exc:
        raise CliError(str(exc)) from None


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="registry", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def rpc(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--rpc", default=DEFAULT_RPC_URL, help=f"JSON-RPC URL (default {DEFAULT_RPC_URL})"
        )

    def keypair(sp: argparse.ArgumentParser, default: Path | None = DEFAULT_KEYPAIR) -> None:
        sp.add_argument(
            "--keypair",
            type=Path,
            default=default,
            required=default is None,
            help=f"signer keypair file (default {default})" if default else "signer keypair file",
        )

    sp = sub.add_parser("keygen", help="write a new keypair file (Solana CLI format)")
    sp.add_argument("out", type=Path)
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")

    sp = sub.add_parser("localnet", help="run the embedded localnet (JSON-RPC over LiteSVM)")
    sp.add_argument("--port", type=int, default=8899)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument(
        "--ledger", default=".local/ledger", help="state directory (kept across restarts)"
    )
    sp.add_argument("--no-program", action="store_true", help="do not deploy the registry program")
    sp.add_argument(
        "--authority",
        type=Path,
        default=DEFAULT_KEYPAIR,
        help="the program's upgrade authority, the only key `registry init` accepts "
        f"(default {DEFAULT_KEYPAIR}, created if missing)",
    )

    sp = sub.add_parser(
        "init",
        help="initialise the registry (the program's upgrade authority "
        "signs and becomes its authority)",
    )
    rpc(sp)
    keypair(sp)
    sp.add_argument(
        "--presence-ttl-hours",
        dest="presence_ttl",
        type=_presence_ttl,
        default=round(DEFAULT_PRESENCE_TTL_HOURS * 3600),
        help="how long a node's presence renewal counts; nodes renew every 6 hours by default "
        f"(default {DEFAULT_PRESENCE_TTL_HOURS:g}: one renewal may fail)",
    )
    sp.add_argument(
        "--policy",
        type=_policy,
        default=p.Policy.APPROVAL,
        help="admission of new nodes: approval (they wait, pending, for "
        "`registry node approve`) or open (active at once); default approval",
    )

    sp = sub.add_parser("issuer", help="gateway keys that nodes trust")
    isub = sp.add_subparsers(dest="issuer_cmd", required=True)
    for name in ("add", "update", "remove"):
        s = isub.add_parser(name)
        rpc(s)
        keypair(s)
        s.add_argument("key", type=_pubkey)
        if name != "remove":
            s.add_argument(
                "--url",
                type=_gateway_url,
                required=True,
                help="the gateway's public URL: nodes send it usage, webhooks and load reports",
            )
    s = isub.add_parser("list")
    rpc(s)
    s.add_argument("--json", action="store_true")

    sp = sub.add_parser("nodes", help="list registered nodes")
    rpc(sp)
    sp.add_argument("--role", type=_role)
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser(
        "node", help="register, update or deregister a node; approve, suspend or activate one"
    )
    nsub = sp.add_subparsers(dest="node_cmd", required=True)
    for name in ("register", "update"):
        s = nsub.add_parser(name)
        rpc(s)
        keypair(s, None)
        if name == "register":
            s.add_argument("--role", type=_role, required=True)
        s.add_argument("--url", required=True)
        s.add_argument("--lat", type=float, required=True)
        s.add_argument("--lon", type=float, required=True)
        s.add_argument("--country", required=True, help="ISO 3166-1 alpha-2, e.g. DE")
        s.add_argument("--capacity", type=int, required=True)
        s.add_argument("--version", default="0.1.0")
    s = nsub.add_parser("deregister")
    rpc(s)
    keypair(s, None)
    for name in ("approve", "suspend", "activate"):
        s = nsub.add_parser(name, help="authority only")
        rpc(s)
        keypair(s)
        s.add_argument("owner", type=_pubkey, help="the node's public key")

    sp = sub.add_parser("airdrop", help="fund a wallet with test SOL and test USDC (localnet only)")
    rpc(sp)
    sp.add_argument("--to", type=_pubkey, required=True)
    sp.add_argument(
        "--sol",
        type=float,
        default=None,
        help="SOL to airdrop (default 1, or 0 when only --usdc is given)",
    )
    sp.add_argument(
        "--usdc",
        type=float,
        default=None,
        help="test USDC to mint to the wallet's token account (the mint `make up` "
        "created, .local/keys/usdc-mint.json)",
    )

    sp = sub.add_parser("token", help="session tokens")
    tsub = sp.add_subparsers(dest="token_cmd", required=True)
    s = tsub.add_parser("mint", help="print a signed token, to test a node without a gateway")
    s.add_argument("--issuer-key", type=Path, required=True)
    s.add_argument("--service", choices=SERVICES, required=True)
    s.add_argument("--identity", required=True)
    s.add_argument("--ttl", type=int, required=True, help="seconds")
    s.add_argument("--room", help="room name (webrtc)")
    s.add_argument("--limit", type=int, help="seconds (stt) or characters (tts)")
    s.add_argument(
        "--audience",
        required=True,
        type=_pubkey,
        metavar="NODE_KEY",
        help="the node key the token is for (aud): every other node refuses it",
    )
    return parser


ASYNC_COMMANDS: dict[str, Callable[[argparse.Namespace, RegistryClient], Awaitable[None]]] = {
    "init": cmd_init,
    "issuer": cmd_issuer,
    "node": cmd_node,
    "nodes": cmd_nodes,
    "airdrop": cmd_airdrop,
}


async def _run_async(args: argparse.Namespace) -> None:
    async with RegistryClient(args.rpc) as client:
        await ASYNC_COMMANDS[args.cmd](args, client)


def run(args: argparse.Namespace) -> None:
    """The command asked for; a refusal by the program becomes a CliError naming its code."""
    try:
        if args.cmd == "keygen":
            cmd_keygen(args)
        elif args.cmd == "localnet":
            cmd_localnet(args)
        elif args.cmd == "token":
            cmd_token_mint(args)
        else:
            asyncio.run(_run_async(args))
    except p.RegistryProgramError as exc:
        raise CliError(f"refused by the program: {exc.name} ({exc.code})") from None
    except SolanaRpcException as exc:
        cause = exc.__cause__ or exc
        raise CliError(
            f"the chain's JSON-RPC at {getattr(args, 'rpc', '?')} did not answer "
            f"({type(cause).__name__}: {cause}); is the chain running (`make up` starts the "
            "localnet), or is --rpc wrong?"
        ) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(
        "registry",
        lambda: run(args),
        (CliError, RegistryError, FileNotFoundError, FileExistsError, ValueError),
        status=1,
    )


if __name__ == "__main__":
    sys.exit(main())
