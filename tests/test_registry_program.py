"""The registry program (programs/registry/registry.so) in an in-process LiteSVM.

The program is deployed through the real BPF upgradeable loader (buffer, write, deploy), so it
has a real ProgramData account naming its upgrade authority, the only key that may initialise
the registry.

Every instruction, allowed and refused: each on-chain rule gets a hostile transaction (flipped
signer/writable flags, substituted or forged accounts, garbage data) and the exact custom error
code is asserted. Compute units are deterministic, so they are asserted too (heartbeat <= 5000).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import replace

import pytest
from solders.account import Account
from solders.clock import Clock
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.rent import Rent
from solders.system_program import ID as SYSTEM_PROGRAM_ID
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction
from solders.transaction_metadata import FailedTransactionMetadata

from registry import program as P
from registry.keys import load_keypair
from registry.localnet.deploy import LiteSvmTarget, deploy_program
from registry.localnet.svm import build_litesvm
from registry.nodeurl import node_url_problem

PID = P.PROGRAM_ID
ERR = P.error_codes()
HEARTBEAT_CU_LIMIT = 5_000
# Compute units of the last successful run of each instruction (printed by the CU test).
CU: dict[str, int] = {}

GATEWAY = "https://gateway.example.net"

FIELDS = P.NodeFields(
    url="https://sfu-1.example.net:7880",
    lat=52.520008,
    lon=13.404954,
    country="DE",
    capacity=500,
    version="1.4.2",
)


# ---------------------------------------------------------------- harness


def disc(name: str) -> bytes:
    return hashlib.sha256(f"global:{name}".encode()).digest()[:8]


def enc_fields(
    url: bytes, lat: int, lon: int, country: bytes, capacity: int, version: bytes
) -> bytes:
    """Borsh of (url string, lat i32, lon i32, country [u8;2], capacity u32, version [u8;16])."""
    return (
        struct.pack("<I", len(url))
        + url
        + struct.pack("<ii", lat, lon)
        + country
        + struct.pack("<I", capacity)
        + version
    )


def raw_fields(**over) -> dict:
    base = dict(
        url=FIELDS.url.encode(),
        lat=P.to_micro(FIELDS.lat),
        lon=P.to_micro(FIELDS.lon),
        country=FIELDS.country.encode(),
        capacity=FIELDS.capacity,
        version=FIELDS.version.encode().ljust(16, b"\0"),
    )
    base.update(over)
    return base


def with_data(ix: Instruction, data: bytes) -> Instruction:
    return Instruction(ix.program_id, data, ix.accounts)


def tamper(
    ix: Instruction,
    index: int,
    *,
    pubkey: Pubkey | None = None,
    signer: bool | None = None,
    writable: bool | None = None,
) -> Instruction:
    metas = list(ix.accounts)
    m = metas[index]
    metas[index] = AccountMeta(
        pubkey if pubkey is not None else m.pubkey,
        m.is_signer if signer is None else signer,
        m.is_writable if writable is None else writable,
    )
    return Instruction(ix.program_id, bytes(ix.data), metas)


def with_accounts(ix: Instruction, metas: list[AccountMeta]) -> Instruction:
    return Instruction(ix.program_id, bytes(ix.data), metas)


class Chain:
    """A LiteSVM with the program deployed by ``upgrade_authority``, a fee payer, and helpers
    that assert outcomes."""

    def __init__(self) -> None:
        self.svm = build_litesvm()
        self.payer = self.fund()
        self.upgrade_authority = self.fund()
        deploy_program(
            LiteSvmTarget(self.svm),
            P.SO_PATH,
            load_keypair(P.PROGRAM_KEYPAIR_PATH),
            self.payer,
            upgrade_authority=self.upgrade_authority,
        )
        # A program deployed in a slot can be invoked from the next one.
        self.svm.warp_to_slot(self.svm.get_clock().slot + 1)
        self.registry, self.registry_bump = P.registry_pda()

    def fund(self, lamports: int = 10 * 10**9) -> Keypair:
        kp = Keypair()
        self.svm.airdrop(kp.pubkey(), lamports)
        return kp

    def send(self, ixs, *signers: Keypair):
        if isinstance(ixs, Instruction):
            ixs = [ixs]
        # Only keys the message marks as signers may sign (a hostile test clears the flag).
        required = {m.pubkey for ix in ixs for m in ix.accounts if m.is_signer}
        keys = {self.payer.pubkey()}
        all_signers = [self.payer]
        for s in signers:
            if s.pubkey() not in keys and s.pubkey() in required:
                keys.add(s.pubkey())
                all_signers.append(s)
        tx = Transaction.new_signed_with_payer(
            ixs, self.payer.pubkey(), all_signers, self.svm.latest_blockhash()
        )
        result = self.svm.send_transaction(tx)
        self.svm.expire_blockhash()
        return result

    def ok(self, ixs, *signers: Keypair, cu: str | None = None):
        result = self.send(ixs, *signers)
        assert not isinstance(result, FailedTransactionMetadata), f"{result.err()}\n" + "\n".join(
            result.meta().logs()
        )
        if cu:
            CU[cu] = result.compute_units_consumed()
        return result

    def fails(self, ixs, *signers: Keypair, index: int | None = None) -> str:
        """Send; assert it failed with one of the program's custom errors; return its name."""
        result = self.send(ixs, *signers)
        assert isinstance(result, FailedTransactionMetadata), "transaction unexpectedly succeeded"
        err = result.err()
        inner = getattr(err, "err", None)
        code = getattr(inner, "code", None)
        assert code is not None, f"not a custom program error: {err}\n{result.meta().logs()}"
        if index is not None:
            assert err.index == index, err
        name = P.error_names()[code]
        assert f"Program log: error: {name}" in result.meta().logs()
        return name

    def account(self, key: Pubkey):
        acc = self.svm.get_account(key)
        if acc is None or acc.lamports == 0:
            return None
        return acc

    def data(self, key: Pubkey) -> bytes:
        acc = self.account(key)
        assert acc is not None, f"no account at {key}"
        return bytes(acc.data)

    def reg(self) -> P.RegistryAccount:
        return P.decode_registry(self.registry, self.data(self.registry))

    def node(self, owner: Pubkey) -> P.NodeAccount:
        addr, _ = P.node_pda(owner)
        return P.decode_node(addr, self.data(addr))

    def issuer(self, key: Pubkey) -> P.IssuerAccount:
        addr, _ = P.issuer_pda(key)
        return P.decode_issuer(addr, self.data(addr))

    def set_clock(self, slot: int, unix_timestamp: int) -> None:
        self.svm.set_clock(Clock(slot, unix_timestamp - 100, 0, 1, unix_timestamp))

    def forge(self, key: Pubkey, data: bytes, owner: Pubkey = PID, lamports: int | None = None):
        """Put an account with arbitrary contents at an address (what an attacker cannot do on
        a real cluster for program-owned accounts, but can for accounts of their own program)."""
        if lamports is None:
            lamports = self.svm.minimum_balance_for_rent_exemption(len(data))
        self.svm.set_account(key, Account(lamports, data, owner, False, 0))

    def is_closed(self, key: Pubkey) -> bool:
        acc = self.svm.get_account(key)
        return acc is None or (
            acc.lamports == 0 and len(acc.data) == 0 and acc.owner == SYSTEM_PROGRAM_ID
        )

    # -- setup shortcuts
    def init(self, ttl: int = 60, policy: P.Policy = P.Policy.OPEN) -> Keypair:
        """Initialise as the upgrade authority; OPEN so nodes start active unless a test is
        about admission."""
        auth = self.upgrade_authority
        self.ok(
            P.initialize_registry_ix(auth.pubkey(), ttl, policy), auth, cu="initialize_registry"
        )
        self.authority = auth
        return auth

    def register(self, role: P.Role = P.Role.SFU, fields: P.NodeFields = FIELDS) -> Keypair:
        owner = self.fund()
        self.ok(P.register_node_ix(owner.pubkey(), role, fields), owner, cu="register_node")
        return owner

    def add_issuer(self, key: Pubkey | None = None, url: str = GATEWAY) -> Pubkey:
        key = key or Keypair().pubkey()
        ix = P.add_issuer_ix(self.authority.pubkey(), key, url)
        self.ok(ix, self.authority, cu="add_issuer")
        return key


@pytest.fixture
def chain() -> Chain:
    return Chain()


@pytest.fixture
def ready(chain: Chain) -> Chain:
    """Registry initialized (authority = chain.authority)."""
    chain.init()
    return chain


def non_canonical_pda(seeds: list[bytes]) -> Pubkey:
    """A valid program address for `seeds` with a bump below the canonical one."""
    _, canonical = Pubkey.find_program_address(seeds, PID)
    for bump in range(canonical - 1, -1, -1):
        h = hashlib.sha256(b"".join(seeds) + bytes([bump]) + bytes(PID) + b"ProgramDerivedAddress")
        candidate = Pubkey(h.digest())
        if not candidate.is_on_curve():
            assert candidate == Pubkey.create_program_address([*seeds, bytes([bump])], PID)
            return candidate
    raise AssertionError("no non-canonical bump")


def set_field(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


# ================================================================ initialize_registry


@pytest.mark.parametrize("policy", list(P.Policy))
def test_initialize_registry(chain: Chain, policy: P.Policy):
    chain.set_clock(10, 1_700_000_000)
    auth = chain.init(ttl=90, policy=policy)
    reg = chain.reg()
    assert (reg.authority, reg.heartbeat_ttl, reg.node_count, reg.issuer_count, reg.policy) == (
        auth.pubkey(),
        90,
        0,
        0,
        policy,
    )
    acc = chain.account(chain.registry)
    assert acc.owner == PID and len(acc.data) == P.REGISTRY_SIZE
    assert acc.lamports == chain.svm.minimum_balance_for_rent_exemption(P.REGISTRY_SIZE)
    assert acc.data[64] == chain.registry_bump  # canonical bump stored
    assert acc.data[P.REGISTRY_POLICY_OFFSET] == int(policy)
    assert bytes(acc.data[66:72]) == bytes(6)


@pytest.mark.parametrize("policy", [2, 255])
def test_initialize_registry_invalid_policy(chain: Chain, policy: int):
    auth = chain.upgrade_authority
    ix = P.initialize_registry_ix(auth.pubkey(), 60)
    ix = with_data(ix, bytes(ix.data)[:16] + bytes([policy]))
    assert chain.fails(ix, auth) == "InvalidPolicy"
    assert chain.account(chain.registry) is None


def test_initialize_registry_only_by_upgrade_authority(chain: Chain):
    """Not "first caller wins": any other key, however early, is refused."""
    mallory = chain.fund()
    ix = P.initialize_registry_ix(mallory.pubkey(), 60, P.Policy.OPEN)
    assert chain.fails(ix, mallory) == "NotUpgradeAuthority"
    assert chain.account(chain.registry) is None
    chain.init()
    assert chain.reg().authority == chain.upgrade_authority.pubkey()


def _programdata_with(chain: Chain, authority: Pubkey | None) -> bytes:
    data = bytearray(chain.data(P.programdata_address()))
    data[12:45] = (b"\1" + bytes(authority)) if authority else bytes(33)
    return bytes(data)


def test_initialize_registry_immutable_program_has_no_authority(chain: Chain):
    """A program without an upgrade authority (Option None) has no key that may initialise."""
    auth = chain.upgrade_authority
    pdata = P.programdata_address()
    chain.forge(pdata, _programdata_with(chain, None), owner=P.BPF_LOADER_UPGRADEABLE_ID)
    assert chain.fails(P.initialize_registry_ix(auth.pubkey(), 60), auth) == "NotUpgradeAuthority"
    assert chain.account(chain.registry) is None


def test_initialize_registry_forged_program_accounts(chain: Chain):
    """The upgrade authority must come from this program's real ProgramData, not a look-alike."""
    mallory = chain.fund()
    ix = P.initialize_registry_ix(mallory.pubkey(), 60)
    pdata = P.programdata_address()
    # A ProgramData look-alike naming mallory, at another address: owned by mallory's program,
    # or (what the loader would never do) by the loader itself.
    fake = Pubkey.new_unique()
    for owner in (Pubkey.new_unique(), P.BPF_LOADER_UPGRADEABLE_ID):
        chain.forge(fake, _programdata_with(chain, mallory.pubkey()), owner=owner)
        assert chain.fails(tamper(ix, 4, pubkey=fake), mallory) == "InvalidProgramData"
    # Another program's account in place of this one (the system program, a wallet, the
    # registry PDA), and this program's ProgramData in the program's place.
    for key in (SYSTEM_PROGRAM_ID, mallory.pubkey(), chain.registry, pdata):
        assert chain.fails(tamper(ix, 3, pubkey=key), mallory) == "InvalidProgramData"
    # The program account in the ProgramData slot.
    assert chain.fails(tamper(ix, 4, pubkey=PID), mallory) == "InvalidProgramData"
    # The real ProgramData, but mallory is not its authority.
    assert chain.fails(ix, mallory) == "NotUpgradeAuthority"
    assert chain.account(chain.registry) is None


@pytest.mark.parametrize("ttl", [1, 86_400])
def test_initialize_registry_ttl_bounds_allowed(chain: Chain, ttl: int):
    chain.init(ttl=ttl)
    assert chain.reg().heartbeat_ttl == ttl


@pytest.mark.parametrize("ttl", [0, -1, 86_401, -(2**63), 2**63 - 1])
def test_initialize_registry_invalid_ttl(chain: Chain, ttl: int):
    auth = chain.upgrade_authority
    assert chain.fails(P.initialize_registry_ix(auth.pubkey(), ttl), auth) == "InvalidTtl"
    assert chain.account(chain.registry) is None


def test_initialize_registry_twice(ready: Chain):
    auth = ready.upgrade_authority
    ix = P.initialize_registry_ix(auth.pubkey(), 30, P.Policy.APPROVAL)
    assert ready.fails(ix, auth) == "AlreadyInitialized"
    reg = ready.reg()
    assert (reg.authority, reg.heartbeat_ttl, reg.policy) == (auth.pubkey(), 60, P.Policy.OPEN)


def test_initialize_registry_prefunded_pda(chain: Chain):
    """Lamports sent to the registry address beforehand must not block creation."""
    rent = chain.svm.minimum_balance_for_rent_exemption(P.REGISTRY_SIZE)
    chain.ok(
        transfer(
            TransferParams(
                from_pubkey=chain.payer.pubkey(), to_pubkey=chain.registry, lamports=rent // 3
            )
        )
    )
    chain.init()
    acc = chain.account(chain.registry)
    assert acc.owner == PID and acc.lamports == rent
    assert chain.reg().node_count == 0


def test_initialize_registry_prefunded_over_rent(chain: Chain):
    rent = chain.svm.minimum_balance_for_rent_exemption(P.REGISTRY_SIZE)
    chain.ok(
        transfer(
            TransferParams(
                from_pubkey=chain.payer.pubkey(), to_pubkey=chain.registry, lamports=rent + 12345
            )
        )
    )
    chain.init()
    assert chain.account(chain.registry).lamports == rent + 12345


def test_initialize_registry_hostile(chain: Chain):
    auth = chain.upgrade_authority
    ix = P.initialize_registry_ix(auth.pubkey(), 60)
    assert chain.fails(tamper(ix, 1, signer=False)) == "MissingSignature"
    assert chain.fails(tamper(ix, 1, writable=False), auth) == "NotWritable"
    assert chain.fails(tamper(ix, 0, writable=False), auth) == "NotWritable"
    assert chain.fails(tamper(ix, 2, pubkey=Pubkey.new_unique()), auth) == "WrongSystemProgram"
    assert chain.fails(tamper(ix, 2, pubkey=PID), auth) == "WrongSystemProgram"
    # Not the ["registry"] PDA: a fresh address, or another PDA of this program.
    assert chain.fails(tamper(ix, 0, pubkey=Pubkey.new_unique()), auth) == "InvalidPda"
    other_pda, _ = P.node_pda(auth.pubkey())
    assert chain.fails(tamper(ix, 0, pubkey=other_pda), auth) == "InvalidPda"
    assert chain.account(chain.registry) is None
    chain.ok(ix, auth)


# ================================================================ malformed instructions


def test_garbage_instruction_data(ready: Chain):
    auth = ready.authority
    ix = P.initialize_registry_ix(auth.pubkey(), 60)
    for data in [
        b"",
        b"\x01",
        bytes(7),
        bytes(8),
        b"\xff" * 16,
        disc("initialize_registry"),
        disc("initialize_registry") + bytes(8),
        disc("initialize_registry") + bytes(10),
        disc("initializeRegistry") + bytes(9),
    ]:
        assert ready.fails(with_data(ix, data), auth) == "InvalidInstruction", data


def test_wrong_account_count(ready: Chain):
    owner = ready.register()
    ix = P.heartbeat_ix(owner.pubkey(), 1, 10)
    metas = list(ix.accounts)
    assert ready.fails(with_accounts(ix, metas[:1]), owner) == "InvalidInstruction"
    assert ready.fails(with_accounts(ix, []), owner) == "InvalidInstruction"
    extra = metas + [AccountMeta(Pubkey.new_unique(), False, False)]
    assert ready.fails(with_accounts(ix, extra), owner) == "InvalidInstruction"
    many = metas + [AccountMeta(Pubkey.new_unique(), False, False) for _ in range(8)]
    assert ready.fails(with_accounts(ix, many), owner) == "InvalidInstruction"
    ix = P.initialize_registry_ix(ready.authority.pubkey(), 60)
    for n in (2, 3, 4):
        assert ready.fails(with_accounts(ix, list(ix.accounts)[:n]), ready.authority) == (
            "InvalidInstruction"
        )


@pytest.mark.parametrize(
    "name,builder",
    [
        (
            "add_issuer",
            lambda c: P.add_issuer_ix(c.authority.pubkey(), Pubkey.new_unique(), GATEWAY),
        ),
        ("remove_issuer", lambda c: P.remove_issuer_ix(c.authority.pubkey(), Pubkey.new_unique())),
        ("deregister_node", lambda c: P.deregister_node_ix(c.authority.pubkey())),
        (
            "set_node_status",
            lambda c: P.set_node_status_ix(c.authority.pubkey(), c.authority.pubkey(), 1),
        ),
        ("heartbeat", lambda c: P.heartbeat_ix(c.authority.pubkey(), 1, 1)),
        ("approve_node", lambda c: P.approve_node_ix(c.authority.pubkey(), c.authority.pubkey())),
    ],
)
def test_wrong_data_length(ready: Chain, name: str, builder):
    ix = builder(ready)
    data = bytes(ix.data)
    for bad in [data[:-1] if len(data) > 8 else data[:7], data + b"\0"]:
        assert ready.fails(with_data(ix, bad), ready.authority) == "InvalidInstruction"


def test_duplicate_accounts(ready: Chain):
    owner = ready.register()
    node, _ = P.node_pda(owner.pubkey())
    # The node passed again as the "owner": it did not sign.
    ix = P.heartbeat_ix(owner.pubkey(), 1, 10)
    assert ready.fails(tamper(ix, 1, pubkey=node, signer=False, writable=True)) == (
        "MissingSignature"
    )
    # The registry passed again as the new node's account.
    other = ready.fund()
    ix = P.register_node_ix(other.pubkey(), P.Role.SFU, FIELDS)
    assert ready.fails(tamper(ix, 1, pubkey=ready.registry), other) == "InvalidPda"


# ================================================================ add_issuer / remove_issuer


def test_add_issuer(ready: Chain):
    ready.set_clock(77, 1_700_000_123)
    key = ready.add_issuer()
    iss = ready.issuer(key)
    addr, bump = P.issuer_pda(key)
    assert (iss.address, iss.key, iss.added_at, iss.url) == (addr, key, 1_700_000_123, GATEWAY)
    acc = ready.account(addr)
    assert acc.owner == PID and len(acc.data) == P.ISSUER_SIZE and acc.data[48] == bump
    assert acc.lamports == ready.svm.minimum_balance_for_rent_exemption(P.ISSUER_SIZE)
    assert ready.reg().issuer_count == 1
    ready.add_issuer()
    assert ready.reg().issuer_count == 2


def test_add_issuer_twice(ready: Chain):
    key = ready.add_issuer()
    ix = P.add_issuer_ix(ready.authority.pubkey(), key, GATEWAY)
    assert ready.fails(ix, ready.authority) == "AlreadyInitialized"
    assert ready.reg().issuer_count == 1


def test_add_issuer_not_authority(ready: Chain):
    mallory = ready.fund()
    ix = P.add_issuer_ix(mallory.pubkey(), mallory.pubkey(), GATEWAY)
    assert ready.fails(ix, mallory) == "NotAuthority"
    assert ready.reg().issuer_count == 0


def test_add_issuer_hostile(ready: Chain):
    auth = ready.authority
    key = Pubkey.new_unique()
    ix = P.add_issuer_ix(auth.pubkey(), key, GATEWAY)
    assert ready.fails(tamper(ix, 2, signer=False)) == "MissingSignature"
    assert ready.fails(tamper(ix, 2, writable=False), auth) == "NotWritable"
    assert ready.fails(tamper(ix, 0, writable=False), auth) == "NotWritable"
    assert ready.fails(tamper(ix, 1, writable=False), auth) == "NotWritable"
    assert ready.fails(tamper(ix, 3, pubkey=Pubkey.new_unique()), auth) == "WrongSystemProgram"
    # The issuer account of another key than the one in the data.
    wrong, _ = P.issuer_pda(Pubkey.new_unique())
    assert ready.fails(tamper(ix, 1, pubkey=wrong), auth) == "InvalidPda"
    # A registry look-alike owned by another program.
    fake = Pubkey.new_unique()
    ready.forge(fake, ready.data(ready.registry), owner=Pubkey.new_unique())
    assert ready.fails(tamper(ix, 0, pubkey=fake), auth) == "WrongAccountOwner"
    # A program-owned, registry-shaped account that is not the ["registry"] PDA.
    ready.forge(fake, ready.data(ready.registry), owner=PID)
    assert ready.fails(tamper(ix, 0, pubkey=fake), auth) == "InvalidPda"
    # A wallet passed as the registry.
    assert ready.fails(tamper(ix, 0, pubkey=auth.pubkey()), auth) == "NotInitialized"
    assert ready.account(P.issuer_pda(key)[0]) is None
    ready.ok(ix, auth)


@pytest.mark.parametrize(
    "url,error",
    [
        ("", "InvalidUrl"),
        ("https://" + "g" * 193, "InvalidUrl"),  # 201 bytes
        ("https://gw.example\n", "InvalidUrl"),
        ("http://gw.example.net", "InsecureUrl"),
        ("ftp://gw.example.net", "InsecureUrl"),
        ("https://", "InsecureUrl"),
    ],
)
def test_add_issuer_refuses_a_bad_url(ready: Chain, url: str, error: str):
    key = Pubkey.new_unique()
    assert ready.fails(P.add_issuer_ix(ready.authority.pubkey(), key, url), ready.authority) == (
        error
    )
    assert ready.account(P.issuer_pda(key)[0]) is None and ready.reg().issuer_count == 0


def test_add_issuer_url_bounds_and_loopback(ready: Chain):
    longest = "https://" + "g" * 192  # 200 bytes
    assert ready.issuer(ready.add_issuer(url=longest)).url == longest
    assert ready.issuer(ready.add_issuer(url="http://127.0.0.1:8402")).url == (
        "http://127.0.0.1:8402"
    )


def test_add_issuer_length_prefix_must_match_the_data(ready: Chain):
    ix = P.add_issuer_ix(ready.authority.pubkey(), Pubkey.new_unique(), GATEWAY)
    data = bytearray(bytes(ix.data))
    for bad in (bytes(data[:-1]), bytes(data) + b"x", bytes(data[:44])):
        forged = Instruction(ix.program_id, bad, ix.accounts)
        assert ready.fails(forged, ready.authority) == "InvalidInstruction"


def test_update_issuer(ready: Chain):
    key = ready.add_issuer()
    before = ready.data(P.issuer_pda(key)[0])
    moved = "https://gw2.example.net:8443/api"
    ix = P.update_issuer_ix(ready.authority.pubkey(), key, moved)
    ready.ok(ix, ready.authority, cu="update_issuer")
    iss = ready.issuer(key)
    assert (iss.key, iss.url, iss.added_at) == (key, moved, ready.issuer(key).added_at)
    after = ready.data(P.issuer_pda(key)[0])
    assert after[:56] == before[:56], "only the URL changed"
    shorter = "https://g.example"
    ready.ok(P.update_issuer_ix(ready.authority.pubkey(), key, shorter), ready.authority)
    data = ready.data(P.issuer_pda(key)[0])
    assert ready.issuer(key).url == shorter and data[60 + len(shorter) :] == bytes(
        P.ISSUER_SIZE - 60 - len(shorter)
    ), "the old URL's tail is cleared"


def test_update_issuer_hostile(ready: Chain):
    auth = ready.authority
    key = ready.add_issuer()
    addr = P.issuer_pda(key)[0]
    before = ready.data(addr)
    ix = P.update_issuer_ix(auth.pubkey(), key, "https://evil.example")
    assert ready.fails(tamper(ix, 2, signer=False)) == "MissingSignature"
    assert ready.fails(tamper(ix, 1, writable=False), auth) == "NotWritable"
    mallory = ready.fund()
    assert ready.fails(tamper(ix, 2, pubkey=mallory.pubkey()), mallory) == "NotAuthority"
    fake = Pubkey.new_unique()
    ready.forge(fake, before, owner=Pubkey.new_unique())
    assert ready.fails(tamper(ix, 1, pubkey=fake), auth) == "WrongAccountOwner"
    ready.forge(fake, before, owner=PID)
    assert ready.fails(tamper(ix, 1, pubkey=fake), auth) == "InvalidPda"
    assert ready.fails(tamper(ix, 1, pubkey=ready.registry), auth) == "WrongDiscriminator"
    plain = P.update_issuer_ix(auth.pubkey(), key, "http://gw.example.net")
    assert ready.fails(plain, auth) == "InsecureUrl"
    gone = P.update_issuer_ix(auth.pubkey(), Pubkey.new_unique(), GATEWAY)
    assert ready.fails(gone, auth) == "NotInitialized"
    assert ready.data(addr) == before


def test_add_issuer_node_as_registry(ready: Chain):
    owner = ready.register()
    node, _ = P.node_pda(owner.pubkey())
    ix = P.add_issuer_ix(ready.authority.pubkey(), Pubkey.new_unique(), GATEWAY)
    assert ready.fails(tamper(ix, 0, pubkey=node), ready.authority) == "WrongDiscriminator"


def test_add_issuer_before_initialize(chain: Chain):
    auth = chain.fund()
    assert chain.fails(P.add_issuer_ix(auth.pubkey(), Pubkey.new_unique(), GATEWAY), auth) == (
        "NotInitialized"
    )


def test_add_issuer_count_overflow(ready: Chain):
    data = set_field(ready.data(ready.registry), 56, "<Q", 2**64 - 1)
    ready.forge(ready.registry, data)
    ix = P.add_issuer_ix(ready.authority.pubkey(), Pubkey.new_unique(), GATEWAY)
    assert ready.fails(ix, ready.authority) == "Overflow"


def test_remove_issuer(ready: Chain):
    key = ready.add_issuer()
    keep = ready.add_issuer()
    addr, _ = P.issuer_pda(key)
    rent = ready.account(addr).lamports
    before = ready.svm.get_balance(ready.authority.pubkey())
    ready.ok(P.remove_issuer_ix(ready.authority.pubkey(), key), ready.authority, cu="remove_issuer")
    assert ready.is_closed(addr)
    assert ready.svm.get_balance(ready.authority.pubkey()) == before + rent
    assert ready.reg().issuer_count == 1
    assert ready.issuer(keep).key == keep
    # Gone: removing again finds nothing.
    ix = P.remove_issuer_ix(ready.authority.pubkey(), key)
    assert ready.fails(ix, ready.authority) == "NotInitialized"
    # And it can be added again, fresh.
    ready.add_issuer(key)
    assert ready.reg().issuer_count == 2


def test_remove_issuer_cannot_be_revived_in_same_tx(ready: Chain):
    key = ready.add_issuer()
    addr, _ = P.issuer_pda(key)
    auth = ready.authority
    ixs = [
        P.remove_issuer_ix(auth.pubkey(), key),
        transfer(TransferParams(from_pubkey=ready.payer.pubkey(), to_pubkey=addr, lamports=10**7)),
        P.remove_issuer_ix(auth.pubkey(), key),
    ]
    assert ready.fails(ixs, auth, index=2) == "NotInitialized"
    assert ready.issuer(key).key == key  # the whole transaction was rolled back


def test_remove_issuer_hostile(ready: Chain):
    auth = ready.authority
    key = ready.add_issuer()
    ix = P.remove_issuer_ix(auth.pubkey(), key)
    assert ready.fails(tamper(ix, 2, signer=False)) == "MissingSignature"
    assert ready.fails(tamper(ix, 2, writable=False), auth) == "NotWritable"
    assert ready.fails(tamper(ix, 0, writable=False), auth) == "NotWritable"
    assert ready.fails(tamper(ix, 1, writable=False), auth) == "NotWritable"
    mallory = ready.fund()
    assert ready.fails(tamper(ix, 2, pubkey=mallory.pubkey()), mallory) == "NotAuthority"
    # An issuer look-alike owned by another program.
    fake = Pubkey.new_unique()
    ready.forge(fake, ready.data(P.issuer_pda(key)[0]), owner=Pubkey.new_unique())
    assert ready.fails(tamper(ix, 1, pubkey=fake), auth) == "WrongAccountOwner"
    # A program-owned issuer-shaped account at an address that is not its PDA.
    ready.forge(fake, ready.data(P.issuer_pda(key)[0]), owner=PID)
    assert ready.fails(tamper(ix, 1, pubkey=fake), auth) == "InvalidPda"
    # The registry passed as the issuer: right owner, wrong type.
    assert ready.fails(tamper(ix, 1, pubkey=ready.registry), auth) == "WrongDiscriminator"
    assert ready.issuer(key).key == key


def test_remove_issuer_count_underflow(ready: Chain):
    key = ready.add_issuer()
    ready.forge(ready.registry, set_field(ready.data(ready.registry), 56, "<Q", 0))
    ix = P.remove_issuer_ix(ready.authority.pubkey(), key)
    assert ready.fails(ix, ready.authority) == "Overflow"


# ================================================================ register_node


def test_register_node(ready: Chain):
    ready.set_clock(4242, 1_700_000_500)
    owner = ready.register(P.Role.STT)
    n = ready.node(owner.pubkey())
    addr, bump = P.node_pda(owner.pubkey())
    assert n.address == addr and n.owner == owner.pubkey()
    assert (n.role, n.status) == (P.Role.STT, P.NodeStatus.ACTIVE)
    assert (n.url, n.country, n.capacity, n.load, n.version) == (FIELDS.url, "DE", 500, 0, "1.4.2")
    assert (n.lat, n.lon) == (52.520008, 13.404954)
    assert (n.registered_at, n.last_heartbeat, n.last_heartbeat_slot) == (
        1_700_000_500,
        1_700_000_500,
        4242,
    )
    acc = ready.account(addr)
    assert acc.owner == PID and len(acc.data) == P.NODE_SIZE
    assert acc.lamports == ready.svm.minimum_balance_for_rent_exemption(P.NODE_SIZE)
    data = bytes(acc.data)
    assert data[82] == bump and data[83] == 0 and data[86:88] == b"\0\0"
    assert data[108 + len(FIELDS.url) :] == bytes(200 - len(FIELDS.url))
    assert ready.reg().node_count == 1


def test_register_node_raw_encoding_matches_builder(ready: Chain):
    owner = ready.fund()
    ix = P.register_node_ix(owner.pubkey(), P.Role.TTS, FIELDS)
    assert bytes(ix.data) == disc("register_node") + bytes([2]) + enc_fields(**raw_fields())


@pytest.mark.parametrize("role", list(P.Role))
def test_register_node_roles(ready: Chain, role: P.Role):
    owner = ready.register(role)
    assert ready.node(owner.pubkey()).role == role


def _register_raw(chain: Chain, owner: Keypair, role: int = 0, **over) -> Instruction:
    ix = P.register_node_ix(owner.pubkey(), P.Role.SFU, FIELDS)
    return with_data(ix, disc("register_node") + bytes([role]) + enc_fields(**raw_fields(**over)))


def _update_raw(chain: Chain, owner: Keypair, **over) -> Instruction:
    ix = P.update_node_ix(owner.pubkey(), FIELDS)
    return with_data(ix, disc("update_node") + enc_fields(**raw_fields(**over)))


VALID_FIELDS = [
    dict(url=b"https://x"),
    dict(url=b"https://" + b"h" * 192),
    dict(url=b"https://h/" + bytes(range(0x21, 0x7F))),
    dict(url=b"http://127.0.0.1:8001"),
    dict(lat=90_000_000, lon=180_000_000),
    dict(lat=-90_000_000, lon=-180_000_000),
    dict(lat=0, lon=0),
    dict(country=b"AZ"),
    dict(country=b"ZA"),
    dict(capacity=1),
    dict(capacity=2**32 - 1),
    dict(version=b"v".ljust(16, b"\0")),
    dict(version=b"0123456789abcdef"),
    dict(version=b"1.0.0-rc.1+b~x_y".ljust(16, b"\0")),
]

INVALID_FIELDS = [
    (dict(url=b""), "InvalidUrl"),
    (dict(url=b"x"), "InsecureUrl"),
    (dict(url=b"http://sfu.example.net"), "InsecureUrl"),
    (dict(url=b"h" * 201), "InvalidUrl"),
    (dict(url=b"https://a b"), "InvalidUrl"),
    (dict(url=b"https://a\x7f"), "InvalidUrl"),
    (dict(url=b"https://a\x00"), "InvalidUrl"),
    (dict(url=b"\nhttps://a"), "InvalidUrl"),
    (dict(url="https://café.de".encode()), "InvalidUrl"),
    (dict(lat=90_000_001), "InvalidLatitude"),
    (dict(lat=-90_000_001), "InvalidLatitude"),
    (dict(lat=2**31 - 1), "InvalidLatitude"),
    (dict(lat=-(2**31)), "InvalidLatitude"),
    (dict(lon=180_000_001), "InvalidLongitude"),
    (dict(lon=-180_000_001), "InvalidLongitude"),
    (dict(lon=-(2**31)), "InvalidLongitude"),
    (dict(country=b"de"), "InvalidCountry"),
    (dict(country=b"D1"), "InvalidCountry"),
    (dict(country=b"D\0"), "InvalidCountry"),
    (dict(country=b"@["), "InvalidCountry"),
    (dict(capacity=0), "InvalidCapacity"),
    (dict(version=bytes(16)), "InvalidVersion"),
    (dict(version=b"\0" + b"1" * 15), "InvalidVersion"),
    (dict(version=b"1.0\0x".ljust(16, b"\0")), "InvalidVersion"),
    (dict(version=b"1.0 beta".ljust(16, b"\0")), "InvalidVersion"),
    (dict(version=b"1.0\x01".ljust(16, b"\0")), "InvalidVersion"),
    (dict(version=b"1.0\xff".ljust(16, b"\0")), "InvalidVersion"),
]


@pytest.mark.parametrize("over", VALID_FIELDS, ids=lambda d: ",".join(d))
def test_register_node_valid_fields(ready: Chain, over: dict):
    owner = ready.fund()
    ready.ok(_register_raw(ready, owner, **over), owner)
    n = ready.node(owner.pubkey())
    f = raw_fields(**over)
    assert n.url.encode() == f["url"]
    assert (P.to_micro(n.lat), P.to_micro(n.lon)) == (f["lat"], f["lon"])
    assert n.country.encode() == f["country"] and n.capacity == f["capacity"]
    assert n.version.encode() == f["version"].rstrip(b"\0")


@pytest.mark.parametrize(
    "over,error", INVALID_FIELDS, ids=[f"{e}-{i}" for i, (_, e) in enumerate(INVALID_FIELDS)]
)
def test_register_node_invalid_fields(ready: Chain, over: dict, error: str):
    owner = ready.fund()
    assert ready.fails(_register_raw(ready, owner, **over), owner) == error
    assert ready.account(P.node_pda(owner.pubkey())[0]) is None
    assert ready.reg().node_count == 0


@pytest.mark.parametrize("role", [3, 255])
def test_register_node_invalid_role(ready: Chain, role: int):
    owner = ready.fund()
    assert ready.fails(_register_raw(ready, owner, role=role), owner) == "InvalidRole"


def test_register_node_malformed_data(ready: Chain):
    owner = ready.fund()
    ix = P.register_node_ix(owner.pubkey(), P.Role.SFU, FIELDS)
    data = bytes(ix.data)
    for bad in [
        data[:-1],
        data + b"\0",
        data[:13],
        data[:12],
        data[:9] + struct.pack("<I", 2**32 - 1) + data[13:],
        data[:9] + struct.pack("<I", len(FIELDS.url) + 1) + data[13:],
    ]:
        assert ready.fails(with_data(ix, bad), owner) == "InvalidInstruction"


def test_register_node_twice(ready: Chain):
    owner = ready.register()
    ix = P.register_node_ix(owner.pubkey(), P.Role.TTS, replace(FIELDS, url="https://x"))
    assert ready.fails(ix, owner) == "AlreadyInitialized"
    assert ready.node(owner.pubkey()).url == FIELDS.url
    assert ready.reg().node_count == 1


def test_register_node_prefunded_pda(ready: Chain):
    owner = ready.fund()
    addr, _ = P.node_pda(owner.pubkey())
    rent = ready.svm.minimum_balance_for_rent_exemption(P.NODE_SIZE)
    ready.ok(transfer(TransferParams(from_pubkey=ready.payer.pubkey(), to_pubkey=addr, lamports=1)))
    before = ready.svm.get_balance(owner.pubkey())
    ready.ok(P.register_node_ix(owner.pubkey(), P.Role.SFU, FIELDS), owner, cu="register_node")
    assert ready.account(addr).lamports == rent
    assert ready.svm.get_balance(owner.pubkey()) == before - (rent - 1)
    assert ready.node(owner.pubkey()).url == FIELDS.url


def test_register_node_hostile(ready: Chain):
    owner = ready.fund()
    ix = P.register_node_ix(owner.pubkey(), P.Role.SFU, FIELDS)
    assert ready.fails(tamper(ix, 2, signer=False)) == "MissingSignature"
    assert ready.fails(tamper(ix, 2, writable=False), owner) == "NotWritable"
    assert ready.fails(tamper(ix, 0, writable=False), owner) == "NotWritable"
    assert ready.fails(tamper(ix, 1, writable=False), owner) == "NotWritable"
    assert ready.fails(tamper(ix, 3, pubkey=Pubkey.new_unique()), owner) == "WrongSystemProgram"
    # Someone else's node address, signed by me.
    victim = Keypair().pubkey()
    assert ready.fails(tamper(ix, 1, pubkey=P.node_pda(victim)[0]), owner) == "InvalidPda"
    # A node address of mine, but derived with a non-canonical bump.
    alt = non_canonical_pda([b"node", bytes(owner.pubkey())])
    assert ready.fails(tamper(ix, 1, pubkey=alt), owner) == "InvalidPda"
    # Registry look-alike (another owner), an issuer as the registry.
    fake = Pubkey.new_unique()
    ready.forge(fake, ready.data(ready.registry), owner=Pubkey.new_unique())
    assert ready.fails(tamper(ix, 0, pubkey=fake), owner) == "WrongAccountOwner"
    issuer = ready.add_issuer()
    assert ready.fails(tamper(ix, 0, pubkey=P.issuer_pda(issuer)[0]), owner) == (
        "WrongDiscriminator"
    )
    assert ready.account(P.node_pda(owner.pubkey())[0]) is None
    ready.ok(ix, owner)


def test_register_node_before_initialize(chain: Chain):
    owner = chain.fund()
    ix = P.register_node_ix(owner.pubkey(), P.Role.SFU, FIELDS)
    assert chain.fails(ix, owner) == "NotInitialized"


def test_register_node_count_overflow(ready: Chain):
    ready.forge(ready.registry, set_field(ready.data(ready.registry), 48, "<Q", 2**64 - 1))
    owner = ready.fund()
    ix = P.register_node_ix(owner.pubkey(), P.Role.SFU, FIELDS)
    assert ready.fails(ix, owner) == "Overflow"


def test_register_many_nodes(ready: Chain):
    owners = [ready.register(role) for role in [P.Role.SFU, P.Role.STT, P.Role.TTS] * 2]
    assert ready.reg().node_count == len(owners)
    assert {ready.node(o.pubkey()).owner for o in owners} == {o.pubkey() for o in owners}


# ================================================================ heartbeat


def test_heartbeat(ready: Chain):
    ready.set_clock(100, 1_700_000_000)
    owner = ready.register()
    ready.set_clock(250, 1_700_000_075)
    ready.ok(P.heartbeat_ix(owner.pubkey(), 37, 640), owner, cu="heartbeat")
    n = ready.node(owner.pubkey())
    assert (n.load, n.capacity) == (37, 640)
    assert (n.last_heartbeat, n.last_heartbeat_slot, n.registered_at) == (
        1_700_000_075,
        250,
        1_700_000_000,
    )
    assert (n.url, n.version, n.role, n.status) == (
        FIELDS.url,
        FIELDS.version,
        P.Role.SFU,
        P.NodeStatus.ACTIVE,
    )
    ready.set_clock(251, 1_700_000_076)
    ready.ok(P.heartbeat_ix(owner.pubkey(), 0, 1), owner)
    n = ready.node(owner.pubkey())
    assert (n.load, n.capacity, n.last_heartbeat, n.last_heartbeat_slot) == (
        0,
        1,
        1_700_000_076,
        251,
    )


def test_heartbeat_compute_units(ready: Chain):
    owner = ready.register()
    result = ready.ok(P.heartbeat_ix(owner.pubkey(), 1, 10), owner, cu="heartbeat")
    assert result.compute_units_consumed() <= HEARTBEAT_CU_LIMIT


def test_heartbeat_invalid_capacity(ready: Chain):
    owner = ready.register()
    assert ready.fails(P.heartbeat_ix(owner.pubkey(), 0, 0), owner) == "InvalidCapacity"
    assert ready.node(owner.pubkey()).capacity == FIELDS.capacity


def test_heartbeat_suspended(ready: Chain):
    owner = ready.register()
    auth = ready.authority
    ready.ok(P.set_node_status_ix(auth.pubkey(), owner.pubkey(), P.NodeStatus.SUSPENDED), auth)
    assert ready.fails(P.heartbeat_ix(owner.pubkey(), 1, 10), owner) == "NodeSuspended"
    ready.ok(P.set_node_status_ix(auth.pubkey(), owner.pubkey(), P.NodeStatus.ACTIVE), auth)
    ready.ok(P.heartbeat_ix(owner.pubkey(), 1, 10), owner)


def test_heartbeat_hostile(ready: Chain):
    owner = ready.register()
    victim = ready.register()
    ix = P.heartbeat_ix(owner.pubkey(), 5, 50)
    assert ready.fails(tamper(ix, 1, signer=False)) == "MissingSignature"
    assert ready.fails(tamper(ix, 0, writable=False), owner) == "NotWritable"
    # Another node's PDA with my signature.
    victim_node = P.node_pda(victim.pubkey())[0]
    assert ready.fails(tamper(ix, 0, pubkey=victim_node), owner) == "InvalidPda"
    # The victim's account with the victim named as owner but not signing.
    vix = P.heartbeat_ix(victim.pubkey(), 5, 50)
    assert ready.fails(tamper(vix, 1, signer=False), owner) == "MissingSignature"
    # Look-alike node owned by another program; registry/issuer passed as the node.
    fake = Pubkey.new_unique()
    ready.forge(fake, ready.data(P.node_pda(owner.pubkey())[0]), owner=Pubkey.new_unique())
    assert ready.fails(tamper(ix, 0, pubkey=fake), owner) == "WrongAccountOwner"
    assert ready.fails(tamper(ix, 0, pubkey=ready.registry), owner) == "WrongDiscriminator"
    issuer = ready.add_issuer()
    assert ready.fails(tamper(ix, 0, pubkey=P.issuer_pda(issuer)[0]), owner) == (
        "WrongDiscriminator"
    )
    # A copy of my node at an address that is not its PDA.
    ready.forge(fake, ready.data(P.node_pda(owner.pubkey())[0]), owner=PID)
    assert ready.fails(tamper(ix, 0, pubkey=fake), owner) == "InvalidPda"
    assert ready.node(victim.pubkey()).load == 0
    assert ready.node(owner.pubkey()).load == 0


def test_heartbeat_unregistered(ready: Chain):
    owner = ready.fund()
    assert ready.fails(P.heartbeat_ix(owner.pubkey(), 1, 1), owner) == "NotInitialized"


def test_heartbeat_forged_owner_field(ready: Chain):
    """A node at my PDA whose stored owner is someone else: the stored owner must sign."""
    owner = ready.register()
    addr, _ = P.node_pda(owner.pubkey())
    data = bytearray(ready.data(addr))
    data[8:40] = bytes(Keypair().pubkey())
    ready.forge(addr, bytes(data))
    assert ready.fails(P.heartbeat_ix(owner.pubkey(), 1, 1), owner) == "NotNodeOwner"


def test_heartbeat_forged_bump(ready: Chain):
    owner = ready.register()
    addr, bump = P.node_pda(owner.pubkey())
    ready.forge(addr, set_field(ready.data(addr), 82, "<B", (bump - 1) % 256))
    assert ready.fails(P.heartbeat_ix(owner.pubkey(), 1, 1), owner) == "InvalidPda"


# ================================================================ update_node


def test_update_node(ready: Chain):
    ready.set_clock(5, 1_700_000_001)
    long_url = "https://" + "a" * 180 + ".example"
    owner = ready.register(P.Role.TTS, replace(FIELDS, url=long_url))
    assert ready.node(owner.pubkey()).url == long_url
    ready.set_clock(9, 1_700_000_999)
    new = P.NodeFields(
        url="wss://b.io",
        lat=-33.868820,
        lon=151.209296,
        country="AU",
        capacity=7,
        version="2.0.0-rc1",
    )
    ready.ok(P.update_node_ix(owner.pubkey(), new), owner, cu="update_node")
    n = ready.node(owner.pubkey())
    assert (n.url, n.lat, n.lon, n.country, n.capacity, n.version) == (
        new.url,
        -33.86882,
        151.209296,
        "AU",
        7,
        "2.0.0-rc1",
    )
    # Unchanged: role, status, load, registration and heartbeat stamps.
    assert (n.role, n.status, n.load) == (P.Role.TTS, P.NodeStatus.ACTIVE, 0)
    assert (n.registered_at, n.last_heartbeat, n.last_heartbeat_slot) == (
        1_700_000_001,
        1_700_000_001,
        5,
    )
    data = ready.data(P.node_pda(owner.pubkey())[0])
    assert struct.unpack_from("<I", data, 104)[0] == len(new.url)
    assert data[108 + len(new.url) :] == bytes(200 - len(new.url))  # old URL bytes zeroed
    assert ready.reg().node_count == 1


def test_update_node_full_length_url(ready: Chain):
    owner = ready.register()
    url = b"wss://" + b"u" * 194
    ready.ok(_update_raw(ready, owner, url=url), owner)
    assert ready.node(owner.pubkey()).url == url.decode()


@pytest.mark.parametrize(
    "over,error", INVALID_FIELDS, ids=[f"{e}-{i}" for i, (_, e) in enumerate(INVALID_FIELDS)]
)
def test_update_node_invalid_fields(ready: Chain, over: dict, error: str):
    owner = ready.register()
    before = ready.data(P.node_pda(owner.pubkey())[0])
    assert ready.fails(_update_raw(ready, owner, **over), owner) == error
    assert ready.data(P.node_pda(owner.pubkey())[0]) == before


def test_update_node_malformed_data(ready: Chain):
    owner = ready.register()
    ix = P.update_node_ix(owner.pubkey(), FIELDS)
    data = bytes(ix.data)
    for bad in [
        data[:-1],
        data + b"\0",
        data[:11],
        data[:8] + struct.pack("<I", 2**32 - 1) + data[12:],
    ]:
        assert ready.fails(with_data(ix, bad), owner) == "InvalidInstruction"


def test_update_node_while_suspended(ready: Chain):
    """A suspended node cannot move its entry while the authority looks at it."""
    owner = ready.register()
    auth = ready.authority
    ready.ok(P.set_node_status_ix(auth.pubkey(), owner.pubkey(), P.NodeStatus.SUSPENDED), auth)
    addr = P.node_pda(owner.pubkey())[0]
    before = ready.data(addr)
    ix = P.update_node_ix(owner.pubkey(), replace(FIELDS, capacity=9))
    assert ready.fails(ix, owner) == "NodeSuspended"
    assert ready.data(addr) == before
    ready.ok(P.set_node_status_ix(auth.pubkey(), owner.pubkey(), P.NodeStatus.ACTIVE), auth)
    ready.ok(ix, owner)
    assert ready.node(owner.pubkey()).capacity == 9


def test_update_node_hostile(ready: Chain):
    owner = ready.register()
    victim = ready.register()
    ix = P.update_node_ix(owner.pubkey(), replace(FIELDS, url="https://evil"))
    assert ready.fails(tamper(ix, 1, signer=False)) == "MissingSignature"
    assert ready.fails(tamper(ix, 0, writable=False), owner) == "NotWritable"
    assert ready.fails(tamper(ix, 0, pubkey=P.node_pda(victim.pubkey())[0]), owner) == (
        "InvalidPda"
    )
    assert ready.fails(tamper(ix, 0, pubkey=ready.registry), owner) == "WrongDiscriminator"
    fake = Pubkey.new_unique()
    ready.forge(fake, ready.data(P.node_pda(victim.pubkey())[0]), owner=Pubkey.new_unique())
    assert ready.fails(tamper(ix, 0, pubkey=fake), owner) == "WrongAccountOwner"
    assert ready.node(victim.pubkey()).url == FIELDS.url
    # Stored owner differs from the signer (forged at the signer's PDA).
    addr = P.node_pda(owner.pubkey())[0]
    data = bytearray(ready.data(addr))
    data[8:40] = bytes(victim.pubkey())
    ready.forge(addr, bytes(data))
    assert ready.fails(ix, owner) == "NotNodeOwner"


# ================================================================ deregister_node


def test_deregister_node(ready: Chain):
    owner = ready.register()
    other = ready.register()
    addr, _ = P.node_pda(owner.pubkey())
    rent = ready.account(addr).lamports
    before = ready.svm.get_balance(owner.pubkey())
    ready.ok(P.deregister_node_ix(owner.pubkey()), owner, cu="deregister_node")
    assert ready.is_closed(addr)
    assert ready.svm.get_balance(owner.pubkey()) == before + rent
    assert ready.reg().node_count == 1
    assert ready.node(other.pubkey()).owner == other.pubkey()
    assert ready.fails(P.heartbeat_ix(owner.pubkey(), 1, 1), owner) == "NotInitialized"
    assert ready.fails(P.deregister_node_ix(owner.pubkey()), owner) == "NotInitialized"
    # Registering again starts a fresh entry.
    ready.set_clock(9, 1_800_000_000)
    ready.ok(P.register_node_ix(owner.pubkey(), P.Role.STT, FIELDS), owner)
    n = ready.node(owner.pubkey())
    assert (n.role, n.registered_at) == (P.Role.STT, 1_800_000_000)
    assert ready.reg().node_count == 2


def test_deregister_node_cannot_be_revived_in_same_tx(ready: Chain):
    owner = ready.register()
    addr, _ = P.node_pda(owner.pubkey())
    ixs = [
        P.deregister_node_ix(owner.pubkey()),
        transfer(TransferParams(from_pubkey=ready.payer.pubkey(), to_pubkey=addr, lamports=10**8)),
        P.heartbeat_ix(owner.pubkey(), 1, 1),
    ]
    assert ready.fails(ixs, owner, index=2) == "NotInitialized"
    ixs[2] = P.update_node_ix(owner.pubkey(), FIELDS)
    assert ready.fails(ixs, owner, index=2) == "NotInitialized"
    assert ready.node(owner.pubkey()).owner == owner.pubkey()
    assert ready.reg().node_count == 1


def test_deregister_then_register_in_one_tx(ready: Chain):
    owner = ready.register(P.Role.SFU)
    ready.ok(
        [
            P.deregister_node_ix(owner.pubkey()),
            P.register_node_ix(owner.pubkey(), P.Role.TTS, FIELDS),
        ],
        owner,
    )
    assert ready.node(owner.pubkey()).role == P.Role.TTS
    assert ready.reg().node_count == 1


def test_deregister_node_suspended(ready: Chain):
    """A suspended node cannot shed its suspension by deregistering and registering again."""
    owner = ready.register()
    auth = ready.authority
    ready.ok(P.set_node_status_ix(auth.pubkey(), owner.pubkey(), P.NodeStatus.SUSPENDED), auth)
    assert ready.fails(P.deregister_node_ix(owner.pubkey()), owner) == "NodeSuspended"
    assert ready.node(owner.pubkey()).status == P.NodeStatus.SUSPENDED


def test_deregister_node_hostile(ready: Chain):
    owner = ready.register()
    victim = ready.register()
    ix = P.deregister_node_ix(owner.pubkey())
    assert ready.fails(tamper(ix, 2, signer=False)) == "MissingSignature"
    assert ready.fails(tamper(ix, 2, writable=False), owner) == "NotWritable"
    assert ready.fails(tamper(ix, 0, writable=False), owner) == "NotWritable"
    assert ready.fails(tamper(ix, 1, writable=False), owner) == "NotWritable"
    victim_node = P.node_pda(victim.pubkey())[0]
    assert ready.fails(tamper(ix, 1, pubkey=victim_node), owner) == "InvalidPda"
    assert ready.fails(tamper(ix, 1, pubkey=ready.registry), owner) == "WrongDiscriminator"
    fake = Pubkey.new_unique()
    ready.forge(fake, ready.data(ready.registry), owner=Pubkey.new_unique())
    assert ready.fails(tamper(ix, 0, pubkey=fake), owner) == "WrongAccountOwner"
    assert ready.fails(tamper(ix, 0, pubkey=victim_node), owner) == "WrongDiscriminator"
    assert ready.node(victim.pubkey()).owner == victim.pubkey()
    assert ready.reg().node_count == 2


def test_deregister_node_count_underflow(ready: Chain):
    owner = ready.register()
    ready.forge(ready.registry, set_field(ready.data(ready.registry), 48, "<Q", 0))
    assert ready.fails(P.deregister_node_ix(owner.pubkey()), owner) == "Overflow"


# ================================================================ set_node_status


def test_set_node_status(ready: Chain):
    owner = ready.register()
    auth = ready.authority
    ready.ok(
        P.set_node_status_ix(auth.pubkey(), owner.pubkey(), P.NodeStatus.SUSPENDED),
        auth,
        cu="set_node_status",
    )
    n = ready.node(owner.pubkey())
    assert n.status == P.NodeStatus.SUSPENDED and n.url == FIELDS.url
    ready.ok(P.set_node_status_ix(auth.pubkey(), owner.pubkey(), P.NodeStatus.SUSPENDED), auth)
    ready.ok(P.set_node_status_ix(auth.pubkey(), owner.pubkey(), P.NodeStatus.ACTIVE), auth)
    assert ready.node(owner.pubkey()).status == P.NodeStatus.ACTIVE


@pytest.mark.parametrize("status", [2, 255])
def test_set_node_status_invalid(ready: Chain, status: int):
    owner = ready.register()
    auth = ready.authority
    ix = P.set_node_status_ix(auth.pubkey(), owner.pubkey(), P.NodeStatus.ACTIVE)
    ix = with_data(ix, disc("set_node_status") + bytes([status]))
    assert ready.fails(ix, auth) == "InvalidStatus"


def test_set_node_status_not_authority(ready: Chain):
    owner = ready.register()
    auth = ready.authority
    ready.ok(P.set_node_status_ix(auth.pubkey(), owner.pubkey(), P.NodeStatus.SUSPENDED), auth)
    # The node's own key cannot lift its suspension.
    ix = P.set_node_status_ix(owner.pubkey(), owner.pubkey(), P.NodeStatus.ACTIVE)
    assert ready.fails(ix, owner) == "NotAuthority"
    assert ready.node(owner.pubkey()).status == P.NodeStatus.SUSPENDED


def test_set_node_status_hostile(ready: Chain):
    owner = ready.register()
    auth = ready.authority
    ix = P.set_node_status_ix(auth.pubkey(), owner.pubkey(), P.NodeStatus.SUSPENDED)
    assert ready.fails(tamper(ix, 2, signer=False)) == "MissingSignature"
    assert ready.fails(tamper(ix, 1, writable=False), auth) == "NotWritable"
    fake = Pubkey.new_unique()
    ready.forge(fake, ready.data(ready.registry), owner=Pubkey.new_unique())
    assert ready.fails(tamper(ix, 0, pubkey=fake), auth) == "WrongAccountOwner"
    # A registry of my own making: program-owned copy naming me as authority, not the PDA.
    mallory = ready.fund()
    data = bytearray(ready.data(ready.registry))
    data[8:40] = bytes(mallory.pubkey())
    ready.forge(fake, bytes(data), owner=PID)
    evil = tamper(tamper(ix, 0, pubkey=fake), 2, pubkey=mallory.pubkey())
    assert ready.fails(evil, mallory) == "InvalidPda"
    # Node look-alike, registry as node, a copied node at a non-PDA address.
    node_addr = P.node_pda(owner.pubkey())[0]
    ready.forge(fake, ready.data(node_addr), owner=Pubkey.new_unique())
    assert ready.fails(tamper(ix, 1, pubkey=fake), auth) == "WrongAccountOwner"
    assert ready.fails(tamper(ix, 1, pubkey=ready.registry), auth) == "WrongDiscriminator"
    ready.forge(fake, ready.data(node_addr), owner=PID)
    assert ready.fails(tamper(ix, 1, pubkey=fake), auth) == "InvalidPda"
    assert ready.fails(tamper(ix, 1, pubkey=Pubkey.new_unique()), auth) == "NotInitialized"
    assert ready.node(owner.pubkey()).status == P.NodeStatus.ACTIVE


# ================================================================ admission (approval policy)


@pytest.fixture
def gated(chain: Chain) -> Chain:
    """Registry initialised under the approval policy."""
    chain.init(policy=P.Policy.APPROVAL)
    return chain


def test_open_policy_node_starts_active(ready: Chain):
    owner = ready.register()
    assert ready.node(owner.pubkey()).status == P.NodeStatus.ACTIVE
    ready.ok(P.heartbeat_ix(owner.pubkey(), 1, 10), owner)


def test_approval_policy_node_starts_pending(gated: Chain):
    owner = gated.register(P.Role.STT)
    n = gated.node(owner.pubkey())
    assert (n.status, n.status.label) == (P.NodeStatus.PENDING, "pending")
    assert gated.reg().node_count == 1


def test_pending_node_cannot_heartbeat_or_update(gated: Chain):
    owner = gated.register()
    addr = P.node_pda(owner.pubkey())[0]
    before = gated.data(addr)
    assert gated.fails(P.heartbeat_ix(owner.pubkey(), 0, 10), owner) == "NodePending"
    ix = P.update_node_ix(owner.pubkey(), replace(FIELDS, capacity=2**32 - 1))
    assert gated.fails(ix, owner) == "NodePending"
    assert gated.data(addr) == before


def test_approve_node(gated: Chain):
    owner = gated.register()
    other = gated.register()
    auth = gated.authority
    gated.ok(P.approve_node_ix(auth.pubkey(), owner.pubkey()), auth, cu="approve_node")
    assert gated.node(owner.pubkey()).status == P.NodeStatus.ACTIVE
    assert gated.node(other.pubkey()).status == P.NodeStatus.PENDING
    # Approved: it may heartbeat and update now.
    gated.ok(P.heartbeat_ix(owner.pubkey(), 2, 10), owner)
    gated.ok(P.update_node_ix(owner.pubkey(), replace(FIELDS, capacity=11)), owner)
    n = gated.node(owner.pubkey())
    assert (n.load, n.capacity) == (2, 11)


def test_approve_node_not_authority(gated: Chain):
    owner = gated.register()
    addr = P.node_pda(owner.pubkey())[0]
    before = gated.data(addr)
    # Neither the node itself nor any other key may admit it.
    for mallory in (owner, gated.fund()):
        ix = P.approve_node_ix(mallory.pubkey(), owner.pubkey())
        assert gated.fails(ix, mallory) == "NotAuthority"
    assert (
        gated.fails(
            tamper(P.approve_node_ix(gated.authority.pubkey(), owner.pubkey()), 2, signer=False)
        )
        == "MissingSignature"
    )
    assert gated.data(addr) == before


def test_approve_node_only_pending(gated: Chain):
    """An approval never lifts a suspension, nor touches an active node."""
    owner = gated.register()
    auth = gated.authority
    gated.ok(P.approve_node_ix(auth.pubkey(), owner.pubkey()), auth)
    assert gated.fails(P.approve_node_ix(auth.pubkey(), owner.pubkey()), auth) == "NodeNotPending"
    gated.ok(P.set_node_status_ix(auth.pubkey(), owner.pubkey(), P.NodeStatus.SUSPENDED), auth)
    assert gated.fails(P.approve_node_ix(auth.pubkey(), owner.pubkey()), auth) == "NodeNotPending"
    assert gated.node(owner.pubkey()).status == P.NodeStatus.SUSPENDED
    unregistered = gated.fund()
    ix = P.approve_node_ix(auth.pubkey(), unregistered.pubkey())
    assert gated.fails(ix, auth) == "NotInitialized"


def test_approve_node_hostile(gated: Chain):
    owner = gated.register()
    auth = gated.authority
    ix = P.approve_node_ix(auth.pubkey(), owner.pubkey())
    assert gated.fails(tamper(ix, 1, writable=False), auth) == "NotWritable"
    assert gated.fails(tamper(ix, 1, pubkey=gated.registry), auth) == "WrongDiscriminator"
    fake = Pubkey.new_unique()
    gated.forge(fake, gated.data(P.node_pda(owner.pubkey())[0]), owner=PID)
    assert gated.fails(tamper(ix, 1, pubkey=fake), auth) == "InvalidPda"
    # A registry of mallory's making naming her as authority.
    mallory = gated.fund()
    data = bytearray(gated.data(gated.registry))
    data[8:40] = bytes(mallory.pubkey())
    gated.forge(fake, bytes(data), owner=PID)
    evil = tamper(tamper(ix, 0, pubkey=fake), 2, pubkey=mallory.pubkey())
    assert gated.fails(evil, mallory) == "InvalidPda"
    assert gated.node(owner.pubkey()).status == P.NodeStatus.PENDING


def test_deregister_pending_node(gated: Chain):
    """A pending node may leave and gets its rent back."""
    owner = gated.register()
    addr = P.node_pda(owner.pubkey())[0]
    rent = gated.account(addr).lamports
    before = gated.svm.get_balance(owner.pubkey())
    gated.ok(P.deregister_node_ix(owner.pubkey()), owner)
    assert gated.is_closed(addr)
    assert gated.svm.get_balance(owner.pubkey()) == before + rent
    assert gated.reg().node_count == 0


def test_activate_pending_node_admits_it(gated: Chain):
    owner = gated.register()
    auth = gated.authority
    gated.ok(P.set_node_status_ix(auth.pubkey(), owner.pubkey(), P.NodeStatus.ACTIVE), auth)
    assert gated.node(owner.pubkey()).status == P.NodeStatus.ACTIVE


# ================================================================ heartbeat load <= capacity


@pytest.mark.parametrize("load,capacity", [(0, 1), (10, 10), (2**32 - 1, 2**32 - 1)])
def test_heartbeat_load_up_to_capacity(ready: Chain, load: int, capacity: int):
    owner = ready.register()
    ready.ok(P.heartbeat_ix(owner.pubkey(), load, capacity), owner)
    n = ready.node(owner.pubkey())
    assert (n.load, n.capacity) == (load, capacity)


@pytest.mark.parametrize("load,capacity", [(11, 10), (2, 1), (2**32 - 1, 2**32 - 2)])
def test_heartbeat_load_over_capacity(ready: Chain, load: int, capacity: int):
    owner = ready.register()
    addr = P.node_pda(owner.pubkey())[0]
    before = ready.data(addr)
    assert ready.fails(P.heartbeat_ix(owner.pubkey(), load, capacity), owner) == (
        "LoadExceedsCapacity"
    )
    assert ready.data(addr) == before


# ================================================================ node URL rule


ALLOWED_URLS = [
    "https://sfu.example.net",
    "wss://sfu.example.net:7880/rtc",
    "HTTPS://X.EXAMPLE",
    "https://[2001:db8::1]:443/",
    "https://a:",
    "https://h?q=1#f",
    "http://127.0.0.1:8001",
    "http://127.255.255.254/x",
    "http://localhost:7880",
    "http://LocalHost",
    "http://[::1]:8080/path",
    "ws://127.0.0.1:7880",
    "ws://localhost/rtc",
    "http://user@127.0.0.1:9",
    "http://evil.example@localhost/",
]
REFUSED_URLS = [
    "x",
    "//sfu.example.net",
    "ftp://sfu.example.net",
    "https:/x",
    "https://",
    "https:///path",
    "https://:443",
    "https://user@",
    "https://a:99999",
    "https://a:8x",
    "https://a:123456",
    "https://[::1",
    "http://sfu.example.net",
    "ws://sfu.example.net",
    "http://10.0.0.1:80",
    "http://127.0.0.1.evil.example",
    "http://localhost.evil.example",
    "http://127.1",
    "http://0127.0.0.1",
    "http://127.0.0.256",
    "http://127.0.0.1.",
    "http://[::2]",
    "http://128.0.0.1",
    "http://127.0.0.1@evil.example",
    "http:127.0.0.1",
    "file://localhost/x",
]


@pytest.mark.parametrize("url", ALLOWED_URLS)
def test_node_url_allowed(ready: Chain, url: str):
    assert node_url_problem(url) is None, "the on-chain rule and registry/nodeurl.py must agree"
    owner = ready.register(fields=replace(FIELDS, url=url))
    assert ready.node(owner.pubkey()).url == url
    ready.ok(P.update_node_ix(owner.pubkey(), replace(FIELDS, url=url + "/v2")), owner)


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_node_url_refused(ready: Chain, url: str):
    assert node_url_problem(url) is not None, "the on-chain rule and registry/nodeurl.py must agree"
    owner = ready.fund()
    ix = P.register_node_ix(owner.pubkey(), P.Role.SFU, replace(FIELDS, url=url))
    assert ready.fails(ix, owner) == "InsecureUrl"
    assert ready.account(P.node_pda(owner.pubkey())[0]) is None
    registered = ready.register()
    addr = P.node_pda(registered.pubkey())[0]
    before = ready.data(addr)
    ix = P.update_node_ix(registered.pubkey(), replace(FIELDS, url=url))
    assert ready.fails(ix, registered) == "InsecureUrl"
    assert ready.data(addr) == before


# ================================================================ rent


@pytest.mark.parametrize(
    "lamports_per_byte_year,threshold", [(6960, 1.0), (1740, 4.0), (3480, 2.0), (10, 0.5)]
)
def test_rent_exact_for_dyadic_thresholds(chain: Chain, lamports_per_byte_year, threshold):
    rent = Rent(
        lamports_per_byte_year=lamports_per_byte_year,
        exemption_threshold=threshold,
        burn_percent=50,
    )
    chain.svm.set_rent(rent)
    chain.init()
    expected = int(float((128 + P.REGISTRY_SIZE) * lamports_per_byte_year) * threshold)
    assert chain.account(chain.registry).lamports == expected


@pytest.mark.parametrize("threshold", [1.1, 2.3, 0.7, 1.0000001])
def test_rent_rounds_up_for_other_thresholds(chain: Chain, threshold):
    chain.svm.set_rent(
        Rent(lamports_per_byte_year=3480, exemption_threshold=threshold, burn_percent=50)
    )
    chain.init()
    exact = int(float((128 + P.REGISTRY_SIZE) * 3480) * threshold)
    got = chain.account(chain.registry).lamports
    assert exact <= got <= exact + 2


# ================================================================ compute units


def test_compute_units_report(ready: Chain):
    """One run of every instruction; CU are deterministic for a given .so and runtime."""
    owner = ready.register()
    key = ready.add_issuer()
    ready.ok(P.heartbeat_ix(owner.pubkey(), 3, 30), owner, cu="heartbeat")
    ready.ok(P.update_node_ix(owner.pubkey(), FIELDS), owner, cu="update_node")
    auth = ready.authority
    ready.ok(
        P.set_node_status_ix(auth.pubkey(), owner.pubkey(), P.NodeStatus.ACTIVE),
        auth,
        cu="set_node_status",
    )
    ready.ok(P.update_issuer_ix(auth.pubkey(), key, GATEWAY), auth, cu="update_issuer")
    ready.ok(P.remove_issuer_ix(auth.pubkey(), key), auth, cu="remove_issuer")
    pending = ready.fund()
    ready.forge(
        ready.registry,
        set_field(
            ready.data(ready.registry), P.REGISTRY_POLICY_OFFSET, "<B", int(P.Policy.APPROVAL)
        ),
    )
    ready.ok(P.register_node_ix(pending.pubkey(), P.Role.STT, FIELDS), pending)
    ready.ok(P.approve_node_ix(auth.pubkey(), pending.pubkey()), auth, cu="approve_node")
    ready.ok(P.deregister_node_ix(owner.pubkey()), owner, cu="deregister_node")
    print("\ncompute units per instruction:")
    for name in sorted(CU):
        print(f"  {name:22s} {CU[name]:6d}")
    assert CU["heartbeat"] <= HEARTBEAT_CU_LIMIT
    # Generous ceilings, to catch a regression (PDA search cost varies with the address).
    for name, cu in CU.items():
        assert cu <= 20_000, (name, cu)
