"""Voice agents on the network: a spoken conversation through our SFU, STT and TTS nodes.

The public surface: ``VoiceAgent`` (one agent in one room, paid by one agent-session bundle, as
its ``Budget`` says), the plug-in interfaces ``STT``, ``LLM`` and ``TTS`` (``agents.plugins``),
the providers for our nodes (``NetworkSTT``, ``NetworkTTS``, and ``Reconnect``: how their streams
keep a socket), the room (``AgentRoom``), the LLMs (``OpenAICompatibleLLM``, ``EmbeddedLLM``) and
the text chunker (``agents.text``).

Imports ``gateway.client`` (the SDK an agent developer uses anyway) and never the gateway's
server side nor ``node/``.
"""

from agents import text
from agents.agent import VoiceAgent
from agents.budget import Budget
from agents.llm import EmbeddedLLM, OpenAICompatibleLLM
from agents.network_stt import NetworkSTT
from agents.network_tts import NetworkTTS
from agents.node_socket import Reconnect
from agents.pipeline import Pipeline, PipelineConfig
from agents.plugins import (
    LLM,
    STT,
    TTS,
    ChatMessage,
    LLMError,
    SpeechAudio,
    SpeechEvent,
    WordTiming,
)
from agents.room import AgentRoom

__all__ = [
    "LLM",
    "STT",
    "TTS",
    "AgentRoom",
    "Budget",
    "ChatMessage",
    "EmbeddedLLM",
    "LLMError",
    "NetworkSTT",
    "NetworkTTS",
    "OpenAICompatibleLLM",
    "Pipeline",
    "PipelineConfig",
    "Reconnect",
    "SpeechAudio",
    "SpeechEvent",
    "VoiceAgent",
    "WordTiming",
    "text",
]
