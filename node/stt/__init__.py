"""The STT role: streaming speech-to-text over WebSocket (`node --role stt`).

Pipeline per client: Silero VAD (vad.py) -> GTCRN denoise (denoise.py) -> speech validation
(validation.py) -> trimming (trimming.py) -> engine (engines.py: faster-whisper, Parakeet slot,
routing) -> hallucination filter (hallucination.py). The protocol and billing clock live in
server.py and clock.py. See README.md for operators.
"""

from node.stt.server import STTRole, create_role

__all__ = ["STTRole", "create_role"]
