"""A room that spans two SFU nodes.

Node A links its room R to node B (``POST /relay/link`` on A, under a roomAdmin token for R that
the gateway's issuer signed, so B trusts it too). A then joins R on B *as a LiveKit client*
(``client.LiveKitClient``, with ``?relay=1``): everything published in R on A is published to B
over that one WebRTC link, and everything B forwards to it is published into R on A. On both
nodes the link is one participant (``relay-<node>``), neither billed nor counted as load, that
clients are not told of: the people behind it are shown one by one (``mirror.py``).
Media stays encoded end to end (passthrough in, ``ForwardTrack`` out); data packets cross too,
keeping their original sender. Tracks that arrived over a relay are never relayed again, so two
linked nodes cannot loop. Audio and video cross (a simulcast track as its top layer arriving);
keyframe requests from the far side reach the publisher.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from livekit.protocol import models

from node.sfu.client import LiveKitClient
from node.sfu.forward import ForwardTrack, negotiated_mime
from node.sfu.mirror import far_side_info
from node.sfu.rtc import PublishedTrack, Room, new_sid

log = logging.getLogger("node.sfu.relay")


class RelayParticipant:
    """The peer node's side of a room, as a participant of the local room."""

    remote = True
    mirror = False
    can_subscribe = True
    auto_subscribe = True  # every local track crosses the link
    can_publish = True
    can_publish_data = True

    def __init__(self, room: Room, peer_url: str, token: str, identity: str) -> None:
        self.room = room
        self.peer_url = peer_url
        self.sid = new_sid("PA")
        self.identity = identity
        self.name = identity
        self.session_id = ""
        self.joined_at = time.time()
        self.state = models.ParticipantInfo.State.JOINED
        self.tracks: dict[str, PublishedTrack] = {}
        self.closed = asyncio.Event()
        self._outgoing: dict[str, ForwardTrack] = {}  # local track sid -> forward to the peer
        self._tasks: set[asyncio.Task[Any]] = set()
        self.client = LiveKitClient(
            peer_url,
            token,
            on_track=self._on_peer_track,
            on_data=self._on_peer_data,
            query={"relay": "1"},
        )

    # ------------------------------------------------------------ the Participant surface

    def info(self) -> models.ParticipantInfo:
        return far_side_info(self)

    def send(self, response: Any) -> None:
        pass  # the peer learns about the room from its own node's signalling

    def send_data(self, label: str, payload: bytes) -> None:
        self.client.send_data(label, payload)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def negotiate_subscriber(self) -> None:
        pass  # publishing to the peer negotiates on its own

    def subscribe(self, track: PublishedTrack) -> None:
        if track.owner is self or track.owner.remote or track.sid in self._outgoing:
            return
        forward = ForwardTrack(
            track_id=f"relay-{track.sid}",
            max_queue=self.room.settings.subscriber_queue,
            kind=track.kind,
        )
        self._outgoing[track.sid] = forward
        track.subscribers[self.sid] = forward
        keyframe = None
        if track.kind == "video":
            # the far side's viewers ask for keyframes through the link (and after a gap)
            keyframe = forward.on_gap = track.keyframe_for(forward)
            track.pick_layer(forward)
        self.spawn(
            self._publish(
                forward, f"{track.owner.identity}/{track.name}", track.mime_type, keyframe
            )
        )

    async def _publish(
        self, forward: ForwardTrack, name: str, mime: str, keyframe: Any = None
    ) -> None:
        try:
            await self.client.publish(forward, name, mime=mime, on_keyframe=keyframe)
        except Exception as exc:
            log.warning("relay of %s to %s failed: %s", name, self.peer_url, exc)

    def unsubscribe(self, track: PublishedTrack) -> bool:
        forward = self._outgoing.pop(track.sid, None)
        track.subscribers.pop(self.sid, None)
        if forward is not None:
            forward.stop()  # aiortc cannot remove the track; the peer hears silence
        return False

    # ------------------------------------------------------------ from the peer

    def _on_peer_track(self, track_sid: str, owner_sid: str, receiver: Any) -> None:
        owner = self.client.participants.get(owner_sid)
        info = next((t for t in owner.tracks if t.sid == track_sid), None) if owner else None
        # "<identity>/<name>": the room shows the track as its far-side owner's (a mirror)
        name = f"{owner.identity}/{info.name if info else track_sid}" if owner else track_sid
        kind = receiver.track.kind
        transceiver = next(
            (t for t in self.client.subscriber.getTransceivers() if t.receiver is receiver), None
        )
        mime = negotiated_mime(transceiver) if transceiver is not None else ""
        published = PublishedTrack(
            sid=new_sid("TR"),
            cid=track_sid,
            name=name,
            owner=self,  # type: ignore[arg-type]
            kind=kind,
            mime_type=mime or "audio/opus",
            source=models.TrackSource.CAMERA if kind == "video" else models.TrackSource.MICROPHONE,
        )
        published.receive(receiver, mime)
        self.room.publish(self, published)  # type: ignore[arg-type]

    def _on_peer_data(self, label: str, payload: bytes) -> None:
        self.room.on_data(self, label, payload)  # type: ignore[arg-type]

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.client.connect()
        self.room.participants[self.sid] = self  # type: ignore[assignment]
        await self.client.open_data()
        for other in list(self.room.participants.values()):
            for track in list(other.tracks.values()):
                self.subscribe(track)
        self.room.send_roster(force=True)  # the far side learns who is here
        self.spawn(self._watch())

    async def _watch(self) -> None:
        await self.client.closed.wait()
        await self.close()

    async def close(self, reason: int = 0, send_leave: bool = True) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self.state = models.ParticipantInfo.State.DISCONNECTED
        self.room.leave(self)  # type: ignore[arg-type]
        for forward in self._outgoing.values():
            forward.stop()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await self.client.close()
