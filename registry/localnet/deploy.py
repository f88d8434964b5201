"""Deploy an SBF program through the BPF upgradeable loader (loader v3).

This is what ``solana program deploy --program-id KEYPAIR`` does, written out
so it works both in-process against :class:`~registry.localnet.svm.LocalSvm`
and over JSON-RPC against any cluster (:class:`RpcTarget`):

1. create a buffer account (owner = loader v3) and ``InitializeBuffer`` it;
2. ``Write`` the ELF into it in chunks that fill a 1232-byte transaction;
3. create the program account (signed by the program keypair, so the program
   id is fixed) and ``DeployWithMaxDataLen`` in the same transaction.

solders has no loader-v3 instruction builders, so the (small) bincode layout
of ``UpgradeableLoaderInstruction`` is encoded here by hand.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from solders.account import Account
from solders.hash import Hash
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.system_program import ID as SYSTEM_PROGRAM_ID
from solders.system_program import CreateAccountParams, create_account
from solders.sysvar import CLOCK, RENT
from solders.transaction import Transaction

from registry.program import BPF_LOADER_UPGRADEABLE_ID, programdata_address

PACKET_DATA_SIZE = 1232
BUFFER_METADATA_SIZE = 37  # enum tag u32 + Option<Pubkey> authority
PROGRAM_ACCOUNT_SIZE = 36  # enum tag u32 + programdata address
PROGRAMDATA_METADATA_SIZE = 45  # enum tag u32 + slot u64 + Option<Pubkey>


class DeployError(RuntimeError):
    """A deploy transaction failed."""


class DeployTarget(Protocol):
    """What the deployer needs from a chain (in-process or RPC)."""

    def latest_blockhash(self) -> Hash: ...

    def minimum_balance_for_rent_exemption(self, size: int) -> int: ...

    def get_account(self, key: Pubkey) -> Account | None: ...

    def send_all(self, txs: Sequence[Transaction]) -> None:
        """Land every transaction (in order where it matters) or raise."""
        ...


# ----------------------------------------------------------------- instructions
def initialize_buffer_ix(buffer: Pubkey, authority: Pubkey) -> Instruction:
    return Instruction(
        BPF_LOADER_UPGRADEABLE_ID,
        struct.pack("<I", 0),
        [AccountMeta(buffer, False, True), AccountMeta(authority, False, False)],
    )


def write_ix(buffer: Pubkey, authority: Pubkey, offset: int, data: bytes) -> Instruction:
    return Instruction(
        BPF_LOADER_UPGRADEABLE_ID,
        struct.pack("<IIQ", 1, offset, len(data)) + data,
        [AccountMeta(buffer, False, True), AccountMeta(authority, True, False)],
    )


def deploy_with_max_data_len_ix(
    payer: Pubkey, program_id: Pubkey, buffer: Pubkey, authority: Pubkey, max_data_len: int
) -> Instruction:
    return Instruction(
        BPF_LOADER_UPGRADEABLE_ID,
        struct.pack("<IQ", 2, max_data_len),
        [
            AccountMeta(payer, True, True),
            AccountMeta(programdata_address(program_id), False, True),
            AccountMeta(program_id, False, True),
            AccountMeta(buffer, False, True),
            AccountMeta(RENT, False, False),
            AccountMeta(CLOCK, False, False),
            AccountMeta(SYSTEM_PROGRAM_ID, False, False),
            AccountMeta(authority, True, False),
        ],
    )


def is_deployed(target: DeployTarget, program_id: Pubkey) -> bool:
    acc = target.get_account(program_id)
    return acc is not None and acc.executable


# ---------------------------------------------------------------------- deploy
def deploy_program(
    target: DeployTarget,
    program: bytes | str | Path,
    program_keypair: Keypair,
    payer: Keypair,
    *,
    upgrade_authority: Keypair | None = None,
    max_data_len: int | None = None,
) -> Pubkey:
    """Deploy ``program`` (ELF bytes or .so path) at ``program_keypair``'s address.

    ``upgrade_authority`` defaults to ``payer``; ``max_data_len`` to twice the
    ELF size (room for upgrades, as the Solana CLI used to do).  Raises
    :class:`DeployError` if the program id is already in use.
    """
    elf = program if isinstance(program, bytes) else Path(program).read_bytes()
    if elf[:4] != b"\x7fELF":
        raise DeployError("not an ELF file")
    authority = upgrade_authority or payer
    program_id = program_keypair.pubkey()
    if target.get_account(program_id) is not None:
        raise DeployError(f"program id {program_id} is already in use")
    max_len = max(max_data_len or 2 * len(elf), len(elf))
    buffer = Keypair()
    buf_size = BUFFER_METADATA_SIZE + len(elf)

    def tx(ixs: list[Instruction], signers: list[Keypair], blockhash: Hash) -> Transaction:
        uniq = {bytes(k.pubkey()): k for k in [payer, *signers]}
        return Transaction.new_signed_with_payer(
            ixs, payer.pubkey(), list(uniq.values()), blockhash
        )

    def loader_account(address: Pubkey, size: int) -> Instruction:
        """Create a rent-exempt account of ``size`` bytes owned by the upgradeable loader."""
        return create_account(
            CreateAccountParams(
                from_pubkey=payer.pubkey(),
                to_pubkey=address,
                lamports=target.minimum_balance_for_rent_exemption(size),
                space=size,
                owner=BPF_LOADER_UPGRADEABLE_ID,
            )
        )

    bh = target.latest_blockhash()
    target.send_all(
        [
            tx(
                [
                    loader_account(buffer.pubkey(), buf_size),
                    initialize_buffer_ix(buffer.pubkey(), authority.pubkey()),
                ],
                [buffer],
                bh,
            )
        ]
    )

    # Size chunks so each Write transaction is as large as a packet allows.
    # (Probe with 128 bytes so the compact-u16 data length already takes its 2 bytes.)
    probe = tx([write_ix(buffer.pubkey(), authority.pubkey(), 0, bytes(128))], [authority], bh)
    chunk = PACKET_DATA_SIZE - (len(bytes(probe)) - 128)
    offsets = list(range(0, len(elf), chunk))
    batch = 64  # refresh the blockhash now and then for slow clusters
    for i in range(0, len(offsets), batch):
        bh = target.latest_blockhash()
        target.send_all(
            [
                tx(
                    [write_ix(buffer.pubkey(), authority.pubkey(), off, elf[off : off + chunk])],
                    [authority],
                    bh,
                )
                for off in offsets[i : i + batch]
            ]
        )

    bh = target.latest_blockhash()
    target.send_all(
        [
            tx(
                [
                    loader_account(program_id, PROGRAM_ACCOUNT_SIZE),
                    deploy_with_max_data_len_ix(
                        payer.pubkey(), program_id, buffer.pubkey(), authority.pubkey(), max_len
                    ),
                ],
                [program_keypair, authority],
                bh,
            )
        ]
    )
    return program_id


# --------------------------------------------------------------------- targets
class SvmTarget:
    """Deploy into a :class:`~registry.localnet.svm.LocalSvm` in-process."""

    def __init__(self, svm: LocalSvmLike) -> None:
        self._svm = svm

    def latest_blockhash(self) -> Hash:
        return self._svm.latest_blockhash()[0]

    def minimum_balance_for_rent_exemption(self, size: int) -> int:
        return self._svm.minimum_balance_for_rent_exemption(size)

    def get_account(self, key: Pubkey) -> Account | None:
        return self._svm.get_account(key)

    def send_all(self, txs: Sequence[Transaction]) -> None:
        from .svm import PreflightError

        for t in txs:
            try:
                self._svm.send_transaction(t)
            except PreflightError as exc:
                raise DeployError(f"{exc.message}; logs: {exc.logs[-5:]}") from exc


class LiteSvmTarget:
    """Deploy into a bare ``solders.litesvm.LiteSVM`` (program tests): the real loader, so the
    program gets a real ProgramData account with its upgrade authority. Build the SVM with
    :func:`registry.localnet.svm.build_litesvm`, which allows loader-v3 deployments."""

    def __init__(self, svm: object) -> None:
        self._svm = svm

    def latest_blockhash(self) -> Hash:
        return self._svm.latest_blockhash()  # type: ignore[attr-defined]

    def minimum_balance_for_rent_exemption(self, size: int) -> int:
        return self._svm.minimum_balance_for_rent_exemption(size)  # type: ignore[attr-defined]

    def get_account(self, key: Pubkey) -> Account | None:
        acc = self._svm.get_account(key)  # type: ignore[attr-defined]
        return acc if acc is not None and acc.lamports > 0 else None

    def send_all(self, txs: Sequence[Transaction]) -> None:
        from solders.transaction_metadata import FailedTransactionMetadata

        for t in txs:
            result = self._svm.send_transaction(t)  # type: ignore[attr-defined]
            if isinstance(result, FailedTransactionMetadata):
                raise DeployError(f"{result.err()}; logs: {list(result.meta().logs())[-5:]}")


class LocalSvmLike(Protocol):
    def latest_blockhash(self) -> tuple[Hash, int]: ...

    def minimum_balance_for_rent_exemption(self, data_len: int) -> int: ...

    def get_account(self, key: Pubkey) -> Account | None: ...

    def send_transaction(self, tx: Transaction) -> object: ...


class RpcTarget:
    """Deploy over JSON-RPC with solana-py's synchronous ``Client``."""

    def __init__(self, client: object, *, confirm_timeout: float = 60.0) -> None:
        from solana.rpc.api import Client

        assert isinstance(client, Client)
        self._c = client
        self._timeout = confirm_timeout

    def latest_blockhash(self) -> Hash:
        return self._c.get_latest_blockhash().value.blockhash

    def minimum_balance_for_rent_exemption(self, size: int) -> int:
        return self._c.get_minimum_balance_for_rent_exemption(size).value

    def get_account(self, key: Pubkey) -> Account | None:
        v = self._c.get_account_info(key).value
        if v is None:
            return None
        return Account(v.lamports, bytes(v.data), v.owner, v.executable, v.rent_epoch)

    def send_all(self, txs: Sequence[Transaction]) -> None:
        from solana.rpc.types import TxOpts

        sigs = [
            self._c.send_raw_transaction(bytes(t), TxOpts(skip_confirmation=True)).value
            for t in txs
        ]
        pending = set(range(len(sigs)))
        deadline = time.monotonic() + self._timeout
        while pending:
            idx = sorted(pending)[:256]
            statuses = self._c.get_signature_statuses([sigs[i] for i in idx]).value
            for i, st in zip(idx, statuses, strict=False):
                if st is None:
                    continue
                if st.err is not None:
                    raise DeployError(f"deploy transaction {sigs[i]} failed: {st.err}")
                if st.confirmation_status is not None and str(st.confirmation_status).endswith(
                    ("Confirmed", "Finalized")
                ):
                    pending.discard(i)
            if pending:
                if time.monotonic() > deadline:
                    raise DeployError(f"{len(pending)} deploy transactions not confirmed in time")
                time.sleep(0.4)
