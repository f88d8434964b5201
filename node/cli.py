"""`node --role {sfu,stt,tts} --config FILE`: run one node of the voice network."""

from __future__ import annotations

import argparse
import asyncio
import sys

from common.cli import add_log_level, run_command
from node.agent import NodeStartError, serve
from node.config import ROLE_NAMES, ConfigError, load_config
from node.roles import RoleNotBuilt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="node", description=__doc__)
    parser.add_argument("--role", choices=ROLE_NAMES, help="overrides `role:` in the config")
    parser.add_argument("--config", required=True, help="YAML config (see configs/node-*.yaml)")
    add_log_level(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(
        "node",
        lambda: asyncio.run(serve(load_config(args.config, args.role))),
        (ConfigError, RoleNotBuilt, NodeStartError),
        status=2,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    sys.exit(main())
