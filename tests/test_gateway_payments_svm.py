"""The Solana exact-scheme verifier, rule by rule, on transactions built here with solders.

``test_gateway_payments.py`` plays the common refusals against the localnet and checks that
nothing moved; this module reaches every rule of ``gateway/payments/svm.py`` (each a way a payer
could try to make the gateway's co-signature pay for more than the network fee), including the
shapes the SDK's payer never builds: lookup tables, a third signer, a transfer that is not
TransferChecked, an authority that does not sign, a foreign trailing instruction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from solders.address_lookup_table_account import AddressLookupTableAccount
from solders.compute_budget import set_compute_unit_limit, set_compute_unit_price
from solders.hash import Hash
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.message import MessageV0, to_bytes_versioned
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import TransferParams, transfer
from solders.transaction import VersionedTransaction
from spl.token.constants import TOKEN_PROGRAM_ID

from gateway.payments.payer import token_transfer
from gateway.payments.svm import MEMO_PROGRAM, P, SvmRules, verify
from gateway.payments.x402 import PaymentInvalid
from registry.usdc import ata

pytestmark = pytest.mark.fast

FEE_PAYER, PAYER = Keypair(), Keypair()
MINT, PAY_TO = Pubkey.new_unique(), Pubkey.new_unique()
RULES = SvmRules(
    fee_payer=FEE_PAYER.pubkey(),
    mint=MINT,
    token_program=TOKEN_PROGRAM_ID,
    decimals=6,
    pay_to=PAY_TO,
    amount=250_000,
    max_cu_price_microlamports=50_000,
    max_cu_limit=40_000,
)


def transfer_ix(
    *,
    mint: Pubkey = MINT,
    pay_to: Pubkey = PAY_TO,
    amount: int = 250_000,
    decimals: int = 6,
    owner: Pubkey | None = None,
) -> Instruction:
    return token_transfer(owner or PAYER.pubkey(), pay_to, mint, amount, decimals, TOKEN_PROGRAM_ID)


def memo_ix(*accounts: AccountMeta) -> Instruction:
    return Instruction(MEMO_PROGRAM, b"purchase", list(accounts))


def the_instructions() -> list[Instruction]:
    """What an honest payer sends: limit, price, the transfer, a memo."""
    return [set_compute_unit_limit(20_000), set_compute_unit_price(1), transfer_ix(), memo_ix()]


def build(
    ixs: list[Instruction] | None = None,
    *,
    fee_payer: Pubkey | None = None,
    signers: tuple[Keypair, ...] = (PAYER,),
    tables: list[AddressLookupTableAccount] | None = None,
) -> VersionedTransaction:
    """A transaction signed by ``signers``, every other signer slot (ours) left empty."""
    message = MessageV0.try_compile(
        fee_payer or FEE_PAYER.pubkey(),
        the_instructions() if ixs is None else ixs,
        tables or [],
        Hash.default(),
    )
    data = to_bytes_versioned(message)
    by_key = {k.pubkey(): k for k in signers}
    keys = list(message.account_keys)[: message.header.num_required_signatures]
    sigs = [by_key[k].sign_message(data) if k in by_key else Signature.default() for k in keys]
    return VersionedTransaction.populate(message, sigs)


def refused(tx: VersionedTransaction, reason: str, needle: str = "") -> None:
    with pytest.raises(PaymentInvalid) as caught:
        verify(tx, RULES)
    assert caught.value.reason == f"{P}_{reason}", caught.value.message
    assert needle in caught.value.message


def test_an_honest_transfer_is_accepted_and_names_its_payer() -> None:
    got = verify(build(), RULES)
    assert got.payer == PAYER.pubkey() and got.amount == 250_000
    assert got.source == ata(PAYER.pubkey(), MINT, TOKEN_PROGRAM_ID)
    assert len(got.message_hash) == 64


def test_address_lookup_tables_are_refused() -> None:
    dest = ata(PAY_TO, MINT, TOKEN_PROGRAM_ID)
    table = AddressLookupTableAccount(Pubkey.new_unique(), [dest])
    tx = build(tables=[table])
    assert tx.message.address_table_lookups  # the destination hides in the table
    refused(tx, "address_lookup_tables")


def test_another_fee_payer_is_refused() -> None:
    refused(build(fee_payer=PAYER.pubkey()), "missing_fee_payer", str(FEE_PAYER.pubkey()))


@pytest.mark.parametrize("count", [2, 7])
def test_too_few_or_too_many_instructions_are_refused(count: int) -> None:
    ixs = (the_instructions() + [memo_ix()] * 3)[:count]
    refused(build(ixs), "transaction_instructions_length", f"got {count}")


@pytest.mark.parametrize(
    "change",
    [
        lambda ixs: ixs.__setitem__(3, memo_ix(AccountMeta(FEE_PAYER.pubkey(), False, False))),
        lambda ixs: ixs.__setitem__(2, transfer_ix(owner=FEE_PAYER.pubkey())),
    ],
    ids=["in a memo", "as the transfer authority"],
)
def test_the_fee_payer_in_any_instruction_is_refused(change: Callable[[list[Any]], None]) -> None:
    ixs = the_instructions()
    change(ixs)
    refused(build(ixs), "transaction_fee_payer_included_in_instruction_accounts")


def test_a_third_signer_is_refused() -> None:
    third = Keypair()
    ixs = the_instructions()
    ixs[3] = memo_ix(AccountMeta(third.pubkey(), True, False))
    refused(build(ixs, signers=(PAYER, third)), "signers", "it has 3")


@pytest.mark.parametrize(
    "index,instruction,reason",
    [
        (0, set_compute_unit_price(1), "compute_limit_instruction"),
        (1, set_compute_unit_limit(20_000), "compute_price_instruction"),
        (0, set_compute_unit_limit(40_001), "compute_limit_instruction_too_high"),
        (1, set_compute_unit_price(50_001), "compute_price_instruction_too_high"),
    ],
    ids=["limit swapped", "price swapped", "limit above the cap", "price above the cap"],
)
def test_compute_budget_out_of_place_or_above_its_cap_is_refused(
    index: int, instruction: Instruction, reason: str
) -> None:
    ixs = the_instructions()
    ixs[index] = instruction
    refused(build(ixs), f"transaction_instructions_{reason}")


def test_a_transfer_that_is_not_transfer_checked_is_refused() -> None:
    ixs = the_instructions()
    ixs[2] = transfer(TransferParams(from_pubkey=PAYER.pubkey(), to_pubkey=PAY_TO, lamports=1))
    refused(build(ixs), "no_transfer_instruction")


@pytest.mark.parametrize(
    "transfer,reason",
    [
        (transfer_ix(mint=Pubkey.new_unique()), "mint_mismatch"),
        (transfer_ix(decimals=9), "mint_mismatch"),
        (transfer_ix(pay_to=Pubkey.new_unique()), "recipient_mismatch"),
        (transfer_ix(amount=249_999), "amount_mismatch"),
        (transfer_ix(amount=250_001), "amount_mismatch"),
    ],
    ids=["other mint", "other decimals", "other recipient", "less", "more"],
)
def test_a_transfer_of_anything_but_the_purchase_is_refused(
    transfer: Instruction, reason: str
) -> None:
    ixs = the_instructions()
    ixs[2] = transfer
    refused(build(ixs), reason)


def test_a_transfer_authority_that_does_not_sign_is_refused() -> None:
    """The payer signs (through a memo), but the tokens are someone else's, who does not."""
    victim = Pubkey.new_unique()
    stolen = transfer_ix(owner=victim)
    stolen.accounts = [*stolen.accounts[:3], AccountMeta(victim, False, False)]
    ixs = the_instructions()
    ixs[2], ixs[3] = stolen, memo_ix(AccountMeta(PAYER.pubkey(), True, False))
    refused(build(ixs), "authority_not_signer", str(victim))


def test_a_foreign_instruction_after_the_transfer_is_refused() -> None:
    ixs = the_instructions()
    ixs.append(transfer(TransferParams(from_pubkey=PAYER.pubkey(), to_pubkey=PAY_TO, lamports=1)))
    refused(build(ixs), "unknown_instruction", "instruction 4")


def test_a_payer_signature_that_does_not_verify_is_refused() -> None:
    tx = build()
    forged = VersionedTransaction.populate(
        tx.message, [Signature.default(), Keypair().sign_message(to_bytes_versioned(tx.message))]
    )
    refused(forged, "signature", str(PAYER.pubkey()))
