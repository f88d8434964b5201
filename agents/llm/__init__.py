"""LLM providers behind ``agents.plugins.LLM``: any OpenAI-compatible server over HTTP, or the
embedded SmolLM2 that needs no network (the default).

Importing this package is light: llama-cpp-python loads only when an ``EmbeddedLLM`` loads its
model.
"""

from agents.llm.embedded import EmbeddedLLM, Generation, bundled_model
from agents.llm.openai_compatible import OpenAICompatibleLLM, openai_messages

__all__ = ["EmbeddedLLM", "Generation", "OpenAICompatibleLLM", "bundled_model", "openai_messages"]
