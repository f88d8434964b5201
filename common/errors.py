"""An error that carries a machine-readable code beside its message.

The code is what the other side acts on (a node refusing a token, the gateway refusing a
signature: the client branches on it); the message is for the person reading the log.
"""

from __future__ import annotations


class CodedError(Exception):
    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)
