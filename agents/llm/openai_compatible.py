"""Any OpenAI-compatible chat completions server as the agent's LLM (OpenAI, vLLM, Ollama,
llama.cpp's server, llama-cpp-python's server), streamed over HTTP with aiohttp.

Why the timeouts live here: a voice agent cannot wait forever on a model. ``timeout`` bounds the
time to the first word of the answer (connecting, queueing and reading the prompt included);
``stall_timeout`` bounds the silence between two text deltas once the answer has started.
Keep-alive comments and role-only events do not count as progress. Both raise ``LLMError``.
Closing the iteration (barge-in) closes the HTTP response, so the server sees the disconnect and
stops generating, and no half-read connection goes back to the pool.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from agents.plugins import ChatMessage, LLMError

log = logging.getLogger(__name__)

_MAX_LINE = 1 << 20  # one SSE line (an event) above this is not a chat delta
_MAX_ERROR_BODY = 4096


def check_timeouts(timeout: float, stall_timeout: float) -> None:
    """Both LLMs wait for a first token at most ``timeout`` and between tokens at most
    ``stall_timeout`` seconds: an answer that never comes must end as an error."""
    if timeout <= 0 or stall_timeout <= 0:
        raise ValueError(f"timeout={timeout} and stall_timeout={stall_timeout} must be > 0")


def openai_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """The OpenAI wire form of ``messages``.

    A speaker's name is written into the content ("Ana: hello") rather than OpenAI's ``name``
    field: most chat templates (llama.cpp, Ollama) drop ``name``, and OpenAI refuses names with
    spaces, so the model would not know who spoke in a room with several people.
    """
    wire = []
    for message in messages:
        content = message.content
        if message.name and message.role == "user":
            content = f"{message.name}: {content}"
        wire.append({"role": message.role, "content": content})
    return wire


class OpenAICompatibleLLM:
    """Streaming chat completions: ``POST {base_url}/chat/completions`` with ``stream: true``.

    ``base_url`` is the API root including its version ("https://api.openai.com/v1",
    "http://127.0.0.1:11434/v1" for Ollama, "http://127.0.0.1:8000/v1" for vLLM or llama.cpp).
    ``options`` go into the request body as they are (``temperature``, ``max_tokens`` ...).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout: float = 15.0,
        stall_timeout: float = 10.0,
        options: dict[str, Any] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url {base_url!r} is not an http(s) URL: give the API root, "
                "e.g. http://127.0.0.1:8000/v1"
            )
        check_timeouts(timeout, stall_timeout)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self.options = dict(options or {})
        self._session: aiohttp.ClientSession | None = None

    async def chat(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        """The answer's text deltas, as the server streams them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        body = {
            **self.options,
            "model": self.model,
            "messages": openai_messages(messages),
            "stream": True,
        }
        try:
            response = await self._post(body, deadline)
        except LLMError as e:
            log.warning("LLM: %s", e)
            raise
        finished = started = False
        try:
            if response.content_type == "application/json":  # a server that ignored `stream`
                text = _whole_answer(await self._read(response, deadline, self._read_json))
                finished = True
                if text:
                    yield text
                return
            async for event in self._events(response, deadline):
                if event == "[DONE]":
                    finished = True
                    return
                delta, finish_reason = _parse_chunk(event, self.url)
                finished = finished or finish_reason is not None
                if delta:
                    started = True
                    yield delta
                    deadline = loop.time() + self.stall_timeout
            if not finished:
                raise LLMError(
                    f"{self.url} closed the stream before [DONE] or a finish_reason: "
                    "the answer may be cut short (check the server's log)"
                )
        except _Stalled:
            error = self._stalled(started)
            log.warning("LLM: %s", error)
            raise error from None
        except LLMError as e:
            log.warning("LLM: %s", e)
            raise
        finally:
            if not finished:
                response.close()  # the server sees the disconnect and stops generating
            response.release()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------ HTTP

    async def _post(self, body: dict[str, Any], deadline: float) -> aiohttp.ClientResponse:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                response = await self._session.post(self.url, json=body, headers=headers)
        except TimeoutError:
            raise self._stalled(False) from None
        except aiohttp.ClientError as e:
            raise LLMError(
                f"cannot reach {self.url}: {e} (is the server running, and is "
                "base_url its API root, e.g. http://127.0.0.1:8000/v1?)"
            ) from e
        if response.status != 200:
            detail = await self._error_detail(response, deadline)
            response.release()
            raise LLMError(
                f"{self.url} answered HTTP {response.status} for model "
                f"{self.model!r}: {detail}{_hint(response.status)}"
            )
        return response

    async def _events(
        self, response: aiohttp.ClientResponse, deadline: float
    ) -> AsyncIterator[str]:
        """Server-Sent Events: the ``data`` of each event (multi-line data joined by newlines)."""
        data: list[str] = []
        while True:
            raw = await self._read(response, deadline, self._read_line)
            if not raw:  # end of the stream
                if data:
                    yield "\n".join(data)
                return
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif line.startswith((":", "event:", "id:", "retry:")):
                continue  # comments (keep-alive) and fields a chat stream does not need
            else:
                raise LLMError(
                    f"{self.url} sent a line that is not Server-Sent Events: "
                    f"{_excerpt(line)} (is base_url a chat completions API?)"
                )

    async def _read(self, response: aiohttp.ClientResponse, deadline: float, read: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                return await read(response)
        except TimeoutError:
            raise _Stalled(self.url) from None
        except (aiohttp.ClientError, HttpProcessingError, ValueError) as e:
            raise LLMError(f"reading the answer from {self.url} failed: {e}") from e

    @staticmethod
    async def _read_line(response: aiohttp.ClientResponse) -> bytes:
        return await response.content.readline(max_line_length=_MAX_LINE)

    @staticmethod
    async def _read_json(response: aiohttp.ClientResponse) -> Any:
        return await response.json()

    def _stalled(self, started: bool) -> LLMError:
        if started:
            return LLMError(
                f"{self.url} (model {self.model!r}) stalled: no text for "
                f"{self.stall_timeout:g} s after the previous delta"
            )
        return LLMError(
            f"{self.url} (model {self.model!r}) sent no text within "
            f"{self.timeout:g} s of the request: is the server overloaded, or the "
            "model still loading? Raise timeout= if it is just slow"
        )

    async def _error_detail(self, response: aiohttp.ClientResponse, deadline: float) -> str:
        try:
            async with asyncio.timeout(max(0.1, deadline - asyncio.get_running_loop().time())):
                body = await response.content.read(_MAX_ERROR_BODY)
        except (TimeoutError, aiohttp.ClientError):
            return "(no readable body)"
        try:
            error = json.loads(body).get("error", body.decode("utf-8", "replace"))
            message = error.get("message", error) if isinstance(error, dict) else error
        except (ValueError, AttributeError):
            message = body.decode("utf-8", "replace")
        return _excerpt(str(message)) or "(empty body)"


class _Stalled(LLMError):
    """A read ran past its deadline (``chat`` says which deadline)."""


def _parse_chunk(event: str, url: str) -> tuple[str, str | None]:
    """A ``chat.completion.chunk``: its text delta and finish reason; LLMError if malformed."""
    try:
        chunk = json.loads(event)
    except ValueError:
        raise LLMError(f"{url} sent an event that is not JSON: {_excerpt(event)}") from None
    if not isinstance(chunk, dict):
        raise LLMError(f"{url} sent an event that is not a JSON object: {_excerpt(event)}")
    if "error" in chunk:  # vLLM and OpenAI report a failure mid-stream this way
        error = chunk["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise LLMError(f"{url} failed mid-answer: {_excerpt(str(message))}")
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise LLMError(f"{url} sent a chunk without a choices list: {_excerpt(event)}")
    if not choices:
        return "", None  # a usage-only chunk (stream_options.include_usage)
    choice = choices[0]
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if not isinstance(delta, dict):
        raise LLMError(f"{url} sent a choice without a delta object: {_excerpt(event)}")
    content = delta.get("content") or ""
    if not isinstance(content, str):
        raise LLMError(f"{url} sent a delta whose content is not text: {_excerpt(event)}")
    return content, choice.get("finish_reason")


def _whole_answer(body: Any) -> str:
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise LLMError(
            f"a non-streamed answer without choices[0].message.content: "
            f"{_excerpt(json.dumps(body))}"
        ) from None
    return content if isinstance(content, str) else ""


def _hint(status: int) -> str:
    if status in (401, 403):
        return " (check api_key)"
    if status == 404:
        return " (check base_url: the API root with its version, e.g. .../v1; and the model name)"
    if status == 429:
        return " (rate limited or out of quota at the provider)"
    return ""


def _excerpt(text: str, limit: int = 200) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")
