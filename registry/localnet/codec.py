"""Wire encodings shared by the localnet's SVM wrapper and its RPC layer.

Kept separate so the shapes (account encodings, SPL token ``jsonParsed``,
transaction-error JSON and messages) live in one place and can be checked
against what solana-py / solders parse.
"""

from __future__ import annotations

import base64
import json
import struct
from decimal import Decimal
from typing import Any

from solders.account import Account
from solders.pubkey import Pubkey
from solders.rpc.responses import RpcSimulateTransactionResult
from spl.token.constants import TOKEN_2022_PROGRAM_ID, TOKEN_PROGRAM_ID

TOKEN_PROGRAMS = (TOKEN_PROGRAM_ID, TOKEN_2022_PROGRAM_ID)
MAX_BASE58_BYTES = 128
TOKEN_ACCOUNT_LEN = 165
MINT_LEN = 82


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


def b58encode(data: bytes) -> str:
    """Bitcoin-alphabet base58 (what Solana uses); no extra dependency."""
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        try:
            n = n * 58 + _B58_INDEX[c]
        except KeyError:
            raise ValueError(f"invalid base58 character {c!r}") from None
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\0" * pad + body


class EncodingError(ValueError):
    """A request asked for an encoding we cannot give (maps to an RPC error)."""

    def __init__(self, message: str, code: int = -32602) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------
# transaction errors
# --------------------------------------------------------------------------
def err_to_json(err: Any) -> Any:
    """solders TransactionErrorType -> the JSON value real validators emit."""
    return json.loads(RpcSimulateTransactionResult(err=err).to_json())["err"]


_TX_ERR_TEXT = {
    "AccountInUse": "Account in use",
    "AccountLoadedTwice": "Account loaded twice",
    "AccountNotFound": "Attempt to debit an account but found no record of a prior credit.",
    "ProgramAccountNotFound": "Attempt to load a program that does not exist",
    "InsufficientFundsForFee": "Insufficient funds for fee",
    "InvalidAccountForFee": "This account may not be used to pay transaction fees",
    "AlreadyProcessed": "This transaction has already been processed",
    "BlockhashNotFound": "Blockhash not found",
    "CallChainTooDeep": "Loader call chain is too deep",
    "MissingSignatureForFee": "Transaction requires a fee but has no signature present",
    "InvalidAccountIndex": "Transaction contains an invalid account reference",
    "SignatureFailure": "Transaction did not pass signature verification",
    "InvalidProgramForExecution": "This program may not be used for executing instructions",
    "SanitizeFailure": "Transaction failed to sanitize accounts offsets correctly",
    "TooManyAccountLocks": "Transaction locked too many accounts",
    "UnsupportedVersion": "Transaction version is unsupported",
    "InvalidWritableAccount": "Transaction loads a writable account that cannot be written",
    "AddressLookupTableNotFound": "Transaction loads an address table account that doesn't exist",
    "InvalidAddressLookupTableIndex": "Transaction address table lookup uses an invalid index",
    "InvalidRentPayingAccount": (
        "Transaction leaves an account with a lower balance than rent-exempt minimum"
    ),
}

_IX_ERR_TEXT = {
    "GenericError": "generic instruction error",
    "InvalidArgument": "invalid program argument",
    "InvalidInstructionData": "invalid instruction data",
    "InvalidAccountData": "invalid account data for instruction",
    "AccountDataTooSmall": "account data too small for instruction",
    "InsufficientFunds": "insufficient funds for instruction",
    "IncorrectProgramId": "incorrect program id for instruction",
    "MissingRequiredSignature": "missing required signature for instruction",
    "AccountAlreadyInitialized": "instruction requires an uninitialized account",
    "UninitializedAccount": "instruction requires an initialized account",
    "NotEnoughAccountKeys": "insufficient account keys for instruction",
    "AccountNotExecutable": "instruction expected an executable account",
    "InvalidSeeds": "Provided seeds do not result in a valid address",
    "ProgramFailedToComplete": "Program failed to complete",
    "ProgramFailedToCompile": "Program failed to compile",
    "ComputationalBudgetExceeded": "Computational budget exceeded",
    "InvalidAccountOwner": "Invalid account owner",
    "ArithmeticOverflow": "Program arithmetic overflowed",
    "Immutable": "Account is immutable",
    "IncorrectAuthority": "Incorrect authority provided",
    "PrivilegeEscalation": "Cross-program invocation with unauthorized signer or writable account",
    "UnsupportedProgramId": "Unsupported program id",
    "ReadonlyDataModified": "instruction modified data of a read-only account",
    "ExternalAccountDataModified": "instruction modified data of an account it does not own",
    "ExternalAccountLamportSpend": (
        "instruction spent from the balance of an account it does not own"
    ),
    "UnbalancedInstruction": "sum of account balances before and after instruction do not match",
    "MissingAccount": "An account required by the instruction is missing",
    "AccountNotRentExempt": "An account does not have enough lamports to be rent-exempt",
    "IllegalOwner": "Provided owner is not allowed",
}


def _words(name: str) -> str:
    out = "".join(" " + c.lower() if c.isupper() else c for c in name).strip()
    return out or name


def describe_error(err: Any) -> str:
    """Human text of a TransactionError JSON value, like Agave's Display impl."""
    if isinstance(err, str):
        return _TX_ERR_TEXT.get(err, _words(err))
    if isinstance(err, dict) and len(err) == 1:
        ((kind, val),) = err.items()
        if kind == "InstructionError" and isinstance(val, list) and len(val) == 2:
            idx, ix = val
            if isinstance(ix, dict) and "Custom" in ix:
                text = f"custom program error: {int(ix['Custom']):#x}"
            elif isinstance(ix, dict) and "BorshIoError" in ix:
                text = f"Failed to serialize or deserialize account data: {ix['BorshIoError']}"
            elif isinstance(ix, str):
                text = _IX_ERR_TEXT.get(ix, _words(ix))
            else:
                text = json.dumps(ix)
            return f"Error processing Instruction {idx}: {text}"
        if kind == "InsufficientFundsForRent" and isinstance(val, dict):
            return (
                f"Transaction results in an account ({val.get('account_index')}) "
                "with insufficient funds for rent"
            )
        if kind == "DuplicateInstruction":
            return f"Transaction contains a duplicate instruction ({val}) that is not allowed"
        return f"{_words(kind)}: {val}"
    return str(err)


# --------------------------------------------------------------------------
# SPL token parsing (enough for balances and jsonParsed)
# --------------------------------------------------------------------------
def ui_token_amount(amount: int, decimals: int) -> dict[str, Any]:
    """Agave's UiTokenAmount for ``amount`` base units."""
    if decimals > 0:
        text = str(
            (Decimal(amount) / (Decimal(10) ** decimals)).quantize(Decimal(1).scaleb(-decimals))
        )
        text = text.rstrip("0").rstrip(".") if "." in text else text
    else:
        text = str(amount)
    return {
        "amount": str(amount),
        "decimals": decimals,
        "uiAmount": amount / (10**decimals),
        "uiAmountString": text,
    }


def _coption_pubkey(data: bytes, off: int) -> str | None:
    tag = struct.unpack_from("<I", data, off)[0]
    return str(Pubkey.from_bytes(data[off + 4 : off + 36])) if tag == 1 else None


def is_token_program(owner: Pubkey) -> bool:
    return owner in TOKEN_PROGRAMS


def token_kind(acc: Account) -> str | None:
    """'account', 'mint' or None for an account owned by an SPL token program."""
    if not is_token_program(acc.owner):
        return None
    n = len(acc.data)
    if n == TOKEN_ACCOUNT_LEN:
        return "account"
    if n == MINT_LEN:
        return "mint"
    if n > TOKEN_ACCOUNT_LEN and acc.owner == TOKEN_2022_PROGRAM_ID:
        return {1: "mint", 2: "account"}.get(acc.data[TOKEN_ACCOUNT_LEN])
    return None


def parse_token_account(data: bytes) -> dict[str, Any] | None:
    """Fields of an initialized SPL token account, or None."""
    if len(data) < TOKEN_ACCOUNT_LEN or data[108] == 0:
        return None
    native_tag = struct.unpack_from("<I", data, 109)[0]
    return {
        "mint": Pubkey.from_bytes(data[0:32]),
        "owner": Pubkey.from_bytes(data[32:64]),
        "amount": struct.unpack_from("<Q", data, 64)[0],
        "delegate": _coption_pubkey(data, 72),
        "state": {1: "initialized", 2: "frozen"}.get(data[108], "uninitialized"),
        "native": struct.unpack_from("<Q", data, 113)[0] if native_tag == 1 else None,
        "delegated_amount": struct.unpack_from("<Q", data, 121)[0],
        "close_authority": _coption_pubkey(data, 129),
    }


def parse_mint(data: bytes) -> dict[str, Any] | None:
    if len(data) < MINT_LEN:
        return None
    return {
        "mint_authority": _coption_pubkey(data, 0),
        "supply": struct.unpack_from("<Q", data, 36)[0],
        "decimals": data[44],
        "is_initialized": bool(data[45]),
        "freeze_authority": _coption_pubkey(data, 46),
    }


def json_parsed_token(acc: Account, mint_decimals: int | None) -> dict[str, Any] | None:
    """The ``jsonParsed`` data object for token accounts/mints, or None."""
    kind = token_kind(acc)
    program = "spl-token" if acc.owner == TOKEN_PROGRAM_ID else "spl-token-2022"
    data = bytes(acc.data)
    if kind == "mint":
        m = parse_mint(data)
        if m is None:
            return None
        info = {
            "decimals": m["decimals"],
            "freezeAuthority": m["freeze_authority"],
            "isInitialized": m["is_initialized"],
            "mintAuthority": m["mint_authority"],
            "supply": str(m["supply"]),
        }
        return {"program": program, "parsed": {"info": info, "type": "mint"}, "space": len(data)}
    if kind == "account" and mint_decimals is not None:
        t = parse_token_account(data)
        if t is None:
            return None
        info: dict[str, Any] = {
            "isNative": t["native"] is not None,
            "mint": str(t["mint"]),
            "owner": str(t["owner"]),
            "state": t["state"],
            "tokenAmount": ui_token_amount(t["amount"], mint_decimals),
        }
        if t["delegate"] is not None:
            info["delegate"] = t["delegate"]
            info["delegatedAmount"] = ui_token_amount(t["delegated_amount"], mint_decimals)
        if t["native"] is not None:
            info["rentExemptReserve"] = ui_token_amount(t["native"], mint_decimals)
        if t["close_authority"] is not None:
            info["closeAuthority"] = t["close_authority"]
        return {"program": program, "parsed": {"info": info, "type": "account"}, "space": len(data)}
    return None


# --------------------------------------------------------------------------
# account encodings
# --------------------------------------------------------------------------
def slice_data(data: bytes, data_slice: dict[str, Any] | None) -> bytes:
    if not data_slice:
        return data
    off, length = data_slice["offset"], data_slice["length"]
    return data[off : off + length]


def encode_bytes(data: bytes, encoding: str) -> Any:
    if encoding in ("base64",):
        return [base64.b64encode(data).decode(), "base64"]
    if encoding in ("base58", "binary"):
        if len(data) > MAX_BASE58_BYTES:
            raise EncodingError(
                "Encoded binary (base 58) data should be less than 128 bytes, "
                "please use Base64 encoding.",
                code=-32600,
            )
        text = b58encode(data)
        return text if encoding == "binary" else [text, "base58"]
    raise EncodingError(f"Invalid params: unsupported encoding: {encoding}")


def encode_account(
    acc: Account,
    encoding: str = "base64",
    data_slice: dict[str, Any] | None = None,
    mint_decimals: int | None = None,
) -> dict[str, Any]:
    """Agave's UiAccount for ``acc``; jsonParsed falls back to base64."""
    raw = bytes(acc.data)
    data: Any = None
    if encoding == "jsonParsed":
        data = json_parsed_token(acc, mint_decimals)
        if data is None:
            data = encode_bytes(slice_data(raw, data_slice), "base64")
    else:
        data = encode_bytes(slice_data(raw, data_slice), encoding)
    return {
        "data": data,
        "executable": acc.executable,
        "lamports": acc.lamports,
        "owner": str(acc.owner),
        "rentEpoch": acc.rent_epoch,
        "space": len(raw),
    }


def decode_filter_bytes(text: str, encoding: str) -> bytes:
    if encoding == "base58":
        if len(text) > 175:  # base58 of 128 bytes is at most 175 chars
            raise EncodingError(
                "Invalid param: encoded binary (base 58) data should be less than 128 bytes"
            )
        return b58decode(text)
    if encoding == "base64":
        return base64.b64decode(text, validate=True)
    raise EncodingError(f"Invalid param: unsupported memcmp encoding {encoding}")
