"""``AgentRoom``: the agent's seat in a room, on the official LiveKit SDK (``livekit.rtc``).

In: each remote participant's audio as 16 kHz mono PCM16 (the SDK's ``AudioStream`` resamples),
and room events (joined, left, an audio track to listen to, data, a listener ready).
Out: one 48 kHz mono track for the agent's voice, fed through an ``AudioSource`` whose queue can
be flushed at once (barge-in), and reliable data messages (``transcript``).

What was heard: an interrupted answer must enter the history only as far as it was spoken, so
the room counts, per piece of speech, the samples sent into the source minus those still queued
or flushed (``played_samples``); with the TTS word timings that says which words were heard.

A listener is ready when it sent the data message ``client-ready`` (the reference's browser page
does, once it subscribed to the agent's track), or when the SFU reports a subscription to our
track (the SDK's ``local_track_subscribed``: our SFU sends it once the subscriber's connection
carries the track). The agent greets only then, so no first words are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from livekit import rtc

from agents.plugins import STT_SAMPLE_RATE, TTS_SAMPLE_RATE, SpeechAudio
from agents.queues import end_queue, until_end
from common.tasks import stop_tasks

log = logging.getLogger("agents.room")

READY_MESSAGE = "client-ready"
FRAME_SAMPLES = TTS_SAMPLE_RATE // 50  # 20 ms


@dataclass(frozen=True)
class RoomEvent:
    """``participant_joined`` / ``participant_left`` (``identity``), ``audio_track`` (the
    participant has audio to listen to), ``listener_ready`` (``identity``; "" when the SFU did not
    say who), ``data`` (``payload``, ``topic``), ``disconnected`` (the agent left the room)."""

    type: Literal[
        "participant_joined",
        "participant_left",
        "audio_track",
        "listener_ready",
        "data",
        "disconnected",
    ]
    identity: str = ""
    payload: bytes = b""
    topic: str = ""


class Playout:
    """Samples of each piece sent into the source, and how many of them were flushed unheard."""

    def __init__(self) -> None:
        self.captured: dict[int, int] = {}
        self.flushed: dict[int, int] = {}
        self._recent: deque[list[int]] = deque()  # [piece, samples], oldest first

    def add(self, piece: int, samples: int) -> None:
        self.captured[piece] = self.captured.get(piece, 0) + samples
        if self._recent and self._recent[-1][0] == piece:
            self._recent[-1][1] += samples
        else:
            self._recent.append([piece, samples])
        while len(self._recent) > 64:
            self._recent.popleft()

    def queued(self, queued_samples: int) -> dict[int, int]:
        """The newest ``queued_samples`` (still in the source's queue), by piece."""
        out: dict[int, int] = {}
        for piece, samples in reversed(self._recent):
            if queued_samples <= 0:
                break
            take = min(samples, queued_samples)
            out[piece] = out.get(piece, 0) + take
            queued_samples -= take
        return out

    def flush(self, queued_samples: int) -> None:
        for piece, samples in self.queued(queued_samples).items():
            self.flushed[piece] = self.flushed.get(piece, 0) + samples
        self._recent.clear()

    def played(self, piece: int, queued_samples: int) -> int:
        return (
            self.captured.get(piece, 0)
            - self.flushed.get(piece, 0)
            - self.queued(queued_samples).get(piece, 0)
        )


class AgentRoom:
    def __init__(
        self, *, queue_ms: int = 400, track_name: str = "agent-voice", event_queue_size: int = 256
    ) -> None:
        self.room = rtc.Room()
        self.queue_ms = queue_ms
        self.track_name = track_name
        self.source: rtc.AudioSource | None = None
        self.playout = Playout()
        self.ready_listeners: set[str] = set()
        self._events: asyncio.Queue[RoomEvent | object] = asyncio.Queue(event_queue_size)
        self._audio_ready: dict[str, asyncio.Event] = {}
        self._listener = asyncio.Event()
        self._readers: dict[str, set[asyncio.Queue[bytes | None]]] = {}
        self._closed = False

    # ------------------------------------------------------------ joining

    async def connect(self, ws_url: str, token: str, timeout: float = 20.0) -> None:
        """Join the room and publish the agent's voice track (silent until ``play``)."""
        self._wire_events()
        await asyncio.wait_for(self.room.connect(ws_url, token), timeout)
        self.source = rtc.AudioSource(TTS_SAMPLE_RATE, 1, queue_size_ms=self.queue_ms)
        track = rtc.LocalAudioTrack.create_audio_track(self.track_name, self.source)
        await self.room.local_participant.publish_track(
            track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        )
        for participant in self.room.remote_participants.values():
            self._emit(RoomEvent("participant_joined", participant.identity))
            if self._audio_track(participant) is not None:
                self._has_audio(participant.identity)
        log.info("agent %s joined room %s", self.identity, self.room.name)

    def _wire_events(self) -> None:
        room = self.room
        room.on(
            "participant_connected",
            lambda p: self._emit(RoomEvent("participant_joined", p.identity)),
        )
        room.on("participant_disconnected", self._on_left)
        room.on("track_subscribed", self._on_track)
        room.on(
            "track_unsubscribed",
            lambda track, pub, participant: (
                track.kind == rtc.TrackKind.KIND_AUDIO and self._end_audio(participant.identity)
            ),
        )
        room.on("data_received", self._on_data)
        room.on("local_track_subscribed", lambda track: self._ready(""))
        room.on("disconnected", lambda reason: self._emit(RoomEvent("disconnected")))

    @property
    def identity(self) -> str:
        return self.room.local_participant.identity if self.room.isconnected() else ""

    @property
    def remote_participants(self) -> dict[str, rtc.RemoteParticipant]:
        """Everyone else in the room, by identity."""
        return {p.identity: p for p in self.room.remote_participants.values()}

    # ------------------------------------------------------------ events

    def _emit(self, event: RoomEvent) -> None:
        if self._closed:
            return
        if self._events.full():
            dropped = self._events.get_nowait()
            log.warning("room event queue full (nobody reads events()): dropped %s", dropped)
        self._events.put_nowait(event)

    def _on_left(self, participant: rtc.RemoteParticipant) -> None:
        self.ready_listeners.discard(participant.identity)
        waiting = self._audio_ready.pop(participant.identity, None)
        if waiting is not None:
            waiting.set()  # an audio_frames() still waiting for a track ends
        self._end_audio(participant.identity)
        self._emit(RoomEvent("participant_left", participant.identity))

    def _on_track(
        self,
        track: rtc.Track,
        publication: rtc.RemoteTrackPublication,
        participant: rtc.RemoteParticipant,
    ) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO:
            self._has_audio(participant.identity)

    def _has_audio(self, identity: str) -> None:
        self._audio_ready.setdefault(identity, asyncio.Event()).set()
        self._emit(RoomEvent("audio_track", identity))

    def _on_data(self, packet: rtc.DataPacket) -> None:
        identity = packet.participant.identity if packet.participant else ""
        payload = bytes(packet.data)
        if _is_ready_message(payload, packet.topic):
            self._ready(identity)
            return
        self._emit(RoomEvent("data", identity, payload, packet.topic or ""))

    def _ready(self, identity: str) -> None:
        if identity:
            self.ready_listeners.add(identity)
        self._listener.set()
        log.info("listener %s subscribed to the agent's voice", identity or "(unnamed)")
        self._emit(RoomEvent("listener_ready", identity))

    async def events(self) -> AsyncIterator[RoomEvent]:
        """Room events in order, until ``aclose``."""
        async for event in until_end(self._events):
            yield event

    async def wait_for_listener(self, timeout: float) -> bool:
        """True once some listener is ready (see the module docstring); False after ``timeout``
        (the caller decides: speak anyway, or wait on)."""
        try:
            await asyncio.wait_for(self._listener.wait(), timeout)
            return True
        except TimeoutError:
            return False

    # ------------------------------------------------------------ listening

    @staticmethod
    def _audio_track(participant: rtc.RemoteParticipant) -> rtc.Track | None:
        for publication in participant.track_publications.values():
            track = publication.track
            if track is not None and track.kind == rtc.TrackKind.KIND_AUDIO:
                return track
        return None

    async def audio_frames(self, identity: str) -> AsyncIterator[bytes]:
        """``identity``'s voice as 16 kHz mono PCM16 frames (10 ms), from when it publishes audio
        until its track or the room goes. Never the agent's own track: only remote ones."""
        if identity == self.identity:
            raise ValueError(f"{identity!r} is the agent itself: its own voice is never heard back")
        await self._audio_ready.setdefault(identity, asyncio.Event()).wait()
        participant = self.remote_participants.get(identity)
        track = self._audio_track(participant) if participant else None
        if track is None:
            return
        stream = rtc.AudioStream(track, sample_rate=STT_SAMPLE_RATE, num_channels=1)
        frames: asyncio.Queue[bytes | None] = asyncio.Queue(500)  # 5 s
        self._readers.setdefault(identity, set()).add(frames)
        pump = asyncio.create_task(self._pump(stream, frames, identity))
        try:
            while (frame := await frames.get()) is not None:
                yield frame
        finally:
            self._readers.get(identity, set()).discard(frames)
            await stop_tasks(pump)
            await stream.aclose()

    @staticmethod
    async def _pump(
        stream: rtc.AudioStream, frames: asyncio.Queue[bytes | None], identity: str
    ) -> None:
        """The SDK's stream into ``frames``; a reader that falls 5 s behind loses the oldest."""
        async for event in stream:
            if frames.full():
                frames.get_nowait()
                log.warning("audio of %s is read too slowly: dropped 10 ms", identity)
            frames.put_nowait(event.frame.data.tobytes())
        _put_end(frames)

    def _end_audio(self, identity: str | None = None) -> None:
        """End the ``audio_frames`` iterators of ``identity`` (of everyone when None)."""
        for who, readers in self._readers.items():
            if identity is None or who == identity:
                for frames in readers:
                    _put_end(frames)

    # ------------------------------------------------------------ speaking

    async def play(self, audio: SpeechAudio) -> None:
        """Send a chunk of the agent's voice (48 kHz mono PCM16) into the room, in 20 ms frames;
        waits while the source's queue is full, so a caller paces itself on playback."""
        if self.source is None:
            raise RuntimeError("connect() first: the voice track is published on joining")
        pcm = audio.pcm16
        if len(pcm) % 2:
            raise ValueError(
                f"PCM16 has 2 bytes per sample; piece {audio.piece} chunk has {len(pcm)} bytes"
            )
        step = FRAME_SAMPLES * 2
        for i in range(0, len(pcm), step):
            chunk = pcm[i : i + step]
            samples = len(chunk) // 2
            self.playout.add(audio.piece, samples)
            await self.source.capture_frame(rtc.AudioFrame(chunk, TTS_SAMPLE_RATE, 1, samples))

    def _queued_samples(self) -> int:
        return round(self.source.queued_duration * TTS_SAMPLE_RATE) if self.source else 0

    def flush(self) -> dict[int, int]:
        """Barge-in: drop everything queued for the room now; returns the samples actually
        played of each piece that was sent."""
        if self.source is not None:
            self.playout.flush(self._queued_samples())
            self.source.clear_queue()
        return {piece: self.playout.played(piece, 0) for piece in self.playout.captured}

    def played_samples(self, piece: int) -> int:
        """Samples of ``piece`` that left the queue (heard, or on their way to the listener)."""
        return self.playout.played(piece, self._queued_samples())

    @property
    def speaking(self) -> bool:
        """Audio is still queued for the room."""
        return self._queued_samples() > 0

    async def wait_for_playout(self) -> None:
        if self.source is not None:
            await self.source.wait_for_playout()

    # ------------------------------------------------------------ data

    async def publish_data(
        self,
        payload: bytes | str | dict[str, Any],
        topic: str = "transcript",
        destination_identities: list[str] | None = None,
    ) -> None:
        """A reliable data message (a dict is sent as JSON)."""
        if isinstance(payload, dict):
            payload = json.dumps(payload, separators=(",", ":"))
        await self.room.local_participant.publish_data(
            payload, reliable=True, topic=topic, destination_identities=destination_identities or []
        )

    # ------------------------------------------------------------ leaving

    async def aclose(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(Exception):
            await self.room.disconnect()
        if self.source is not None:
            await self.source.aclose()
        self._closed = True
        end_queue(self._events)
        for event in self._audio_ready.values():
            event.set()  # audio_frames waiters end
        self._end_audio()


def _put_end(frames: asyncio.Queue[bytes | None]) -> None:
    if frames.full():
        frames.get_nowait()
    frames.put_nowait(None)


def _is_ready_message(payload: bytes, topic: str | None) -> bool:
    """``client-ready`` as the topic, as the whole payload, or as ``{"type": "client-ready"}``."""
    if topic == READY_MESSAGE:
        return True
    text = payload.decode("utf-8", "replace").strip()
    if text == READY_MESSAGE:
        return True
    if text.startswith("{"):
        with contextlib.suppress(ValueError):
            data = json.loads(text)
            return isinstance(data, dict) and data.get("type") == READY_MESSAGE
    return False
