"""A real EVM for the EVM rail's tests: py-evm through eth-tester, behind a JSON-RPC server on
loopback, with an EIP-3009 token compiled here from the Vyper source below (fixture
``evm_chain``), and the payment tests' gateway settling on it (fixture ``evm_gw``); registered as a
pytest plugin in tests/conftest.py. The helpers below play the payer's side.

The token is not USDC's bytecode (that would need downloading); it implements the parts of
FiatToken v2 that the gateway relies on, with the same function selectors, EIP-712 types and
events, in the same order (AuthorizationUsed, then Transfer). ``EvmChain.front_run`` puts a
transaction ahead of the gateway's, as a higher-paying mempool watcher would.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from eth_abi import encode
from eth_account import Account
from eth_tester import EthereumTester, PyEVMBackend
from eth_tester.exceptions import TransactionFailed, ValidationError
from eth_utils import keccak

from gateway.payments import evm, payer
from gateway.payments.book import PaymentBook
from gateway.payments.config import EvmPayments, PaymentsConfig
from tests.support.payments import PATH, Pay

TOKEN_SOURCE = (
    """
# pragma version ~=0.4.3
# A minimal EIP-3009 token: the parts of FiatToken v2 (USDC) the gateway uses. Tests only.

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256

event AuthorizationUsed:
    authorizer: indexed(address)
    nonce: indexed(bytes32)

balanceOf: public(HashMap[address, uint256])
authorizationState: public(HashMap[address, HashMap[bytes32, bool]])
DOMAIN_SEPARATOR: public(bytes32)
minter: address

DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
TRANSFER_TYPEHASH: constant(bytes32) = keccak256(
    "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"""
    """uint256 validBefore,bytes32 nonce)")


@deploy
def __init__(name: String[32], version: String[8]):
    self.minter = msg.sender
    self.DOMAIN_SEPARATOR = keccak256(abi_encode(
        DOMAIN_TYPEHASH, keccak256(name), keccak256(version), chain.id, self))


@external
def mint(to: address, amount: uint256):
    assert msg.sender == self.minter, "minter only"
    self.balanceOf[to] += amount
    log Transfer(sender=empty(address), receiver=to, value=amount)


@external
def transferWithAuthorization(sender: address, receiver: address, amount: uint256,
                              valid_after: uint256, valid_before: uint256, nonce: bytes32,
                              v: uint8, r: bytes32, s: bytes32):
    assert block.timestamp > valid_after, "authorization is not yet valid"
    assert block.timestamp < valid_before, "authorization is expired"
    assert not self.authorizationState[sender][nonce], "authorization is used or canceled"
    digest: bytes32 = keccak256(concat(b"\\x19\\x01", self.DOMAIN_SEPARATOR, keccak256(abi_encode(
        TRANSFER_TYPEHASH, sender, receiver, amount, valid_after, valid_before, nonce))))
    assert ecrecover(digest, v, r, s) == sender, "invalid signature"
    self.authorizationState[sender][nonce] = True
    log AuthorizationUsed(authorizer=sender, nonce=nonce)
    assert self.balanceOf[sender] >= amount, "transfer amount exceeds balance"
    self.balanceOf[sender] -= amount
    self.balanceOf[receiver] += amount
    log Transfer(sender=sender, receiver=receiver, value=amount)
"""
)

PAYER_KEY = "0x" + "42" * 32
PAYER = Account.from_key(PAYER_KEY).address
RELAYER_KEY = "0x" + "07" * 32
PAY_TO = Account.from_key("0x" + "09" * 32).address
GWEI = 10**9


def _camel(key: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), key)


def _json(v: Any) -> Any:
    """eth-tester's Python values as JSON-RPC spells them: camelCase keys, 0x-hex quantities."""
    if isinstance(v, dict):
        return {_camel(k): _json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json(x) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return hex(v)
    if isinstance(v, bytes):
        return "0x" + v.hex()
    return v


def _block(tag: Any) -> Any:
    return int(tag, 16) if isinstance(tag, str) and tag.startswith("0x") else tag


@dataclass
class EvmChain:
    """One py-evm chain and the JSON-RPC methods the gateway calls, on loopback."""

    t: EthereumTester
    server: TestServer | None = None
    url: str = ""
    token: str = ""
    # The next eth_sendRawTransaction first runs this (a mempool watcher that outbids it).
    front_run: Callable[[], None] | None = None

    @property
    def chain_id(self) -> int:
        return int(self.t.backend.chain.chain_id)

    @property
    def funder(self) -> str:
        return self.t.get_accounts()[0]

    def send(self, sender: str, to: str, data: bytes, value: int = 0) -> dict[str, Any]:
        """A transaction from one of the chain's own unlocked accounts; its receipt."""
        tx = {
            "from": sender,
            "to": to,
            "data": "0x" + data.hex(),
            "value": value,
            "gas": 500_000,
            "max_fee_per_gas": 10 * GWEI,
            "max_priority_fee_per_gas": GWEI,
        }
        return self.t.get_transaction_receipt(self.t.send_transaction(tx))

    def token_call(self, signature: str, types: list[str], args: list[Any]) -> bytes:
        return keccak(text=signature)[:4] + encode(types, args)

    def balance(self, owner: str) -> int:
        data = self.token_call("balanceOf(address)", ["address"], [owner])
        return int(
            self.t.call({"from": self.funder, "to": self.token, "data": "0x" + data.hex()}), 16
        )

    def used(self, authorizer: str, nonce: bytes) -> bool:
        data = self.token_call(
            "authorizationState(address,bytes32)", ["address", "bytes32"], [authorizer, nonce]
        )
        return (
            int(self.t.call({"from": self.funder, "to": self.token, "data": "0x" + data.hex()}), 16)
            == 1
        )

    def deploy_token(self) -> None:
        import vyper

        out = vyper.compile_code(TOKEN_SOURCE, output_formats=["bytecode"])
        code = bytes.fromhex(out["bytecode"][2:]) + encode(["string", "string"], ["USD Coin", "2"])
        tx = {
            "from": self.funder,
            "data": "0x" + code.hex(),
            "gas": 3_000_000,
            "max_fee_per_gas": 10 * GWEI,
            "max_priority_fee_per_gas": GWEI,
        }
        receipt = self.t.get_transaction_receipt(self.t.send_transaction(tx))
        assert receipt["status"] == 1 and receipt["contract_address"]
        self.token = receipt["contract_address"]

    def rpc(self, method: str, params: list[Any]) -> Any:
        t = self.t
        if method == "eth_chainId":
            return hex(self.chain_id)
        if method == "eth_blockNumber":
            return hex(t.get_block_by_number("latest")["number"])
        if method == "eth_getBlockByNumber":
            return _json(t.get_block_by_number(_block(params[0])))
        if method == "eth_maxPriorityFeePerGas":
            return hex(GWEI)
        if method == "eth_getTransactionCount":
            return hex(t.get_nonce(params[0], _block(params[1])))
        if method == "eth_estimateGas":
            return hex(t.estimate_gas(params[0]))
        if method == "eth_call":  # a node needs no 'from' for a call; eth-tester does
            return t.call({"from": self.funder, **params[0]}, _block(params[1]))
        if method == "eth_sendRawTransaction":
            if self.front_run is not None:
                run, self.front_run = self.front_run, None
                run()
            return t.send_raw_transaction(params[0])
        if method == "eth_getTransactionReceipt":
            return _json(t.get_transaction_receipt(params[0]))
        if method == "eth_getLogs":
            f = params[0]
            to_block = _block(f.get("toBlock", "latest"))
            return _json(
                t.get_logs(
                    from_block=_block(f.get("fromBlock", "0x0")),
                    to_block=None if to_block == "latest" else to_block,
                    address=f.get("address"),
                    topics=f.get("topics"),
                )
            )
        raise KeyError(method)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            result = self.rpc(body["method"], body.get("params") or [])
        except TransactionFailed as exc:
            return web.json_response(
                {
                    "jsonrpc": "2.0",
                    "id": body["id"],
                    "error": {"code": 3, "message": f"execution reverted: {exc}"},
                }
            )
        except (ValidationError, ValueError, KeyError) as exc:  # as a node answers bad requests
            return web.json_response(
                {
                    "jsonrpc": "2.0",
                    "id": body["id"],
                    "error": {"code": -32602, "message": repr(exc)},
                }
            )
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": result})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/", self.handle)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        self.url = str(self.server.make_url("/"))


@pytest.fixture
async def evm_chain() -> AsyncIterator[EvmChain]:
    c = EvmChain(EthereumTester(PyEVMBackend()))
    c.deploy_token()
    c.send(c.funder, Account.from_key(RELAYER_KEY).address, b"", value=10**18)  # relayer's gas
    c.send(
        c.funder,
        c.token,
        c.token_call("mint(address,uint256)", ["address", "uint256"], [PAYER, 10_000_000]),
    )
    await c.start()
    yield c
    assert c.server is not None
    await c.server.close()


@pytest.fixture
async def evm_gw(pay: Pay, evm_chain: EvmChain) -> AsyncIterator[Pay]:
    """The gateway with EVM settlement on the chain above (the Solana rail stays as it was)."""
    (pay.tmp / "relayer.hex").write_text(RELAYER_KEY)
    pay.config = pay.config.model_copy(
        update={
            "payments": PaymentsConfig(
                solana=pay.config.payments.solana,
                evm=EvmPayments(
                    enabled=True,
                    chain_id=evm_chain.chain_id,
                    rpc_url=evm_chain.url,
                    asset=evm_chain.token,
                    pay_to=PAY_TO,
                    relayer_key_file=pay.tmp / "relayer.hex",
                    confirm_timeout_seconds=5,
                ),
            )
        }
    )
    await pay.restart()
    yield pay


BODY = {"wallet_address": PAYER, "wallet_chain": "evm", "amount_usd": 2.5}


async def post(p: Pay, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, body, _ = await exchange(p, headers)
    return status, body


async def exchange(p: Pay, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    auth = p.auth(PAYER_KEY, PATH, "evm")
    async with p.http.post(p.url + PATH, json=BODY, headers={**auth, **(headers or {})}) as r:
        return r.status, await r.json(content_type=None), r.headers


async def authorization(
    p: Pay, chain: EvmChain, **override: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """The 402's EVM requirement, a payload the payer signed for it, and its payment header."""
    status, body, headers = await exchange(p)
    assert status == 402, body
    # The test chain's id has no x402 v1 name, so the offer is in the v2 header only.
    _, accepts = payer.requirements_from_402(headers, body)
    (req,) = [a for a in accepts if a["asset"] == chain.token]
    payload = payer.evm_authorization(PAYER_KEY, req, chain.chain_id, **override)
    name, value = payer.payment_header(2, req, payload)
    return payload, {name: value}


def submit_as(chain: EvmChain, payload: dict[str, Any]) -> Callable[[], None]:
    """A third party (not the relayer, not the payer) submitting this authorization itself."""
    rules = evm.EvmRules(
        chain.chain_id,
        chain.token,
        "USD Coin",
        "2",
        payload["authorization"]["to"],
        int(payload["authorization"]["value"]),
    )

    def run() -> None:
        receipt = chain.send(
            chain.t.get_accounts()[2],
            chain.token,
            evm.transfer_calldata(evm.verify(payload, rules)),
        )
        assert receipt["status"] == 1

    return run


async def state(p: Pay, chain: EvmChain) -> dict[str, Any]:
    acct = await p.ledger.get_account("evm", PAYER)
    return {
        "payer": chain.balance(PAYER),
        "pay_to": chain.balance(PAY_TO),
        "payments": await PaymentBook(p.ledger).count_by_status(),
        "credits": None if acct is None else (acct.credit_balance, acct.available_balance),
    }
