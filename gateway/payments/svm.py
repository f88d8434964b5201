"""The exact scheme on Solana, verified before the gateway co-signs anything (DESIGN section 8).

The client sends a transaction it signed with the fee-payer slot (index 0) left for us. We sign
only a transaction of this exact shape::

    0  ComputeBudget SetComputeUnitLimit   (limit <= cap, 40,000 CU by default)
    1  ComputeBudget SetComputeUnitPrice   (price <= cap, 50,000 micro-lamports/CU by default)
    2  Token TransferChecked               exactly `amount` of `mint` to ATA(payTo, mint),
                                           authority = the payer, a signer of the transaction
    3+ Memo (or Lighthouse assertions), at most three

with our fee payer as the transaction's fee payer and in **no** instruction's accounts (so the
signature we add can only pay the network fee), no address lookup tables (every account in
plain sight), exactly two signers (us and the payer), and the payer's signature valid. Rules and
reason codes follow the official x402 facilitator (x402 2.25.0), stricter where DESIGN says so:
the amount must be exact (x402 accepts more), the fee payer may appear in no instruction at all
(x402 checks only the transfer authority), and both compute-unit caps are config keys whose
defaults keep the fee payer's worst case at 0.000012 SOL a purchase (x402's price cap alone would
let a payer make us pay 7 SOL of priority fees; see gateway/payments/config.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from solders.compute_budget import ID as COMPUTE_BUDGET
from solders.message import MessageV0, to_bytes_versioned
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from spl.token.constants import TOKEN_2022_PROGRAM_ID as TOKEN_2022_PROGRAM
from spl.token.constants import TOKEN_PROGRAM_ID as TOKEN_PROGRAM

from registry.usdc import ata

from .x402 import PaymentInvalid

MEMO_PROGRAM = Pubkey.from_string("MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr")
MEMO_V1_PROGRAM = Pubkey.from_string("Memo1UhkJRfHyvLMcVucJwxXeuD728EqVDDwQDxFMNo")
LIGHTHOUSE_PROGRAM = Pubkey.from_string("L2TExMFKdjpN9kozasaurPirfHy9P8sbXoAN1qA3S95")
OPTIONAL_PROGRAMS = (MEMO_PROGRAM, MEMO_V1_PROGRAM, LIGHTHOUSE_PROGRAM)
MAX_TX_BYTES = 1232

P = "invalid_exact_svm_payload"


@dataclass(frozen=True)
class SvmRules:
    fee_payer: Pubkey
    mint: Pubkey
    token_program: Pubkey
    decimals: int
    pay_to: Pubkey
    amount: int
    max_cu_price_microlamports: int
    max_cu_limit: int


@dataclass(frozen=True)
class SvmPayment:
    tx: VersionedTransaction
    payer: Pubkey  # the transfer authority: who paid, and who gets the credits
    source: Pubkey
    amount: int
    message_hash: str  # sha256 of the message: the same payment in any signature spelling


def decode_transaction(b64: object) -> VersionedTransaction:
    if not isinstance(b64, str) or not b64:
        raise PaymentInvalid(
            f"{P}_transaction_could_not_be_decoded", "payload.transaction must be a base64 string"
        )
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise PaymentInvalid(
            f"{P}_transaction_could_not_be_decoded", "payload.transaction is not base64"
        ) from None
    if len(raw) > MAX_TX_BYTES:
        raise PaymentInvalid(
            f"{P}_transaction_could_not_be_decoded",
            f"transaction is {len(raw)} bytes (max {MAX_TX_BYTES})",
        )
    try:
        return VersionedTransaction.from_bytes(raw)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes, any decode error
        raise PaymentInvalid(
            f"{P}_transaction_could_not_be_decoded",
            f"payload.transaction is not a Solana transaction: {exc}",
        ) from None


def verify(tx: VersionedTransaction, r: SvmRules) -> SvmPayment:
    """Every rule above, or PaymentInvalid naming the first one broken."""
    shape = _Shape(tx)
    _check_envelope(shape, r)
    _check_compute_budget(shape, r)
    transfer = _check_transfer(shape, r)
    _check_trailing(shape)
    message = to_bytes_versioned(shape.message)
    payer_sig: Signature = tx.signatures[1]
    if not payer_sig.verify(shape.keys[1], message):
        raise PaymentInvalid(
            f"{P}_signature",
            f"the signature of {shape.keys[1]} does not verify over the transaction",
        )
    return SvmPayment(
        tx=tx,
        payer=transfer.authority,
        source=transfer.source,
        amount=transfer.amount,
        message_hash=hashlib.sha256(message).hexdigest(),
    )


class _Shape:
    """The parts of a transaction the rules read: its accounts and its instructions."""

    def __init__(self, tx: VersionedTransaction) -> None:
        self.tx = tx
        self.message = tx.message
        self.keys = list(tx.message.account_keys)
        self.ixs = list(tx.message.instructions)

    def program(self, i: int) -> Pubkey:
        return self.keys[self.ixs[i].program_id_index]


@dataclass(frozen=True)
class _Transfer:
    source: Pubkey
    authority: Pubkey
    amount: int


def _check_envelope(shape: _Shape, r: SvmRules) -> None:
    """No lookup tables, our fee payer first and in no instruction, 3 to 6 instructions, two
    signers."""
    msg, keys, ixs = shape.message, shape.keys, shape.ixs
    if isinstance(msg, MessageV0) and msg.address_table_lookups:
        raise PaymentInvalid(
            f"{P}_address_lookup_tables",
            "address lookup tables are not accepted: every account must be listed",
        )
    if not keys or keys[0] != r.fee_payer:
        raise PaymentInvalid(
            f"{P}_missing_fee_payer",
            f"the transaction's fee payer must be {r.fee_payer} "
            f"(extra.feePayer), not {keys[0] if keys else 'nothing'}",
        )
    if not 3 <= len(ixs) <= 6:
        raise PaymentInvalid(
            f"{P}_transaction_instructions_length", f"expected 3 to 6 instructions, got {len(ixs)}"
        )
    # SECURITY: the signature we add must authorise nothing but the fee.
    for n, ix in enumerate(ixs):
        if ix.program_id_index == 0 or 0 in bytes(ix.accounts):
            raise PaymentInvalid(
                f"{P}_transaction_fee_payer_included_in_instruction_accounts",
                f"instruction {n} uses the fee payer {r.fee_payer}: the fee payer "
                "may only pay the network fee",
            )
    signers = msg.header.num_required_signatures
    if signers != 2 or len(shape.tx.signatures) != 2:
        raise PaymentInvalid(
            f"{P}_signers",
            "the transaction must have exactly two signers: the fee payer and "
            f"the payer (it has {signers})",
        )


def _check_compute_budget(shape: _Shape, r: SvmRules) -> None:
    """Instructions 0 and 1 set the compute-unit limit and price, each under its cap."""
    limit = _compute_budget(shape, 0, 2, 4, "compute_limit_instruction", "SetComputeUnitLimit")
    if limit > r.max_cu_limit:
        raise PaymentInvalid(
            f"{P}_transaction_instructions_compute_limit_instruction_too_high",
            f"compute unit limit {limit} is above the cap {r.max_cu_limit}",
        )
    price = _compute_budget(shape, 1, 3, 8, "compute_price_instruction", "SetComputeUnitPrice")
    if price > r.max_cu_price_microlamports:
        raise PaymentInvalid(
            f"{P}_transaction_instructions_compute_price_instruction_too_high",
            f"compute unit price {price} micro-lamports is above the cap "
            f"{r.max_cu_price_microlamports} "
            f"({r.max_cu_price_microlamports / 1e6:g} lamports/CU)",
        )


def _compute_budget(shape: _Shape, i: int, tag: int, size: int, code: str, name: str) -> int:
    """The little-endian argument of ComputeBudget instruction ``i`` (``tag``, ``size`` bytes),
    which must take no accounts."""
    ix = shape.ixs[i]
    data = bytes(ix.data)
    if (
        shape.program(i) != COMPUTE_BUDGET
        or len(data) != 1 + size
        or data[0] != tag
        or bytes(ix.accounts)
    ):
        raise PaymentInvalid(
            f"{P}_transaction_instructions_{code}",
            f"instruction {i} must be ComputeBudget {name}",
        )
    return int.from_bytes(data[1:], "little")


def _check_transfer(shape: _Shape, r: SvmRules) -> _Transfer:
    """Instruction 2 is one TransferChecked of exactly ``r.amount`` of ``r.mint`` to the payTo's
    token account, by an authority that signs the transaction."""
    keys, program = shape.keys, shape.program(2)
    data, accts = bytes(shape.ixs[2].data), bytes(shape.ixs[2].accounts)
    if (
        program not in (TOKEN_PROGRAM, TOKEN_2022_PROGRAM)
        or len(data) != 10
        or data[0] != 12
        or len(accts) != 4
    ):
        raise PaymentInvalid(
            f"{P}_no_transfer_instruction",
            "instruction 2 must be one SPL Token TransferChecked "
            "(source, mint, destination, authority)",
        )
    source, mint, dest, authority = (keys[i] for i in accts)
    amount = int.from_bytes(data[1:9], "little")
    if program != r.token_program or mint != r.mint:
        raise PaymentInvalid(
            f"{P}_mint_mismatch",
            f"the transfer is of mint {mint} (program {program}); this "
            f"purchase is paid in {r.mint}",
        )
    if data[9] != r.decimals:
        raise PaymentInvalid(
            f"{P}_mint_mismatch",
            f"TransferChecked says {data[9]} decimals; {r.mint} has {r.decimals}",
        )
    want_dest = ata(r.pay_to, r.mint, r.token_program)
    if dest != want_dest:
        raise PaymentInvalid(
            f"{P}_recipient_mismatch",
            f"the transfer goes to {dest}; it must go to {want_dest}, the "
            f"{r.mint} account of {r.pay_to}",
        )
    if amount != r.amount:
        raise PaymentInvalid(
            f"{P}_amount_mismatch",
            f"the transfer is {amount} base units; this purchase is exactly {r.amount}",
        )
    if accts[3] >= shape.message.header.num_required_signatures:
        raise PaymentInvalid(
            f"{P}_authority_not_signer",
            f"the transfer authority {authority} does not sign the transaction",
        )
    return _Transfer(source=source, authority=authority, amount=amount)


def _check_trailing(shape: _Shape) -> None:
    """Only Memo (or Lighthouse) instructions may follow the transfer."""
    for n in range(3, len(shape.ixs)):
        if shape.program(n) not in OPTIONAL_PROGRAMS:
            raise PaymentInvalid(
                f"{P}_unknown_instruction",
                f"instruction {n} calls {shape.program(n)}: only Memo (or Lighthouse) "
                "instructions may follow the transfer",
            )
