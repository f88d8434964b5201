"""Token minting and verification, without a chain: the trusted set is passed in directly.

The on-chain source of that set is exercised in tests/test_registry_rpc.py.
"""

import time

import jwt
import pytest
from solders.keypair import Keypair

from registry.tokens import Grant, TokenError, TokenVerifier, mint_token, verify_token

pytestmark = pytest.mark.fast  # unit tests: no process, no model (make test-fast)

ISSUER = Keypair()
OTHER = Keypair()


def trusted() -> set[str]:
    return {str(ISSUER.pubkey())}


def test_webrtc_token_carries_livekit_grant() -> None:
    token = mint_token(ISSUER, "agent-1", Grant("webrtc", room="r1", can_publish=False), 60)
    claims = verify_token(token, trusted(), "webrtc")
    assert claims.identity == "agent-1"
    assert claims.room == "r1"
    assert claims.grant == {
        "roomJoin": True,
        "room": "r1",
        "canPublish": False,
        "canSubscribe": True,
        "canPublishData": True,
    }
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA" and header["kid"] == str(ISSUER.pubkey())


@pytest.mark.parametrize("service,key", [("stt", "limit_seconds"), ("tts", "limit_characters")])
def test_limited_grants(service: str, key: str) -> None:
    token = mint_token(ISSUER, "agent", Grant(service, limit=300), 60, session_id="s-1")
    claims = verify_token(token, trusted(), service)
    assert claims.session_id == "s-1"
    assert claims.limit == 300
    assert claims.grant[key] == 300


def test_non_issuer_is_refused() -> None:
    token = mint_token(OTHER, "agent", Grant("stt", limit=10), 60)
    with pytest.raises(TokenError) as err:
        verify_token(token, trusted(), "stt")
    assert err.value.code == "untrusted_issuer"


def test_forged_signature_is_refused() -> None:
    # Claims say ISSUER, but the signature is OTHER's: a forger who copies a trusted kid.
    good = mint_token(ISSUER, "agent", Grant("stt", limit=10), 60)
    forged_sig = mint_token(OTHER, "agent", Grant("stt", limit=10), 60).split(".")[2]
    head, body, _ = good.split(".")
    with pytest.raises(TokenError) as err:
        verify_token(f"{head}.{body}.{forged_sig}", trusted(), "stt")
    assert err.value.code == "invalid_signature"


def test_tampered_claims_are_refused() -> None:
    token = mint_token(ISSUER, "agent", Grant("tts", limit=10), 60)
    head, _, sig = token.split(".")
    other_body = mint_token(ISSUER, "agent", Grant("tts", limit=10_000), 60).split(".")[1]
    with pytest.raises(TokenError) as err:
        verify_token(f"{head}.{other_body}.{sig}", trusted(), "tts")
    assert err.value.code == "invalid_signature"


def test_expired_and_not_yet_valid() -> None:
    now = time.time()
    token = mint_token(ISSUER, "agent", Grant("stt", limit=10), 60, now=now - 120)
    with pytest.raises(TokenError) as err:
        verify_token(token, trusted(), "stt", now=now)
    assert err.value.code == "token_expired"
    future = mint_token(ISSUER, "agent", Grant("stt", limit=10), 60, now=now + 600)
    with pytest.raises(TokenError) as err:
        verify_token(future, trusted(), "stt", now=now)
    assert err.value.code == "token_not_yet_valid"
    # Inside the leeway both are fine.
    verify_token(token, trusted(), "stt", now=now - 62)


def test_other_service_is_refused() -> None:
    token = mint_token(ISSUER, "agent", Grant("stt", limit=10), 60)
    with pytest.raises(TokenError) as err:
        verify_token(token, trusted(), "tts")
    assert err.value.code == "wrong_service"


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "x" * 5000])
def test_garbage_is_refused(garbage: str) -> None:
    with pytest.raises(TokenError) as err:
        verify_token(garbage, trusted(), "stt")
    assert err.value.code == "invalid_token"


def test_hs256_token_with_trusted_kid_is_refused() -> None:
    # Algorithm confusion: an HMAC token "signed" with the public key as secret.
    body = {
        "iss": str(ISSUER.pubkey()),
        "sub": "a",
        "nbf": 0,
        "exp": 2**31,
        "jti": "x",
        "stt": {"session_id": "x", "limit_seconds": 10},
    }
    token = jwt.encode(
        body, bytes(ISSUER.pubkey()), algorithm="HS256", headers={"kid": str(ISSUER.pubkey())}
    )
    with pytest.raises(TokenError) as err:
        verify_token(token, trusted(), "stt")
    assert err.value.code == "invalid_token"


def test_bad_grants_are_refused_at_mint() -> None:
    with pytest.raises(ValueError, match="room"):
        mint_token(ISSUER, "a", Grant("webrtc"), 60)
    with pytest.raises(ValueError, match="limit"):
        mint_token(ISSUER, "a", Grant("stt"), 60)
    with pytest.raises(ValueError, match="ttl"):
        mint_token(ISSUER, "a", Grant("tts", limit=1), 0)


async def test_verifier_cache_refreshes_for_new_issuer_and_expires_removed() -> None:
    listed = {str(ISSUER.pubkey())}
    reads = 0

    async def source() -> set[str]:
        nonlocal reads
        reads += 1
        return set(listed)

    verifier = TokenVerifier(source, "stt", cache_ttl=0.3)
    token = mint_token(ISSUER, "a", Grant("stt", limit=10), 60)
    await verifier.verify(token)
    await verifier.verify(token)
    assert reads == 1  # cached

    listed.clear()  # issuer removed on chain: still trusted until the cache expires
    await verifier.verify(token)
    import asyncio

    await asyncio.sleep(0.35)
    with pytest.raises(TokenError) as err:
        await verifier.verify(token)
    assert err.value.code == "untrusted_issuer"


def test_signed_body_binds_signer_and_bytes() -> None:
    from registry.tokens import sign_body, verify_body

    node = Keypair()
    body = b'{"session_id":"s","event":"usage"}'
    token = sign_body(node, body)
    assert verify_body(token, body) == str(node.pubkey())
    for bad, code in [
        ((token, body + b" "), "body_mismatch"),
        ((sign_body(node, body, now=time.time() - 1000), body), "token_expired"),
        (("a.b.c", body), "invalid_token"),
    ]:
        with pytest.raises(TokenError) as err:
            verify_body(*bad)
        assert err.value.code == code
    # A signature by another key under this node's iss does not verify.
    head, claims, _ = token.split(".")
    other_sig = sign_body(Keypair(), body).split(".")[2]
    with pytest.raises(TokenError) as err:
        verify_body(f"{head}.{claims}.{other_sig}", body)
    assert err.value.code == "invalid_signature"


NODE_A, NODE_B = str(Keypair().pubkey()), str(Keypair().pubkey())


def test_audience_names_the_routed_node_and_only_that_node_accepts() -> None:
    token = mint_token(ISSUER, "agent", Grant("stt", limit=10), 60, audience=NODE_A)
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == NODE_A
    assert verify_token(token, trusted(), "stt", audience=NODE_A).raw["aud"] == NODE_A
    with pytest.raises(TokenError) as err:
        verify_token(token, trusted(), "stt", audience=NODE_B)
    assert err.value.code == "wrong_node"
    assert NODE_A in str(err.value) and NODE_B in str(err.value)


def test_a_token_without_audience_is_refused_by_a_node_that_checks() -> None:
    token = mint_token(ISSUER, "agent", Grant("tts", limit=10), 60)
    assert "aud" not in jwt.decode(token, options={"verify_signature": False})
    with pytest.raises(TokenError) as err:
        verify_token(token, trusted(), "tts", audience=NODE_A)
    assert err.value.code == "wrong_node"
    assert "no aud" in str(err.value)
    # a verifier that names no audience (a hand-made test token, the CLI) still accepts both
    assert verify_token(token, trusted(), "tts").identity == "agent"
    with_aud = mint_token(ISSUER, "agent", Grant("tts", limit=10), 60, audience=NODE_A)
    assert verify_token(with_aud, trusted(), "tts").identity == "agent"
    with pytest.raises(ValueError, match="audience"):
        mint_token(ISSUER, "agent", Grant("tts", limit=10), 60, audience="")


async def test_verifier_checks_its_own_audience_or_the_one_passed() -> None:
    async def source() -> set[str]:
        return trusted()

    token = mint_token(ISSUER, "a", Grant("webrtc", room="r"), 60, audience=NODE_A)
    assert (await TokenVerifier(source, "webrtc", audience=NODE_A).verify(token)).room == "r"
    with pytest.raises(TokenError) as err:
        await TokenVerifier(source, "webrtc", audience=NODE_B).verify(token)
    assert err.value.code == "wrong_node"
    with pytest.raises(TokenError) as err:
        await TokenVerifier(source, "webrtc").verify(token, audience=NODE_B)
    assert err.value.code == "wrong_node"
