"""The STT node's models, loaded once per node and shared by every client: the Whisper engine (and
Parakeet where configured), Silero VAD and, with ``denoise``, GTCRN."""

from __future__ import annotations

from node.models.whisper import gtcrn_path, silero_vad_path
from node.stt.denoise import GTCRNModel
from node.stt.engines import ParakeetEngine, WhisperEngine
from node.stt.settings import STTSettings
from node.stt.vad import SileroModel


class Models:
    """Everything loaded once per node and shared by all clients."""

    def __init__(self, settings: STTSettings) -> None:
        s = settings
        self.whisper = WhisperEngine(
            s.whisper.models,
            s.whisper.device,
            s.whisper.compute_type,
            s.whisper.cpu_threads,
            s.whisper.beam_size,
            s.model_cache,
            s.whisper.encoder_window,
            s.whisper.workers,
        )
        self.parakeet: ParakeetEngine | None = None
        if s.parakeet is not None:
            self.parakeet = ParakeetEngine(s.parakeet.model)
            self.parakeet.load()  # raises EngineUnavailable with what to do
        self.silero = SileroModel(silero_vad_path())
        self.gtcrn = GTCRNModel(gtcrn_path()) if s.denoise else None

    def load(self) -> None:
        self.whisper.load()
