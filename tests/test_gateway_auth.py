"""Wallet-signature auth: every check in verify_request, the replay guard, and the middleware
through a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from eth_account import Account
from solders.keypair import Keypair

from gateway.auth import (
    DEFAULT_EXEMPT_PATHS,
    SAFE_REPEAT_SECONDS,
    AuthError,
    Claim,
    MemoryReplayGuard,
    Wallet,
    is_exempt,
    sign_request,
    signed_message,
    verify_request,
    wallet_auth_middleware,
)
from gateway.ledger import Ledger
from gateway.ledger.signatures import LedgerReplayGuard

pytestmark = pytest.mark.fast  # unit tests: no process, no model (make test-fast)

NOW = 1_700_000_000
PATH = "/v1/webrtc/token"
EVM_KEY = "0x" + "11" * 32
EVM_ADDRESS = Account.from_key(EVM_KEY).address


@pytest.fixture
def kp() -> Keypair:
    return Keypair.from_seed(bytes(range(32)))


def fails(code: str, method: str, path: str, headers: dict[str, str], now: float = NOW) -> str:
    with pytest.raises(AuthError) as ei:
        verify_request(method, path, headers, now)
    assert ei.value.code == code, str(ei.value)
    return str(ei.value)


# ---------------------------------------------------------------- happy paths


def test_solana_happy_path(kp: Keypair) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    assert h["Authorization"].startswith("solana:")
    w = verify_request("POST", PATH, h, NOW)
    assert w == Wallet(str(kp.pubkey()), "solana")
    assert w.expires_at == NOW + 30 and w.signature_id


def test_evm_happy_path() -> None:
    h = sign_request("POST", PATH, EVM_KEY, "evm", NOW)
    assert h["Authorization"].startswith("evm:0x") and len(h["Authorization"]) == 4 + 2 + 130
    assert verify_request("POST", PATH, h, NOW) == Wallet(EVM_ADDRESS, "evm")


def test_message_format_and_query_stripped(kp: Keypair) -> None:
    assert (
        signed_message("post", "/v1/webrtc/token?x=1", 1700000000)
        == b"POST\n/v1/webrtc/token\n1700000000"
    )
    h = sign_request("GET", "/v1/account/sessions?limit=5", kp, "solana", NOW)
    verify_request("GET", "/v1/account/sessions", h, NOW)
    verify_request("GET", "/v1/account/sessions?limit=50", h, NOW)


def test_urlsafe_unpadded_base64_accepted(kp: Keypair) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    raw = base64.b64decode(h["Authorization"].split(":", 1)[1])
    h["Authorization"] = "solana:" + base64.urlsafe_b64encode(raw).decode().rstrip("=")
    verify_request("POST", PATH, h, NOW)


def test_evm_address_compared_case_insensitively() -> None:
    h = sign_request("POST", PATH, EVM_KEY, "evm", NOW)
    for spelled in (EVM_ADDRESS.lower(), "0x" + EVM_ADDRESS[2:].upper()):
        h["X-Wallet-Address"] = spelled
        assert verify_request("POST", PATH, h, NOW).address == EVM_ADDRESS  # canonical checksum


def test_evm_v_zero_one_accepted() -> None:
    h = sign_request("POST", PATH, EVM_KEY, "evm", NOW)
    sig = bytes.fromhex(h["Authorization"][6:])
    h["Authorization"] = "evm:0x" + (sig[:64] + bytes([sig[64] - 27])).hex()
    verify_request("POST", PATH, h, NOW)


def test_headers_case_insensitive_and_chain_case(kp: Keypair) -> None:
    h = {k.lower(): v for k, v in sign_request("POST", PATH, kp, "solana", NOW).items()}
    h["x-wallet-chain"] = "Solana"
    verify_request("POST", PATH, h, NOW)


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize(
    "name", ["Authorization", "X-Wallet-Address", "X-Wallet-Chain", "X-Timestamp"]
)
def test_each_missing_header(kp: Keypair, name: str) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    del h[name]
    assert f"missing header {name}" in fails("missing_header", "POST", PATH, h)
    h[name] = "  "
    fails("missing_header", "POST", PATH, h)


def test_unknown_chain(kp: Keypair) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    h["X-Wallet-Chain"] = "tron"
    h["Authorization"] = "tron:" + h["Authorization"].split(":", 1)[1]
    assert "'tron'" in fails("bad_chain", "POST", PATH, h)


def test_chain_mismatch(kp: Keypair) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    h["Authorization"] = "evm:" + h["Authorization"].split(":", 1)[1]
    msg = fails("chain_mismatch", "POST", PATH, h)
    assert "'evm'" in msg and "'solana'" in msg


def test_authorization_without_chain_prefix(kp: Keypair) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    h["Authorization"] = h["Authorization"].split(":", 1)[1]
    fails("bad_authorization", "POST", PATH, h)


@pytest.mark.parametrize("offset", [31, -31, 3600])
def test_timestamp_skew_refused(kp: Keypair, offset: int) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    msg = fails("timestamp_skew", "POST", PATH, h, now=NOW - offset)
    assert ("ahead of" if offset > 0 else "behind") in msg and "±30" in msg


@pytest.mark.parametrize("offset", [30, -30, 0])
def test_timestamp_at_window_edge_accepted(kp: Keypair, offset: int) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    verify_request("POST", PATH, h, NOW - offset)


def test_skew_is_configurable(kp: Keypair) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    with pytest.raises(AuthError, match="limit ±5 s"):
        verify_request("POST", PATH, h, NOW + 6, max_skew=5)
    assert verify_request("POST", PATH, h, NOW + 100, max_skew=120).expires_at == NOW + 120


@pytest.mark.parametrize("ts", ["abc", "1700000000.5", "-5", "１７"])
def test_bad_timestamp(kp: Keypair, ts: str) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    h["X-Timestamp"] = ts
    fails("bad_timestamp", "POST", PATH, h)


@pytest.mark.parametrize("sig", ["not*base64!", "AAAA", "A" * 87])
def test_bad_base64_signature(kp: Keypair, sig: str) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    h["Authorization"] = "solana:" + sig
    assert "bad signature encoding" in fails("bad_signature_encoding", "POST", PATH, h)


def test_bad_solana_address(kp: Keypair) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    h["X-Wallet-Address"] = "0OIl"
    fails("bad_address", "POST", PATH, h)


def test_wrong_solana_signer(kp: Keypair) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    h["X-Wallet-Address"] = str(Keypair().pubkey())
    assert "signature mismatch" in fails("signature_mismatch", "POST", PATH, h)


def test_wrong_evm_signer() -> None:
    h = sign_request("POST", PATH, EVM_KEY, "evm", NOW)
    h["X-Wallet-Address"] = Account.create().address
    msg = fails("signature_mismatch", "POST", PATH, h)
    assert EVM_ADDRESS in msg


@pytest.mark.parametrize("chain,key", [("solana", None), ("evm", EVM_KEY)])
@pytest.mark.parametrize("method,path", [("GET", PATH), ("POST", "/v1/stt/session")])
def test_signature_for_another_method_or_path(
    kp: Keypair, chain: str, key, method: str, path: str
) -> None:
    h = sign_request(method, path, key or kp, chain, NOW)
    fails("signature_mismatch", "POST", PATH, h)


def test_signature_for_another_timestamp(kp: Keypair) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    h["X-Timestamp"] = str(NOW + 1)
    fails("signature_mismatch", "POST", PATH, h)


@pytest.mark.parametrize(
    "sig",
    ["abcd", "0xzz" + "00" * 63, "0x" + "00" * 64, "0x" + "00" * 66, "0x" + "11" * 64 + "05"],
)
def test_malformed_evm_signature(sig: str) -> None:
    h = sign_request("POST", PATH, EVM_KEY, "evm", NOW)
    h["Authorization"] = "evm:" + sig
    fails("bad_signature_encoding", "POST", PATH, h)


def test_unrecoverable_evm_signature() -> None:
    h = sign_request("POST", PATH, EVM_KEY, "evm", NOW)
    h["Authorization"] = "evm:0x" + "00" * 64 + "1b"  # r = s = 0
    fails("signature_mismatch", "POST", PATH, h)


def test_bad_evm_address() -> None:
    h = sign_request("POST", PATH, EVM_KEY, "evm", NOW)
    h["X-Wallet-Address"] = "0x1234"
    fails("bad_address", "POST", PATH, h)


def test_sign_request_rejects_wrong_key_types(kp: Keypair) -> None:
    with pytest.raises(TypeError):
        sign_request("GET", PATH, EVM_KEY, "solana", NOW)
    with pytest.raises(TypeError):
        sign_request("GET", PATH, kp, "evm", NOW)
    with pytest.raises(ValueError, match="'btc'"):
        sign_request("GET", PATH, kp, "btc", NOW)


# ---------------------------------------------------------------- replay identity


def test_replay_id_ignores_signature_spelling() -> None:
    """Re-encoding a signature or flipping ECDSA s -> n-s must not yield a fresh replay id."""
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    h = sign_request("POST", PATH, EVM_KEY, "evm", NOW)
    sig = bytes.fromhex(h["Authorization"][6:])
    s = int.from_bytes(sig[32:64], "big")
    flipped = sig[:32] + (n - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    ids = {verify_request("POST", PATH, h, NOW).signature_id}
    for alt in ("0x" + sig.hex().upper(), "0x" + flipped.hex()):
        ids.add(
            verify_request("POST", PATH, {**h, "Authorization": "evm:" + alt}, NOW).signature_id
        )
    assert len(ids) == 1


@pytest.fixture(params=["memory", "ledger"])
async def make_guard(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """Each replay guard, built on a test clock: the in-process one, and the one on the ledger's
    database that several gateway processes share (SQLite here; PostgreSQL across two gateways in
    test_gateway_liveness.py)."""
    ledgers: list[Ledger] = []

    async def make(clock: Callable[[], float]) -> Any:
        if request.param == "memory":
            return MemoryReplayGuard(clock=clock)
        ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/guard.db")
        await ledger.migrate()
        ledgers.append(ledger)
        return LedgerReplayGuard(ledger.db, clock=clock)

    yield make
    for ledger in ledgers:
        await ledger.close()


async def test_guard_forgets_after_window(make_guard: Any) -> None:
    now = [1000.0]
    g = await make_guard(lambda: now[0])
    assert await g.claim("a", 1030.0, "") is Claim.GRANTED
    assert await g.claim("a", 1030.0, "") is Claim.REPLAYED
    assert await g.is_used("a")
    await g.claim("b", 1010.0, "")
    now[0] = 1020.0
    assert not await g.is_used("b") and await g.is_used("a")
    now[0] = 1031.0
    if isinstance(g, MemoryReplayGuard):
        assert len(g) == 0
    else:
        assert await g.prune() == 2
    await g.claim("c", 2000.0, "h1")
    await g.release("c", "h1")
    assert not await g.is_used("c")


async def test_guard_binds_a_released_id_to_its_body(make_guard: Any) -> None:
    g = await make_guard(lambda: 1000.0)
    assert await g.claim("a", 1030.0, "body-1") is Claim.GRANTED
    await g.release("a", "body-1")
    assert await g.claim("a", 1030.0, "body-2") is Claim.OTHER_BODY
    assert not await g.is_used("a")  # the refused copy did not use it up
    assert await g.claim("a", 1030.0, "body-1") is Claim.GRANTED
    assert await g.claim("a", 1030.0, "body-1") is Claim.REPLAYED


async def test_guard_repeats_reads_for_their_window_only(make_guard: Any) -> None:
    now = [1000.0]
    g = await make_guard(lambda: now[0])
    assert await g.claim("r", 1030.0, "", repeat_for=2.0) is Claim.GRANTED
    now[0] = 1001.9
    assert await g.claim("r", 1030.0, "", repeat_for=2.0) is Claim.GRANTED
    now[0] = 1002.0
    assert await g.claim("r", 1030.0, "", repeat_for=2.0) is Claim.REPLAYED


async def test_concurrent_copies_on_the_ledger_guard_are_granted_once(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/guard.db")
    await ledger.migrate()
    try:
        guards = [LedgerReplayGuard(ledger.db, clock=lambda: 1000.0) for _ in range(2)]
        claims = await asyncio.gather(*(g.claim("x", 1030.0, "") for g in guards * 5))
        assert claims.count(Claim.GRANTED) == 1 and claims.count(Claim.REPLAYED) == 9
    finally:
        await ledger.close()


# ---------------------------------------------------------------- middleware, real server


@pytest.fixture
async def client():
    clock = [float(NOW)]
    status = {"code": 200}

    async def token(request: web.Request) -> web.Response:
        w: Wallet = request["wallet"]
        if status["code"] == 402 and "X-Payment" not in request.headers:
            return web.json_response({"error": "payment required"}, status=402)
        return web.json_response({"address": w.address, "chain": w.chain})

    async def account(request: web.Request) -> web.Response:
        return web.json_response({"address": request["wallet"].address})

    async def buy(request: web.Request) -> web.Response:
        body = await request.json()
        if "X-Payment" not in request.headers:
            return web.json_response({"error": "payment required"}, status=402)
        return web.json_response({"bought_for": body["wallet"]})

    async def raise402(request: web.Request) -> web.Response:
        raise web.HTTPPaymentRequired()

    async def public(request: web.Request) -> web.Response:
        return web.json_response({"wallet": str(request.get("wallet"))})

    app = web.Application(middlewares=[wallet_auth_middleware(clock=lambda: clock[0])])
    app.router.add_post(PATH, token)
    app.router.add_post("/v1/raise402", raise402)
    app.router.add_get("/v1/account", account)
    app.router.add_post("/v1/buy", buy)
    for p in (
        "/v1/pricing",
        "/v1/servers/status",
        "/openapi.json",
        "/internal/health",
        "/v1/webhooks/sfu",
    ):
        app.router.add_route("*", p, public)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        c.clock, c.status = clock, status  # type: ignore[attr-defined]
        yield c


async def test_middleware_happy_path_both_chains(client, kp: Keypair) -> None:
    for key, chain, address in ((kp, "solana", str(kp.pubkey())), (EVM_KEY, "evm", EVM_ADDRESS)):
        r = await client.post(PATH, headers=sign_request("POST", PATH, key, chain, NOW))
        assert r.status == 200, await r.text()
        assert await r.json() == {"address": address, "chain": chain}


async def test_middleware_refuses_with_reason(client, kp: Keypair) -> None:
    r = await client.post(PATH)
    assert r.status == 401
    assert (await r.json()) == {"error": "missing header Authorization"}
    h = sign_request("POST", PATH, kp, "solana", NOW - 100)
    r = await client.post(PATH, headers=h)
    assert r.status == 401 and "timestamp skew" in (await r.json())["error"]
    h = sign_request("POST", "/v1/other", kp, "solana", NOW)
    r = await client.post(PATH, headers=h)
    assert r.status == 401 and "signature mismatch" in (await r.json())["error"]


async def test_middleware_verifies_path_without_query(client, kp: Keypair) -> None:
    r = await client.post(PATH + "?debug=1", headers=sign_request("POST", PATH, kp, "solana", NOW))
    assert r.status == 200


async def test_replay_after_200_refused(client, kp: Keypair) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    assert (await client.post(PATH, headers=h)).status == 200
    r = await client.post(PATH, headers=h)
    assert r.status == 401 and "replayed signature" in (await r.json())["error"]
    # A re-spelled copy of the same signature is the same authorisation.
    raw = base64.b64decode(h["Authorization"].split(":", 1)[1])
    alt = {**h, "Authorization": "solana:" + base64.urlsafe_b64encode(raw).decode().rstrip("=")}
    assert (await client.post(PATH, headers=alt)).status == 401
    # Once the window has passed the skew check refuses it (and the guard may forget it).
    client.clock[0] = NOW + 31
    r = await client.post(PATH, headers=h)
    assert r.status == 401 and "timestamp skew" in (await r.json())["error"]


async def test_reuse_after_402_allowed(client) -> None:
    client.status["code"] = 402
    h = sign_request("POST", PATH, EVM_KEY, "evm", NOW)
    assert (await client.post(PATH, headers=h)).status == 402
    assert (await client.post(PATH, headers=h)).status == 402  # still not used up
    r = await client.post(PATH, headers={**h, "X-Payment": "paid"})
    assert r.status == 200
    assert (await client.post(PATH, headers={**h, "X-Payment": "paid"})).status == 401


async def test_reuse_after_raised_402_allowed(client, kp: Keypair) -> None:
    h = sign_request("POST", "/v1/raise402", kp, "solana", NOW)
    assert (await client.post("/v1/raise402", headers=h)).status == 402
    assert (await client.post("/v1/raise402", headers=h)).status == 402


async def test_404_under_v1_uses_the_signature(client, kp: Keypair) -> None:
    h = sign_request("POST", "/v1/nowhere", kp, "solana", NOW)
    assert (await client.post("/v1/nowhere", headers=h)).status == 404
    assert (await client.post("/v1/nowhere", headers=h)).status == 401


@pytest.mark.parametrize(
    "path",
    ["/v1/pricing", "/v1/servers/status", "/openapi.json", "/internal/health", "/v1/webhooks/sfu"],
)
async def test_exempt_paths_need_no_signature(client, path: str) -> None:
    r = await client.get(path)
    assert r.status == 200 and (await r.json()) == {"wallet": "None"}


async def test_dot_segments_never_exempt(client) -> None:
    r = await client.get("/v1/webhooks/../account")
    assert r.status == 401
    assert is_exempt("/v1/webhooks/sfu", DEFAULT_EXEMPT_PATHS)
    assert not is_exempt("/v1/webhooks/./sfu", DEFAULT_EXEMPT_PATHS)
    assert is_exempt("/internal", DEFAULT_EXEMPT_PATHS)
    assert not is_exempt("/v1/pricing/x", DEFAULT_EXEMPT_PATHS)


async def test_402_signature_reused_only_with_the_identical_body(client, kp: Keypair) -> None:
    h = sign_request("POST", "/v1/buy", kp, "solana", NOW)
    mine = {"wallet": str(kp.pubkey())}
    assert (await client.post("/v1/buy", json=mine, headers=h)).status == 402
    # The signature came back for *this* body: another body (another wallet) is a replay ...
    r = await client.post(
        "/v1/buy", json={"wallet": "someone-else"}, headers={**h, "X-Payment": "paid"}
    )
    assert r.status == 401
    error = (await r.json())["error"]
    assert error.startswith("replayed signature") and "answered 402 for another body" in error
    # ... that used nothing up: the identical body still goes through, once.
    r = await client.post("/v1/buy", json=mine, headers={**h, "X-Payment": "paid"})
    assert r.status == 200 and (await r.json()) == {"bought_for": mine["wallet"]}
    r = await client.post("/v1/buy", json=mine, headers={**h, "X-Payment": "paid"})
    assert r.status == 401 and "already answered" in (await r.json())["error"]


async def test_identical_get_within_its_second_is_answered(client, kp: Keypair) -> None:
    h = sign_request("GET", "/v1/account", kp, "solana", NOW)
    for _ in range(3):  # one second, three identical reads, as a reference client sends them
        r = await client.get("/v1/account", headers=h)
        assert r.status == 200 and (await r.json()) == {"address": str(kp.pubkey())}
    client.clock[0] = NOW + SAFE_REPEAT_SECONDS
    r = await client.get("/v1/account", headers=h)
    assert r.status == 401 and "replayed signature" in (await r.json())["error"]


async def test_identical_post_within_its_second_is_refused(client, kp: Keypair) -> None:
    h = sign_request("POST", PATH, kp, "solana", NOW)
    assert (await client.post(PATH, headers=h)).status == 200
    r = await client.post(PATH, headers=h)  # the same clock second: still a replay
    assert r.status == 401 and "replayed signature" in (await r.json())["error"]
