"""The participants of a linked node, each shown as itself.

Two nodes that share a room (``relay.py``) tell each other who is in it: each side of the link
sends the other its *local* participants (identity, name, metadata, attributes) as a data packet
on the link, ``ROSTER_TOPIC``, whenever that list changes. Who speaks crosses the same way
(``SPEAKERS_TOPIC``, at every speaker check while someone speaks). The receiving room shows each
of them as a ``Mirror``: a participant of its own, with its own sid, that owns the tracks the link
carries for it (a relayed track is named ``<identity>/<name>``). Clients see the far side's
people by identity, with their tracks and metadata; the link itself is not listed.

A mirror is not billed, not load and not relayed back (it is ``remote``); it neither subscribes
nor receives data of its own (the link does both for the whole far side).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from livekit.protocol import models

ROSTER_TOPIC = "lk.relay.roster"
SPEAKERS_TOPIC = "lk.relay.speakers"  # {identity: RFC 6464 level} of who speaks, every check
MAX_ROSTER = 1000  # participants one link may announce
MAX_FIELD = 64 * 1024  # bytes of metadata (or of all attributes) per announced participant


def roster_packet(participants: list[Any]) -> bytes:
    """The data packet that tells the far side who is here (``participants``: the local ones)."""
    entries = [
        {
            "identity": p.identity,
            "name": p.name or "",
            "metadata": p.metadata,
            "attributes": dict(p.attributes),
        }
        for p in participants[:MAX_ROSTER]
    ]
    packet = models.DataPacket(
        user=models.UserPacket(topic=ROSTER_TOPIC, payload=json.dumps(entries).encode())
    )
    return packet.SerializeToString()


def speakers_packet(levels: dict[str, int]) -> bytes:
    """Who speaks here, by identity, with the level (-dBov) the speaker check saw."""
    payload = json.dumps(levels).encode()
    return models.DataPacket(
        user=models.UserPacket(topic=SPEAKERS_TOPIC, payload=payload)
    ).SerializeToString()


def read_speakers(payload: bytes) -> dict[str, int]:
    """A speakers packet's levels, checked (``ValueError`` otherwise)."""
    levels = json.loads(payload)
    if not isinstance(levels, dict) or len(levels) > MAX_ROSTER:
        raise ValueError(f"speakers are a map of at most {MAX_ROSTER} identities")
    if not all(
        isinstance(k, str) and isinstance(v, int) and 0 <= v <= 127 for k, v in levels.items()
    ):
        raise ValueError("speakers map identities to levels 0..127")
    return levels


def read_roster(payload: bytes) -> list[dict[str, Any]]:
    """The entries of a roster packet's payload, checked; a malformed one reads as None."""
    entries = json.loads(payload)
    if not isinstance(entries, list):
        raise ValueError("a roster is a list")
    kept = []
    for entry in entries[:MAX_ROSTER]:
        if not isinstance(entry, dict) or not isinstance(entry.get("identity"), str):
            raise ValueError("a roster entry needs an identity")
        attributes = entry.get("attributes") or {}
        if not isinstance(attributes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
        ):
            raise ValueError("roster attributes map strings to strings")
        metadata = entry.get("metadata") or ""
        name = entry.get("name") or ""
        if not isinstance(metadata, str) or not isinstance(name, str):
            raise ValueError("roster name and metadata are strings")
        if len(metadata) > MAX_FIELD or len(json.dumps(attributes)) > MAX_FIELD:
            raise ValueError("roster metadata or attributes too large")
        kept.append(
            {
                "identity": entry["identity"][:256],
                "name": name[:256],
                "metadata": metadata,
                "attributes": attributes,
            }
        )
    return kept


def far_side_info(participant: Any, **extra: Any) -> models.ParticipantInfo:
    """A participant of another node (a link, or one of the people behind it) as a room lists
    it: it may do everything there; its own node enforces what its token grants."""
    return models.ParticipantInfo(
        sid=participant.sid,
        identity=participant.identity,
        name=participant.name,
        state=participant.state,
        tracks=[t.info() for t in participant.tracks.values()],
        joined_at=int(participant.joined_at),
        joined_at_ms=int(participant.joined_at * 1000),
        version=1,
        permission=models.ParticipantPermission(
            can_subscribe=True, can_publish=True, can_publish_data=True
        ),
        is_publisher=bool(participant.tracks),
        **extra,
    )


class Mirror:
    """A participant of the linked node, in this room (see the module docstring)."""

    remote = True
    mirror = True
    can_subscribe = False
    auto_subscribe = False
    can_publish = True
    can_publish_data = True
    session_id = ""

    def __init__(self, room: Any, link: Any, sid: str, identity: str) -> None:
        self.room = room
        self.link = link  # the participant that is the link to the far node
        self.sid = sid
        self.identity = identity
        self.name = ""
        self.metadata = ""
        self.attributes: dict[str, str] = {}
        self.joined_at = time.time()
        self.state = models.ParticipantInfo.State.ACTIVE
        self.tracks: dict[str, Any] = {}
        self.closed = asyncio.Event()

    def update(self, entry: dict[str, Any]) -> bool:
        """Take the far side's name, metadata and attributes; whether anything changed."""
        new = (entry["name"], entry["metadata"], entry["attributes"])
        if new == (self.name, self.metadata, self.attributes):
            return False
        self.name, self.metadata, self.attributes = new
        return True

    def info(self) -> models.ParticipantInfo:
        return far_side_info(self, metadata=self.metadata, attributes=self.attributes)

    def send(self, response: Any) -> None:
        pass  # the far side's clients hear from their own node

    def send_data(self, label: str, payload: bytes) -> None:
        pass  # the link carries every data packet to the far side once

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        return self.link.spawn(coro)

    def subscribe(self, track: Any) -> bool:
        return False

    def unsubscribe(self, track: Any) -> bool:
        return False

    async def negotiate_subscriber(self) -> None:
        pass

    async def close(self, reason: int = 0, send_leave: bool = True) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self.state = models.ParticipantInfo.State.DISCONNECTED
        self.room.leave(self)
