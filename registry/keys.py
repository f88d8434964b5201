"""Keypair files in the Solana CLI format (a JSON array of the 64 secret+public bytes).

One format for every key in the project (node keys, issuer keys, the registry authority, wallets)
so that `solana-keygen`, Phantom exports and our own `registry keygen` files are interchangeable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from solders.keypair import Keypair


def load_keypair(path: str | Path) -> Keypair:
    """Read a keypair file, naming the file and the fix when it is missing or malformed."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
        return Keypair.from_bytes(bytes(raw))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"keypair file {p} not found: create one with `registry keygen {p}`"
        ) from None
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"keypair file {p} is not a Solana CLI keypair (a JSON array of 64 bytes): {exc}"
        ) from None


def save_keypair(keypair: Keypair, path: str | Path, overwrite: bool = False) -> Path:
    """Write a keypair readable only by its owner; refuse to clobber an existing key by default."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} already exists; refusing to overwrite a key (use --force)")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(list(bytes(keypair)), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return p


def load_or_create_keypair(path: str | Path) -> Keypair:
    """A service's own key: created on first start, the same key on every start after."""
    p = Path(path)
    if p.exists():
        return load_keypair(p)
    keypair = Keypair()
    save_keypair(keypair, p)
    return keypair
