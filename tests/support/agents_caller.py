"""A caller for voice-agent tests: a second participant on the official ``livekit`` SDK.

It joins with the client token of an agent session, publishes speech (16 kHz float arrays from
tests/support/speech.py, sent at real time as 48 kHz frames), records what it hears from the agent
(48 kHz mono PCM16, each 10 ms frame stamped with its arrival time), sends the ``client-ready``
data message once it is subscribed to the agent's track (as the reference's browser page does),
starts speaking only once the agent receives its track (``local_track_subscribed``), and keeps
the data messages it receives (``transcript``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import soxr
from livekit import rtc

RATE = 48_000
FRAME = 480  # 10 ms


class Caller:
    def __init__(self, identity: str = "caller") -> None:
        self.identity = identity
        self.room = rtc.Room()
        self.heard: list[tuple[float, np.ndarray]] = []  # (arrival, 10 ms of int16)
        self.data: list[tuple[str, bytes, str]] = []  # (topic, payload, sender identity)
        self.agent_track: asyncio.Future[rtc.RemoteAudioTrack] | None = None
        self.speech_ended_at: float | None = None  # when the last word left the source
        self._source: rtc.AudioSource | None = None
        self._recorder: asyncio.Task[None] | None = None

    async def join(self, ws_url: str, token: str, ready: bool = True) -> None:
        """Join; once the agent's track is subscribed, record it (and send client-ready)."""
        self.agent_track = asyncio.get_running_loop().create_future()

        def subscribed(
            track: rtc.Track, pub: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant
        ) -> None:
            if track.kind == rtc.TrackKind.KIND_AUDIO and not self.agent_track.done():
                self.agent_track.set_result(track)  # type: ignore[arg-type]
                self._recorder = asyncio.ensure_future(self._record(track, ready))

        self.room.on("track_subscribed", subscribed)
        self.room.on(
            "data_received",
            lambda p: self.data.append(
                (p.topic, bytes(p.data), p.participant.identity if p.participant else "")
            ),
        )
        await asyncio.wait_for(self.room.connect(ws_url, token), 20)

    async def _record(self, track: rtc.Track, ready: bool) -> None:
        stream = rtc.AudioStream(track, sample_rate=RATE, num_channels=1)
        if ready:
            await self.room.local_participant.publish_data(
                b"client-ready", reliable=True, topic="client-ready"
            )
        async for event in stream:
            self.heard.append(
                (time.monotonic(), np.frombuffer(event.frame.data, dtype=np.int16).copy())
            )

    async def say(self, audio16k: np.ndarray, tail_silence: float = 0.0) -> None:
        """Speak ``audio16k`` (float, 16 kHz) into the room in real time."""
        if self._source is None:
            self._source = rtc.AudioSource(RATE, 1)
            track = rtc.LocalAudioTrack.create_audio_track("mic", self._source)
            heard = asyncio.get_running_loop().create_future()
            self.room.on("local_track_subscribed", lambda t: heard.done() or heard.set_result(t))
            await self.room.local_participant.publish_track(
                track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
            )
            # Speak once the agent receives the track (the SFU's track_subscribed), as a client
            # page shows "speak now" only then: words said before are lost on the way.
            await asyncio.wait_for(heard, 15)
        pcm = soxr.resample(audio16k.astype(np.float32), 16000, RATE)
        pcm = np.concatenate([pcm, np.zeros(int(tail_silence * RATE), dtype=np.float32)])
        data = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
        speech_frames = len(audio16k) * 3 // FRAME
        for k, i in enumerate(range(0, len(data) - FRAME + 1, FRAME)):
            await self._source.capture_frame(
                rtc.AudioFrame(data[i : i + FRAME].tobytes(), RATE, 1, FRAME)
            )
            if k == speech_frames:
                self.speech_ended_at = time.monotonic() + self._source.queued_duration
        await self._source.wait_for_playout()

    def heard_pcm(self, since: float = 0.0) -> np.ndarray:
        chunks = [c for t, c in self.heard if t >= since]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)

    def first_audible(self, since: float = 0.0, level: float = 500.0) -> float | None:
        """Arrival time of the first 10 ms frame louder than ``level`` (RMS) after ``since``."""
        for t, c in self.heard:
            if t >= since and np.sqrt(np.mean(c.astype(float) ** 2)) > level:
                return t
        return None

    async def leave(self) -> None:
        if self._recorder is not None:
            self._recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._recorder
        await self.room.disconnect()
