"""Another build of the registry program, for the tests of a local chain made by an older
checkout."""

from __future__ import annotations

from pathlib import Path

from registry import program


def another_build(dest: Path) -> Path:
    """A copy of ``registry.so`` that differs in one error message, written to ``dest``: a
    valid program (the loader's verifier takes it), but not this build."""
    other = bytearray(program.SO_PATH.read_bytes())
    at = other.index(b"error: ")
    other[at] = ord("E")
    dest.write_bytes(bytes(other))
    return dest
