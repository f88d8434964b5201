"""Async client for the registry program over any Solana JSON-RPC (our localnet or a cluster).

Instructions are encoded by anchorpy's coders from the IDL (``registry.program``); transactions go
through solana-py. Listing nodes is one ``getProgramAccounts`` call filtered by discriminator, size
and role, so a gateway can read ten thousand nodes in one round trip.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Sequence
from dataclasses import replace
from urllib.parse import urlparse

from based58 import b58encode
from solana.exceptions import SolanaRpcException
from solana.rpc.async_api import AsyncClient
from solana.rpc.commitment import Confirmed
from solana.rpc.core import (
    RPCException,
    TransactionExpiredBlockheightExceededError,
    UnconfirmedTxError,
)
from solana.rpc.types import MemcmpOpts, TxOpts
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import Transaction

from common.closing import AsyncClosing
from registry import program as p

DEFAULT_RPC_URL = "http://127.0.0.1:8899"
# Nodes renew their presence every 6 hours by default (node config `presence_interval`); a TTL of
# 13 hours lets one renewal fail without the node dropping out of the registry's view.
DEFAULT_PRESENCE_TTL_HOURS = 13.0
LAMPORTS_PER_SOL = 1_000_000_000

_CUSTOM_RE = re.compile(r"(?:InstructionErrorCustom\(|Custom\()(?:code: )?(\d+)\)")
_HEX_RE = re.compile(r"custom program error: 0x([0-9a-fA-F]+)")


class RegistryError(Exception):
    """The RPC or the chain refused a registry call for a reason other than a program rule."""


def program_error_from(
    exc: BaseException, logs: Sequence[str] = ()
) -> p.RegistryProgramError | None:
    """Recover the program's custom error code from whatever shape the RPC reported it in."""
    text = repr(exc) + " " + str(exc)
    data = getattr(exc.args[0], "data", None) if exc.args else None
    found_logs = list(logs) or list(getattr(data, "logs", None) or [])
    m = _CUSTOM_RE.search(text) or _CUSTOM_RE.search(repr(data))
    if m:
        return p.RegistryProgramError(int(m.group(1)), found_logs)
    for line in found_logs:
        h = _HEX_RE.search(line)
        if h:
            return p.RegistryProgramError(int(h.group(1), 16), found_logs)
    return None


class RegistryClient(AsyncClosing):
    """Typed calls for every instruction plus the reads the gateway and nodes need."""

    def __init__(
        self,
        rpc_url: str = DEFAULT_RPC_URL,
        program_id: Pubkey = p.PROGRAM_ID,
        timeout: float = 30.0,
    ) -> None:
        self.rpc_url = rpc_url
        self.program_id = program_id
        self.rpc = AsyncClient(rpc_url, commitment=Confirmed, timeout=timeout)
        self._decoded: dict[bytes, p.NodeAccount] = {}  # node account bytes -> their decoding

    async def close(self) -> None:
        await self.rpc.close()

    # ------------------------------------------------------------ transactions

    async def send(
        self, instructions: Sequence[Instruction], signers: Sequence[Keypair]
    ) -> Signature:
        """Sign with ``signers`` (the first pays the fee), send, and wait for confirmation."""
        payer = signers[0]
        try:
            blockhash = (await self.rpc.get_latest_blockhash()).value.blockhash
            message = Message.new_with_blockhash(list(instructions), payer.pubkey(), blockhash)
            tx = Transaction(list(signers), message, blockhash)
            resp = await self.rpc.send_raw_transaction(
                bytes(tx), opts=TxOpts(skip_confirmation=True, preflight_commitment=Confirmed)
            )
            sig = resp.value
            confirmed = await self.rpc.confirm_transaction(sig, Confirmed, sleep_seconds=0.05)
        except (RPCException, SolanaRpcException) as exc:
            program_error = program_error_from(exc)
            if program_error is not None:
                raise program_error from None
            raise RegistryError(f"{self.rpc_url}: transaction refused: {exc}") from exc
        except (UnconfirmedTxError, TransactionExpiredBlockheightExceededError) as exc:
            raise RegistryError(f"{self.rpc_url}: transaction not confirmed: {exc}") from exc
        except OSError as exc:
            raise RegistryError(
                f"cannot reach the Solana RPC at {self.rpc_url}: {exc} "
                "(is the localnet running? `make up` or `registry localnet`)"
            ) from exc
        status = confirmed.value[0]
        if status is not None and status.err is not None:
            program_error = program_error_from(RegistryError(repr(status.err)))
            if program_error is not None:
                raise program_error
            raise RegistryError(f"transaction {sig} failed: {status.err}")
        return sig

    async def initialize_registry(
        self, authority: Keypair, heartbeat_ttl: int, policy: p.Policy = p.Policy.APPROVAL
    ) -> Signature:
        """``authority`` must be the program's upgrade authority (the localnet's: the key
        ``registry localnet --authority`` deployed with)."""
        ix = p.initialize_registry_ix(authority.pubkey(), heartbeat_ttl, policy, self.program_id)
        return await self.send([ix], [authority])

    async def add_issuer(self, authority: Keypair, key: Pubkey, url: str) -> Signature:
        ix = p.add_issuer_ix(authority.pubkey(), key, url, self.program_id)
        return await self.send([ix], [authority])

    async def update_issuer(self, authority: Keypair, key: Pubkey, url: str) -> Signature:
        ix = p.update_issuer_ix(authority.pubkey(), key, url, self.program_id)
        return await self.send([ix], [authority])

    async def remove_issuer(self, authority: Keypair, key: Pubkey) -> Signature:
        ix = p.remove_issuer_ix(authority.pubkey(), key, self.program_id)
        return await self.send([ix], [authority])

    async def register_node(self, owner: Keypair, role: p.Role, fields: p.NodeFields) -> Signature:
        ix = p.register_node_ix(owner.pubkey(), role, fields, self.program_id)
        return await self.send([ix], [owner])

    async def heartbeat(self, owner: Keypair, load: int, capacity: int) -> Signature:
        ix = p.heartbeat_ix(owner.pubkey(), load, capacity, self.program_id)
        return await self.send([ix], [owner])

    async def update_node(self, owner: Keypair, fields: p.NodeFields) -> Signature:
        return await self.send([p.update_node_ix(owner.pubkey(), fields, self.program_id)], [owner])

    async def deregister_node(self, owner: Keypair) -> Signature:
        return await self.send([p.deregister_node_ix(owner.pubkey(), self.program_id)], [owner])

    async def set_node_status(
        self, authority: Keypair, owner: Pubkey, status: p.NodeStatus
    ) -> Signature:
        ix = p.set_node_status_ix(authority.pubkey(), owner, status, self.program_id)
        return await self.send([ix], [authority])

    async def approve_node(self, authority: Keypair, owner: Pubkey) -> Signature:
        """Admit a pending node (authority only)."""
        ix = p.approve_node_ix(authority.pubkey(), owner, self.program_id)
        return await self.send([ix], [authority])

    async def airdrop(self, to: Pubkey, lamports: int) -> Signature:
        sig = (await self.rpc.request_airdrop(to, lamports)).value
        await self.rpc.confirm_transaction(sig, Confirmed, sleep_seconds=0.05)
        return sig

    async def ensure_funded(self, keypair: Keypair, min_sol: float = 0.5) -> None:
        """On the localnet, top a signer up so operators never need a separate airdrop step."""
        if not is_local_rpc(self.rpc_url):
            return
        balance = (await self.rpc.get_balance(keypair.pubkey())).value
        if balance < min_sol * LAMPORTS_PER_SOL:
            await self.airdrop(keypair.pubkey(), 2 * LAMPORTS_PER_SOL)

    # ------------------------------------------------------------ reads

    async def _account_data(self, address: Pubkey) -> bytes | None:
        info = (await self.rpc.get_account_info(address)).value
        if info is None or info.owner != self.program_id or not info.data:
            return None
        return bytes(info.data)

    async def get_registry(self) -> p.RegistryAccount | None:
        address, _ = p.registry_pda(self.program_id)
        data = await self._account_data(address)
        return p.decode_registry(address, data) if data else None

    async def require_registry(self) -> p.RegistryAccount:
        registry = await self.get_registry()
        if registry is None:
            raise RegistryError(
                f"no registry initialised for program {self.program_id} at {self.rpc_url}: "
                "run `registry init`"
            )
        return registry

    async def get_node(self, owner: Pubkey, now: float | None = None) -> p.NodeAccount | None:
        address, _ = p.node_pda(owner, self.program_id)
        data = await self._account_data(address)
        if not data:
            return None
        node = p.decode_node(address, data)
        registry = await self.get_registry()
        ttl = registry.heartbeat_ttl if registry else 0
        return mark_stale([node], ttl, now)[0]

    async def list_nodes(
        self, role: p.Role | str | None = None, now: float | None = None
    ) -> list[p.NodeAccount]:
        """Every node (of ``role``).

        Each is marked ``stale`` when its heartbeat is older than the TTL.
        """
        filters: list[int | MemcmpOpts] = [
            p.NODE_SIZE,
            MemcmpOpts(offset=0, bytes=_b58(p.account_discriminator("Node"))),
        ]
        if role is not None:
            filters.append(
                MemcmpOpts(offset=p.NODE_ROLE_OFFSET, bytes=_b58(bytes([p.Role.parse(role)])))
            )
        registry = await self.require_registry()
        resp = await self.rpc.get_program_accounts(
            self.program_id, encoding="base64", filters=filters
        )
        # A gateway re-reads every node every few seconds and nearly all are unchanged: an entry
        # whose bytes were decoded last time is that same NodeAccount (10,000 nodes: the refresh
        # costs a dictionary lookup per node instead of a decode and a copy).
        seen: dict[bytes, p.NodeAccount] = {}
        for acc in resp.value:
            raw = bytes(acc.account.data)
            node = self._decoded.get(raw)
            seen[raw] = node if node is not None else decode_node_fast(acc.pubkey, raw)
        if role is None:
            self._decoded = seen
        else:
            self._decoded.update(seen)
        nodes = sorted(seen.values(), key=lambda n: (n.role, n.url, bytes(n.owner)))
        return mark_stale(nodes, registry.heartbeat_ttl, now)

    async def list_issuers(self) -> list[p.IssuerAccount]:
        filters: list[int | MemcmpOpts] = [
            p.ISSUER_SIZE,
            MemcmpOpts(offset=0, bytes=_b58(p.account_discriminator("Issuer"))),
        ]
        resp = await self.rpc.get_program_accounts(
            self.program_id, encoding="base64", filters=filters
        )
        issuers = [p.decode_issuer(acc.pubkey, bytes(acc.account.data)) for acc in resp.value]
        return sorted(issuers, key=lambda i: str(i.key))

    async def issuer_keys(self) -> list[str]:
        """Base58 issuer keys: the source a ``tokens.TokenVerifier`` reads."""
        return [str(i.key) for i in await self.list_issuers()]

    async def issuer_urls(self) -> dict[str, str]:
        """Base58 issuer key -> its gateway's public URL."""
        return {str(i.key): i.url for i in await self.list_issuers()}


def is_local_rpc(url: str) -> bool:
    """Loopback RPC = our localnet: the only place airdrops and auto-funding are allowed."""
    host = urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def mark_stale(
    nodes: list[p.NodeAccount], ttl: int, now: float | None = None
) -> list[p.NodeAccount]:
    """``nodes`` with ``stale`` set against ``ttl`` at ``now``; a node whose flag is already
    right is returned as it is, not copied."""
    current = time.time() if now is None else now
    return [
        n if n.stale == (stale := current - n.last_heartbeat > ttl) else replace(n, stale=stale)
        for n in nodes
    ]


_NODE_HEAD = struct.Struct("<32sqqQiiIIBBBx2s2x16sI")


def decode_node_fast(address: Pubkey, data: bytes) -> p.NodeAccount:
    """Decode a Node with one ``struct.unpack`` (anchorpy's construct decoder is ~20x slower).

    The layout is fixed by the IDL; a test checks this decoder against anchorpy's on the same bytes.
    """
    if len(data) < p.NODE_SIZE or data[:8] != p.account_discriminator("Node"):
        raise ValueError(f"account {address} is not a registry Node")
    (
        owner,
        registered_at,
        last_hb,
        last_slot,
        lat,
        lon,
        capacity,
        load,
        role,
        status,
        _bump,
        country,
        version,
        url_len,
    ) = _NODE_HEAD.unpack_from(data, 8)
    url = data[108 : 108 + min(url_len, p.MAX_URL_LEN)]
    return p.NodeAccount(
        address=address,
        owner=Pubkey(owner),
        role=p.Role(role),
        status=p.NodeStatus(status),
        url=url.decode("ascii", "replace"),
        lat=lat / p.MICRO,
        lon=lon / p.MICRO,
        country=country.decode("ascii", "replace"),
        capacity=capacity,
        load=load,
        version=version.rstrip(b"\0").decode("ascii", "replace"),
        registered_at=registered_at,
        last_heartbeat=last_hb,
        last_heartbeat_slot=last_slot,
    )


def _b58(raw: bytes) -> str:
    # solana-py's MemcmpOpts takes base58 strings.
    return b58encode(raw).decode()


__all__ = [
    "DEFAULT_RPC_URL",
    "RegistryClient",
    "LAMPORTS_PER_SOL",
    "RegistryError",
    "is_local_rpc",
    "decode_node_fast",
    "mark_stale",
    "program_error_from",
]
