"""Solana settlement: co-sign as fee payer, send, confirm; the chain reads reconciliation needs.

The calls go through solana-py's ``AsyncClient`` (the same against our localnet and a real
cluster). What settlement must tell apart is only whether the RPC answered: ``RpcRefused`` (it
answered with an error, e.g. a preflight failure: nothing landed) or ``RpcUnavailable`` (no
answer: the outcome is unknown), so every call sorts solana-py's errors into those two.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import httpx
from solana.exceptions import SolanaRpcException
from solana.rpc.async_api import AsyncClient
from solana.rpc.commitment import Confirmed
from solana.rpc.core import RPCException
from solana.rpc.types import TxOpts
from solders.account import Account
from solders.hash import Hash
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import Message, VersionedMessage, to_bytes_versioned
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import Transaction, VersionedTransaction
from solders.transaction_status import TransactionConfirmationStatus, TransactionStatus
from spl.token.instructions import create_idempotent_associated_token_account

from registry.usdc import ata

from .svm import TOKEN_2022_PROGRAM, TOKEN_PROGRAM

log = logging.getLogger("gateway.payments")
T = TypeVar("T")
_LANDED = (TransactionConfirmationStatus.Confirmed, TransactionConfirmationStatus.Finalized)


class RpcUnavailable(Exception):
    """The RPC could not be reached or did not answer: the outcome is unknown."""


class RpcRefused(Exception):
    """The RPC answered with an error (e.g. a preflight failure): nothing landed. ``logs``: the
    simulation's program logs, when the refusal carries them."""

    def __init__(self, message: str, logs: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.logs = list(logs)


class SolanaRpc:
    """The handful of calls settlement makes, on one ``AsyncClient`` (commitment confirmed)."""

    def __init__(self, url: str, timeout: float = 15.0) -> None:
        self.url = url
        self.client = AsyncClient(url, commitment=Confirmed, timeout=timeout)

    async def close(self) -> None:
        await self.client.close()

    async def _answer(self, request: Awaitable[T]) -> T:
        """``request``'s response, or the outcome sorted into RpcRefused / RpcUnavailable."""
        try:
            return await request
        except RPCException as exc:
            error = exc.args[0] if exc.args else exc
            simulation = getattr(error, "data", None)
            raise RpcRefused(
                str(getattr(error, "message", error)), getattr(simulation, "logs", None) or ()
            ) from None
        except SolanaRpcException as exc:
            raise RpcUnavailable(
                f"cannot reach the Solana RPC at {self.url}: {exc.__cause__!r}"
            ) from None
        except (TimeoutError, httpx.HTTPError, OSError) as exc:
            raise RpcUnavailable(f"cannot reach the Solana RPC at {self.url}: {exc!r}") from None

    # ---------------------------------------------------------------- reads

    async def account(self, key: Pubkey) -> Account | None:
        return (await self._answer(self.client.get_account_info(key))).value

    async def balance(self, key: Pubkey) -> int:
        return (await self._answer(self.client.get_balance(key))).value

    async def latest_blockhash(self) -> Hash:
        return (await self._answer(self.client.get_latest_blockhash())).value.blockhash

    async def blockhash_valid(self, message: VersionedMessage) -> bool:
        """Whether ``message``'s blockhash can still land (the RPC prices only such a message:
        ``getFeeForMessage`` answers null for an expired blockhash; solana-py has no
        ``isBlockhashValid``)."""
        fee = await self._answer(self.client.get_fee_for_message(message))
        return fee.value is not None

    async def statuses(self, sigs: list[Signature]) -> list[TransactionStatus | None]:
        return list(
            (
                await self._answer(
                    self.client.get_signature_statuses(sigs, search_transaction_history=True)
                )
            ).value
        )

    # ---------------------------------------------------------------- writes

    async def send(self, tx: VersionedTransaction | Transaction) -> Signature:
        """Send with preflight (the RPC simulates first; a refusal means nothing landed)."""
        opts = TxOpts(skip_confirmation=True, preflight_commitment=Confirmed, max_retries=0)
        return (await self._answer(self.client.send_raw_transaction(bytes(tx), opts))).value

    async def wait(self, sig: Signature, timeout: float) -> TransactionStatus | None:
        """The transaction's status once confirmed (or failed), or None if not seen within
        ``timeout`` (solana-py's ``confirm_transaction`` raises instead, after its own timeout)."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            (status,) = await self.statuses([sig])
            if status is not None and (
                status.err is not None or status.confirmation_status in _LANDED
            ):
                return status
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def airdrop(self, to: Pubkey, lamports: int) -> None:
        sig = (await self._answer(self.client.request_airdrop(to, lamports))).value
        await self.wait(sig, 30)

    async def send_and_confirm(
        self, instructions: list[Instruction], signers: list[Keypair], timeout: float = 30.0
    ) -> Signature:
        blockhash = await self.latest_blockhash()
        message = Message.new_with_blockhash(instructions, signers[0].pubkey(), blockhash)
        sig = await self.send(Transaction(signers, message, blockhash))
        status = await self.wait(sig, timeout)
        if status is None or status.err is not None:
            raise RpcRefused(
                f"transaction {sig} did not confirm: {status.err if status else 'timeout'}"
            )
        return sig


def cosign(tx: VersionedTransaction, fee_payer: Keypair) -> VersionedTransaction:
    """Put the fee payer's signature in slot 0 (deterministic: same message, same signature)."""
    sig = fee_payer.sign_message(to_bytes_versioned(tx.message))
    return VersionedTransaction.populate(tx.message, [sig, *list(tx.signatures)[1:]])


@dataclass(frozen=True)
class MintInfo:
    mint: Pubkey
    token_program: Pubkey
    decimals: int


async def read_mint(rpc: SolanaRpc, mint: Pubkey) -> MintInfo:
    acc = await rpc.account(mint)
    if acc is None:
        raise RuntimeError(f"payment asset {mint} is not on the chain at {rpc.url}")
    if acc.owner not in (TOKEN_PROGRAM, TOKEN_2022_PROGRAM) or len(acc.data) < 82:
        raise RuntimeError(f"payment asset {mint} is not an SPL token mint (owner {acc.owner})")
    return MintInfo(mint, acc.owner, acc.data[44])


async def ensure_token_account(
    rpc: SolanaRpc, payer: Keypair, owner: Pubkey, mint: MintInfo
) -> Pubkey:
    """The pay-to wallet's token account must exist for the client's TransferChecked to land."""
    account = ata(owner, mint.mint, mint.token_program)
    if await rpc.account(account) is None:
        ix = create_idempotent_associated_token_account(
            payer.pubkey(), owner, mint.mint, mint.token_program
        )
        await rpc.send_and_confirm([ix], [payer])
        log.info("created the pay-to token account %s (%s of %s)", account, mint.mint, owner)
    return account
