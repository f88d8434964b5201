"""NetworkSTT and NetworkTTS against our real STT and TTS nodes (real weights), with sessions
bought from the real gateway on the localnet (tests/support/agents_network.py). Questions are
spoken by Kokoro (tests/support/speech.py). A loopback relay (tests/support/agents_proxy.py) drops
sockets and slips malformed messages in, which the real nodes never do on their own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time

import numpy as np
import pytest

from agents.network_stt import NetworkSTT, NetworkSTTStream
from agents.network_tts import NetworkTTS, NetworkTTSStream, kokoro_lang_code
from agents.node_socket import Reconnect, stream_url
from agents.plugins import SpeechAudio, SpeechEvent
from tests.support.agents_network import Network  # the `network` fixture: a conftest plugin
from tests.support.agents_proxy import WSProxy
from tests.support.agents_script import hear, push_realtime
from tests.support.speech import silence, speak, word_errors, words

pytestmark = pytest.mark.timeout(300)

QUESTION = "Could you explain how the new billing system works?"


async def collect(stream: NetworkSTTStream, until: str, timeout: float = 60.0) -> list[SpeechEvent]:
    """Events up to and including the first of type ``until``."""
    got: list[SpeechEvent] = []

    async def run() -> None:
        async for event in stream.events():
            got.append(event)
            if event.type == until:
                return

    try:
        await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        raise AssertionError(f"no {until!r} event within {timeout} s; got {got}") from None
    return got


# ------------------------------------------------------------------------------ STT


async def test_stt_transcribes_a_spoken_question(network: Network) -> None:
    bundle = await network.agent_session()
    stt = NetworkSTT(bundle.stt.server_url, bundle.stt.token)
    assert stt.url == stream_url(network.url("stt"))
    stream = await stt.stream()
    try:
        assert stream.session_id == bundle.stt.session_id and stream.remaining_seconds > 200
        pusher = asyncio.create_task(
            push_realtime(stream, np.concatenate([silence(0.3), speak(QUESTION), silence(1.2)]))
        )
        events = await collect(stream, "final")
        await pusher
        kinds = [e.type for e in events]
        assert "speech_start" in kinds and "speech_end" in kinds, kinds
        assert kinds.index("speech_start") < kinds.index("speech_end")
        final = events[-1]
        assert word_errors(QUESTION, final.text)[0] <= 2, final.text
        assert final.latency_ms is not None and final.latency_ms >= 0
        start = next(e for e in events if e.type == "speech_start")
        assert start.at is not None and abs(start.at - time.time()) < 60
    finally:
        await stream.aclose()
    assert [e async for e in stream.events()] == []  # ended after aclose


async def test_stt_reconnects_with_the_same_key_after_a_drop_and_skips_malformed_messages(
    network: Network, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agents.stt")
    bundle = await network.agent_session()
    async with WSProxy(stream_url(network.url("stt"))) as proxy:
        stream = await NetworkSTT(proxy.url, bundle.stt.token, reconnect=Reconnect(6, 0.2)).stream()
        try:
            for bad in (
                "not json {",
                "[1, 2]",
                json.dumps({"type": "transcription", "text": 7}),
                json.dumps({"type": "vad_event", "event": "shout"}),
                json.dumps({"type": "surprise"}),
                b"\x00\x01",
            ):
                await proxy.inject(bad)
            await proxy.drop()
            for _ in range(100):
                if stream.reconnects == 1:
                    break
                await asyncio.sleep(0.1)
            assert stream.reconnects == 1 and proxy.connections == 2
            assert stream.session_id == bundle.stt.session_id  # the same session resumed
            pusher = asyncio.create_task(
                push_realtime(stream, np.concatenate([speak(QUESTION), silence(1.2)]))
            )
            events = await collect(stream, "final")
            await pusher
            assert word_errors(QUESTION, events[-1].text)[0] <= 2, events[-1].text
            assert all(e.type != "error" for e in events), events
        finally:
            await stream.aclose()
    logged = caplog.text
    assert "not JSON" in logged and "not an object" in logged
    assert "malformed 'transcription'" in logged and "malformed 'vad_event'" in logged
    assert "unknown message type 'surprise'" in logged and "binary message" in logged
    assert "reconnecting with the same session key (try 1 of 6" in logged
    assert "STT stream reconnected" in logged


async def test_stt_survives_a_killed_and_restarted_node(
    network: Network, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agents.stt")
    bundle = await network.agent_session()
    stream = await NetworkSTT(
        bundle.stt.server_url, bundle.stt.token, reconnect=Reconnect(tries=8)
    ).stream()
    try:
        network.kill("stt")
        await asyncio.to_thread(network.start, "stt")
        for _ in range(300):
            if stream.reconnects == 1:
                break
            await asyncio.sleep(0.1)
        assert stream.reconnects == 1, caplog.text
        pusher = asyncio.create_task(
            push_realtime(stream, np.concatenate([speak(QUESTION), silence(1.2)]))
        )
        events = await collect(stream, "final")
        await pusher
        assert word_errors(QUESTION, events[-1].text)[0] <= 2
    finally:
        await stream.aclose()
    assert "STT socket to" in caplog.text and "dropped" in caplog.text


async def test_stt_refused_key_ends_the_stream_with_an_error(network: Network) -> None:
    bundle = await network.agent_session()
    from agents.network_stt import STTConnectError

    with pytest.raises(STTConnectError) as refused:
        await NetworkSTT(bundle.stt.server_url, bundle.tts.token).stream()  # a TTS key
    assert refused.value.code == "invalid_token"


# ------------------------------------------------------------------------------ TTS

FIRST = "Hello there, this is the first piece."
SECOND = "And here comes the second one."
LONG = (
    "This answer is long on purpose: it goes on about the weather, the mountains, the rivers "
    "and the sea, so that there is plenty left to say when the caller interrupts it."
)


class Listener:
    """Reads a TTS stream's audio into a list, as the room would."""

    def __init__(self, stream: NetworkTTSStream) -> None:
        self.chunks: list[SpeechAudio] = []
        self.task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: NetworkTTSStream) -> None:
        async for chunk in stream.audio():
            self.chunks.append(chunk)

    async def settled(self, quiet: float = 0.3) -> None:
        """Until no chunk arrived for ``quiet`` seconds."""
        while True:
            n = len(self.chunks)
            await asyncio.sleep(quiet)
            if len(self.chunks) == n:
                return

    def pcm(self, piece: int | None = None) -> np.ndarray:
        return np.frombuffer(
            b"".join(c.pcm16 for c in self.chunks if piece is None or c.piece == piece), dtype="<i2"
        )

    def words(self, piece: int) -> list[str]:
        return [w.word for c in self.chunks if c.piece == piece for w in c.words]


async def transcribe_48k(network: Network, audio: np.ndarray) -> str:
    """What our STT node hears in 48 kHz PCM16 (downsampled with soxr), in real time."""
    import soxr

    bundle = await network.agent_session()
    stream = await NetworkSTT(bundle.stt.server_url, bundle.stt.token).stream()
    try:
        return await hear(stream, soxr.resample(audio.astype(np.float32) / 32768, 48000, 16000))
    finally:
        await stream.aclose()


async def test_tts_speaks_two_pieces_in_order_with_word_timings(network: Network) -> None:
    bundle = await network.agent_session()
    stream = await NetworkTTS(bundle.tts.server_url, bundle.tts.token).stream()
    listener = Listener(stream)
    try:
        assert stream.session_id == bundle.tts.session_id
        first, second = await stream.say(FIRST), await stream.say(SECOND)
        assert (first, second) == (0, 1)
        assert await asyncio.wait_for(stream.wait_done(second), 60) is None
        assert await stream.wait_done(first) is None
        await listener.settled()
        pieces = [c.piece for c in listener.chunks]
        assert pieces == sorted(pieces) and set(pieces) == {0, 1}, "piece 0 wholly before 1"
        ends = [i for i, c in enumerate(listener.chunks) if not c.pcm16]
        assert [listener.chunks[i].piece for i in ends] == [0, 1], "one end mark per piece"
        assert ends[1] == len(listener.chunks) - 1 and pieces[ends[0] + 1] == 1, (
            "each piece's end mark follows all of its audio"
        )
        assert all(len(c.pcm16) == 1920 for c in listener.chunks if c.pcm16), "20 ms at 48 kHz"
        for piece, text in ((0, FIRST), (1, SECOND)):
            assert len(listener.pcm(piece)) > 48000 * 0.8
            assert words(" ".join(listener.words(piece))) == words(text), listener.words(piece)
            timings = [w for c in listener.chunks if c.piece == piece for w in c.words]
            assert all(a.start <= a.end <= b.start + 1e-3 for a, b in itertools.pairwise(timings))
            assert timings[-1].end <= len(listener.pcm(piece)) / 48000 + 0.05
        heard = await transcribe_48k(network, listener.pcm())
        assert word_errors(FIRST + " " + SECOND, heard)[0] <= 3, heard
    finally:
        await stream.aclose()
    await asyncio.wait_for(listener.task, 5)  # audio() ends after aclose


async def test_tts_clear_stops_the_audio_and_nothing_stale_follows(network: Network) -> None:
    bundle = await network.agent_session()
    stream = await NetworkTTS(bundle.tts.server_url, bundle.tts.token).stream()
    listener = Listener(stream)
    try:
        long_piece = await stream.say(LONG)
        queued = await stream.say("This piece is queued and never heard.")
        while len(listener.chunks) < 25:  # half a second in
            await asyncio.sleep(0.02)
        t0 = time.monotonic()
        await stream.clear()
        print(f"clear confirmed in {1000 * (time.monotonic() - t0):.0f} ms")
        at_clear = len(listener.chunks)
        assert await stream.wait_done(long_piece) == "cleared"
        assert await stream.wait_done(queued) == "cleared"
        await asyncio.sleep(1.5)
        assert len(listener.chunks) == at_clear, "no stale audio after clear"
        heard_of_long = len(listener.pcm(long_piece)) / 48000
        assert heard_of_long < 3.0, "the long piece was cut, not played out"
        after = await stream.say("Okay.")
        assert await asyncio.wait_for(stream.wait_done(after), 30) is None
        await listener.settled()
        assert {c.piece for c in listener.chunks[at_clear:]} == {after}
        assert len(listener.pcm(after)) > 48000 * 0.2
    finally:
        await stream.aclose()


async def test_tts_characters_left_decrease_and_extend_raises_them(network: Network) -> None:
    from agents.network_tts import token_character_limit

    bundle = await network.agent_session(tts_max_characters=300)
    assert token_character_limit(bundle.tts.token) == 300
    stream = await NetworkTTS(bundle.tts.server_url, bundle.tts.token).stream()
    listener = Listener(stream)
    try:
        assert stream.characters_left == 300
        piece = await stream.say("  Hello there.  ")
        assert stream.characters_left == 300 - len("Hello there.")
        assert await asyncio.wait_for(stream.wait_done(piece), 30) is None
        await listener.settled()
        assert len(listener.pcm(piece)) > 0
        refused = await stream.say("x" * 400)  # past the session's characters
        why = await asyncio.wait_for(stream.wait_done(refused), 10)
        assert why is not None and "character limit" in why
        assert stream.characters_left == 300 - len("Hello there.")
        async with network.gateway() as gw:
            extended = await gw.extend_agent_session(
                bundle.bundle_id, 1, additional_tts_characters=500
            )
        await stream.extend(extended.tts.token)
        assert stream.limit_characters == 800
        assert stream.characters_left == 800 - len("Hello there."), (
            "the refused text is not counted"
        )
    finally:
        await stream.aclose()


async def test_tts_skips_malformed_messages_and_reconnects_after_a_drop(
    network: Network, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agents.tts")
    bundle = await network.agent_session()
    async with WSProxy(stream_url(network.url("tts"))) as proxy:
        stream = await NetworkTTS(proxy.url, bundle.tts.token, reconnect=Reconnect(4, 0.2)).stream()
        listener = Listener(stream)
        try:
            piece = await stream.say(FIRST)
            while not listener.chunks:
                await asyncio.sleep(0.02)
            for bad in (
                "{oops",
                json.dumps({"type": "alignment", "context_id": "piece-0", "words": "x"}),
                json.dumps({"type": "generating", "context_id": "piece-99"}),
                json.dumps({"type": "weather"}),
            ):
                await proxy.inject(bad)
            assert await asyncio.wait_for(stream.wait_done(piece), 30) is None
            assert len(listener.pcm(piece)) > 48000 * 0.8, "the piece played on"
            await proxy.drop()
            for _ in range(100):
                if stream.reconnects == 1:
                    break
                await asyncio.sleep(0.1)
            assert stream.reconnects == 1
            again = await stream.say("Still here.")
            assert await asyncio.wait_for(stream.wait_done(again), 30) is None
            assert len(listener.pcm(again)) > 48000 * 0.3
        finally:
            await stream.aclose()
    logged = caplog.text
    assert "not JSON" in logged and "malformed 'alignment'" in logged
    assert "malformed 'generating'" in logged and "malformed 'weather'" in logged
    assert "reconnecting with the same session key (try 1 of 4" in logged


def test_languages_map_to_the_nodes_kokoro_codes() -> None:
    assert [kokoro_lang_code(x) for x in ("en", "EN-GB", "es", "a", "pt-BR")] == [
        "a",
        "b",
        "e",
        "a",
        "p",
    ]
    with pytest.raises(ValueError, match="'xx' has no voice"):
        kokoro_lang_code("xx")
