"""The STT role: streaming speech-to-text over WebSocket (`node --role stt`).

Pipeline per client: Silero VAD (vad.py) -> GTCRN denoise (denoise.py) -> speech validation
(validation.py) -> trimming (trimming.py) -> engine (engines.py: faster-whisper, Parakeet slot,
routing) -> hallucination filter (hallucination.py). ``create_role`` (role.py) is what the node
agent loads; the socket protocol lives in connection.py, the front end in frontend.py, the billing
clock in clock.py. See README.md for operators.
"""

from node.stt.role import STTRole, create_role

__all__ = ["STTRole", "create_role"]
