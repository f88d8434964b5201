"""The registry through the localnet's JSON-RPC: the client, issuers, staleness, tokens, restart.

Every rule is also tested instruction by instruction in LiteSVM (tests/test_registry_program.py);
here the same program runs behind the RPC that solana-py talks to, as a gateway or node would see
it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from solders.keypair import Keypair

from registry import program as p
from registry.client import RegistryClient, decode_node_fast
from registry.tokens import Grant, TokenError, TokenVerifier, mint_token
from tests.conftest import Chain, start_localnet_process

FIELDS = p.NodeFields(
    url="http://127.0.0.1:8001", lat=52.52, lon=13.405, country="DE", capacity=8, version="0.1.0"
)


async def funded(client: RegistryClient) -> Keypair:
    key = Keypair()
    await client.ensure_funded(key)
    return key


async def expect_error(name: str, coro) -> p.RegistryProgramError:  # type: ignore[no-untyped-def]
    with pytest.raises(p.RegistryProgramError) as err:
        await coro
    assert err.value.name == name, f"expected {name}, got {err.value.name}: {err.value.logs}"
    return err.value


async def test_node_lifecycle(chain: Chain) -> None:
    async with RegistryClient(chain.url) as client:
        owner = await funded(client)
        await client.register_node(owner, p.Role.STT, FIELDS)
        node = await client.get_node(owner.pubkey())
        assert node is not None
        assert (node.role, node.status, node.url, node.country) == (
            p.Role.STT,
            p.NodeStatus.ACTIVE,
            FIELDS.url,
            "DE",
        )
        assert (node.lat, node.lon, node.capacity, node.load, node.version) == (
            52.52,
            13.405,
            8,
            0,
            "0.1.0",
        )
        assert abs(node.registered_at - time.time()) < 5  # the localnet's clock follows the wall

        await client.heartbeat(owner, load=3, capacity=10)
        node = await client.get_node(owner.pubkey())
        assert (node.load, node.capacity, node.stale) == (3, 10, False)

        moved = p.NodeFields(
            url="https://stt.example.org",
            lat=-33.9,
            lon=151.2,
            country="AU",
            capacity=4,
            version="0.2.0",
        )
        await client.update_node(owner, moved)
        node = await client.get_node(owner.pubkey())
        assert (node.url, node.country, node.lat, node.lon, node.capacity, node.version) == (
            "https://stt.example.org",
            "AU",
            -33.9,
            151.2,
            4,
            "0.2.0",
        )

        listed = {str(n.owner) for n in await client.list_nodes("stt")}
        assert str(owner.pubkey()) in listed
        assert str(owner.pubkey()) not in {str(n.owner) for n in await client.list_nodes("tts")}

        before = (await client.require_registry()).node_count
        await client.deregister_node(owner)
        assert await client.get_node(owner.pubkey()) is None
        assert (await client.require_registry()).node_count == before - 1
        # Rent went back: the node key holds (nearly) what it had before registering.
        assert (await client.rpc.get_balance(owner.pubkey())).value > 1.99e9


async def test_refusals_through_rpc(chain: Chain) -> None:
    async with RegistryClient(chain.url) as client:
        owner, stranger = await funded(client), await funded(client)
        await client.register_node(owner, p.Role.TTS, FIELDS)
        # A second registration (other fields, so not a replay of the same transaction).
        again = p.NodeFields(FIELDS.url, FIELDS.lat, FIELDS.lon, "FR", 2, "0.1.1")
        await expect_error("AlreadyInitialized", client.register_node(owner, p.Role.TTS, again))
        for bad, name in [
            (p.NodeFields("", 0, 0, "DE", 1, "1"), "InvalidUrl"),
            (p.NodeFields("h" * 201, 0, 0, "DE", 1, "1"), "InvalidUrl"),
            (p.NodeFields("https://x", 91, 0, "DE", 1, "1"), "InvalidLatitude"),
            (p.NodeFields("https://x", 0, -181, "DE", 1, "1"), "InvalidLongitude"),
            (p.NodeFields("https://x", 0, 0, "de", 1, "1"), "InvalidCountry"),
            (p.NodeFields("https://x", 0, 0, "DE", 0, "1"), "InvalidCapacity"),
            (p.NodeFields("http://x", 0, 0, "DE", 1, "1"), "InsecureUrl"),
        ]:
            await expect_error(name, client.register_node(stranger, p.Role.SFU, bad))
        bad_role = p.register_node_ix(stranger.pubkey(), 7, FIELDS)  # type: ignore[arg-type]
        await expect_error("InvalidRole", client.send([bad_role], [stranger]))

        # Only the authority suspends; a suspended node cannot heartbeat; activation restores it.
        await expect_error(
            "NotAuthority", client.set_node_status(stranger, owner.pubkey(), p.NodeStatus.SUSPENDED)
        )
        await client.set_node_status(chain.authority, owner.pubkey(), p.NodeStatus.SUSPENDED)
        await expect_error("NodeSuspended", client.heartbeat(owner, 1, 8))
        assert (await client.get_node(owner.pubkey())).status is p.NodeStatus.SUSPENDED
        await client.set_node_status(chain.authority, owner.pubkey(), p.NodeStatus.ACTIVE)
        await client.heartbeat(owner, 1, 8)
        await expect_error("LoadExceedsCapacity", client.heartbeat(owner, 9, 8))
        assert (await client.get_node(owner.pubkey())).load == 1

        # Someone else's key cannot heartbeat, update or close my node.
        node_pda, _ = p.node_pda(owner.pubkey())
        forged = p.heartbeat_ix(stranger.pubkey(), 0, 8)
        accounts = list(forged.accounts)
        accounts[0] = type(accounts[0])(node_pda, False, True)
        from solders.instruction import Instruction

        hostile = Instruction(forged.program_id, forged.data, accounts)
        with pytest.raises(p.RegistryProgramError) as err:
            await client.send([hostile], [stranger])
        assert err.value.name in ("NotNodeOwner", "InvalidPda")
        await expect_error(
            "NotAuthority", client.add_issuer(stranger, stranger.pubkey(), "https://gw.example")
        )
        await client.deregister_node(owner)


async def test_stale_after_ttl(chain: Chain) -> None:
    async with RegistryClient(chain.url) as client:
        owner = await funded(client)
        await client.register_node(owner, p.Role.SFU, FIELDS)
        assert not (await client.get_node(owner.pubkey())).stale
        await asyncio.sleep(chain.ttl + 1.5)
        node = next(n for n in await client.list_nodes("sfu") if n.owner == owner.pubkey())
        assert node.stale
        await client.heartbeat(owner, 0, 8)
        assert not (await client.get_node(owner.pubkey())).stale
        await client.deregister_node(owner)


async def test_fast_decoder_matches_anchorpy(chain: Chain) -> None:
    async with RegistryClient(chain.url) as client:
        owner = await funded(client)
        await client.register_node(owner, p.Role.STT, FIELDS)
        await client.heartbeat(owner, 5, 9)
        address, _ = p.node_pda(owner.pubkey())
        data = bytes((await client.rpc.get_account_info(address)).value.data)
        assert len(data) == p.NODE_SIZE
        assert decode_node_fast(address, data) == p.decode_node(address, data)
        await client.deregister_node(owner)


async def test_issuers_and_token_trust_follow_the_chain(chain: Chain) -> None:
    async with RegistryClient(chain.url) as client:
        assert str(chain.issuer.pubkey()) in await client.issuer_keys()
        stranger = await funded(client)
        gateway = Keypair()
        verifier = TokenVerifier(client.issuer_keys, "stt", cache_ttl=0.5)
        token = mint_token(gateway, "agent", Grant("stt", limit=60), 60)
        with pytest.raises(TokenError) as err:
            await verifier.verify(token)
        assert err.value.code == "untrusted_issuer"

        await client.add_issuer(chain.authority, gateway.pubkey(), "https://gw-a.example")
        await asyncio.sleep(1.1)  # the forced refresh is rate limited to once a second
        claims = await verifier.verify(token)
        assert claims.issuer == str(gateway.pubkey())
        # the gateway's URL is on chain with its key, and moves without touching the key
        assert (await client.issuer_urls())[str(gateway.pubkey())] == "https://gw-a.example"
        await expect_error(
            "NotAuthority", client.update_issuer(stranger, gateway.pubkey(), "https://evil.example")
        )
        await expect_error(
            "InsecureUrl",
            client.update_issuer(chain.authority, gateway.pubkey(), "http://gw.example"),
        )
        await client.update_issuer(chain.authority, gateway.pubkey(), "https://gw-b.example:8443")
        assert (await client.issuer_urls())[str(gateway.pubkey())] == "https://gw-b.example:8443"
        assert (await verifier.verify(token)).issuer == str(gateway.pubkey())

        await client.remove_issuer(chain.authority, gateway.pubkey())
        assert str(gateway.pubkey()) not in await client.issuer_keys()
        await asyncio.sleep(0.6)
        with pytest.raises(TokenError) as err:
            await verifier.verify(token)
        assert err.value.code == "untrusted_issuer"


async def test_restart_keeps_state(tmp_path: Path) -> None:
    net = start_localnet_process(tmp_path / "ledger")
    try:
        authority, owner = net.authority, Keypair()
        async with RegistryClient(net.url) as client:
            await client.ensure_funded(authority)
            await client.ensure_funded(owner)
            await client.initialize_registry(authority, 60, p.Policy.OPEN)
            await client.register_node(owner, p.Role.TTS, FIELDS)
            await client.heartbeat(owner, 2, 8)
            before = await client.get_node(owner.pubkey())
        net.stop(sig=9)  # SIGKILL: nothing may depend on a clean shutdown
        net = start_localnet_process(tmp_path / "ledger", port=net.port)
        async with RegistryClient(net.url) as client:
            after = await client.get_node(owner.pubkey())
            assert after is not None
            assert (after.load, after.last_heartbeat, after.url) == (
                before.load,
                before.last_heartbeat,
                before.url,
            )
            assert (await client.require_registry()).authority == authority.pubkey()
            # The program still runs after the restart (not merely its accounts remain).
            await client.heartbeat(owner, 4, 8)
            assert (await client.get_node(owner.pubkey())).load == 4
    finally:
        net.stop()
