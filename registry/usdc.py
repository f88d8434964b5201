"""Test USDC on the localnet: a USDC-like SPL mint (6 decimals) that `make up` creates once.

The mint's own keypair and its mint authority are kept under ``.local/keys/`` so the mint has the
same address across restarts (and is re-created at that address if the ledger was wiped), and so
``registry airdrop --usdc N`` can mint to any wallet. Nothing here may run against a real cluster:
every entry point refuses a non-loopback RPC.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.system_program import CreateAccountParams, create_account
from spl.token.constants import ASSOCIATED_TOKEN_PROGRAM_ID, TOKEN_PROGRAM_ID
from spl.token.instructions import (
    InitializeMintParams,
    MintToCheckedParams,
    create_idempotent_associated_token_account,
    get_associated_token_address,
    initialize_mint,
    mint_to_checked,
)

from registry.client import RegistryClient, RegistryError, is_local_rpc
from registry.keys import load_keypair, load_or_create_keypair

DECIMALS = 6
MINT_SIZE = 82
MINT_KEYPAIR = Path(".local/keys/usdc-mint.json")
MINT_AUTHORITY_KEYPAIR = Path(".local/keys/usdc-mint-authority.json")

__all__ = [
    "ASSOCIATED_TOKEN_PROGRAM_ID",
    "DECIMALS",
    "MINT_AUTHORITY_KEYPAIR",
    "MINT_KEYPAIR",
    "TOKEN_PROGRAM_ID",
    "ata",
    "ensure_ata",
    "ensure_test_usdc",
    "mint_test_usdc",
    "test_usdc_mint",
    "to_atomic",
]


def ata(owner: Pubkey, mint: Pubkey, token_program: Pubkey = TOKEN_PROGRAM_ID) -> Pubkey:
    """The associated token account of ``owner`` for ``mint``."""
    return get_associated_token_address(owner, mint, token_program)


def to_atomic(amount: Decimal | float | str, decimals: int = DECIMALS) -> int:
    """Whole tokens -> base units; refuses amounts finer than the mint's precision."""
    d = Decimal(str(amount)) * (10**decimals)
    if d != d.to_integral_value() or d <= 0:
        raise ValueError(f"{amount} is not a positive amount with at most {decimals} decimals")
    return int(d)


def test_usdc_mint(mint_keypair: Path = MINT_KEYPAIR) -> Pubkey:
    """The localnet test-USDC mint address (from its keypair file)."""
    return load_keypair(mint_keypair).pubkey()


def _local_only(client: RegistryClient) -> None:
    if not is_local_rpc(client.rpc_url):
        raise RegistryError(
            f"test USDC is for the localnet only; {client.rpc_url} is not a loopback RPC"
        )


async def ensure_test_usdc(
    client: RegistryClient,
    mint_keypair: Path = MINT_KEYPAIR,
    authority_keypair: Path = MINT_AUTHORITY_KEYPAIR,
) -> tuple[Pubkey, bool]:
    """Create the test-USDC mint if it is not on chain yet; idempotent. Returns (mint, created)."""
    _local_only(client)
    mint = load_or_create_keypair(mint_keypair)
    authority = load_or_create_keypair(authority_keypair)
    info = (await client.rpc.get_account_info(mint.pubkey())).value
    if info is not None:
        if info.owner != TOKEN_PROGRAM_ID or len(info.data) != MINT_SIZE:
            raise RegistryError(f"{mint.pubkey()} exists but is not an SPL mint")
        return mint.pubkey(), False
    await client.ensure_funded(authority)
    rent = (await client.rpc.get_minimum_balance_for_rent_exemption(MINT_SIZE)).value
    await client.send(
        [
            create_account(
                CreateAccountParams(
                    from_pubkey=authority.pubkey(),
                    to_pubkey=mint.pubkey(),
                    lamports=rent,
                    space=MINT_SIZE,
                    owner=TOKEN_PROGRAM_ID,
                )
            ),
            initialize_mint(
                InitializeMintParams(
                    decimals=DECIMALS,
                    program_id=TOKEN_PROGRAM_ID,
                    mint=mint.pubkey(),
                    mint_authority=authority.pubkey(),
                    freeze_authority=None,
                )
            ),
        ],
        [authority, mint],
    )
    return mint.pubkey(), True


async def ensure_ata(client: RegistryClient, payer: Keypair, owner: Pubkey, mint: Pubkey) -> Pubkey:
    """Create ``owner``'s token account for ``mint`` if missing (``payer`` pays the rent)."""
    account = ata(owner, mint)
    if (await client.rpc.get_account_info(account)).value is None:
        await client.send(
            [create_idempotent_associated_token_account(payer.pubkey(), owner, mint)], [payer]
        )
    return account


async def mint_test_usdc(
    client: RegistryClient,
    to: Pubkey,
    amount: Decimal | float | str,
    mint_keypair: Path = MINT_KEYPAIR,
    authority_keypair: Path = MINT_AUTHORITY_KEYPAIR,
) -> Pubkey:
    """Mint ``amount`` test USDC to ``to``'s associated token account (created if missing)."""
    _local_only(client)
    if not Path(mint_keypair).exists() or not Path(authority_keypair).exists():
        raise RegistryError(f"no test USDC mint here ({mint_keypair}): run `make up` first")
    atomic = to_atomic(amount)
    mint = load_keypair(mint_keypair).pubkey()
    authority = load_keypair(authority_keypair)
    if (await client.rpc.get_account_info(mint)).value is None:
        raise RegistryError(f"the test USDC mint {mint} is not on this chain: run `make up` first")
    await client.ensure_funded(authority)
    account = ata(to, mint)
    await client.send(
        [
            create_idempotent_associated_token_account(authority.pubkey(), to, mint),
            mint_to_checked(
                MintToCheckedParams(
                    program_id=TOKEN_PROGRAM_ID,
                    mint=mint,
                    dest=account,
                    mint_authority=authority.pubkey(),
                    amount=atomic,
                    decimals=DECIMALS,
                )
            ),
        ],
        [authority],
    )
    return account
