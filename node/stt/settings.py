"""The ``stt:`` section of a node's YAML, validated (unknown keys are errors naming the key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.settings import SettingsError
from node.capacity import usable_cores


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WhisperSettings(_Strict):
    models: list[str] = Field(
        default_factory=lambda: ["tiny.en", "base"],
        min_length=1,
        description="CTranslate2 Whisper models by offline-pack name (tiny.en, base) or path; "
        "English uses the first English-capable one, other languages the first "
        "multilingual one",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compute_type: str = "auto"  # int8 on CPU, int8_float16 on CUDA
    cpu_threads: int = Field(
        default=1,
        ge=1,
        description="threads per inference; on CPU one thread per inference and one inference "
        "per core get through 3-4x the utterances of two threads each (measured on tiny.en and "
        "base), at about the same latency",
    )
    workers: int = Field(
        default_factory=usable_cores,
        ge=1,
        description="inferences at once (CTranslate2 replicas); default: the cores this process "
        "may use",
    )
    beam_size: int = Field(default=1, ge=1)
    encoder_window: Literal["auto", "full"] = Field(
        default="auto",
        description="auto: pad each utterance to a 10/15/20/30 s encoder window "
        "(2-3x less CPU); full: Whisper's standard 30 s",
    )


class ParakeetSettings(_Strict):
    model: str | None = None
    workers: int = Field(default=1, ge=1)


class VadSettings(_Strict):
    threshold: float = Field(default=0.45, gt=0, lt=1)
    min_speech_ms: float = Field(default=250, ge=32)
    end_of_utterance_ms: float = Field(
        default=500, ge=64, le=5000, description="silence that ends an utterance"
    )
    min_silence_ms: float = Field(
        default=250, ge=32, description="adaptive floor for long utterances"
    )
    adapt_after_s: float = Field(default=3.0, ge=0)
    max_utterance_s: float = Field(default=15.0, ge=1, le=30)
    speech_pad_ms: float = Field(default=300, ge=0, le=1000)


class ValidationSettings(_Strict):
    min_confidence: float = Field(default=0.6, ge=0, le=1)
    min_speech_ratio: float = Field(default=0.15, ge=0, le=1)
    min_rms_dbfs: float = -50.0


class STTSettings(_Strict):
    whisper: WhisperSettings = Field(default_factory=WhisperSettings)
    parakeet: ParakeetSettings | None = None
    vad: VadSettings = Field(default_factory=VadSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    denoise: bool = True
    interim_results: bool = True
    interim_interval_ms: float = Field(default=1000, ge=200)
    word_timestamps: bool = True
    speculative_finals: bool = Field(
        default=True,
        description="start the final's inference once the pause reaches "
        "speech_pad_ms, before end_of_utterance_ms; reused if no "
        "speech followed (only when an engine is idle)",
    )
    queue_size: int = Field(default=32, ge=1, description="inferences waiting, all clients")
    interim_max_utilization: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="partials only while the engine was busy less than this share of the last 5 s",
    )
    config_timeout: float = Field(default=10.0, gt=0)
    usage_report_interval: float = Field(default=15.0, gt=0)
    reconnect_grace: float = Field(
        default=5.0,
        ge=0,
        description="seconds a session with no socket waits for a reconnect before it settles",
    )
    expiry_warnings: list[int] = Field(default_factory=lambda: [60, 10])
    max_frame_ms: float = Field(default=1000, gt=0)
    burst_seconds: float = Field(
        default=2.0,
        ge=0.1,
        description="audio a client may send ahead of real time; beyond "
        "it frames are dropped with one rate_limited error",
    )
    audio_queue_frames: int = Field(
        default=256,
        ge=8,
        description="frames waiting for the front end per stream; when full, "
        "the node stops reading the socket (TCP backpressure)",
    )
    frontend_threads: int = Field(default=2, ge=1)
    model_cache: Path | None = Field(
        default=None,
        description="where split models are joined; default $VOICENET_MODEL_DIR "
        "or <repo>/.local/models",
    )

    @model_validator(mode="after")
    def _check(self) -> STTSettings:
        self.vad.min_silence_ms = min(self.vad.min_silence_ms, self.vad.end_of_utterance_ms)
        return self


def load_settings(raw: dict[str, Any] | None) -> STTSettings:
    try:
        return STTSettings.model_validate(raw or {})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"stt.{key}: {msg}")
        raise SettingsError("invalid stt settings: " + "; ".join(problems)) from None
