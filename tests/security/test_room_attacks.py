"""Attacks on rooms with real participants (issue 12, items 2 and 5): a real SFU node agent on the
session localnet, the real gateway, and the official ``livekit`` SDK as every participant.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from livekit import rtc as lk
from solders.keypair import Keypair

from gateway.client import GatewayClient
from tests.conftest import Chain
from tests.support.polling import wait_for
from tests.support.sfu_net import SfuNet as Setup
from tests.support.sfu_net import get_status, sfu_and_gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Far from the other test nodes, so the gateway routes this module's sessions to its own node.
WHERE = {"lat": -36.85, "lon": 174.76, "country": "NZ"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sfu(chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    async with sfu_and_gateway(chain, tmp_path_factory.mktemp("rooms"), WHERE) as net:
        yield net


async def wallet(setup: Setup) -> GatewayClient:
    key = Keypair()
    await setup.ledger.grant("solana", str(key.pubkey()), 1_000_000, memo="room attack test")
    return GatewayClient(setup.gateway_url, key, session=setup.http)


async def joined(url: str, token: str) -> lk.Room:
    room = lk.Room()
    await asyncio.wait_for(room.connect(url, token), 20)
    return room


def identities(room: lk.Room) -> set[str]:
    return {p.identity for p in room.remote_participants.values()}


async def test_another_wallet_with_my_room_and_identity_lands_alone(sfu: Setup) -> None:
    """Wallet B asks for A's room name and A's caller's identity. B's participant is alone in a
    room of its own; A's caller and agent stay connected and never see B."""
    name = f"tutor-{uuid.uuid4().hex[:6]}"
    alice, mallory = await wallet(sfu), await wallet(sfu)
    caller_s = await alice.create_webrtc_token(name, "user-42", 5)
    agent_s = await alice.create_webrtc_token(name, "agent", 5)
    intruder_s = await mallory.create_webrtc_token(name, "user-42", 5)
    caller = agent = intruder = None
    try:
        caller = await joined(caller_s.ws_url, caller_s.token)
        agent = await joined(agent_s.ws_url, agent_s.token)
        await wait_for(lambda: identities(agent) == {"user-42"}, 10, "the agent sees its caller")
        rooms_before = set(sfu.role.rooms)
        intruder = await joined(intruder_s.ws_url, intruder_s.token)
        assert identities(intruder) == set(), "the intruder is alone"
        assert len(set(sfu.role.rooms) - rooms_before) == 1, "in a room of its own"
        await asyncio.sleep(1.0)  # a duplicate-identity kick would have arrived by now
        assert caller.connection_state == lk.ConnectionState.CONN_CONNECTED
        assert identities(agent) == {"user-42"} and identities(caller) == {"agent"}
    finally:
        for room in (caller, agent, intruder):
            if room is not None:
                await room.disconnect()
    # a client whose leave did not arrive before its socket closed is held for the resume grace
    await wait_for(
        lambda: sfu.role.load() == 0, sfu.role.settings.resume_grace + 10, "everyone gone"
    )


async def test_a_second_join_with_my_identity_replaces_the_first(sfu: Setup) -> None:
    """Within one account, the same identity joining again replaces the older connection (as in
    LiveKit): the agent sees one ``user-42``, the new one."""
    name = f"tutor-{uuid.uuid4().hex[:6]}"
    alice = await wallet(sfu)
    first_s = await alice.create_webrtc_token(name, "user-42", 5)
    second_s = await alice.create_webrtc_token(name, "user-42", 5)
    agent_s = await alice.create_webrtc_token(name, "agent", 5)
    first = second = agent = None
    try:
        agent = await joined(agent_s.ws_url, agent_s.token)
        first = await joined(first_s.ws_url, first_s.token)
        await wait_for(lambda: identities(agent) == {"user-42"}, 10, "the first caller")
        old_sid = next(iter(agent.remote_participants.values())).sid
        second = await joined(second_s.ws_url, second_s.token)
        await wait_for(
            lambda: first.connection_state != lk.ConnectionState.CONN_CONNECTED,
            10,
            "the first connection replaced",
        )
        await wait_for(
            lambda: (
                [p.sid for p in agent.remote_participants.values() if p.identity == "user-42"]
                not in ([], [old_sid])
            ),
            10,
            "the agent sees the new caller",
        )
        assert len(agent.remote_participants) == 1
    finally:
        for room in (first, second, agent):
            if room is not None:
                await room.disconnect()
    # a client whose leave did not arrive before its socket closed is held for the resume grace
    await wait_for(
        lambda: sfu.role.load() == 0, sfu.role.settings.resume_grace + 10, "everyone gone"
    )


async def test_a_settled_session_token_is_refused_by_the_sfu(sfu: Setup) -> None:
    """The caller leaves: its session settles (billed once), the gateway tells the SFU, and the
    same token cannot join again for free, although it has not expired."""
    name = f"tutor-{uuid.uuid4().hex[:6]}"
    alice = await wallet(sfu)
    session = await alice.create_webrtc_token(name, "user-42", 5)
    room = await joined(session.ws_url, session.token)
    await asyncio.sleep(1.2)
    await room.disconnect()

    async def settled() -> bool:
        record = await sfu.ledger.get_session(session.session_id)
        return record is not None and record.status == "completed"

    for _ in range(150):
        if await settled():
            break
        await asyncio.sleep(0.1)
    assert await settled(), "the participant's leave settled its session"
    record = await sfu.ledger.get_session(session.session_id)
    balance = (await alice.account()).credit_balance
    answer: tuple[int, str] = (0, "")
    for _ in range(100):  # the revocation is pushed in the background
        answer = await get_status(sfu, "/rtc/validate", session.token, header=False)
        if answer[0] != 200:
            break
        await asyncio.sleep(0.1)
    assert answer[0] == 401 and "session_ended" in answer[1], answer
    again = lk.Room()
    with pytest.raises(Exception):  # the SDK's ConnectError: the SFU refused the join
        await asyncio.wait_for(again.connect(session.ws_url, session.token), 20)
    await asyncio.sleep(0.5)
    assert await sfu.ledger.get_session(session.session_id) == record
    assert (await alice.account()).credit_balance == balance
