"""The STT role over its real WebSocket protocol, with real weights and real (Kokoro) speech.

The role runs in-process on an aiohttp server with the real token verifier (issuers read from the
session localnet), a real durable outbox posting to a stand-in gateway, and the real models;
one test runs `node --role stt` as a process. Most streams go faster than real time; one short
one goes in real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yaml
from solders.keypair import Keypair

from node.stt.models import Models
from registry.keys import load_keypair
from registry.tokens import Grant, mint_token
from tests.conftest import ROOT, Chain, free_port
from tests.support.speech import corpus, noise, silence, speak, stream_audio, word_errors
from tests.support.stt_node import Client, connect, stt_node

pytestmark = pytest.mark.timeout(120)

# Tests that send recorded audio as fast as possible (speed=None) test transcription, not pacing:
# they give the stream a burst budget as long as their audio (an operator setting for batch
# clients); pacing itself is tested in tests/security/test_node_attacks.py.
BATCH_BURST = 600.0


@pytest.fixture(scope="session")
def sentences() -> list[tuple[str, np.ndarray]]:
    return corpus()


def finals(client: Client) -> list[dict[str, Any]]:
    return [m for m in client.of("transcription") if m["is_final"]]


# ------------------------------------------------------------------------------ accuracy


async def test_wer_on_24_kokoro_sentences_faster_than_real_time(
    chain: Chain, tmp_path: Path, stt_models: Models, sentences: list[tuple[str, np.ndarray]]
) -> None:
    async with (
        stt_node(
            chain, tmp_path, stt_models, interim_results=False, burst_seconds=BATCH_BURST
        ) as node,
        connect(node, {"session_key": node.token(chain), "language": "en"}) as c,
    ):
        ready = await c.type("ready")
        assert ready["language"] == "en" and ready["client_id"] and ready["remaining_seconds"] > 290
        audio = np.concatenate([np.concatenate([s, silence(0.9)]) for _, s in sentences])
        t0 = time.monotonic()
        await stream_audio(c.ws, audio, speed=None)
        await c.ws.send_json({"type": "flush"})
        await c.wait_for(
            lambda m: (
                m["type"] == "transcription"
                and m["is_final"]
                and m["end"] > len(audio) / 16000 - 2.5
            ),
            timeout=90,
        )
        elapsed = time.monotonic() - t0
        got = finals(c)
        hyp = " ".join(m["text"] for m in got)
        ref = " ".join(t for t, _ in sentences)
        errors, n = word_errors(ref, hyp)
        print(
            f"WER {errors}/{n} = {errors / n:.1%} over {len(sentences)} sentences, "
            f"{len(audio) / 16000:.0f}s of audio in {elapsed:.1f}s"
        )
        assert len(sentences) >= 20
        assert errors / n <= 0.10, hyp
        assert audio.size / 16000 > elapsed  # faster than real time, end to end
        for m in got:
            assert m["language"] == "en" and 0 < m["confidence"] <= 1 and m["start"] < m["end"]
            assert m["words"] and all(
                m["start"] - 0.05 <= w["start"] <= w["end"] <= m["end"] + 0.05 for w in m["words"]
            )
        starts = [m for m in c.of("vad_event") if m["event"] == "speech_start"]
        assert len(starts) == len(got)


async def test_real_time_stream_events_in_order_interims_and_expiry(
    chain: Chain, tmp_path: Path, stt_models: Models
) -> None:
    text = "Could you explain how the new billing system works for our customers?"
    audio = np.concatenate([silence(0.4), speak(text, "af_heart"), silence(1.0)])
    async with (
        stt_node(
            chain, tmp_path, stt_models, usage_report_interval=1.0, interim_max_utilization=1.0
        ) as node,
        connect(node, {"session_key": node.token(chain, seconds=11)}) as c,
    ):
        ready = await c.type("ready")
        assert ready["remaining_seconds"] <= 11
        first = await c.type("session_expiring")  # under 60 s left at once
        assert first["remaining_seconds"] <= 11
        await stream_audio(c.ws, audio, speed=1.0)
        final = await c.wait_for(lambda m: m["type"] == "transcription" and m["is_final"])
        kinds = [
            (m["type"], m.get("event"), m.get("is_final"))
            for _, m in c.messages
            if m["type"] in ("vad_event", "transcription")
        ]
        assert kinds[0] == ("vad_event", "speech_start", None)
        end_at = kinds.index(("vad_event", "speech_end", None))
        assert kinds[end_at + 1 :] == [("transcription", None, True)]
        assert any(k == ("transcription", None, False) for k in kinds[1:end_at]), (
            "interim results while speech goes on"
        )
        assert word_errors(text, final["text"])[0] <= 1, final["text"]
        t_end = next(t for t, m in c.messages if m.get("event") == "speech_end")
        t_final = next(t for t, m in c.messages if m is final)
        print(
            f"real time: final {1000 * (t_final - t_end):.0f} ms after speech_end, "
            f"latency_ms {final['latency_ms']}"
        )
        assert t_final - t_end < 2.0
        warn10 = await c.wait_for(
            lambda m: m["type"] == "session_expiring" and m["remaining_seconds"] <= 10, timeout=10
        )
        assert warn10["remaining_seconds"] >= 8
        await c.type("session_expired", timeout=15)
        await c.closed()
        await asyncio.sleep(0.5)
        complete = [e for e in node.events if e["event"] == "complete"]
        assert complete and abs(complete[-1]["usage"]["duration_seconds"] - 11) < 0.5
        assert any(e["event"] == "usage" for e in node.events), "periodic usage reports"


# ------------------------------------------------------------------------------ no speech


async def test_silence_and_noise_produce_nothing(
    chain: Chain, tmp_path: Path, stt_models: Models
) -> None:
    async with (
        stt_node(chain, tmp_path, stt_models, burst_seconds=BATCH_BURST) as node,
        connect(node, {"session_key": node.token(chain)}) as c,
    ):
        await c.type("ready")
        audio = np.concatenate([silence(2), noise(3, 0.05), noise(2, 0.2, seed=3), silence(1)])
        hum = 0.1 * np.sin(2 * np.pi * 50 * np.arange(32000) / 16000).astype(np.float32)
        await stream_audio(c.ws, np.concatenate([audio, hum]), speed=None)
        await c.ws.send_json({"type": "flush"})
        await c.ws.send_json({"type": "ping"})
        await c.type("pong")
        await asyncio.sleep(1.0)
        assert c.of("transcription") == []


async def test_flush_reset_and_mid_session_config(
    chain: Chain, tmp_path: Path, stt_models: Models, sentences: list[tuple[str, np.ndarray]]
) -> None:
    (t1, s1), (t2, s2) = sentences[0], sentences[1]
    async with (
        stt_node(
            chain, tmp_path, stt_models, interim_results=False, burst_seconds=BATCH_BURST
        ) as node,
        connect(node, {"session_key": node.token(chain)}) as c,
    ):
        await c.type("ready")
        # flush: speech with no trailing silence is forced out
        await stream_audio(c.ws, np.concatenate([silence(0.3), s1]), speed=None)
        await c.ws.send_json({"type": "flush"})
        final = await c.wait_for(lambda m: m["type"] == "transcription")
        assert final["is_final"] and word_errors(t1, final["text"])[0] <= 1
        # reset: half a sentence then reset: nothing comes of it
        await stream_audio(c.ws, s2[: len(s2) // 2], speed=None)
        await c.ws.send_json({"type": "reset"})
        await stream_audio(c.ws, silence(1.0), speed=None)
        await c.ws.send_json({"type": "ping"})
        await c.type("pong")
        await asyncio.sleep(0.8)
        assert len(c.of("transcription")) == 1
        # mid-session config: ready again with the new language, buffers cleared
        await c.ws.send_json({"type": "config", "language": "auto"})
        ready = await c.wait_for(lambda m: m["type"] == "ready" and m["language"] == "auto")
        assert ready["model"] == "base"
        await stream_audio(c.ws, np.concatenate([silence(0.3), s2, silence(0.8)]), speed=None)
        final = await c.wait_for(lambda m: m["type"] == "transcription" and m["start"] > 4)
        assert final["language"] == "en" and word_errors(t2, final["text"])[0] <= 2
        await c.ws.send_json({"type": "config", "language": "tlh"})
        err = await c.type("error")
        assert err["error"] == "unsupported_language"


async def test_client_end_of_utterance_silence(
    chain: Chain, tmp_path: Path, stt_models: Models, sentences: list[tuple[str, np.ndarray]]
) -> None:
    """A client may ask its own end-of-utterance silence: a 350 ms pause between two sentences
    ends an utterance for a client that asked for 200 ms, not under the node's 500 ms."""
    (_, s1), (_, s2) = sentences[2], sentences[3]
    audio = np.concatenate([silence(0.3), s1, silence(0.35), s2, silence(1.0)])
    ends: dict[str, int] = {}
    async with stt_node(
        chain, tmp_path, stt_models, interim_results=False, burst_seconds=BATCH_BURST
    ) as node:
        for name, extra in (("node", {}), ("client", {"end_of_utterance_ms": 200})):
            async with connect(node, {"session_key": node.token(chain), **extra}) as c:
                await c.type("ready")
                await stream_audio(c.ws, audio, speed=None)
                await c.ws.send_json({"type": "flush"})
                await c.wait_for(
                    lambda m: (
                        m["type"] == "transcription"
                        and m["is_final"]
                        and m["end"] > len(audio) / 16000 - 2.5
                    ),
                    timeout=60,
                )
                ends[name] = sum(1 for m in c.of("vad_event") if m["event"] == "speech_end")
        assert ends["node"] == 1 and ends["client"] >= 2, ends
        async with connect(node, {"session_key": node.token(chain)}) as c:
            await c.type("ready")
            for bad in (50, 9000, "fast", True):
                await c.ws.send_json({"type": "config", "end_of_utterance_ms": bad})
                err = await c.wait_for(
                    lambda m, bad=bad: (
                        m["type"] == "error"
                        and m["error"] == "invalid_config"
                        and str(bad) in m["message"]
                    )
                )
                assert "100 to 5000" in err["message"]
            await c.ws.send_json({"type": "config", "end_of_utterance_ms": 300})
            await c.wait_for(lambda m: m["type"] == "ready" and len(c.of("ready")) == 2)


# ------------------------------------------------------------------------------ protocol


async def test_malformed_input_is_answered_and_the_session_survives(
    chain: Chain, tmp_path: Path, stt_models: Models
) -> None:
    async with (
        stt_node(chain, tmp_path, stt_models) as node,
        connect(node, {"session_key": node.token(chain)}) as c,
    ):
        await c.type("ready")
        await c.ws.send_bytes(b"\x00\x01\x02")  # odd length
        await c.ws.send_bytes(b"\x00" * 32002)  # over 1 s
        await c.ws.send_str("this is not json")
        await c.ws.send_str("[1, 2]")
        await c.ws.send_json({"type": "dance"})
        await c.ws.send_json({"type": "config", "model": "gpt"})
        await c.ws.send_json({"type": "ping"})
        await c.type("pong")
        codes = [m["error"] for m in c.of("error")]
        assert codes == [
            "bad_audio",
            "bad_audio",
            "invalid_json",
            "invalid_json",
            "unknown_type",
            "invalid_config",
        ]
        assert all(m["message"] for m in c.of("error"))
        await c.ws.send_bytes(b"\x00\x00" * 320)
        await c.ws.send_json({"type": "ping"})
        await asyncio.sleep(0.3)
        assert len(c.of("pong")) == 2 and not c.ws.closed


async def test_tokens_are_checked(chain: Chain, tmp_path: Path, stt_models: Models) -> None:
    async with stt_node(chain, tmp_path, stt_models, config_timeout=0.5) as node:
        cases = {
            "garbage": "not-a-jwt",
            "foreign": mint_token(Keypair(), "x", Grant("stt", limit=60), 60),
            "tts": mint_token(chain.issuer, "x", Grant("tts", limit=60), 60),
            "expired": mint_token(
                chain.issuer, "x", Grant("stt", limit=60), 1, now=time.time() - 60
            ),
            "no node": mint_token(chain.issuer, "x", Grant("stt", limit=60), 60),
            "other node": mint_token(
                chain.issuer, "x", Grant("stt", limit=60), 60, audience=str(Keypair().pubkey())
            ),
        }
        for name, token in cases.items():
            async with connect(node, {"session_key": token}) as c:
                err = await c.type("error")
                expected = "wrong_node" if name.endswith("node") else "invalid_token"
                assert err["error"] == expected, (name, err)
                if name.endswith("node"):
                    assert err["message"].startswith("wrong_node:"), err
                await c.closed()
        async with connect(node, {"language": "en"}) as c:  # no session_key at all
            assert (await c.type("error"))["error"] == "invalid_token"
        async with connect(node) as c:  # nothing within config_timeout
            await c.ws.send_bytes(b"\x00\x00" * 160)
            assert (await c.type("error"))["error"] == "not_configured"
            err = await c.wait_for(lambda m: m.get("error") == "config_timeout", timeout=3)
            assert err["type"] == "error"
            await c.closed()
        assert node.role.load() == 0


async def test_capacity_is_measured_with_the_real_models_and_cached(
    chain: Chain, tmp_path: Path, stt_models: Models
) -> None:
    """At start the role measures one real-time stream (front end over real speech, a Whisper
    final) and advertises what the cores carry, at most the config's; a restart on the same
    machine and models reuses the figure."""
    from node.capacity import derive_capacity, usable_cores

    async with stt_node(chain, tmp_path, stt_models, capacity=64, calibrate=True) as node:
        cal = node.role.context.calibration
        assert cal is not None and not cal.cached and 0 < cal.cost < 2
        assert node.role.capacity == derive_capacity(cal.cost, usable_cores(), 64)
        assert 1 <= node.role.capacity <= 64
        first = node.role.capacity
    async with stt_node(chain, tmp_path, stt_models, capacity=64, calibrate=True) as node:
        again = node.role.context.calibration
        assert again is not None and again.cached and again.cost == cal.cost
        assert node.role.capacity == first
    async with stt_node(chain, tmp_path, stt_models, capacity=2, calibrate=True) as node:
        assert node.role.capacity == min(first, 2)  # the config bounds what is advertised


async def test_server_full_at_capacity_and_extend(
    chain: Chain, tmp_path: Path, stt_models: Models
) -> None:
    # measured capacity bounded by the config's 1: the node is full with one stream
    async with stt_node(chain, tmp_path, stt_models, capacity=1, calibrate=True) as node:
        assert node.role.capacity == 1 and node.role.context.calibration is not None
        sid = "extend-" + str(time.time())
        async with connect(node, {"session_key": node.token(chain, 100, session_id=sid)}) as a:
            await a.type("ready")
            assert node.role.load() == 1
            async with connect(node, {"session_key": node.token(chain)}) as b:
                err = await b.type("error")
                assert err == {
                    "type": "error",
                    "error": "server_full",
                    "message": "Server at capacity",
                }
                await b.closed()
            await a.ws.send_json(
                {"type": "extend", "session_key": node.token(chain, 400, session_id=sid)}
            )
            ext = await a.type("session_extended")
            assert 395 < ext["remaining_seconds"] <= 400
            await a.ws.send_json({"type": "extend", "session_key": node.token(chain, 900)})
            assert (await a.type("error"))["error"] == "invalid_token"  # another session's key
            await a.ws.send_json({"type": "extend", "session_key": "garbage"})
            await a.ws.send_json({"type": "ping"})
            await a.type("pong")  # a refused extend leaves the session running
            assert [m["error"] for m in a.of("error")] == ["invalid_token", "invalid_token"]
        await asyncio.sleep(0.2)
        assert node.role.load() == 0


async def test_reconnect_resumes_the_paused_clock(
    chain: Chain, tmp_path: Path, stt_models: Models
) -> None:
    async with stt_node(chain, tmp_path, stt_models) as node:
        token = node.token(chain, seconds=30)
        async with connect(node, {"session_key": token}) as c:
            first = await c.type("ready")
            await asyncio.sleep(1.5)
        await asyncio.sleep(2.0)  # disconnected: the clock is paused
        async with connect(node, {"session_key": token}) as c:
            again = await c.type("ready")
        used = first["remaining_seconds"] - again["remaining_seconds"]
        assert 1.3 < used < 2.3, (first, again)
        await asyncio.sleep(1.0)
        usage = [e for e in node.events if e["event"] == "usage"]
        assert usage and 1.3 < usage[-1]["usage"]["duration_seconds"] < 2.5
        assert usage[-1]["session_id"] and not [e for e in node.events if e["event"] == "complete"]


async def test_a_session_the_client_left_settles_after_the_reconnect_grace(
    chain: Chain, tmp_path: Path, stt_models: Models
) -> None:
    """The client left and no reconnect with the same key came within ``reconnect_grace``: the
    session is reported complete, once, long before its token expires (300 s paid, 600 s to
    live). A reconnect within the grace continues the same session; one after it is refused."""
    async with stt_node(chain, tmp_path, stt_models, reconnect_grace=3.0) as node:
        token = node.token(chain, seconds=300)
        async with connect(node, {"session_key": token}) as c:
            first = await c.type("ready")
            await asyncio.sleep(1.0)
        await asyncio.sleep(0.2)  # gone, within the grace
        async with connect(node, {"session_key": token}) as c:
            again = await c.type("ready")
            assert again["session_id"] == first["session_id"]
            await asyncio.sleep(0.5)
        for _ in range(300):  # the grace, the next sweep, the outbox's delivery
            if any(e["event"] == "complete" for e in node.events):
                break
            await asyncio.sleep(0.1)
        complete = [e for e in node.events if e["event"] == "complete"]
        assert [e["session_id"] for e in complete] == [first["session_id"]], node.events
        # both connections count (1.0 s + 0.5 s), the gap and the grace (3 s) do not
        assert 1.3 < complete[0]["usage"]["duration_seconds"] < 4.0, complete
        async with connect(node, {"session_key": token}) as c:
            refused = await c.type("error")
            assert refused["error"] == "session_expired" and "settled" in refused["message"]
            await c.closed()
        await asyncio.sleep(1.0)
        assert [e for e in node.events if e["event"] == "complete"] == complete  # reported once
        assert not [
            e for e in node.events[node.events.index(complete[0]) + 1 :] if e["event"] == "usage"
        ], "nothing reported after the settling"


# ------------------------------------------------------------------------------ the real process


async def test_node_process_serves_stt(
    chain: Chain, tmp_path: Path, sentences: list[tuple[str, np.ndarray]]
) -> None:
    port = free_port()
    config = {
        "role": "stt",
        "keypair": str(tmp_path / "stt.json"),
        "rpc_url": chain.url,
        "listen_port": port,
        "public_url": f"http://127.0.0.1:{port}",
        "location": {"lat": 50.1, "lon": 8.7, "country": "DE"},
        "capacity": 3,
        "report_interval": 1,
        "drain_timeout": 2,
        "state_dir": str(tmp_path / "state"),
        "stt": {
            "whisper": {"models": ["tiny.en"]},
            "interim_results": False,
            "burst_seconds": BATCH_BURST,
        },
    }
    path = tmp_path / "node-stt.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(tmp_path / "node.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--config", str(path)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            health = None
            while time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "node.log").read_text()[-3000:]
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                        if resp.status == 200:
                            health = await resp.json()
                            break
                await asyncio.sleep(0.3)
            # measured at start, the config's 3 as the upper bound
            assert health and health["role"] == "stt" and 1 <= health["capacity"] <= 3
            assert health["capacity_configured"] == 3
            text, audio = sentences[2]
            node_key = str(load_keypair(tmp_path / "stt.json").pubkey())
            token = mint_token(chain.issuer, "a", Grant("stt", limit=60), 60, audience=node_key)
            async with http.ws_connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
                c = Client(ws)
                await ws.send_json({"type": "config", "session_key": token})
                assert (await c.type("ready"))["model"] == "tiny.en"
                await stream_audio(ws, np.concatenate([audio, silence(0.8)]), speed=None)
                final = await c.type("transcription")
                assert word_errors(text, final["text"])[0] <= 1
                async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                    assert (await resp.json())["load"] == 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_bad_stt_config_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "role": "stt",
                "keypair": str(tmp_path / "k.json"),
                "listen_port": free_port(),
                "public_url": "http://127.0.0.1:1",
                "location": {"lat": 0, "lon": 0, "country": "DE"},
                "capacity": 1,
                "stt": {"vad": {"treshold": 0.5}},
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "stt.vad.treshold: unknown key" in proc.stderr


async def test_hallucinated_phrase_over_near_silence_is_dropped(
    chain: Chain,
    tmp_path: Path,
    stt_models: Models,
    monkeypatch: pytest.MonkeyPatch,
    sentences: list[tuple[str, np.ndarray]],
) -> None:
    """The engine "hears" a subtitle credit in faint audio the validator let through: the filter
    drops it; the same engine output over clearly spoken audio of that length is kept."""
    from node.stt.engines import EngineResult
    from node.stt.frontend import Utterance

    async with stt_node(chain, tmp_path, stt_models) as node:
        role = node.role
        monkeypatch.setattr(
            role.models.whisper,
            "transcribe",
            lambda audio, language, word_timestamps=False, prompt=None: EngineResult(
                "Thanks for watching!", "en", 0.4, engine="whisper"
            ),
        )
        speech = sentences[0][1][:32000]
        probs = np.full(len(speech) // 512, 0.9, dtype=np.float32)
        from node.stt.validation import rms_dbfs

        scale = 10 ** ((-38 - rms_dbfs(speech)) / 20)  # faint: -38 dBFS passes validation
        faint = Utterance(1, True, 0, speech * scale, probs, time.monotonic())
        assert role.transcribe(faint, "en", "whisper") is None
        assert role.stats["filtered"] == 1
        loud = Utterance(2, True, 0, speech, probs, time.monotonic())
        assert role.transcribe(loud, "en", "whisper")["text"] == "Thanks for watching!"


async def test_draining_node_refuses_new_streams(
    chain: Chain, tmp_path: Path, stt_models: Models
) -> None:
    async with stt_node(chain, tmp_path, stt_models) as node:
        async with connect(node, {"session_key": node.token(chain)}) as live:
            await live.type("ready")
            await node.role.drain()
            async with connect(node, {"session_key": node.token(chain)}) as late:
                assert (await late.type("error"))["error"] == "draining"
                await late.closed()
            await live.ws.send_json({"type": "ping"})
            await live.type("pong")  # live streams go on
            assert node.role.load() == 1
