"""The paying side of x402, for the agent SDK (``GatewayClient.purchase_credits``) and tests.

``svm_transaction`` builds what the official x402 client builds for the exact scheme on Solana
(SetComputeUnitLimit, SetComputeUnitPrice, TransferChecked to ATA(payTo), a random Memo; v0
message, fee payer = ``extra.feePayer`` left unsigned in slot 0). Keyword overrides exist so tests
can build the hostile variants the gateway must refuse. ``evm_authorization`` signs an EIP-3009
TransferWithAuthorization as x402's EVM client does. ``pick_offer`` and ``payment_payload`` choose
the offer a wallet can pay among a 402's ``accepts`` and build its payload for either chain.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

from solana.rpc.async_api import AsyncClient
from solana.rpc.commitment import Confirmed
from solders.compute_budget import set_compute_unit_limit, set_compute_unit_price
from solders.hash import Hash
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.message import MessageV0, to_bytes_versioned
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from spl.token.instructions import TransferCheckedParams, transfer_checked

from registry.usdc import ata

from .svm import MEMO_PROGRAM

MINT_DECIMALS_AT = 44  # the byte of an SPL mint account that holds its decimals


async def _chain_facts(
    rpc_url: str, mint: Pubkey, blockhash: Hash | None
) -> tuple[Pubkey, int, Hash]:
    """The mint's token program and decimals, and a recent blockhash (unless given)."""
    async with AsyncClient(rpc_url, commitment=Confirmed) as client:
        account = (await client.get_account_info(mint)).value
        if account is None:
            raise RuntimeError(f"mint {mint} not found at {rpc_url}")
        if blockhash is None:
            blockhash = (await client.get_latest_blockhash()).value.blockhash
    return account.owner, account.data[MINT_DECIMALS_AT], blockhash


def token_transfer(
    owner: Pubkey, pay_to: Pubkey, mint: Pubkey, amount: int, decimals: int, token_program: Pubkey
) -> Instruction:
    """TransferChecked of ``amount`` base units of ``mint`` from ``owner``'s associated token
    account to ``pay_to``'s: the instruction an x402 exact payment on Solana makes."""
    return transfer_checked(
        TransferCheckedParams(
            program_id=token_program,
            source=ata(owner, mint, token_program),
            mint=mint,
            dest=ata(pay_to, mint, token_program),
            owner=owner,
            amount=amount,
            decimals=decimals,
        )
    )


async def svm_transaction(
    payer: Keypair,
    requirement: dict[str, Any],
    rpc_url: str,
    *,
    amount: int | None = None,
    pay_to: Pubkey | None = None,
    mint: Pubkey | None = None,
    cu_limit: int = 20_000,
    cu_price: int = 1,
    blockhash: Hash | None = None,
    memo: bytes | None = None,
    memo_accounts: list[AccountMeta] | None = None,
    authority: Pubkey | None = None,
    extra_signers: list[Keypair] | None = None,
    extra_instructions: list[Instruction] | None = None,
) -> str:
    """Base64 of the partially signed transaction (slot 0 left for the fee payer)."""
    fee_payer = Pubkey.from_string(requirement["extra"]["feePayer"])
    mint = mint or Pubkey.from_string(requirement["asset"])
    pay_to = pay_to or Pubkey.from_string(requirement["payTo"])
    token_program, decimals, blockhash = await _chain_facts(rpc_url, mint, blockhash)
    amount = (
        int(requirement.get("amount") or requirement["maxAmountRequired"])
        if amount is None
        else amount
    )
    authority = authority or payer.pubkey()
    ixs = [
        set_compute_unit_limit(cu_limit),
        set_compute_unit_price(cu_price),
        token_transfer(authority, pay_to, mint, amount, decimals, token_program),
        Instruction(
            MEMO_PROGRAM,
            memo if memo is not None else os.urandom(16).hex().encode(),
            memo_accounts or [],
        ),
        *(extra_instructions or []),
    ]
    message = MessageV0.try_compile(fee_payer, ixs, [], blockhash)
    data = to_bytes_versioned(message)
    signers = {payer.pubkey(): payer, **{k.pubkey(): k for k in extra_signers or []}}
    keys = list(message.account_keys)
    sigs = [
        signers[k].sign_message(data) if k in signers else Signature.default()
        for k in keys[: message.header.num_required_signatures]
    ]
    return base64.b64encode(bytes(VersionedTransaction.populate(message, sigs))).decode()


def evm_authorization(
    key: str | bytes,
    requirement: dict[str, Any],
    chain_id: int,
    *,
    value: int | None = None,
    to: str | None = None,
    valid_after: int | None = None,
    valid_before: int | None = None,
    token_name: str | None = None,
) -> dict[str, Any]:
    """An x402 exact EVM payload: EIP-3009 authorization signed with EIP-712."""
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    from .evm import EvmRules, typed_data

    account = Account.from_key(key)
    extra = requirement.get("extra") or {}
    now = int(time.time())
    auth = {
        "from": account.address,
        "to": to or requirement["payTo"],
        "value": int(requirement.get("amount") or requirement["maxAmountRequired"])
        if value is None
        else value,
        "validAfter": now - 600 if valid_after is None else valid_after,
        "validBefore": now + int(requirement.get("maxTimeoutSeconds", 300))
        if valid_before is None
        else valid_before,
        "nonce": os.urandom(32),
    }
    rules = EvmRules(
        chain_id,
        requirement["asset"],
        token_name or extra.get("name", ""),
        extra.get("version", ""),
        requirement["payTo"],
        0,
    )
    signed = account.sign_message(encode_typed_data(full_message=typed_data(rules, auth)))
    return {
        "signature": "0x" + bytes(signed.signature).hex(),
        "authorization": {
            **{k: str(v) for k, v in auth.items() if k != "nonce"},
            "from": auth["from"],
            "to": auth["to"],
            "nonce": "0x" + auth["nonce"].hex(),
        },
    }


def payment_header(
    version: int, requirement: dict[str, Any], payload: dict[str, Any], resource: str = ""
) -> tuple[str, str]:
    """(header name, value) carrying ``payload`` for ``requirement`` (a v2 ``accepts`` entry or
    a v1 one)."""
    if version == 1:
        body: dict[str, Any] = {
            "x402Version": 1,
            "scheme": requirement["scheme"],
            "network": requirement["network"],
            "payload": payload,
        }
        name = "X-PAYMENT"
    else:
        body = {
            "x402Version": 2,
            "accepted": requirement,
            "payload": payload,
            "resource": {"url": resource},
        }
        name = "PAYMENT-SIGNATURE"
    return name, base64.b64encode(json.dumps(body).encode()).decode()


def pick_offer(accepts: list[dict[str, Any]], chain: str) -> dict[str, Any] | None:
    """The ``exact`` offer a wallet on ``chain`` (``solana`` or ``evm``) can pay: its network
    named as in x402 v2 (CAIP-2: ``solana:…``, ``eip155:…``) or in v1 (``solana-devnet``,
    ``base``…)."""
    prefix, v1_names = (
        ("solana:", ("solana", "solana-devnet", "solana-testnet"))
        if chain == "solana"
        else ("eip155:", ("base", "base-sepolia"))
    )
    for offer in accepts:
        network = str(offer.get("network", ""))
        if offer.get("scheme") == "exact" and (network.startswith(prefix) or network in v1_names):
            return offer
    return None


async def payment_payload(
    key: Keypair | str | bytes, offer: dict[str, Any], rpc_url: str, evm_chain_id: int = 8453
) -> dict[str, Any]:
    """The x402 ``payload`` that pays ``offer`` from ``key``: a Solana key's partially signed
    transaction (blockhash and mint read from ``rpc_url``), or an EVM key's signed authorization
    (for the offer's chain id; ``evm_chain_id`` where a v1 offer names none)."""
    if isinstance(key, Keypair):
        return {"transaction": await svm_transaction(key, offer, rpc_url)}
    network = str(offer.get("network", ""))
    if network.startswith("eip155:"):
        reference = network.removeprefix("eip155:")
        if not reference.isdigit():
            raise ValueError(f"offer network {network!r}: expected eip155:<decimal chain id>")
        evm_chain_id = int(reference)
    return evm_authorization(key, offer, evm_chain_id)


def requirements_from_402(headers: Any, body: Any) -> tuple[int, list[dict[str, Any]]]:
    """(version, accepts) from a 402: the v2 header when present, else the v1 body."""
    header = headers.get("PAYMENT-REQUIRED") if headers is not None else None
    if header:
        try:
            data = json.loads(base64.b64decode(header))
        except ValueError:  # binascii.Error and JSONDecodeError are ValueErrors
            raise ValueError("the 402's PAYMENT-REQUIRED header is not base64 JSON") from None
        return 2, _offers(data)
    if isinstance(body, dict) and body.get("x402Version") == 1:
        return 1, _offers(body)
    raise ValueError("the 402 carries no x402 payment requirements")


def _offers(requirements: Any) -> list[dict[str, Any]]:
    """The entries of ``accepts`` that are objects (an offer of another shape cannot be paid)."""
    if not isinstance(requirements, dict):
        raise ValueError("the 402's payment requirements are not a JSON object")
    accepts = requirements.get("accepts") or []
    if not isinstance(accepts, list):
        raise ValueError(f"the 402's 'accepts' is {type(accepts).__name__}, not a list")
    return [offer for offer in accepts if isinstance(offer, dict)]
