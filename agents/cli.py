"""``agent``: a voice agent in a room, from the command line.

    agent --gateway URL --wallet FILE --room NAME [--instructions TEXT] [--llm URL --model M]

Buys an agent-session bundle with the wallet (a caller identity included), prints the caller's
grant as one JSON line on stdout (``{"ws_url", "token", "room"}``: what a client page or a
script joins with) before it starts listening, joins the room and talks until the last caller
leaves (or Ctrl-C). Without ``--llm`` it answers with the embedded SmolLM2 (no network). Logs go
to stderr, so stdout holds only the grant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys

from agents.agent import VoiceAgent
from agents.budget import Budget
from agents.pipeline import PipelineConfig
from agents.plugins import LLM
from gateway.client import GatewayClient, GatewayError, load_wallet

log = logging.getLogger("agents.cli")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--gateway", required=True, help="gateway URL, e.g. http://127.0.0.1:8402")
    p.add_argument(
        "--wallet", required=True, help="Solana keypair file (JSON) that pays for the bundle"
    )
    p.add_argument("--room", required=True, help="room name (the caller joins the same room)")
    p.add_argument("--instructions", default=PipelineConfig.instructions, help="the system prompt")
    p.add_argument(
        "--llm",
        metavar="URL",
        help="OpenAI-compatible API root (http://127.0.0.1:8000/v1); default: the embedded SmolLM2",
    )
    p.add_argument("--model", help="model name for --llm")
    p.add_argument("--api-key", help="API key for --llm (default: none)")
    p.add_argument(
        "--greeting",
        default="Hello! How can I help you?",
        help="said once the caller hears the agent ('' for none)",
    )
    p.add_argument("--identity", default="agent", help="the agent's participant identity")
    p.add_argument(
        "--client-identity",
        default="caller",
        help="the caller's participant identity in the printed grant",
    )
    p.add_argument("--minutes", type=float, default=5, help="bundle length, extended as needed")
    p.add_argument("--voice", default="af_heart", help="TTS voice (Kokoro name)")
    p.add_argument(
        "--top-up-usd", type=float, help="buy this much credit (x402) whenever the balance runs low"
    )
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.llm and not args.model:
        p.error("--llm needs --model (the name the server serves, e.g. 'gpt-4o-mini')")
    if args.model and not args.llm:
        p.error("--model goes with --llm URL; without --llm the embedded SmolLM2 answers")
    try:
        args.budget = Budget(duration_minutes=args.minutes, top_up_usd=args.top_up_usd)
    except ValueError as exc:
        p.error(f"--minutes / --top-up-usd: {exc}")
    return args


def make_llm(args: argparse.Namespace) -> LLM:
    from agents.llm import EmbeddedLLM, OpenAICompatibleLLM

    if args.llm:
        return OpenAICompatibleLLM(args.llm, args.model, args.api_key)
    return EmbeddedLLM()


async def run(args: argparse.Namespace) -> int:
    wallet = load_wallet(args.wallet)
    llm = make_llm(args)
    load = getattr(llm, "load", None)
    if load is not None:
        await load()  # the embedded model is ready before the caller can speak
    async with GatewayClient(args.gateway, wallet) as gateway:
        agent = VoiceAgent(
            llm,
            gateway=gateway,
            room=args.room,
            identity=args.identity,
            client_identity=args.client_identity,
            instructions=args.instructions,
            budget=args.budget,
            voice=args.voice,
        )
        try:
            await agent.create_session()
        except GatewayError as exc:
            log.error(
                "could not buy the agent session: %s (credits: `gateway credits grant` "
                "on a local network, or --top-up-usd to buy with the wallet)",
                exc,
            )
            return 1
        grant = agent.client_grant
        assert grant is not None
        print(
            json.dumps({"ws_url": grant.ws_url, "token": grant.token, "room": args.room}),
            flush=True,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, agent.ended.set)
        await agent.start()
        greeting = asyncio.create_task(agent.say(args.greeting)) if args.greeting else None
        await agent.run()
        if greeting is not None:
            greeting.cancel()
            await asyncio.gather(greeting, return_exceptions=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
