"""The registry program's ABI, seen from Python: ids, PDAs, layouts, instructions, errors.

Everything here is derived from the Anchor-format IDL in ``programs/registry/idl.json``, so the
C program, anchorpy, and any other Anchor client agree byte for byte. This module does no I/O
beyond reading that IDL; the async client (``registry.client``) builds on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from pathlib import Path
from typing import Any, Self

from anchorpy import Idl
from anchorpy.coder.accounts import AccountsCoder
from anchorpy.coder.instruction import InstructionCoder
from anchorpy_core.idl import IdlInstruction
from pyheck import snake
from solders.instruction import AccountMeta, Instruction
from solders.pubkey import Pubkey
from solders.system_program import ID as SYSTEM_PROGRAM_ID

PROGRAM_DIR = Path(__file__).resolve().parent.parent / "programs" / "registry"
IDL_PATH = PROGRAM_DIR / "idl.json"
SO_PATH = PROGRAM_DIR / "registry.so"
PROGRAM_KEYPAIR_PATH = PROGRAM_DIR / "program-keypair.json"

# Fixed program id of the embedded localnet deployment (its keypair is committed: localnet only).
PROGRAM_ID = Pubkey.from_string("54qRqffWyocWmu78z7iGGX6humQ7JEayFouaAqzcqZ1C")
# The BPF upgradeable loader (loader v3): it owns the program and its ProgramData account, which
# holds the upgrade authority, the only key `initialize_registry` accepts.
BPF_LOADER_UPGRADEABLE_ID = Pubkey.from_string("BPFLoaderUpgradeab1e11111111111111111111111")

REGISTRY_SEED = b"registry"
ISSUER_SEED = b"issuer"
NODE_SEED = b"node"

# Account sizes, fixed so that getProgramAccounts can filter with dataSize.
REGISTRY_SIZE = 72
ISSUER_SIZE = 260
NODE_SIZE = 308
MAX_URL_LEN = 200
VERSION_LEN = 16

# Byte offsets inside the Registry account and a Node account (memcmp filters, tests).
REGISTRY_POLICY_OFFSET = 65
NODE_OWNER_OFFSET = 8
NODE_ROLE_OFFSET = 80
NODE_STATUS_OFFSET = 81

MAX_TTL_SECONDS = 86_400
MICRO = 1_000_000


class _ByteEnum(IntEnum):
    """A one-byte choice stored on chain, parsed from its name (any case), the byte or itself."""

    @classmethod
    def _kind(cls) -> str:
        return cls.__name__.lower()

    @classmethod
    def parse(cls, value: str | int | _ByteEnum) -> Self:
        """The member ``value`` names; a ValueError naming the choices otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            choices = ", ".join(m.label for m in cls)
            raise ValueError(
                f"unknown {cls._kind()} {value!r}: expected one of {choices}"
            ) from None

    @property
    def label(self) -> str:
        return self.name.lower()


class Role(_ByteEnum):
    """A node's service; the byte stored on chain."""

    SFU = 0
    STT = 1
    TTS = 2


class NodeStatus(_ByteEnum):
    """A node's standing; only ACTIVE nodes are routed to, may heartbeat or update their entry."""

    ACTIVE = 0
    SUSPENDED = 1
    PENDING = 2  # registered under the approval policy, waiting for `registry node approve`

    @classmethod
    def _kind(cls) -> str:
        return "node status"


class Policy(_ByteEnum):
    """How the registry admits new nodes: APPROVAL (they start pending until the authority
    approves them) or OPEN (they start active)."""

    APPROVAL = 0
    OPEN = 1

    @classmethod
    def _kind(cls) -> str:
        return "admission policy"


@cache
def idl() -> Idl:
    return Idl.from_json(IDL_PATH.read_text())


@cache
def _instruction_coder() -> InstructionCoder:
    return InstructionCoder(idl())


@cache
def _accounts_coder() -> AccountsCoder:
    return AccountsCoder(idl())


@cache
def error_names() -> dict[int, str]:
    """Custom error code -> name, as the program returns them (``Custom(6000 + n)``)."""
    raw = json.loads(IDL_PATH.read_text())
    return {e["code"]: e["name"] for e in raw["errors"]}


@cache
def error_codes() -> dict[str, int]:
    return {name: code for code, name in error_names().items()}


class RegistryProgramError(Exception):
    """A transaction failed with one of the registry program's own error codes."""

    def __init__(self, code: int, logs: list[str] | None = None) -> None:
        self.code = code
        self.name = error_names().get(code, f"Custom({code})")
        self.logs = logs or []
        super().__init__(f"registry program error {code} {self.name}")


# ---------------------------------------------------------------- PDAs


def registry_pda(program_id: Pubkey = PROGRAM_ID) -> tuple[Pubkey, int]:
    return Pubkey.find_program_address([REGISTRY_SEED], program_id)


def issuer_pda(key: Pubkey, program_id: Pubkey = PROGRAM_ID) -> tuple[Pubkey, int]:
    return Pubkey.find_program_address([ISSUER_SEED, bytes(key)], program_id)


def node_pda(owner: Pubkey, program_id: Pubkey = PROGRAM_ID) -> tuple[Pubkey, int]:
    return Pubkey.find_program_address([NODE_SEED, bytes(owner)], program_id)


def programdata_address(program_id: Pubkey = PROGRAM_ID) -> Pubkey:
    """The program's ProgramData account: the loader's PDA [program id]."""
    return Pubkey.find_program_address([bytes(program_id)], BPF_LOADER_UPGRADEABLE_ID)[0]


# ---------------------------------------------------------------- field encoding


def encode_country(country: str) -> list[int]:
    """Two ASCII bytes; the program checks they are upper-case letters."""
    raw = country.encode("ascii", "replace")
    if len(raw) != 2:
        raise ValueError(f"country {country!r} must be a two-letter ISO 3166-1 code, e.g. 'DE'")
    return list(raw)


def encode_version(version: str) -> list[int]:
    raw = version.encode("ascii", "replace")
    if not 1 <= len(raw) <= VERSION_LEN:
        raise ValueError(f"version {version!r} must be 1..{VERSION_LEN} ASCII characters")
    return list(raw.ljust(VERSION_LEN, b"\0"))


def to_micro(degrees: float) -> int:
    return int(round(degrees * MICRO))


# ---------------------------------------------------------------- instructions


def _ix(name: str, program_id: Pubkey, args: dict[str, Any], **accounts: Pubkey) -> Instruction:
    """An instruction as the IDL declares it: the arguments through anchorpy's coder, the accounts
    in the IDL's order with its signer and writable flags (stated once, in idl.json). The
    registry, the System Program and the program's own accounts are filled in here; callers name
    the others (``node``, ``issuer``, ``owner``, ``authority``)."""
    known = {
        "registry": registry_pda(program_id)[0],
        "systemProgram": SYSTEM_PROGRAM_ID,
        "program": program_id,
        "programData": programdata_address(program_id),
    }
    spec = _idl_instruction(name)
    metas = [
        AccountMeta(
            pubkey=accounts[a.name] if a.name in accounts else known[a.name],
            is_signer=a.is_signer,
            is_writable=a.is_mut,
        )
        for a in spec.accounts
    ]
    data = _instruction_coder().encode(snake(name), {snake(k): v for k, v in args.items()})
    return Instruction(program_id, data, metas)


@cache
def _idl_instruction(name: str) -> IdlInstruction:
    by_name = {snake(ix.name): ix for ix in idl().instructions}
    return by_name[name]


def initialize_registry_ix(
    authority: Pubkey,
    heartbeat_ttl: int,
    policy: Policy = Policy.APPROVAL,
    program_id: Pubkey = PROGRAM_ID,
) -> Instruction:
    """``authority`` must be the program's upgrade authority; APPROVAL is the safe default."""
    args = {"heartbeat_ttl": heartbeat_ttl, "policy": int(Policy.parse(policy))}
    return _ix("initialize_registry", program_id, args, authority=authority)


def add_issuer_ix(
    authority: Pubkey, key: Pubkey, url: str, program_id: Pubkey = PROGRAM_ID
) -> Instruction:
    """Trust gateway ``key`` as a token issuer; ``url`` is its public URL (usage, webhooks and
    load reports go there)."""
    issuer, _ = issuer_pda(key, program_id)
    args = {"key": key, "url": url}
    return _ix("add_issuer", program_id, args, issuer=issuer, authority=authority)


def update_issuer_ix(
    authority: Pubkey, key: Pubkey, url: str, program_id: Pubkey = PROGRAM_ID
) -> Instruction:
    issuer, _ = issuer_pda(key, program_id)
    return _ix("update_issuer", program_id, {"url": url}, issuer=issuer, authority=authority)


def remove_issuer_ix(
    authority: Pubkey, key: Pubkey, program_id: Pubkey = PROGRAM_ID
) -> Instruction:
    return _ix(
        "remove_issuer", program_id, {}, issuer=issuer_pda(key, program_id)[0], authority=authority
    )


@dataclass(frozen=True)
class NodeFields:
    """What an operator declares about a node (everything but role, load and status)."""

    url: str
    lat: float
    lon: float
    country: str
    capacity: int
    version: str

    def as_args(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "lat": to_micro(self.lat),
            "lon": to_micro(self.lon),
            "country": encode_country(self.country),
            "capacity": self.capacity,
            "version": encode_version(self.version),
        }


def register_node_ix(
    owner: Pubkey, role: Role, fields: NodeFields, program_id: Pubkey = PROGRAM_ID
) -> Instruction:
    args = {"role": int(role), **fields.as_args()}
    return _ix("register_node", program_id, args, node=node_pda(owner, program_id)[0], owner=owner)


def heartbeat_ix(
    owner: Pubkey, load: int, capacity: int, program_id: Pubkey = PROGRAM_ID
) -> Instruction:
    node, _ = node_pda(owner, program_id)
    args = {"load": load, "capacity": capacity}
    return _ix("heartbeat", program_id, args, node=node, owner=owner)


def update_node_ix(
    owner: Pubkey, fields: NodeFields, program_id: Pubkey = PROGRAM_ID
) -> Instruction:
    node, _ = node_pda(owner, program_id)
    return _ix("update_node", program_id, fields.as_args(), node=node, owner=owner)


def deregister_node_ix(owner: Pubkey, program_id: Pubkey = PROGRAM_ID) -> Instruction:
    return _ix("deregister_node", program_id, {}, node=node_pda(owner, program_id)[0], owner=owner)


def set_node_status_ix(
    authority: Pubkey, owner: Pubkey, status: NodeStatus, program_id: Pubkey = PROGRAM_ID
) -> Instruction:
    node, _ = node_pda(owner, program_id)
    return _ix(
        "set_node_status", program_id, {"status": int(status)}, node=node, authority=authority
    )


def approve_node_ix(
    authority: Pubkey, owner: Pubkey, program_id: Pubkey = PROGRAM_ID
) -> Instruction:
    return _ix(
        "approve_node", program_id, {}, node=node_pda(owner, program_id)[0], authority=authority
    )


# ---------------------------------------------------------------- accounts


def account_discriminator(name: str) -> bytes:
    return _accounts_coder().acc_name_to_discriminator[name]


@dataclass(frozen=True)
class RegistryAccount:
    address: Pubkey
    authority: Pubkey
    heartbeat_ttl: int
    node_count: int
    issuer_count: int
    policy: Policy


@dataclass(frozen=True)
class IssuerAccount:
    """A trusted gateway: its token key and its public URL."""

    address: Pubkey
    key: Pubkey
    added_at: int
    url: str


@dataclass(frozen=True)
class NodeAccount:
    """A node as the chain holds it, plus ``stale`` computed against a TTL and a clock."""

    address: Pubkey
    owner: Pubkey
    role: Role
    status: NodeStatus
    url: str
    lat: float
    lon: float
    country: str
    capacity: int
    load: int
    version: str
    registered_at: int
    last_heartbeat: int
    last_heartbeat_slot: int
    stale: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "pubkey": str(self.owner),
            "address": str(self.address),
            "role": self.role.label,
            "url": self.url,
            "lat": self.lat,
            "lon": self.lon,
            "country": self.country,
            "load": self.load,
            "capacity": self.capacity,
            "version": self.version,
            "status": self.status.label,
            "stale": self.stale,
            "registered_at": self.registered_at,
            "last_heartbeat": self.last_heartbeat,
            "last_heartbeat_slot": self.last_heartbeat_slot,
        }


def _decode(name: str, data: bytes) -> Any:
    if data[:8] != account_discriminator(name):
        raise ValueError(f"account data is not a {name} (discriminator {data[:8].hex()})")
    return _accounts_coder().decode(data)


def decode_registry(address: Pubkey, data: bytes) -> RegistryAccount:
    a = _decode("Registry", data)
    return RegistryAccount(
        address, a.authority, a.heartbeat_ttl, a.node_count, a.issuer_count, Policy(a.policy)
    )


def decode_issuer(address: Pubkey, data: bytes) -> IssuerAccount:
    a = _decode("Issuer", data)
    return IssuerAccount(address, a.key, a.added_at, a.url)


def decode_node(address: Pubkey, data: bytes) -> NodeAccount:
    a = _decode("Node", data)
    return NodeAccount(
        address=address,
        owner=a.owner,
        role=Role(a.role),
        status=NodeStatus(a.status),
        url=a.url,
        lat=a.lat / MICRO,
        lon=a.lon / MICRO,
        country=bytes(a.country).decode("ascii", "replace"),
        capacity=a.capacity,
        load=a.load,
        version=bytes(a.version).rstrip(b"\0").decode("ascii", "replace"),
        registered_at=a.registered_at,
        last_heartbeat=a.last_heartbeat,
        last_heartbeat_slot=a.last_heartbeat_slot,
    )
