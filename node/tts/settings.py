"""The ``tts:`` section of a node config; every key checked, a typo names the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.settings import validate_settings


class TtsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: Literal["kokoro-onnx", "kokoro", "mlx"] = "kokoro-onnx"
    model_dir: Path | None = Field(default=None, description="cache for the assembled Kokoro files")
    provider: str = Field(
        default="auto", description="onnxruntime provider, or auto (CUDA if present)"
    )
    threads: int = Field(
        default=0,
        ge=0,
        description="onnxruntime intra-op threads of a job that "
        "runs alone; 0 = all cores (jobs that share "
        "the node use one each)",
    )
    spin: bool = Field(default=False, description="let onnxruntime threads busy-wait")
    workers: int = Field(
        default=0, ge=0, le=64, description="segments synthesized at once; 0 = one per core"
    )
    voice: str = "af_heart"
    lang_code: str | None = None
    speed: float = Field(default=1.0, ge=0.5, le=2.0)
    max_text_chars: int = Field(default=5000, ge=1, le=100_000)
    max_queued_texts: int = Field(default=64, ge=1)
    max_contexts: int = Field(default=8, ge=1)
    lead_frames: int = Field(
        default=5, ge=0, le=100, description="20 ms frames sent ahead at start"
    )
    lookahead_seconds: float = Field(default=6.0, gt=0, description="synthesis runs this far ahead")
    first_clause_words: int = Field(default=4, ge=1, le=40)
    usage_interval: float = Field(default=10.0, gt=0, description="seconds between usage reports")
    reconnect_grace: float = Field(
        default=5.0,
        ge=0,
        description="seconds a session with no socket waits for a reconnect before it settles",
    )
    auth_timeout: float = Field(default=10.0, gt=0)
    alignment: bool = True
    warmup: bool = True

    @field_validator("voice")
    @classmethod
    def _voice(cls, v: str) -> str:
        from node.tts.voices import EngineError, VoiceSpec

        try:
            VoiceSpec.parse(v)
        except EngineError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("lang_code")
    @classmethod
    def _lang(cls, v: str | None) -> str | None:
        from node.models.kokoro import LANGUAGES

        if v is not None and v not in LANGUAGES:
            raise ValueError(f"expected one of {', '.join(LANGUAGES)}")
        return v


def load_settings(raw: dict[str, Any]) -> TtsSettings:
    return validate_settings(TtsSettings, {k: v for k, v in raw.items()}, "tts")
