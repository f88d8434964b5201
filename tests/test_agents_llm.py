"""The LLM plugins (agents/llm/): OpenAICompatibleLLM against a server no one here wrote
(llama-cpp-python's own OpenAI-compatible server, serving the bundled SmolLM2 GGUF) and against
tiny loopback servers that misbehave on purpose; EmbeddedLLM in this process.

Figures (time to first token, tokens per second) are printed, never asserted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from agents.llm import EmbeddedLLM, OpenAICompatibleLLM, bundled_model
from agents.llm.embedded import DEFAULT_OPTIONS
from agents.plugins import ChatMessage, LLMError
from tests.conftest import free_port
from tests.support.serving import serve

pytestmark = pytest.mark.slow

QUESTION = [
    ChatMessage("system", "You are a helpful voice assistant. Answer briefly."),
    ChatMessage("user", "What is the capital of France?"),
]
STORY = [ChatMessage("user", "Tell me a long story about a dragon who learns to cook.")]


# ---------------------------------------------------------------- helpers


def established_to(port: int) -> int:
    """Open TCP connections to 127.0.0.1:``port`` on this machine (the kernel's own table)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == "01" and int(remote.split(":")[1], 16) == port:
            count += 1
    return count


async def wait_closed(port: int, within: float = 5.0) -> int:
    """Connections to ``port`` left once they had ``within`` seconds to close (not a timing)."""
    deadline = time.monotonic() + within
    while established_to(port) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return established_to(port)


async def timed(deltas: AsyncIterator[str]) -> tuple[str, float, int, float]:
    """The whole answer, time to first delta, deltas, total seconds."""
    started = time.perf_counter()
    first, count, text = 0.0, 0, ""
    async for delta in deltas:
        first = first or time.perf_counter() - started
        count += 1
        text += delta
    return text, first, count, time.perf_counter() - started


def start_llama_server(model: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """The server's log goes to a file: it is verbose, and a full pipe would block it."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model),
                "--model_alias",
                "smollm2",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "2048",
                "--n_threads",
                "2",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on loopback; yields its API root."""
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    proc = start_llama_server(bundled_model(), port, log)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                out = log.read_text(errors="replace")
                raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}: {out[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("llama_cpp.server did not come up in 120 s") from None
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.asynccontextmanager
async def misbehaving(handler: web.RequestHandler) -> AsyncIterator[str]:  # type: ignore[type-arg]
    """A loopback server answering chat completions with ``handler``; yields its API root."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner, port = await serve(app)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


async def sse(request: web.Request, *events: bytes, then_wait: float = 0.0) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for event in events:
        await response.write(event)
    await asyncio.sleep(then_wait)
    return response


def chunk(text: str, finish: str | None = None) -> bytes:
    body = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n".encode()


async def failure(llm: OpenAICompatibleLLM, messages: list[ChatMessage] = QUESTION) -> str:
    """The LLMError message of a chat that must fail, bounded so a hang fails the test."""
    try:
        with pytest.raises(LLMError) as error:
            async with asyncio.timeout(30):
                async for _ in llm.chat(messages):
                    pass
    finally:
        await llm.aclose()
    return str(error.value)


# ---------------------------------------------------------------- a real server


async def test_streams_an_answer_from_llama_cpp_server(llama_server: str) -> None:
    llm = OpenAICompatibleLLM(llama_server, "smollm2", timeout=60, options={"max_tokens": 60})
    try:
        text, first, deltas, seconds = await timed(llm.chat(QUESTION))
    finally:
        await llm.aclose()
    print(
        f"\nllama_cpp.server over HTTP: first token {first * 1000:.0f} ms, {deltas} deltas, "
        f"{deltas / seconds:.1f} deltas/s: {text!r}"
    )
    assert text.strip()
    assert deltas > 1  # streamed, not one block


async def test_stopping_mid_answer_closes_the_connection(llama_server: str) -> None:
    port = int(llama_server.rsplit(":", 1)[1].split("/")[0])
    llm = OpenAICompatibleLLM(llama_server, "smollm2", timeout=60, options={"max_tokens": 400})
    try:
        stream = llm.chat(STORY)
        got = [await anext(stream), await anext(stream)]
        assert established_to(port) == 1  # the answer is still streaming
        await stream.aclose()  # barge-in
        assert await wait_closed(port) == 0, "the half-read response went back to the pool"

        # The same through task cancellation (how the pipeline stops an answer), then a new chat.
        async def consume() -> None:
            async for _ in llm.chat(STORY):
                got.append("")

        task = asyncio.create_task(consume())
        while len(got) < 5:
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert await wait_closed(port) == 0
        text, *_ = await timed(llm.chat(QUESTION))
        assert text.strip()  # the server is fine after the disconnects
    finally:
        await llm.aclose()


async def test_a_completed_answer_keeps_its_connection_for_the_next(llama_server: str) -> None:
    """The contrast to the test above: a fully read stream goes back to the pool (keep-alive)."""
    port = int(llama_server.rsplit(":", 1)[1].split("/")[0])
    llm = OpenAICompatibleLLM(llama_server, "smollm2", timeout=60, options={"max_tokens": 5})
    try:
        await timed(llm.chat(QUESTION))
        assert established_to(port) == 1
    finally:
        await llm.aclose()
    assert await wait_closed(port) == 0


async def test_a_wrong_path_is_a_404_that_names_base_url(llama_server: str) -> None:
    root = llama_server.removesuffix("/v1")  # forgot the /v1
    message = await failure(OpenAICompatibleLLM(root, "smollm2", timeout=30))
    assert "HTTP 404" in message and "check base_url" in message, message


async def test_a_server_with_a_wrong_model_path_is_unreachable(tmp_path: Path) -> None:
    port = free_port()
    proc = start_llama_server(Path("/nonexistent/model.gguf"), port, tmp_path / "server.log")
    try:
        assert proc.wait(timeout=60) != 0  # llama_cpp.server refuses to start
        message = await failure(
            OpenAICompatibleLLM(f"http://127.0.0.1:{port}/v1", "smollm2", timeout=10)
        )
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "cannot reach" in message and "is the server running" in message, message


# ---------------------------------------------------------------- misbehaving servers


async def test_a_server_that_accepts_and_never_answers_times_out() -> None:
    async def silent(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async with misbehaving(silent) as base:
        message = await failure(OpenAICompatibleLLM(base, "m", timeout=1))
    assert "sent no text within 1 s" in message, message


async def test_a_stream_with_no_first_token_times_out() -> None:
    async def keepalive_only(request: web.Request) -> web.StreamResponse:
        role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
        return await sse(request, b": keep-alive\n\n", role, b": keep-alive\n\n", then_wait=3600)

    async with misbehaving(keepalive_only) as base:
        message = await failure(OpenAICompatibleLLM(base, "m", timeout=1))
    assert "sent no text within 1 s" in message, message


async def test_a_stream_that_stalls_between_tokens_times_out() -> None:
    async def stalls(request: web.Request) -> web.StreamResponse:
        return await sse(request, chunk("Hello"), chunk(" there"), then_wait=3600)

    got = []
    async with misbehaving(stalls) as base:
        llm = OpenAICompatibleLLM(base, "m", timeout=5, stall_timeout=0.5)
        with pytest.raises(LLMError, match=r"stalled: no text for 0.5 s") as error:
            async with asyncio.timeout(30):
                async for delta in llm.chat(QUESTION):
                    got.append(delta)
        await llm.aclose()
    assert got == ["Hello", " there"]
    print(f"\n{error.value}")


@pytest.mark.parametrize(
    "body, expected",
    [
        (b"data: {not json\n\n", "not JSON"),
        (b"data: [1, 2]\n\n", "not a JSON object"),
        (b'data: {"object": "chat.completion.chunk"}\n\n', "without a choices list"),
        (b'data: {"choices": [{"index": 0}]}\n\n', "without a delta object"),
        (b'data: {"choices": [{"delta": {"content": 42}}]}\n\n', "content is not text"),
        (b'data: {"error": {"message": "CUDA out of memory"}}\n\n', "failed mid-answer"),
        (b"<html>Bad gateway</html>\n", "not Server-Sent Events"),
        (chunk("Hello"), "closed the stream before [DONE]"),
        (b"data: " + b"x" * (2 << 20) + b"\n\n", "failed"),
    ],
)
async def test_malformed_streams_raise_clear_errors(body: bytes, expected: str) -> None:
    async def garbage(request: web.Request) -> web.StreamResponse:
        return await sse(request, body)

    async with misbehaving(garbage) as base:
        llm = OpenAICompatibleLLM(base, "m", timeout=5)
        message = await failure(llm)
        await llm.aclose()
    assert expected in message, message


async def test_http_errors_carry_the_servers_message_and_a_hint() -> None:
    async def unauthorized(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "Incorrect API key provided"}}, status=401)

    async with misbehaving(unauthorized) as base:
        llm = OpenAICompatibleLLM(base, "gpt-x", api_key="sk-wrong")
        message = await failure(llm)
        await llm.aclose()
    assert "HTTP 401" in message and "Incorrect API key" in message and "api_key" in message


async def test_the_request_is_an_openai_streaming_chat_request() -> None:
    seen: dict[str, object] = {}

    async def record(request: web.Request) -> web.StreamResponse:
        seen["auth"] = request.headers.get("Authorization")
        seen["body"] = await request.json()
        return await sse(request, chunk("Hi", finish="stop"), b"data: [DONE]\n\n")

    async with misbehaving(record) as base:
        llm = OpenAICompatibleLLM(base + "/", "gpt-x", api_key="sk-1", options={"temperature": 0.3})
        text, *_ = await timed(llm.chat([ChatMessage("user", "hey", name="Bo")]))
        await llm.aclose()
    assert text == "Hi"
    assert seen["auth"] == "Bearer sk-1"
    assert seen["body"] == {
        "model": "gpt-x",
        "stream": True,
        "temperature": 0.3,
        "messages": [{"role": "user", "content": "Bo: hey"}],
    }


async def test_bad_settings_name_the_value() -> None:
    with pytest.raises(ValueError, match="'localhost:8000'"):
        OpenAICompatibleLLM("localhost:8000", "m")
    with pytest.raises(ValueError, match="timeout=0"):
        OpenAICompatibleLLM("http://x/v1", "m", timeout=0)


# ---------------------------------------------------------------- embedded


async def test_embedded_streams_answers_and_stops_when_asked() -> None:
    llm = EmbeddedLLM(options={"max_tokens": 120})
    try:
        started = time.perf_counter()
        await llm.load()
        print(f"\nembedded SmolLM2: loaded in {time.perf_counter() - started:.2f} s")

        text, first, deltas, seconds = await timed(llm.chat(QUESTION))
        print(
            f"embedded: first token {first * 1000:.0f} ms, {deltas} tokens, "
            f"{deltas / seconds:.1f} tokens/s: {text!r}"
        )
        assert text.strip() and deltas > 1

        stream = llm.chat(STORY)  # barge-in after three tokens
        for _ in range(3):
            await anext(stream)
        await stream.aclose()
        stopped_at = llm.tokens_generated
        await asyncio.sleep(0.5)
        assert llm.tokens_generated == stopped_at  # the thread stopped generating
        assert llm.last is not None and llm.last.tokens <= 4
        print(f"embedded: stopped after {llm.last.tokens} tokens")

        # The pipeline cancels the task that iterates; the next answer still works.
        async def consume() -> None:
            async for _ in llm.chat(STORY):
                pass

        task = asyncio.create_task(consume())
        while llm.tokens_generated < stopped_at + 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        text2, first2, deltas2, seconds2 = await timed(
            llm.chat(
                [*QUESTION, ChatMessage("assistant", text), ChatMessage("user", "And of Italy?")]
            )
        )
        print(
            f"embedded, second turn: first token {first2 * 1000:.0f} ms, "
            f"{deltas2 / seconds2:.1f} tokens/s: {text2!r}"
        )
        assert text2.strip()
    finally:
        await llm.aclose()


async def test_embedded_first_token_timeout_is_an_error_and_frees_the_model() -> None:
    llm = EmbeddedLLM(timeout=0.001, options={"max_tokens": 50})
    try:
        await llm.load()
        with pytest.raises(LLMError, match="gave no first token within 0.001 s"):
            async with asyncio.timeout(60):
                async for _ in llm.chat(STORY):
                    pass
        llm.timeout = 60
        text, *_ = await timed(llm.chat(QUESTION))
        assert text.strip()
    finally:
        await llm.aclose()


def test_embedded_with_a_wrong_model_path_names_it() -> None:
    with pytest.raises(LLMError, match="'/nonexistent/smol.gguf' is not a file"):
        EmbeddedLLM("/nonexistent/smol.gguf")


def test_embedded_bad_settings_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"options \['max_token'\]: not create_chat_completion"):
        EmbeddedLLM(options={"max_token": 50})
    with pytest.raises(ValueError, match="stall_timeout=0"):
        EmbeddedLLM(stall_timeout=0)
    llm = EmbeddedLLM(options={"temperature": 0.7, "seed": 3})
    assert llm.options == {**DEFAULT_OPTIONS, "temperature": 0.7, "seed": 3}


async def test_embedded_model_errors_become_llm_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    llm = EmbeddedLLM(broken)
    try:
        with pytest.raises(LLMError, match="cannot load .*broken.gguf") as error:
            async with asyncio.timeout(60):
                async for _ in llm.chat(QUESTION):
                    pass
        print(f"\n{error.value}")
    finally:
        await llm.aclose()
