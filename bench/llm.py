"""The embedded LLM's speed on this machine: time to first token and tokens per second, and the
time to the first speakable piece (agents/text.py), over a set of short spoken-style questions.

Run: .venv/bin/python bench/llm.py [--rounds N] [--threads T]. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

# The project root first: this folder's gateway.py would otherwise shadow the gateway package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.llm import EmbeddedLLM
from agents.plugins import ChatMessage
from agents.text import Chunker

SYSTEM = ChatMessage(
    "system", "You are a helpful voice assistant. Answer briefly, in plain sentences."
)
QUESTIONS = [
    "What is the capital of Italy?",
    "How many days are in a week?",
    "Can you recommend a good book?",
    "What should I cook for dinner tonight?",
    "Why is the sky blue?",
    "How do I make a cup of tea?",
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(rounds: int, threads: int | None) -> None:
    llm = EmbeddedLLM(n_threads=threads)
    started = time.perf_counter()
    await llm.load()
    print(
        f"model {llm.model_path.name}: loaded in {time.perf_counter() - started:.2f} s, "
        f"{llm.n_threads} threads"
    )
    first_token, first_piece, rates = [], [], []
    try:
        for i in range(rounds):
            question = QUESTIONS[i % len(QUESTIONS)]
            chunker, piece_at = Chunker(), None
            started = time.perf_counter()
            async for delta in llm.chat([SYSTEM, ChatMessage("user", question)]):
                if piece_at is None and chunker.push(delta):
                    piece_at = time.perf_counter() - started
            piece_at = piece_at if piece_at is not None else time.perf_counter() - started
            last = llm.last
            assert last is not None and last.first_token_s is not None
            first_token.append(last.first_token_s * 1000)
            first_piece.append(piece_at * 1000)
            rates.append(last.tokens_per_second)
    finally:
        await llm.aclose()
    for name, values, unit in (
        ("time to first token", first_token, "ms"),
        ("time to first speakable piece", first_piece, "ms"),
        ("tokens per second", rates, ""),
    ):
        print(
            f"{name:30s} p50 {statistics.median(values):7.1f}{unit}  "
            f"p95 {pct(values, 0.95):7.1f}{unit}  (n={len(values)})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.threads))
