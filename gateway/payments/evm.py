"""The exact scheme on EVM chains (USDC on Base): EIP-3009 ``transferWithAuthorization``.

The client signs an EIP-712 ``TransferWithAuthorization(from, to, value, validAfter, validBefore,
nonce)`` for the token contract; the gateway verifies it here (signer, recipient, exact amount,
validity window, chain and token domain) and settles by submitting the authorization from a relayer
key through the configured EVM RPC, then waits for the receipt.

Front-running: anyone who sees the authorization (in the mempool, or the client itself) may submit
it first; the gateway's own submission then reverts although the gateway was paid. x402 clients sign
``TransferWithAuthorization``, so the payee-only ``receiveWithAuthorization`` (another EIP-712
type) cannot carry their signature. Instead, before sending and after a revert, the gateway asks
the token: ``authorizationState(from, nonce)`` says whether the nonce is used, and the
``AuthorizationUsed(from, nonce)`` log, immediately followed in the same transaction by
``Transfer(from, payTo, value)`` from the token (the order FiatToken emits them), says it was used
to pay us exactly this amount. Only then is it credited; a nonce used for anything else (the payer
signed another authorization with the same nonce) is a failed payment.

Tested here against a real EVM (py-evm through eth-tester, an EIP-3009 token compiled from Vyper,
behind a JSON-RPC server on loopback): settlement, the front-run, and a nonce used elsewhere.
Settlement uses the standard JSON-RPC methods (eth_chainId, eth_getTransactionCount,
eth_estimateGas, eth_getBlockByNumber, eth_maxPriorityFeePerGas, eth_sendRawTransaction,
eth_getTransactionReceipt, eth_call, eth_getLogs, eth_blockNumber).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .x402 import PaymentInvalid

P = "invalid_exact_evm_payload"
TRANSFER_WITH_AUTHORIZATION_VRS = (
    "transferWithAuthorization("
    "address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
)
AUTHORIZATION_STATE = "authorizationState(address,bytes32)"
AUTHORIZATION_USED_EVENT = "AuthorizationUsed(address,bytes32)"
TRANSFER_EVENT = "Transfer(address,address,uint256)"
# How far back (before the gateway first saw a payment) its use is looked for: x402 clients date
# validAfter 10 minutes back, and a client may submit its own authorization before paying us.
LOOKBACK_BLOCKS = 600
# A payment must stay valid long enough to be settled (x402 uses 6 s, one Base block is 2 s).
MIN_VALIDITY_LEFT = 6
AUTH_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ],
}


@dataclass(frozen=True)
class EvmRules:
    chain_id: int
    asset: str
    token_name: str
    token_version: str
    pay_to: str
    amount: int


@dataclass(frozen=True)
class EvmPayment:
    payer: str  # checksummed
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes
    signature: bytes

    def reference(self, chain_id: int, asset: str) -> str:
        """What makes the authorization unique on chain: (token, from, nonce)."""
        return f"evm:{chain_id}:{asset.lower()}:{self.payer.lower()}:0x{self.nonce.hex()}"

    @classmethod
    def from_record(cls, authorization: dict[str, Any], signature: str) -> EvmPayment:
        """The payment as recorded at claim time (already verified then), for the reconciler."""
        a = authorization
        return cls(
            a["from"],
            a["to"],
            int(a["value"]),
            int(a["validAfter"]),
            int(a["validBefore"]),
            bytes.fromhex(a["nonce"][2:]),
            bytes.fromhex(signature[2:]),
        )


def typed_data(r: EvmRules, a: dict[str, Any]) -> dict[str, Any]:
    return {
        "types": AUTH_TYPES,
        "primaryType": "TransferWithAuthorization",
        "domain": {
            "name": r.token_name,
            "version": r.token_version,
            "chainId": r.chain_id,
            "verifyingContract": r.asset,
        },
        "message": a,
    }


def _uint(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise PaymentInvalid(f"{P}_authorization", f"authorization.{name} must be a number string")
    try:
        n = int(v, 0) if isinstance(v, str) else v
    except ValueError:
        raise PaymentInvalid(
            f"{P}_authorization", f"authorization.{name} {v!r} is not a number"
        ) from None
    if not 0 <= n < 2**256:
        raise PaymentInvalid(f"{P}_authorization", f"authorization.{name} is out of range")
    return n


def verify(payload: dict[str, Any], r: EvmRules, now: float | None = None) -> EvmPayment:
    """The authorization in ``payload``, if it pays exactly this purchase, is valid now and is
    signed by its ``from``; PaymentInvalid naming the first rule broken otherwise."""
    payment = _parse(payload)
    _check_terms(payment, r, time.time() if now is None else now)
    _check_signer(payment, r)
    return payment


def _parse(payload: dict[str, Any]) -> EvmPayment:
    """The authorization's fields, each of its type: 0x addresses, uint256s, a 32-byte nonce and
    a 65-byte (r, s, v) signature."""
    from eth_utils import is_hex_address, to_checksum_address

    auth, sig_text = payload.get("authorization"), payload.get("signature")
    if not isinstance(auth, dict) or not isinstance(sig_text, str):
        raise PaymentInvalid(
            f"{P}_authorization", "payload must carry 'authorization' and 'signature'"
        )
    frm, to = auth.get("from"), auth.get("to")
    if (
        not isinstance(frm, str)
        or not is_hex_address(frm)
        or not isinstance(to, str)
        or not is_hex_address(to)
    ):
        raise PaymentInvalid(
            f"{P}_authorization", "authorization.from and .to must be 0x addresses"
        )
    value = _uint(auth.get("value"), "value")
    after = _uint(auth.get("validAfter"), "validAfter")
    before = _uint(auth.get("validBefore"), "validBefore")
    nonce_text = auth.get("nonce")
    try:
        nonce = (
            bytes.fromhex(nonce_text[2:])
            if isinstance(nonce_text, str) and nonce_text.startswith("0x")
            else b""
        )
        sig = bytes.fromhex(sig_text[2:]) if sig_text.startswith("0x") else b""
    except ValueError:
        nonce, sig = b"", b""
    if len(nonce) != 32:
        raise PaymentInvalid(f"{P}_authorization", "authorization.nonce must be 32 bytes of 0x-hex")
    if len(sig) != 65:
        raise PaymentInvalid(
            f"{P}_signature",
            "signature must be 65 bytes of 0x-hex (r, s, v); smart-wallet "
            "signatures are not accepted",
        )
    return EvmPayment(
        to_checksum_address(frm), to_checksum_address(to), value, after, before, nonce, sig
    )


def _check_terms(p: EvmPayment, r: EvmRules, now: float) -> None:
    """It pays exactly this purchase to our address, and is valid from now until settled."""
    if p.to.lower() != r.pay_to.lower():
        raise PaymentInvalid(
            f"{P}_recipient_mismatch",
            f"the authorization pays {p.to}; this purchase pays {r.pay_to}",
        )
    if p.value != r.amount:
        raise PaymentInvalid(
            f"{P}_amount_mismatch",
            f"the authorization is for {p.value} base units; this purchase is exactly {r.amount}",
        )
    if p.valid_after > now:
        raise PaymentInvalid(
            f"{P}_authorization_valid_after",
            f"the authorization is not valid before {p.valid_after} (now {int(now)})",
        )
    if p.valid_before < now + MIN_VALIDITY_LEFT:
        raise PaymentInvalid(
            f"{P}_authorization_valid_before",
            "the authorization expired or expires too soon "
            f"(validBefore {p.valid_before}, now {int(now)})",
        )


def _check_signer(p: EvmPayment, r: EvmRules) -> None:
    """The EIP-712 signature over this chain's and token's domain recovers to ``from``."""
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    message = {
        "from": p.payer,
        "to": p.to,
        "value": p.value,
        "validAfter": p.valid_after,
        "validBefore": p.valid_before,
        "nonce": p.nonce,
    }
    try:
        signable = encode_typed_data(full_message=typed_data(r, message))
        signer = Account.recover_message(signable, signature=p.signature)
    except Exception as exc:  # noqa: BLE001 - eth_keys raises assorted types for bad r/s/v
        raise PaymentInvalid(f"{P}_signature", f"the signature does not recover: {exc}") from None
    if signer.lower() != p.payer.lower():
        raise PaymentInvalid(
            f"{P}_signature",
            f"the authorization is signed by {signer}, not by {p.payer} (wrong chain, "
            "token or amount signed?)",
        )


def transfer_calldata(p: EvmPayment) -> bytes:
    from eth_abi import encode
    from eth_utils import keccak

    selector = keccak(text=TRANSFER_WITH_AUTHORIZATION_VRS)[:4]
    v = p.signature[64] if p.signature[64] >= 27 else p.signature[64] + 27
    return selector + encode(
        [
            "address",
            "address",
            "uint256",
            "uint256",
            "uint256",
            "bytes32",
            "uint8",
            "bytes32",
            "bytes32",
        ],
        [
            p.payer,
            p.to,
            p.value,
            p.valid_after,
            p.valid_before,
            p.nonce,
            v,
            p.signature[:32],
            p.signature[32:64],
        ],
    )


def _selector(signature: str) -> bytes:
    from eth_utils import keccak

    return keccak(text=signature)[:4]


def _topic(signature: str) -> str:
    from eth_utils import keccak

    return "0x" + keccak(text=signature).hex()


def _address_topic(address: str) -> str:
    return "0x" + "00" * 12 + address.lower()[2:]


def paid_by(receipt: dict[str, Any], used_log: dict[str, Any], asset: str, p: EvmPayment) -> bool:
    """True when ``used_log`` (AuthorizationUsed(p.payer, p.nonce)) is directly followed, in its
    successful transaction, by the token's Transfer(p.payer, p.to, p.value): the authorization
    paid us. Adjacency matters: a transaction may use several authorizations."""
    if int(receipt.get("status", "0x0"), 16) != 1:
        return False
    index = int(used_log["logIndex"], 16) + 1
    for log in receipt.get("logs") or []:
        if int(log["logIndex"], 16) != index:
            continue
        topics = [t.lower() for t in log.get("topics") or []]
        return (
            log["address"].lower() == asset.lower()
            and topics == [_topic(TRANSFER_EVENT), _address_topic(p.payer), _address_topic(p.to)]
            and int(log.get("data") or "0x0", 16) == p.value
        )
    return False


class EvmUnavailable(Exception):
    """No answer from the EVM RPC: nothing was sent (``sent`` False) or the outcome is unknown."""

    def __init__(self, message: str, sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


class EvmSettler:
    """Submits authorizations from a relayer key, waits for their receipts, and finds who used an
    authorization when the relayer's own submission was beaten to it."""

    def __init__(
        self, rpc_url: str | None, relayer_key_file: Path, chain_id: int, timeout: float = 60.0
    ) -> None:
        self.rpc_url = rpc_url
        self.relayer_key_file = relayer_key_file
        self.chain_id = chain_id
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()  # one relayer nonce at a time

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, *params: Any) -> Any:
        if not self.rpc_url:
            raise EvmUnavailable("no EVM RPC configured (payments.evm.rpc_url)")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": list(params)}
        try:
            async with self._session.post(self.rpc_url, json=body) as resp:
                data = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise EvmUnavailable(f"cannot reach the EVM RPC at {self.rpc_url}: {exc!r}") from None
        if "error" in data:
            raise EvmUnavailable(f"EVM RPC refused {method}: {data['error']}")
        return data.get("result")

    def _relayer(self) -> Any:
        from eth_account import Account

        try:
            key = Path(self.relayer_key_file).read_text().strip()
        except OSError as exc:
            raise EvmUnavailable(f"no relayer key ({self.relayer_key_file}): {exc}") from None
        return Account.from_key(key)

    async def submit(self, asset: str, p: EvmPayment) -> str:
        """Sign and send the transferWithAuthorization call; returns the transaction hash.

        Raises EvmUnavailable(sent=False) when nothing reached the chain."""
        relayer = self._relayer()
        async with self._lock:
            chain = int(await self.call("eth_chainId"), 16)
            if chain != self.chain_id:
                raise EvmUnavailable(f"the EVM RPC is chain {chain}, configured {self.chain_id}")
            data = "0x" + transfer_calldata(p).hex()
            call = {"from": relayer.address, "to": asset, "data": data}
            gas = int(await self.call("eth_estimateGas", call), 16)
            nonce = int(await self.call("eth_getTransactionCount", relayer.address, "pending"), 16)
            block = await self.call("eth_getBlockByNumber", "latest", False)
            base_fee = int(block.get("baseFeePerGas", "0x0"), 16)
            tip = int(await self.call("eth_maxPriorityFeePerGas"), 16)
            tx = {
                "type": 2,
                "chainId": self.chain_id,
                "nonce": nonce,
                "to": asset,
                "data": data,
                "value": 0,
                "gas": gas * 12 // 10,
                "maxPriorityFeePerGas": tip,
                "maxFeePerGas": 2 * base_fee + tip,
            }
            signed = relayer.sign_transaction(tx)
            raw = "0x" + bytes(signed.raw_transaction).hex()
            try:
                return str(await self.call("eth_sendRawTransaction", raw))
            except EvmUnavailable as exc:
                raise EvmUnavailable(str(exc), sent=True) from None

    async def block_number(self) -> int:
        return int(await self.call("eth_blockNumber"), 16)

    async def authorization_used(self, asset: str, p: EvmPayment) -> bool:
        """The token's ``authorizationState(from, nonce)``: used (or canceled) already?"""
        from eth_abi import encode

        data = _selector(AUTHORIZATION_STATE) + encode(["address", "bytes32"], [p.payer, p.nonce])
        out = await self.call("eth_call", {"to": asset, "data": "0x" + data.hex()}, "latest")
        return int(out or "0x0", 16) != 0

    async def find_use(self, asset: str, p: EvmPayment, from_block: int) -> str | None:
        """The transaction that used this authorization to pay ``p.to`` exactly ``p.value``, from
        ``from_block`` on; None when it was not used, or used otherwise."""
        logs = await self.call(
            "eth_getLogs",
            {
                "address": asset,
                "fromBlock": hex(max(0, from_block)),
                "toBlock": "latest",
                "topics": [
                    _topic(AUTHORIZATION_USED_EVENT),
                    _address_topic(p.payer),
                    "0x" + p.nonce.hex(),
                ],
            },
        )
        for log in logs or []:
            receipt = await self.call("eth_getTransactionReceipt", log["transactionHash"])
            if receipt is not None and paid_by(receipt, log, asset, p):
                return str(log["transactionHash"])
        return None

    async def receipt(self, tx_hash: str, timeout: float | None = None) -> dict[str, Any] | None:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            r = await self.call("eth_getTransactionReceipt", tx_hash)
            if r is not None or time.monotonic() >= deadline:
                return r
            await asyncio.sleep(1.0)
