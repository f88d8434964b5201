"""LiteSVM wrapped into something that behaves like a single-node cluster.

LiteSVM executes transactions with the real Agave runtime but has no notion of
time, blocks or history: its clock and blockhash never move, it cannot list
accounts and it forgets everything on exit.  :class:`LocalSvm` adds exactly
those missing pieces and nothing else:

* **Time.**  Slots advance with the wall clock (400 ms per slot since the
  ledger's genesis) and the Clock / SlotHashes sysvars are refreshed before
  every execution, so programs see a realistic ``unix_timestamp``.
* **Blockhashes.**  Each slot has a deterministic blockhash derived from the
  genesis hash; a transaction is accepted only if its blockhash is at most 150
  slots old (``BlockhashNotFound`` otherwise) and a signature is accepted only
  once within that window (``AlreadyProcessed``).  LiteSVM's own single-hash
  check and history are switched off because they cannot express this.
* **Preflight.**  A failing transaction is rolled back (LiteSVM charges the
  fee even on failure) and reported as :class:`PreflightError`, unless the
  caller skipped preflight, in which case it lands as a failed transaction.
* **Account index.**  Every key a transaction touched is remembered together
  with its owner so getProgramAccounts can be answered by scanning.
* **Durability.**  Every landed transaction's writable accounts, the clock and
  the transaction record are committed to the :class:`Journal` before the
  call returns; on start the journal is replayed with ``set_account``.
* **Loader v3.**  ``LiteSVM()`` activates ``disable_new_loader_v3_deployments``;
  we build the SVM from parts with that one feature deactivated so programs
  can be deployed through the real upgradeable loader.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solders.account import Account
from solders.clock import Clock
from solders.compute_budget import set_compute_unit_limit
from solders.hash import Hash
from solders.keypair import Keypair
from solders.litesvm import FeatureSet, LiteSVM
from solders.message import Message, MessageV0
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import ID as SYSTEM_PROGRAM_ID
from solders.system_program import TransferParams, transfer
from solders.sysvar import CLOCK, SLOT_HASHES
from solders.transaction import Transaction, VersionedTransaction
from solders.transaction_metadata import FailedTransactionMetadata, TransactionMetadata

from .codec import (
    b58encode,
    describe_error,
    err_to_json,
    parse_mint,
    parse_token_account,
    token_kind,
    ui_token_amount,
)
from .journal import Journal, TxRecord

log = logging.getLogger(__name__)

SLOT_SECONDS = 0.4
MAX_PROCESSING_AGE = 150  # slots a blockhash stays valid (Agave's MAX_PROCESSING_AGE)
LAMPORTS_PER_SIGNATURE = 5_000
PACKET_DATA_SIZE = 1232  # max wire size of a transaction
FAUCET_LAMPORTS = 500_000_000 * 1_000_000_000  # 500M SOL
DISABLE_NEW_LOADER_V3_DEPLOYMENTS = Pubkey.from_string(
    "EmhbpdVtZ2hWRGFWBDjn2i3SJD8Z36z4mpMcZJEnebnP"
)
LOOKUP_TABLE_META_SIZE = 56
SOLANA_CORE_VERSION = "2.2.0"  # the Agave line LiteSVM 0.6 / solders 0.26 is built from
FEATURE_SET_ID = 3_271_415_109

AnyTransaction = Transaction | VersionedTransaction


class PreflightError(Exception):
    """A transaction was refused; mirrors a validator's sendTransaction error.

    ``code`` is -32002 (simulation failed) or -32003 (signature verification);
    ``err`` is the TransactionError as JSON, ``logs`` the program logs.
    """

    def __init__(
        self,
        err: Any,
        logs: Sequence[str] = (),
        units_consumed: int = 0,
        *,
        code: int = -32002,
        return_data: dict[str, Any] | None = None,
        inner_instructions: list[dict[str, Any]] | None = None,
    ) -> None:
        self.err = err
        self.logs = list(logs)
        self.units_consumed = units_consumed
        self.code = code
        self.return_data = return_data
        self.inner_instructions = inner_instructions
        if code == -32003:
            message = "Transaction signature verification failure"
        else:
            message = f"Transaction simulation failed: {describe_error(err)}"
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0])

    def rpc_data(self) -> dict[str, Any] | None:
        """The JSON-RPC ``error.data`` object (RpcSimulateTransactionResult)."""
        if self.code == -32003:
            return None
        return {
            "err": self.err,
            "logs": self.logs,
            "accounts": None,
            "unitsConsumed": self.units_consumed,
            "returnData": self.return_data,
            "innerInstructions": self.inner_instructions,
            "replacementBlockhash": None,
        }


@dataclass
class SimulationResult:
    """Outcome of simulateTransaction (nothing is committed)."""

    err: Any
    logs: list[str]
    units_consumed: int
    return_data: dict[str, Any] | None = None
    inner_instructions: list[dict[str, Any]] | None = None
    post_accounts: dict[Pubkey, Account | None] = field(default_factory=dict)
    replacement_blockhash: dict[str, Any] | None = None


@dataclass(frozen=True)
class SignatureStatus:
    slot: int
    err: Any


def build_litesvm() -> LiteSVM:
    """LiteSVM like ``LiteSVM()`` but with loader-v3 deployments allowed.

    ``LiteSVM()`` uses ``FeatureSet.all_enabled()``, which includes
    ``disable_new_loader_v3_deployments`` (inactive on mainnet).  Building from
    ``LiteSVM.default()`` lets us pass our own FeatureSet to the builtins and
    precompiles, which is where LiteSVM takes its runtime feature set from.
    """
    fs = FeatureSet.all_enabled()
    active = dict(fs.active)
    active.pop(DISABLE_NEW_LOADER_V3_DEPLOYMENTS, None)
    fs = FeatureSet(active, set(fs.inactive) | {DISABLE_NEW_LOADER_V3_DEPLOYMENTS})
    return (
        LiteSVM.default()
        .with_builtins(fs)
        .with_lamports(1_000_000 * 1_000_000_000)
        .with_sysvars()
        .with_precompiles(fs)
        .with_spl_programs()
        .with_sigverify(True)
        .with_blockhash_check(False)  # we enforce the recent-blockhash window ourselves
        .with_transaction_history(0)  # and replay protection, persistently
    )


def _as_versioned(tx: AnyTransaction) -> VersionedTransaction:
    if isinstance(tx, VersionedTransaction):
        return tx
    return VersionedTransaction.from_legacy(tx)


def _exists(acc: Account | None) -> bool:
    return acc is not None and acc.lamports > 0


class LocalSvm:
    """A persistent, clock-driven single-node chain over LiteSVM.

    Not async; callers serialise access (the RPC server runs on one event
    loop).  A lock guards the state anyway so threads cannot corrupt it.
    """

    def __init__(
        self,
        ledger_dir: Path | None = None,
        *,
        now: Callable[[], float] = time.time,
        tx_history_limit: int = 50_000,
    ) -> None:
        self._now = now
        self._lock = threading.RLock()
        self._svm = build_litesvm()
        self._journal = Journal(
            Path(ledger_dir) if ledger_dir is not None else None, tx_history_limit=tx_history_limit
        )
        self._schedule = self._svm.get_epoch_schedule()
        self._known: set[Pubkey] = set()
        self._owner_of: dict[Pubkey, Pubkey] = {}
        self._by_owner: dict[Pubkey, set[Pubkey]] = {}
        self._bh_by_slot: dict[int, Hash] = {}
        self._slot_by_bh: dict[Hash, int] = {}
        self._bh_lo = 0
        self._bh_hi = -1
        self._recent_sigs: dict[int, set[Signature]] = {}  # blockhash slot -> signatures
        self._airdrop_nonce = random.randrange(1_000_000)
        self._clock_set: tuple[int, int] = (-1, -1)
        self._slot_hashes_slot = -1
        self._decimals_cache: dict[Pubkey, int] = {}

        genesis = self._journal.get_meta("genesis_hash")
        if genesis is None:
            self._genesis_time = self._now()
            self._genesis_hash = Hash(
                hashlib.sha256(b"registry-localnet-genesis" + os.urandom(32)).digest()
            )
            self._faucet = Keypair()
            self._slot = 0
            self._ts = int(self._genesis_time)
            self._sync_clock()
            faucet_acc = Account(FAUCET_LAMPORTS, b"", SYSTEM_PROGRAM_ID)
            self._svm.set_account(self._faucet.pubkey(), faucet_acc)
            self._index(self._faucet.pubkey(), faucet_acc)
            self._journal.commit(
                [(self._faucet.pubkey(), faucet_acc)],
                known=[self._faucet.pubkey()],
                meta={
                    "genesis_time": repr(self._genesis_time),
                    "genesis_hash": str(self._genesis_hash),
                    "faucet": b58encode(bytes(self._faucet)),
                    "last_slot": "0",
                    "last_unix_timestamp": str(self._ts),
                },
            )
            self.restored = False
        else:
            self._genesis_time = float(self._journal.get_meta("genesis_time") or 0.0)
            self._genesis_hash = Hash.from_string(genesis)
            self._faucet = Keypair.from_base58_string(self._journal.get_meta("faucet") or "")
            self._slot = int(self._journal.get_meta("last_slot") or 0)
            self._ts = int(self._journal.get_meta("last_unix_timestamp") or 0)
            self._sync_clock()
            self._restore()
            self.restored = True

    # ------------------------------------------------------------------ restore
    def _restore(self) -> None:
        """Put every journaled account back; programs after their data."""
        programs: list[tuple[Pubkey, Account]] = []
        n = 0
        for key, acc in self._journal.load_accounts():
            if acc is None:
                if _exists(self._svm.get_account(key)):
                    self._svm.set_account(key, Account(0, b"", SYSTEM_PROGRAM_ID))
                self._index(key, None)
                continue
            if acc.executable:
                programs.append((key, acc))
            else:
                self._svm.set_account(key, acc)
                self._index(key, acc)
            n += 1
        for key, acc in programs:
            try:
                self._svm.set_account(key, acc)
            except BaseException as exc:  # pyo3 PanicException is not an Exception
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                log.error("could not restore program %s: %r", key, exc)
            self._index(key, acc)
        for key in self._journal.load_known():
            if key not in self._known:
                self._index(key, self._svm.get_account(key))
        lo = max(0, self._slot - MAX_PROCESSING_AGE)
        for sig, bh_slot in self._journal.recent_signatures(lo):
            self._recent_sigs.setdefault(bh_slot, set()).add(Signature.from_string(sig))
        self._clock_set = (-1, -1)  # re-assert our sysvars over anything restored
        self._slot_hashes_slot = -1
        self._sync_clock()
        log.info("localnet ledger restored: %d accounts, slot %d", n, self._slot)

    # -------------------------------------------------------------- time/slots
    def _blockhash_for_slot(self, slot: int) -> Hash:
        h = self._bh_by_slot.get(slot)
        if h is None:
            h = Hash(
                hashlib.sha256(
                    bytes(self._genesis_hash) + b"slot" + slot.to_bytes(8, "little")
                ).digest()
            )
        return h

    def _advance_window(self) -> None:
        lo = max(0, self._slot - MAX_PROCESSING_AGE)
        for s in range(self._bh_lo, min(lo, self._bh_hi + 1)):
            h = self._bh_by_slot.pop(s, None)
            if h is not None:
                self._slot_by_bh.pop(h, None)
        for s in list(self._recent_sigs):
            if s < lo:
                del self._recent_sigs[s]
        for s in range(max(lo, self._bh_hi + 1), self._slot + 1):
            h = self._blockhash_for_slot(s)
            self._bh_by_slot[s] = h
            self._slot_by_bh[h] = s
        self._bh_lo, self._bh_hi = lo, self._slot

    def _tick(self) -> None:
        now = self._now()
        wall_slot = int((now - self._genesis_time) / SLOT_SECONDS)
        self._slot = max(self._slot, wall_slot)
        self._ts = max(self._ts, int(now))
        if self._slot != self._bh_hi:
            self._advance_window()

    def _sync_clock(self) -> None:
        """Advance slot/time from the wall clock and push them into the sysvars."""
        self._tick()
        if self._clock_set == (self._slot, self._ts):
            return
        epoch = self._schedule.get_epoch(self._slot)
        first = self._schedule.get_first_slot_in_epoch(epoch)
        epoch_start_ts = int(self._genesis_time + first * SLOT_SECONDS)
        self._svm.set_clock(
            Clock(
                self._slot,
                epoch_start_ts,
                epoch,
                self._schedule.get_leader_schedule_epoch(self._slot),
                self._ts,
            )
        )
        self._clock_set = (self._slot, self._ts)
        if self._slot_hashes_slot != self._slot:
            self._svm.set_slot_hashes(
                [
                    (s, self._blockhash_for_slot(s))
                    for s in range(self._slot - 1, max(-1, self._slot - 151), -1)
                ]
            )
            self._slot_hashes_slot = self._slot

    def current_slot(self) -> int:
        with self._lock:
            self._sync_clock()
            return self._slot

    def block_height(self) -> int:
        """No skipped slots here, so block height == slot."""
        return self.current_slot()

    def block_time(self, slot: int) -> int:
        return int(self._genesis_time + slot * SLOT_SECONDS)

    def latest_blockhash(self) -> tuple[Hash, int]:
        """(blockhash, lastValidBlockHeight)."""
        with self._lock:
            slot = self.current_slot()
            return self._blockhash_for_slot(slot), slot + MAX_PROCESSING_AGE

    def blockhash_slot(self, blockhash: Hash) -> int | None:
        """Slot of a still-valid blockhash, None if unknown or expired."""
        with self._lock:
            self._sync_clock()
            s = self._slot_by_bh.get(blockhash)
            if s is None or self._slot - s > MAX_PROCESSING_AGE:
                return None
            return s

    def is_blockhash_valid(self, blockhash: Hash) -> bool:
        return self.blockhash_slot(blockhash) is not None

    @property
    def genesis_hash(self) -> Hash:
        return self._genesis_hash

    @property
    def faucet(self) -> Keypair:
        """Funded keypair behind requestAirdrop; also pays for deploys."""
        return self._faucet

    @property
    def litesvm(self) -> LiteSVM:
        """The underlying LiteSVM (read-only use; writes bypass the journal)."""
        return self._svm

    def epoch_info(self) -> dict[str, int]:
        slot = self.current_slot()
        epoch, index = self._schedule.get_epoch_and_slot_index(slot)
        return {
            "absoluteSlot": slot,
            "blockHeight": slot,
            "epoch": epoch,
            "slotIndex": index,
            "slotsInEpoch": self._schedule.get_slots_in_epoch(epoch),
            "transactionCount": self.transaction_count(),
        }

    def transaction_count(self) -> int:
        with self._lock:
            return self._journal.transaction_count()

    # --------------------------------------------------------------- accounts
    def _index(self, key: Pubkey, acc: Account | None) -> None:
        self._known.add(key)
        new_owner = acc.owner if _exists(acc) else None  # type: ignore[union-attr]
        old_owner = self._owner_of.get(key)
        if old_owner == new_owner:
            return
        if old_owner is not None:
            self._by_owner.get(old_owner, set()).discard(key)
            del self._owner_of[key]
        if new_owner is not None:
            self._owner_of[key] = new_owner
            self._by_owner.setdefault(new_owner, set()).add(key)

    def get_account(self, key: Pubkey) -> Account | None:
        """The account, or None if it does not exist (0 lamports)."""
        with self._lock:
            if key == CLOCK or key == SLOT_HASHES:
                self._sync_clock()
            acc = self._svm.get_account(key)
            return acc if _exists(acc) else None

    def get_balance(self, key: Pubkey) -> int:
        acc = self.get_account(key)
        return 0 if acc is None else acc.lamports

    def program_accounts(self, owner: Pubkey) -> list[tuple[Pubkey, Account]]:
        """Every indexed account currently owned by ``owner``."""
        with self._lock:
            out = []
            for key in sorted(self._by_owner.get(owner, ()), key=bytes):
                acc = self._svm.get_account(key)
                if _exists(acc) and acc.owner == owner:  # type: ignore[union-attr]
                    out.append((key, acc))
            return out  # type: ignore[return-value]

    def known_accounts(self) -> frozenset[Pubkey]:
        return frozenset(self._known)

    def minimum_balance_for_rent_exemption(self, data_len: int) -> int:
        return self._svm.minimum_balance_for_rent_exemption(data_len)

    def mint_decimals(self, mint: Pubkey) -> int | None:
        d = self._decimals_cache.get(mint)
        if d is None:
            acc = self.get_account(mint)
            if acc is None or token_kind(acc) != "mint":
                return None
            m = parse_mint(bytes(acc.data))
            if m is None:
                return None
            d = m["decimals"]
            self._decimals_cache[mint] = d
        return d

    def token_balance(self, acc: Account) -> dict[str, Any] | None:
        """(UiTokenAmount, mint, owner) for an SPL token account, else None."""
        if token_kind(acc) != "account":
            return None
        t = parse_token_account(bytes(acc.data))
        if t is None:
            return None
        decimals = self.mint_decimals(t["mint"])
        if decimals is None:
            return None
        return {
            "mint": t["mint"],
            "owner": t["owner"],
            "uiTokenAmount": ui_token_amount(t["amount"], decimals),
        }

    # ----------------------------------------------------------- transactions
    def _resolve_keys(
        self, tx: VersionedTransaction
    ) -> tuple[list[Pubkey], list[bool], dict[str, list[str]]]:
        """All account keys (static + looked-up) and which are writable."""
        msg = tx.message
        h = msg.header
        static = list(msg.account_keys)
        n, ns = len(static), h.num_required_signatures
        writable = [
            (i < ns - h.num_readonly_signed_accounts)
            if i < ns
            else (i < n - h.num_readonly_unsigned_accounts)
            for i in range(n)
        ]
        loaded_w: list[Pubkey] = []
        loaded_r: list[Pubkey] = []
        if isinstance(msg, MessageV0):
            for lut in msg.address_table_lookups:
                acc = self._svm.get_account(lut.account_key)
                data = bytes(acc.data) if _exists(acc) else b""  # type: ignore[union-attr]
                addrs = [
                    Pubkey.from_bytes(data[o : o + 32])
                    for o in range(LOOKUP_TABLE_META_SIZE, len(data) - 31, 32)
                ]
                loaded_w += [addrs[i] for i in lut.writable_indexes if i < len(addrs)]
                loaded_r += [addrs[i] for i in lut.readonly_indexes if i < len(addrs)]
        keys = static + loaded_w + loaded_r
        writable += [True] * len(loaded_w) + [False] * len(loaded_r)
        loaded = {"writable": [str(k) for k in loaded_w], "readonly": [str(k) for k in loaded_r]}
        return keys, writable, loaded

    @staticmethod
    def _return_data(meta: TransactionMetadata) -> dict[str, Any] | None:
        rd = meta.return_data()
        if not rd.data and rd.program_id == Pubkey.default():
            return None
        return {
            "programId": str(rd.program_id),
            "data": [base64.b64encode(rd.data).decode(), "base64"],
        }

    @staticmethod
    def _inner_instructions(meta: TransactionMetadata) -> list[dict[str, Any]]:
        out = []
        for idx, inner in enumerate(meta.inner_instructions()):
            if not inner:
                continue
            out.append(
                {
                    "index": idx,
                    "instructions": [
                        {
                            "programIdIndex": ci.program_id_index,
                            "accounts": list(ci.accounts),
                            "data": b58encode(bytes(ci.data)),
                            "stackHeight": ii.stack_height(),
                        }
                        for ii, ci in ((x, x.instruction()) for x in inner)
                    ],
                }
            )
        return out

    def _token_balances(
        self, keys: list[Pubkey], accs: list[Account | None]
    ) -> list[dict[str, Any]]:
        out = []
        for i, acc in enumerate(accs):
            if acc is None or not _exists(acc):
                continue
            tb = self.token_balance(acc)
            if tb is None:
                continue
            out.append(
                {
                    "accountIndex": i,
                    "mint": str(tb["mint"]),
                    "uiTokenAmount": tb["uiTokenAmount"],
                    "owner": str(tb["owner"]),
                    "programId": str(acc.owner),
                }
            )
        return out

    def _restore_accounts(
        self, keys: list[Pubkey], pre: list[Account | None], post: list[Account | None]
    ) -> None:
        for key, a, b in zip(keys, pre, post, strict=False):
            if a != b:
                self._svm.set_account(
                    key, a if a is not None else Account(0, b"", SYSTEM_PROGRAM_ID)
                )

    def send_transaction(self, tx: AnyTransaction, *, skip_preflight: bool = False) -> Signature:
        """Execute, journal durably, and return the signature.

        Raises :class:`PreflightError` when the transaction does not land:
        bad/expired blockhash, replay, signature failure, or (unless
        ``skip_preflight``) any execution error.  With ``skip_preflight`` an
        execution error lands as a failed transaction (fee charged) exactly
        like on a real cluster.
        """
        vtx = _as_versioned(tx)
        size = len(bytes(vtx))
        if size > PACKET_DATA_SIZE:
            raise ValueError(f"transaction too large: {size} bytes (max: {PACKET_DATA_SIZE} bytes)")
        with self._lock:
            self._sync_clock()
            if not vtx.signatures:
                raise PreflightError("SanitizeFailure")
            sig = vtx.signatures[0]
            bh_slot = self.blockhash_slot(vtx.message.recent_blockhash)
            if bh_slot is None:
                raise PreflightError("BlockhashNotFound")
            if sig in self._recent_sigs.get(bh_slot, ()):
                raise PreflightError("AlreadyProcessed")
            keys, writable, loaded = self._resolve_keys(vtx)
            pre = [self._svm.get_account(k) for k in keys]
            res = self._svm.send_transaction(vtx)
            post = [self._svm.get_account(k) for k in keys]
            failed = isinstance(res, FailedTransactionMetadata)
            meta: TransactionMetadata = res.meta() if failed else res  # type: ignore[union-attr,assignment]
            err = err_to_json(res.err()) if failed else None  # type: ignore[union-attr]
            if failed:
                landed = any(a != b for a, b in zip(pre, post, strict=False))
                if err == "SignatureFailure" or not landed or not skip_preflight:
                    self._restore_accounts(keys, pre, post)
                    raise PreflightError(
                        err,
                        meta.logs(),
                        meta.compute_units_consumed(),
                        code=-32003 if err == "SignatureFailure" else -32002,
                        return_data=self._return_data(meta),
                    )
            record = TxRecord(
                signature=str(sig),
                slot=self._slot,
                blockhash_slot=bh_slot,
                block_time=self._ts,
                err=err,
                raw=bytes(vtx),
                meta={
                    "err": err,
                    "status": {"Ok": None} if err is None else {"Err": err},
                    "fee": LAMPORTS_PER_SIGNATURE * vtx.message.header.num_required_signatures,
                    "preBalances": [a.lamports if a is not None else 0 for a in pre],
                    "postBalances": [a.lamports if a is not None else 0 for a in post],
                    "innerInstructions": self._inner_instructions(meta),
                    "logMessages": meta.logs(),
                    "preTokenBalances": self._token_balances(keys, pre),
                    "postTokenBalances": self._token_balances(keys, post),
                    "rewards": [],
                    "loadedAddresses": loaded,
                    "returnData": self._return_data(meta),
                    "computeUnitsConsumed": meta.compute_units_consumed(),
                },
            )
            # Only writable accounts can change; journal those that did (an
            # unchanged demoted sysvar must not be frozen into the ledger).
            changes = [
                (k, post[i]) for i, k in enumerate(keys) if writable[i] and pre[i] != post[i]
            ]
            try:
                self._journal.commit(
                    changes,
                    known=[k for k in keys if k not in self._known],
                    meta={"last_slot": str(self._slot), "last_unix_timestamp": str(self._ts)},
                    tx=record,
                )
            except BaseException:
                # Not durable -> not applied: keep memory and disk in agreement.
                self._restore_accounts(keys, pre, post)
                raise
            for i, k in enumerate(keys):
                if writable[i] or k not in self._known:
                    self._index(k, post[i])
            for k, acc in changes:
                if acc is not None and token_kind(acc) == "mint":
                    self._decimals_cache.pop(k, None)
            self._recent_sigs.setdefault(bh_slot, set()).add(sig)
            return sig

    def simulate_transaction(
        self,
        tx: AnyTransaction,
        *,
        sig_verify: bool = False,
        replace_recent_blockhash: bool = False,
    ) -> SimulationResult:
        """Run without committing anything (like simulateTransaction)."""
        vtx = _as_versioned(tx)
        with self._lock:
            self._sync_clock()
            replacement = None
            if replace_recent_blockhash:
                h, lvbh = self.latest_blockhash()
                replacement = {"blockhash": str(h), "lastValidBlockHeight": lvbh}
            elif self.blockhash_slot(vtx.message.recent_blockhash) is None:
                return SimulationResult(err="BlockhashNotFound", logs=[], units_consumed=0)
            if not sig_verify:
                self._svm.with_sigverify(False)
            try:
                res = self._svm.simulate_transaction(vtx)
            finally:
                if not sig_verify:
                    self._svm.with_sigverify(True)
            if isinstance(res, FailedTransactionMetadata):
                meta = res.meta()
                return SimulationResult(
                    err=err_to_json(res.err()),
                    logs=meta.logs(),
                    units_consumed=meta.compute_units_consumed(),
                    return_data=self._return_data(meta),
                    inner_instructions=self._inner_instructions(meta),
                    replacement_blockhash=replacement,
                )
            meta = res.meta()
            post = {k: (a if _exists(a) else None) for k, a in res.post_accounts()}
            return SimulationResult(
                err=None,
                logs=meta.logs(),
                units_consumed=meta.compute_units_consumed(),
                return_data=self._return_data(meta),
                inner_instructions=self._inner_instructions(meta),
                post_accounts=post,
                replacement_blockhash=replacement,
            )

    def airdrop(self, to: Pubkey, lamports: int) -> Signature:
        """Transfer from the faucet in a real, journaled transaction."""
        with self._lock:
            self._airdrop_nonce += 1
            blockhash, _ = self.latest_blockhash()
            # A varying compute-unit limit makes repeated identical airdrops
            # distinct transactions (else the second is AlreadyProcessed).
            ixs = [
                set_compute_unit_limit(1_000 + self._airdrop_nonce % 1_000_000),
                transfer(
                    TransferParams(
                        from_pubkey=self._faucet.pubkey(), to_pubkey=to, lamports=lamports
                    )
                ),
            ]
            tx = Transaction.new_signed_with_payer(
                ixs, self._faucet.pubkey(), [self._faucet], blockhash
            )
            return self.send_transaction(tx)

    def fee_for_message(self, message: Message | MessageV0) -> int | None:
        """Fee in lamports, None if the message's blockhash is not valid."""
        if self.blockhash_slot(message.recent_blockhash) is None:
            return None
        return LAMPORTS_PER_SIGNATURE * message.header.num_required_signatures

    # ----------------------------------------------------------------- history
    def signature_statuses(self, signatures: Iterable[Signature]) -> list[SignatureStatus | None]:
        sigs = [str(s) for s in signatures]
        with self._lock:
            found = self._journal.get_statuses(sigs)
        return [SignatureStatus(*found[s]) if s in found else None for s in sigs]

    def get_transaction(self, signature: Signature) -> TxRecord | None:
        with self._lock:
            return self._journal.get_tx(str(signature))

    def close(self) -> None:
        with self._lock:
            self._journal.close()
