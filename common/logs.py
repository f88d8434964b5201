"""Log setup shared by every service's command line (gateway, node): one format, quiet libraries."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that log a line per RPC call or migration step at INFO.
NOISY_LOGGERS = ("httpx", "alembic")


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
