"""The TTS role: ``create_role`` (``node.tts.role``) is what the node agent loads."""

from node.tts.role import TtsRole, create_role

__all__ = ["TtsRole", "create_role"]
