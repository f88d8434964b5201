"""Solana settlement: co-sign as fee payer, send, confirm; the chain reads reconciliation needs.

A thin JSON-RPC client over aiohttp (the handful of calls used here, base64 everywhere), the same
against our localnet and a real cluster.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import Message, to_bytes_versioned
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import Transaction, VersionedTransaction

from registry.usdc import ata

from .svm import ASSOCIATED_TOKEN_PROGRAM, TOKEN_2022_PROGRAM, TOKEN_PROGRAM

log = logging.getLogger("gateway.payments")
SYSTEM_PROGRAM = Pubkey.from_string("11111111111111111111111111111111")


class RpcUnavailable(Exception):
    """The RPC could not be reached or did not answer: the outcome is unknown."""


class RpcRefused(Exception):
    """The RPC answered with an error (e.g. a preflight failure): nothing landed."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


@dataclass(frozen=True)
class TxStatus:
    slot: int
    err: Any
    confirmation: str | None


class SolanaRpc:
    def __init__(self, url: str, timeout: float = 15.0) -> None:
        self.url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, method: str, *params: Any) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": list(params)}
        try:
            async with self._session.post(self.url, json=body) as resp:
                if resp.status != 200:
                    raise RpcUnavailable(f"{self.url} answered HTTP {resp.status} to {method}")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise RpcUnavailable(f"cannot reach the Solana RPC at {self.url}: {exc!r}") from None
        if not isinstance(data, dict):
            raise RpcUnavailable(f"{self.url} answered {method} with non-JSON-RPC data")
        if "error" in data:
            err = data["error"] or {}
            raise RpcRefused(int(err.get("code", 0)), str(err.get("message", "")), err.get("data"))
        return data.get("result")

    # ---------------------------------------------------------------- reads

    async def account(self, key: Pubkey) -> dict[str, Any] | None:
        value = (await self.call("getAccountInfo", str(key),
                                 {"encoding": "base64", "commitment": "confirmed"}))["value"]
        if value is None:
            return None
        return {"owner": Pubkey.from_string(value["owner"]), "lamports": value["lamports"],
                "data": base64.b64decode(value["data"][0])}

    async def balance(self, key: Pubkey) -> int:
        return int((await self.call("getBalance", str(key), {"commitment": "confirmed"}))["value"])

    async def token_balance(self, account: Pubkey) -> int | None:
        try:
            value = (await self.call("getTokenAccountBalance", str(account),
                                     {"commitment": "confirmed"}))["value"]
        except RpcRefused:
            return None
        return int(value["amount"])

    async def latest_blockhash(self) -> Hash:
        value = (await self.call("getLatestBlockhash", {"commitment": "confirmed"}))["value"]
        return Hash.from_string(value["blockhash"])

    async def blockhash_valid(self, blockhash: Hash) -> bool:
        return bool((await self.call("isBlockhashValid", str(blockhash),
                                     {"commitment": "confirmed"}))["value"])

    async def statuses(self, sigs: list[Signature]) -> list[TxStatus | None]:
        values = (await self.call("getSignatureStatuses", [str(s) for s in sigs],
                                  {"searchTransactionHistory": True}))["value"]
        return [None if v is None else TxStatus(v.get("slot", 0), v.get("err"),
                                                v.get("confirmationStatus"))
                for v in values]

    # ---------------------------------------------------------------- writes

    async def send(self, tx: VersionedTransaction | Transaction) -> Signature:
        """Send with preflight (the RPC simulates first; a refusal means nothing landed)."""
        raw = base64.b64encode(bytes(tx)).decode()
        sig = await self.call("sendTransaction", raw, {"encoding": "base64",
                                                       "preflightCommitment": "confirmed",
                                                       "maxRetries": 0})
        return Signature.from_string(sig)

    async def wait(self, sig: Signature, timeout: float) -> TxStatus | None:
        """The transaction's status once confirmed, or None if not seen within ``timeout``."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            (status,) = await self.statuses([sig])
            if status is not None and (status.err is not None or status.confirmation
                                       in ("confirmed", "finalized")):
                return status
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def airdrop(self, to: Pubkey, lamports: int) -> None:
        sig = Signature.from_string(await self.call("requestAirdrop", str(to), lamports))
        await self.wait(sig, 30)

    async def send_and_confirm(self, instructions: list[Any], signers: list[Keypair],
                               timeout: float = 30.0) -> Signature:
        blockhash = await self.latest_blockhash()
        message = Message.new_with_blockhash(instructions, signers[0].pubkey(), blockhash)
        sig = await self.send(Transaction(signers, message, blockhash))
        status = await self.wait(sig, timeout)
        if status is None or status.err is not None:
            raise RpcRefused(0, f"transaction {sig} did not confirm: "
                                f"{status.err if status else 'timeout'}")
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
    if acc["owner"] not in (TOKEN_PROGRAM, TOKEN_2022_PROGRAM) or len(acc["data"]) < 82:
        raise RuntimeError(f"payment asset {mint} is not an SPL token mint (owner {acc['owner']})")
    return MintInfo(mint, acc["owner"], acc["data"][44])


async def ensure_token_account(rpc: SolanaRpc, payer: Keypair, owner: Pubkey,
                               mint: MintInfo) -> Pubkey:
    """The pay-to wallet's token account must exist for the client's TransferChecked to land."""
    from solders.instruction import AccountMeta, Instruction

    account = ata(owner, mint.mint, mint.token_program)
    if await rpc.account(account) is None:
        ix = Instruction(ASSOCIATED_TOKEN_PROGRAM, bytes([1]), [  # CreateIdempotent
            AccountMeta(payer.pubkey(), True, True), AccountMeta(account, False, True),
            AccountMeta(owner, False, False), AccountMeta(mint.mint, False, False),
            AccountMeta(SYSTEM_PROGRAM, False, False),
            AccountMeta(mint.token_program, False, False)])
        await rpc.send_and_confirm([ix], [payer])
        log.info("created the pay-to token account %s (%s of %s)", account, mint.mint, owner)
    return account
