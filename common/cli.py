"""The frame every service's command line shares: the ``--log-level`` option and one way a
command ends (exit status 0; one line naming the problem and a non-zero status for an error the
user can fix; 130 on Ctrl-C), so that ``registry``, ``gateway`` and ``node`` fail alike.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from common.logs import configure_logging

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)


def run_command(
    prog: str,
    work: Callable[[], object],
    expected: tuple[type[BaseException], ...],
    status: int,
    log_level: str | None = None,
) -> int:
    """Run ``work`` and return the process's exit status.

    An ``expected`` error is a mistake the user can fix (a bad config, a missing file, a value
    refused): its message already names the value and the fix, so it is printed as one line
    ``prog: message`` on stderr, without a traceback. Anything else is a bug and propagates.
    ``log_level`` sets up logging first, for the commands that log.
    """
    if log_level is not None:
        configure_logging(log_level)
    try:
        work()
    except expected as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        return INTERRUPTED
    return 0
