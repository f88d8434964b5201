"""The embedded localnet, driven by the real solana-py AsyncClient over loopback HTTP.

Each test gets its own in-process localnet on a free port with a fresh ledger directory; a fake
clock (wall clock + offset) lets blockhash expiry be tested without waiting a minute.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from solana.rpc.async_api import AsyncClient
from solana.rpc.core import RPCException
from solana.rpc.types import MemcmpOpts, TokenAccountOpts, TxOpts
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.litesvm import LiteSVM
from solders.message import Message
from solders.pubkey import Pubkey
from solders.rpc.errors import SendTransactionPreflightFailureMessage
from solders.system_program import CreateAccountParams, TransferParams, create_account, transfer
from solders.sysvar import CLOCK
from solders.token import ID as TOKEN_PROGRAM_ID
from solders.transaction import Transaction
from spl.token import instructions as spl

from registry.localnet import Localnet, start_localnet
from registry.localnet.deploy import (
    BPF_LOADER_UPGRADEABLE_ID,
    DeployError,
    RpcTarget,
    deploy_program,
    programdata_address,
)
from registry.localnet.rpc import MAX_AIRDROP_LAMPORTS, MAX_BATCH_REQUESTS
from tests.support.clock import Clock
from tests.support.program_builds import another_build

ROOT = Path(__file__).resolve().parent.parent
REGISTRY_SO = ROOT / "programs" / "registry" / "registry.so"
REGISTRY_KEYPAIR = ROOT / "programs" / "registry" / "program-keypair.json"
SOL = 1_000_000_000


@dataclass
class Net:
    handle: Localnet
    client: AsyncClient
    ledger: Path
    clock: Clock

    @property
    def url(self) -> str:
        return self.handle.url


@pytest_asyncio.fixture
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    clock = Clock()
    handle = await start_localnet(0, tmp_path / "ledger", now=clock)
    client = AsyncClient(handle.url)
    try:
        yield Net(handle, client, tmp_path / "ledger", clock)
    finally:
        await client.close()
        await handle.close()


async def funded(client: AsyncClient, lamports: int = 10 * SOL) -> Keypair:
    kp = Keypair()
    await client.request_airdrop(kp.pubkey(), lamports)
    return kp


async def signed(
    client: AsyncClient, ixs: list[Instruction], payer: Keypair, *others: Keypair
) -> Transaction:
    bh = (await client.get_latest_blockhash()).value.blockhash
    return Transaction([payer, *others], Message(ixs, payer.pubkey()), bh)


def pay(src: Keypair, dst: Pubkey, lamports: int) -> Instruction:
    return transfer(TransferParams(from_pubkey=src.pubkey(), to_pubkey=dst, lamports=lamports))


async def is_valid(url: str, blockhash: object) -> bool:
    resp = await raw_rpc(
        url,
        json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "isBlockhashValid", "params": [str(blockhash)]}
        ),
    )
    return resp["result"]["value"]  # type: ignore[index]


async def raw_rpc(url: str, body: bytes | str) -> object:
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=headers) as r:
        assert r.status == 200
        return await r.json()


def token_elf() -> bytes:
    """A real SBF program to deploy: the SPL Token ELF that LiteSVM bundles."""
    return bytes(LiteSVM().get_account(TOKEN_PROGRAM_ID).data)


# ------------------------------------------------------------------------------------- basics
async def test_airdrop_transfer_status_and_transaction(net: Net) -> None:
    c = net.client
    alice, bob = await funded(c), Keypair()
    assert (await c.get_balance(alice.pubkey())).value == 10 * SOL

    sig = (await c.send_transaction(await signed(c, [pay(alice, bob.pubkey(), SOL)], alice))).value
    assert (await c.get_balance(bob.pubkey())).value == SOL
    assert (await c.get_balance(alice.pubkey())).value == 9 * SOL - 5000

    status = (await c.get_signature_statuses([sig])).value[0]
    assert status is not None and status.err is None
    assert str(status.confirmation_status).endswith("Finalized")
    await c.confirm_transaction(
        sig, last_valid_block_height=(await c.get_latest_blockhash()).value.last_valid_block_height
    )

    tx = (await c.get_transaction(sig)).value
    assert tx is not None and tx.transaction.meta is not None
    meta = tx.transaction.meta
    assert meta.err is None and meta.fee == 5000 and meta.compute_units_consumed == 150
    assert meta.pre_balances[:2] == [10 * SOL, 0] and meta.post_balances[:2] == [
        9 * SOL - 5000,
        SOL,
    ]
    assert any("success" in line for line in meta.log_messages or [])
    b64 = (
        await c.get_transaction(sig, encoding="base64", max_supported_transaction_version=0)
    ).value
    assert b64 is not None and b64.transaction.meta.fee == 5000
    unknown = (await c.get_signature_statuses([Keypair().sign_message(b"x")])).value
    assert unknown == [None]


async def test_replayed_transaction_is_refused(net: Net) -> None:
    c = net.client
    alice = await funded(c)
    tx = await signed(c, [pay(alice, Keypair().pubkey(), 1000)], alice)
    await c.send_transaction(tx)
    with pytest.raises(RPCException) as err:
        await c.send_raw_transaction(bytes(tx))
    failure = err.value.args[0]
    assert isinstance(failure, SendTransactionPreflightFailureMessage)
    assert "already been processed" in failure.message
    # No second fee was charged.
    assert (await c.get_balance(alice.pubkey())).value == 10 * SOL - 1000 - 5000


async def test_expired_blockhash_is_refused(net: Net) -> None:
    c = net.client
    alice = await funded(c)
    latest = (await c.get_latest_blockhash()).value
    tx = await signed(c, [pay(alice, Keypair().pubkey(), 1000)], alice)
    assert (await is_valid(net.url, latest.blockhash)) is True
    net.clock.offset += 0.4 * 100  # 100 slots later: still valid
    assert (await is_valid(net.url, latest.blockhash)) is True
    net.clock.offset += 0.4 * 52  # past 150 slots
    assert (await c.get_block_height()).value > latest.last_valid_block_height
    assert (await is_valid(net.url, latest.blockhash)) is False
    with pytest.raises(RPCException) as err:
        await c.send_raw_transaction(bytes(tx))
    failure = err.value.args[0]
    assert isinstance(failure, SendTransactionPreflightFailureMessage)
    assert failure.message == "Transaction simulation failed: Blockhash not found"
    assert "BlockhashNotFound" in str(failure.data.err)
    # A fresh blockhash works.
    await c.send_transaction(await signed(c, [pay(alice, Keypair().pubkey(), 1000)], alice))


async def test_failing_transaction_is_a_preflight_failure(net: Net) -> None:
    c = net.client
    alice = await funded(c, SOL)
    tx = await signed(c, [pay(alice, Keypair().pubkey(), 5 * SOL)], alice)
    with pytest.raises(RPCException) as err:
        await c.send_transaction(tx)
    failure = err.value.args[0]
    assert isinstance(failure, SendTransactionPreflightFailureMessage)
    assert failure.message == (
        "Transaction simulation failed: Error processing Instruction 0: custom program error: 0x1"
    )
    assert any("insufficient lamports" in line for line in failure.data.logs)
    assert failure.data.units_consumed == 150
    assert (await c.get_balance(alice.pubkey())).value == SOL  # preflight charges no fee

    sim = (await c.simulate_transaction(tx)).value
    assert sim.err is not None and any("insufficient lamports" in line for line in sim.logs)

    # With skipPreflight the transaction lands as failed and pays its fee, like on a cluster.
    sig = (await c.send_raw_transaction(bytes(tx), TxOpts(skip_preflight=True))).value
    status = (await c.get_signature_statuses([sig])).value[0]
    assert status is not None and status.err is not None
    assert (await c.get_balance(alice.pubkey())).value == SOL - 5000
    assert (await c.get_transaction(sig)).value.transaction.meta.err is not None


async def test_simulate_success_has_logs_and_units(net: Net) -> None:
    c = net.client
    alice = await funded(c)
    tx = await signed(c, [pay(alice, Keypair().pubkey(), SOL)], alice)
    sim = (await c.simulate_transaction(tx, sig_verify=True)).value
    assert sim.err is None and sim.units_consumed == 150 and sim.logs
    assert (await c.get_balance(alice.pubkey())).value == 10 * SOL  # nothing committed


# --------------------------------------------------------------------------- accounts, tokens
async def test_program_accounts_filters_and_token_queries(net: Net) -> None:
    c = net.client
    payer = await funded(c)
    mint, owner_a, owner_b = Keypair(), Keypair(), Keypair()
    rent_mint = (await c.get_minimum_balance_for_rent_exemption(82)).value
    rent_acct = (await c.get_minimum_balance_for_rent_exemption(165)).value
    ixs = [
        create_account(
            CreateAccountParams(
                from_pubkey=payer.pubkey(),
                to_pubkey=mint.pubkey(),
                lamports=rent_mint,
                space=82,
                owner=TOKEN_PROGRAM_ID,
            )
        ),
        spl.initialize_mint(
            spl.InitializeMintParams(
                decimals=6,
                program_id=TOKEN_PROGRAM_ID,
                mint=mint.pubkey(),
                mint_authority=payer.pubkey(),
            )
        ),
    ]
    await c.send_transaction(await signed(c, ixs, payer, mint))
    accounts = {}
    for owner, amount in ((owner_a, 1_500_000), (owner_b, 7)):
        acct = Keypair()
        ixs = [
            create_account(
                CreateAccountParams(
                    from_pubkey=payer.pubkey(),
                    to_pubkey=acct.pubkey(),
                    lamports=rent_acct,
                    space=165,
                    owner=TOKEN_PROGRAM_ID,
                )
            ),
            spl.initialize_account(
                spl.InitializeAccountParams(
                    program_id=TOKEN_PROGRAM_ID,
                    account=acct.pubkey(),
                    mint=mint.pubkey(),
                    owner=owner.pubkey(),
                )
            ),
            spl.mint_to(
                spl.MintToParams(
                    program_id=TOKEN_PROGRAM_ID,
                    mint=mint.pubkey(),
                    dest=acct.pubkey(),
                    mint_authority=payer.pubkey(),
                    amount=amount,
                )
            ),
        ]
        sig = (await c.send_transaction(await signed(c, ixs, payer, acct))).value
        accounts[owner.pubkey()] = acct.pubkey()
    post_tok = (await c.get_transaction(sig)).value.transaction.meta.post_token_balances
    assert post_tok and post_tok[0].ui_token_amount.amount == "7"

    everything = (await c.get_program_accounts(TOKEN_PROGRAM_ID, encoding="base64")).value
    assert {a.pubkey for a in everything} == {mint.pubkey(), *accounts.values()}
    only_accounts = (
        await c.get_program_accounts(TOKEN_PROGRAM_ID, encoding="base64", filters=[165])
    ).value
    assert {a.pubkey for a in only_accounts} == set(accounts.values())
    for enc in ("base58", "base64"):
        raw = (
            str(owner_a.pubkey())
            if enc == "base58"
            else base64.b64encode(bytes(owner_a.pubkey())).decode()
        )
        resp = await raw_rpc(
            net.url,
            json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "getProgramAccounts",
                    "params": [
                        str(TOKEN_PROGRAM_ID),
                        {
                            "encoding": "base64",
                            "filters": [
                                {"dataSize": 165},
                                {"memcmp": {"offset": 32, "bytes": raw, "encoding": enc}},
                            ],
                        },
                    ],
                }
            ),
        )
        assert [a["pubkey"] for a in resp["result"]] == [str(accounts[owner_a.pubkey()])]
    by_memcmp = (
        await c.get_program_accounts(
            TOKEN_PROGRAM_ID,
            encoding="base64",
            filters=[MemcmpOpts(offset=32, bytes=str(owner_b.pubkey()))],
        )
    ).value
    assert [a.pubkey for a in by_memcmp] == [accounts[owner_b.pubkey()]]
    with_ctx = await raw_rpc(
        net.url,
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "getProgramAccounts",
                "params": [
                    str(TOKEN_PROGRAM_ID),
                    {"encoding": "base64", "withContext": True, "filters": [{"dataSize": 82}]},
                ],
            }
        ),
    )
    assert [a["pubkey"] for a in with_ctx["result"]["value"]] == [str(mint.pubkey())]
    assert "slot" in with_ctx["result"]["context"]

    bal = (await c.get_token_account_balance(accounts[owner_a.pubkey()])).value
    assert (bal.amount, bal.decimals, bal.ui_amount_string) == ("1500000", 6, "1.5")
    supply = (await c.get_token_supply(mint.pubkey())).value
    assert supply.amount == "1500007"
    mine = (
        await c.get_token_accounts_by_owner_json_parsed(
            owner_a.pubkey(), TokenAccountOpts(mint=mint.pubkey())
        )
    ).value
    assert (
        len(mine) == 1 and mine[0].account.data.parsed["info"]["tokenAmount"]["amount"] == "1500000"
    )
    multi = (await c.get_multiple_accounts([mint.pubkey(), Keypair().pubkey()])).value
    assert multi[0] is not None and multi[0].owner == TOKEN_PROGRAM_ID and multi[1] is None
    parsed = (await c.get_account_info_json_parsed(mint.pubkey())).value
    assert parsed.data.parsed["info"]["decimals"] == 6


async def test_cluster_info_methods_parse(net: Net) -> None:
    c = net.client
    assert await c.is_connected()
    assert (await c.get_version()).value.solana_core
    assert str((await c.get_genesis_hash()).value)
    epoch = (await c.get_epoch_info()).value
    assert epoch.absolute_slot == epoch.block_height
    assert (await c.get_minimum_balance_for_rent_exemption(0)).value == 890880
    fees = await raw_rpc(
        net.url, b'{"jsonrpc":"2.0","id":1,"method":"getRecentPrioritizationFees","params":[]}'
    )
    assert fees == {"jsonrpc": "2.0", "id": 1, "result": []}
    alice = await funded(c)
    tx = await signed(c, [pay(alice, Keypair().pubkey(), 1)], alice)
    assert (await c.get_fee_for_message(tx.message)).value == 5000
    assert (await c.get_account_info(Keypair().pubkey())).value is None


# ------------------------------------------------------------------------------------ time
async def test_clock_follows_wall_time(net: Net) -> None:
    c = net.client
    s0 = (await c.get_slot()).value
    await asyncio.sleep(0.9)
    s1 = (await c.get_slot()).value
    assert 2 <= s1 - s0 <= 6
    alice = await funded(c)  # a transaction runs against the refreshed Clock sysvar
    acc = (await c.get_account_info(CLOCK)).value
    slot, _, _, _, unix_ts = struct.unpack("<QqQQq", bytes(acc.data))
    assert slot >= s1 and abs(unix_ts - time.time()) <= 2
    assert alice is not None


# --------------------------------------------------------------------------------- restart
async def test_restart_keeps_accounts_history_and_programs(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    so, kp_path, program = tmp_path / "token.so", tmp_path / "program.json", Keypair()
    so.write_bytes(token_elf())
    kp_path.write_text(json.dumps(list(bytes(program))))
    net = await start_localnet(0, ledger, [(so, kp_path)])
    try:
        async with AsyncClient(net.url) as c:
            alice, bob = await funded(c), Keypair()
            tx = await signed(c, [pay(alice, bob.pubkey(), 2 * SOL)], alice)
            sig = (await c.send_transaction(tx)).value
    finally:
        await net.close()

    net = await start_localnet(0, ledger, [(so, kp_path)])  # program already there: not redeployed
    try:
        async with AsyncClient(net.url) as c:
            assert (await c.get_balance(bob.pubkey())).value == 2 * SOL
            assert (await c.get_balance(alice.pubkey())).value == 8 * SOL - 5000
            assert (await c.get_signature_statuses([sig])).value[0] is not None
            assert (await c.get_transaction(sig)).value.transaction.meta.fee == 5000
            with pytest.raises(RPCException):  # still inside the blockhash window: a replay
                await c.send_raw_transaction(bytes(tx))
            owned = (
                await c.get_program_accounts(BPF_LOADER_UPGRADEABLE_ID, encoding="base64")
            ).value
            assert {programdata_address(program.pubkey()), program.pubkey()} <= {
                a.pubkey for a in owned
            }
            # The restored program executes (InitializeMint on the deployed token program).
            mint = Keypair()
            rent = (await c.get_minimum_balance_for_rent_exemption(82)).value
            ixs = [
                create_account(
                    CreateAccountParams(
                        from_pubkey=alice.pubkey(),
                        to_pubkey=mint.pubkey(),
                        lamports=rent,
                        space=82,
                        owner=program.pubkey(),
                    )
                ),
                spl.initialize_mint(
                    spl.InitializeMintParams(
                        decimals=2,
                        program_id=program.pubkey(),
                        mint=mint.pubkey(),
                        mint_authority=bob.pubkey(),
                    )
                ),
            ]
            await c.send_transaction(await signed(c, ixs, alice, mint))
            assert (await c.get_account_info(mint.pubkey())).value.data[44] == 2
    finally:
        await net.close()


async def test_deploy_over_rpc_with_the_sync_client(net: Net) -> None:
    """deploy.py also works against any cluster through solana-py's Client."""
    from solana.rpc.api import Client

    payer, program = await funded(net.client, 100 * SOL), Keypair()
    target = RpcTarget(Client(net.url))
    await asyncio.to_thread(deploy_program, target, token_elf(), program, payer)
    acc = (await net.client.get_account_info(program.pubkey())).value
    assert acc is not None and acc.executable and acc.owner == BPF_LOADER_UPGRADEABLE_ID
    pd = (await net.client.get_account_info(programdata_address(program.pubkey()))).value
    assert pd is not None and bytes(pd.data[13:45]) == bytes(payer.pubkey())  # upgrade authority


async def test_deploy_bad_elf_fails_cleanly(tmp_path: Path) -> None:
    bad, kp = tmp_path / "bad.so", tmp_path / "kp.json"
    bad.write_bytes(b"\x7fELF" + b"\0" * 2000)
    kp.write_text(json.dumps(list(bytes(Keypair()))))
    with pytest.raises(DeployError):
        await start_localnet(0, tmp_path / "ledger", [(bad, kp)])
    # The ledger lock was released: the directory can be used again.
    net = await start_localnet(0, tmp_path / "ledger")
    await net.close()


async def test_registry_program_deploys_at_its_fixed_id(tmp_path: Path) -> None:
    authority = Keypair()
    net = await start_localnet(
        0, tmp_path / "ledger", [(REGISTRY_SO, REGISTRY_KEYPAIR)], upgrade_authority=authority
    )
    program_id = Pubkey.from_string("54qRqffWyocWmu78z7iGGX6humQ7JEayFouaAqzcqZ1C")
    try:
        async with AsyncClient(net.url) as c:
            acc = (await c.get_account_info(program_id)).value
            assert acc is not None and acc.executable and acc.owner == BPF_LOADER_UPGRADEABLE_ID
            # The upgrade authority is the key asked for (the one `registry init` accepts).
            pd = (await c.get_account_info(programdata_address(program_id))).value
            assert pd is not None and bytes(pd.data[12:45]) == b"\1" + bytes(authority.pubkey())
    finally:
        await net.close()


# ------------------------------------------------------------------------------- JSON-RPC
SYS = "11111111111111111111111111111111"


def req(method: object, params: object = None) -> str:
    body: dict[str, object] = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        body["params"] = params
    return json.dumps(body)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (req("noSuchMethod"), -32601),
        ("{not json", -32700),
        ("[]", -32600),
        ("42", -32600),
        ('{"jsonrpc":"2.0","id":1}', -32600),
        (req(7), -32600),
        (req("getBalance", ["not-a-pubkey"]), -32602),
        (req("getBalance", {"a": 1}), -32602),
        (req("getBalance", []), -32602),
        (req("sendTransaction", ["!!!"]), -32602),
        (req("sendTransaction", ["AAAA", {"encoding": "base64"}]), -32602),
        (
            req(
                "getProgramAccounts", [SYS, {"filters": [{"memcmp": {"offset": -1, "bytes": "x"}}]}]
            ),
            -32602,
        ),
        (req("getAccountInfo", [SYS, {"encoding": "nope"}]), -32602),
        (req("requestAirdrop", [SYS, -5]), -32602),
    ],
)
async def test_jsonrpc_errors(net: Net, body: str, code: int) -> None:
    resp = await raw_rpc(net.url, body)
    assert isinstance(resp, dict) and resp["error"]["code"] == code, resp


async def test_airdrop_cap(net: Net) -> None:
    """An airdrop up to the cap lands; one lamport more is a JSON-RPC error and moves nothing."""
    alice = await funded(net.client, MAX_AIRDROP_LAMPORTS)
    assert (await net.client.get_balance(alice.pubkey())).value == MAX_AIRDROP_LAMPORTS
    bob = Keypair()
    resp = await raw_rpc(
        net.url, req("requestAirdrop", [str(bob.pubkey()), MAX_AIRDROP_LAMPORTS + 1])
    )
    assert isinstance(resp, dict) and resp["error"]["code"] == -32602, resp
    assert "exceeds the localnet's limit" in resp["error"]["message"]
    assert (await net.client.get_balance(bob.pubkey())).value == 0


async def test_batch_size_cap(net: Net) -> None:
    """A batch of MAX_BATCH_REQUESTS is answered; one more request is refused as a whole
    (one JSON-RPC error, HTTP 200, not a 500) and none of its requests runs."""
    bob = Keypair()

    def batch(n: int) -> str:
        return json.dumps(
            [
                {
                    "jsonrpc": "2.0",
                    "id": i,
                    "method": "requestAirdrop",
                    "params": [str(bob.pubkey()), 1 + i],
                }
                for i in range(n)
            ]
        )

    resp = await raw_rpc(net.url, batch(MAX_BATCH_REQUESTS + 1))
    assert isinstance(resp, dict) and resp["error"]["code"] == -32600, resp
    assert "exceeds the limit" in resp["error"]["message"]
    assert (await net.client.get_balance(bob.pubkey())).value == 0
    resp = await raw_rpc(net.url, batch(MAX_BATCH_REQUESTS))
    assert isinstance(resp, list) and len(resp) == MAX_BATCH_REQUESTS
    assert all("result" in r for r in resp), resp[:3]
    expected = sum(1 + i for i in range(MAX_BATCH_REQUESTS))
    assert (await net.client.get_balance(bob.pubkey())).value == expected


async def test_batch_request(net: Net) -> None:
    alice = await funded(net.client)
    resp = await raw_rpc(
        net.url,
        json.dumps(
            [
                {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "getBalance",
                    "params": [str(alice.pubkey())],
                },
                {"jsonrpc": "2.0", "id": "two", "method": "getSlot"},
                {"jsonrpc": "2.0", "id": 3, "method": "bogus"},
                17,
            ]
        ),
    )
    assert isinstance(resp, list) and len(resp) == 4
    assert resp[0] == {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {"context": resp[0]["result"]["context"], "value": 10 * SOL},
    }
    assert resp[0]["result"]["context"]["apiVersion"]
    assert resp[1]["id"] == "two" and isinstance(resp[1]["result"], int)
    assert resp[2]["error"]["code"] == -32601
    assert resp[3]["error"]["code"] == -32600


async def test_garbage_never_crashes_the_server(net: Net) -> None:
    bodies = [
        b"\xff\xfe",
        b"null",
        b'"str"',
        b'{"jsonrpc":"2.0","id":{},"method":"getSlot"}',
        b'{"jsonrpc":"2.0","id":1,"method":"getTransaction","params":["1111"]}',
        b'{"jsonrpc":"2.0","id":1,"method":"simulateTransaction","params":["'
        + b"1" * 3000
        + b'"]}',
        b'{"jsonrpc":"2.0","id":1,"method":"getMultipleAccounts","params":[[1,2,3]]}',
        b'{"jsonrpc":"2.0","id":1,"method":"getSignatureStatuses","params":[null]}',
        b"[" * 100_000,
    ]
    for body in bodies:
        resp = await raw_rpc(net.url, body)
        assert "error" in resp, (body[:60], resp)
    assert await net.client.is_connected()


async def test_jsonrpc_error_for_custom_program_error_is_parseable(net: Net) -> None:
    """anchorpy reads program errors from the preflight logs; make sure they are there."""
    c = net.client
    payer = await funded(c)
    # InitializeMint on an account the token program does not own -> an instruction error.
    mint = Keypair()
    ixs = [
        create_account(
            CreateAccountParams(
                from_pubkey=payer.pubkey(),
                to_pubkey=mint.pubkey(),
                lamports=SOL,
                space=82,
                owner=Pubkey.default(),
            )
        ),
        Instruction(
            TOKEN_PROGRAM_ID,
            bytes([0, 6]) + bytes(payer.pubkey()) + bytes([0]),
            [AccountMeta(mint.pubkey(), False, True), AccountMeta(CLOCK, False, False)],
        ),
    ]
    with pytest.raises(RPCException) as err:
        await c.send_transaction(await signed(c, ixs, payer, mint))
    failure = err.value.args[0]
    assert isinstance(failure, SendTransactionPreflightFailureMessage)
    assert failure.message.startswith(
        "Transaction simulation failed: Error processing Instruction 1:"
    )
    assert any(TOKEN_PROGRAM_ID.__str__() in line for line in failure.data.logs)


def test_token_2022_accounts_are_told_apart_by_their_kind_byte() -> None:
    """Token-2022 accounts may be longer than the classic layouts: the byte after the 165-byte
    account base says mint (1) or account (2). Only the real Token-2022 program id counts."""
    from solders.account import Account
    from spl.token.constants import TOKEN_2022_PROGRAM_ID, TOKEN_PROGRAM_ID

    from registry.localnet.codec import token_kind

    def account(owner: Pubkey, data: bytes) -> Account:
        return Account(lamports=1, data=data, owner=owner, executable=False, rent_epoch=0)

    extended = bytes(165)
    assert token_kind(account(TOKEN_2022_PROGRAM_ID, extended + b"\x02" + bytes(10))) == "account"
    assert token_kind(account(TOKEN_2022_PROGRAM_ID, extended + b"\x01" + bytes(10))) == "mint"
    assert token_kind(account(TOKEN_PROGRAM_ID, bytes(165))) == "account"
    assert token_kind(account(TOKEN_PROGRAM_ID, bytes(82))) == "mint"
    assert token_kind(account(Pubkey.new_unique(), bytes(165))) is None


def test_a_ledger_with_another_build_of_the_program_is_refused_with_the_fix(
    tmp_path: Path,
) -> None:
    """A local chain made by an older checkout holds an older registry program (and accounts of
    its layout): starting on it says so and what to do, instead of failing later with errors
    that name no cause. The same build starts again as it is."""
    from registry import program as p
    from registry.localnet import LocalSvm, StaleProgram, deploy_programs

    ledger = tmp_path / "ledger"
    svm = LocalSvm(ledger)
    assert deploy_programs(svm, [(p.SO_PATH, p.PROGRAM_KEYPAIR_PATH)]) == [str(p.PROGRAM_ID)]
    assert deploy_programs(svm, [(p.SO_PATH, p.PROGRAM_KEYPAIR_PATH)]) == []  # same build
    other = another_build(tmp_path / "other.so")
    with pytest.raises(StaleProgram, match="Remove the ledger directory"):
        deploy_programs(svm, [(other, p.PROGRAM_KEYPAIR_PATH)])
    svm.close()


def test_a_ledger_of_another_build_is_told_apart(tmp_path: Path) -> None:
    from registry import program as p
    from registry.localnet import LocalSvm, deploy_programs, holds_another_build

    programs = [(p.SO_PATH, p.PROGRAM_KEYPAIR_PATH)]
    assert not holds_another_build(tmp_path / "none", programs)
    other = another_build(tmp_path / "other.so")
    svm = LocalSvm(tmp_path / "ledger")
    deploy_programs(svm, [(other, p.PROGRAM_KEYPAIR_PATH)])
    svm.close()
    assert holds_another_build(tmp_path / "ledger", programs)
    assert not holds_another_build(tmp_path / "ledger", [(other, programs[0][1])])
