"""`node --role {sfu,stt,tts} --config FILE`: run one node of the voice network."""

from __future__ import annotations

import argparse
import asyncio
import sys

from node.agent import NodeStartError, serve
from node.config import ROLE_NAMES, ConfigError, load_config
from node.roles import RoleNotBuilt
from registry.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="node", description=__doc__)
    parser.add_argument("--role", choices=ROLE_NAMES, help="overrides `role:` in the config")
    parser.add_argument("--config", required=True, help="YAML config (see configs/node-*.yaml)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = load_config(args.config, args.role)
        asyncio.run(serve(config))
    except (ConfigError, RoleNotBuilt, NodeStartError) as exc:
        print(f"node: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
