"""Solana JSON-RPC over HTTP for a :class:`~registry.localnet.svm.LocalSvm`.

Implements the subset that solana-py's ``AsyncClient``, anchorpy and x402
clients use, with response shapes and error codes copied from Agave so those
clients run unchanged.  Every request is answered; malformed input gets the
JSON-RPC error a validator would give (-32700/-32600/-32601/-32602) and an
unexpected exception becomes -32603 instead of taking the server down.

Handlers are synchronous: the SVM is in-memory and a commit is one fsync, so
running them on the event loop keeps transactions strictly ordered without
locks or thread hops.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web
from solders.hash import Hash
from solders.message import MessageV0, from_bytes_versioned
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction

from common import jsonsafe

from .codec import (
    TOKEN_PROGRAMS,
    EncodingError,
    b58decode,
    b58encode,
    decode_filter_bytes,
    encode_account,
    parse_mint,
    parse_token_account,
    token_kind,
    ui_token_amount,
)
from .svm import FEATURE_SET_ID, SOLANA_CORE_VERSION, LocalSvm, PreflightError

log = logging.getLogger(__name__)

MAX_MULTIPLE_ACCOUNTS = 100
# One HTTP body may not make the server run without bound: a batch holds at most this many
# requests (each may send a transaction); larger batches get one JSON-RPC error.
MAX_BATCH_REQUESTS = 100
# The faucet holds 500M SOL: an airdrop larger than this is a mistake or an attempt to drain it.
MAX_AIRDROP_LAMPORTS = 1_000 * 1_000_000_000
MAX_SIGNATURE_STATUSES = 256
MAX_BASE58_TX_LEN = 1683  # base58 of a 1232-byte packet
MAX_TX_BYTES = 1232


T = TypeVar("T")


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


def invalid_params(msg: str) -> RpcError:
    return RpcError(-32602, msg)


# ---------------------------------------------------------------- param helpers
def _param(params: list[Any], i: int, name: str) -> Any:
    if i >= len(params):
        raise invalid_params(f"Invalid params: missing `{name}`")
    return params[i]


def _arity(params: list[Any], n: int) -> None:
    if len(params) > n:
        raise invalid_params(f"Invalid params: invalid length {len(params)}, expected at most {n}")


def _base58(v: Any, parse: Callable[[str], T], what: str) -> T:
    """A base58 pubkey, signature or hash parameter, refused with the RPC's own wording."""
    if not isinstance(v, str):
        raise invalid_params(f"Invalid params: expected a base58 {what} string")
    try:
        return parse(v)
    except Exception:  # noqa: BLE001 - solders raises assorted types on bad input
        raise invalid_params(f"Invalid param: Invalid {what} {v!r}") from None


def _pubkey(v: Any) -> Pubkey:
    return _base58(v, Pubkey.from_string, "pubkey")


def _signature(v: Any) -> Signature:
    return _base58(v, Signature.from_string, "signature")


def _hash(v: Any) -> Hash:
    return _base58(v, Hash.from_string, "hash")


def _one_with_config(
    params: list[Any], name: str, parse: Callable[[Any], T]
) -> tuple[T, dict[str, Any]]:
    """The usual shape of a Solana RPC call: one argument, then an optional configuration."""
    _arity(params, 2)
    return parse(_param(params, 0, name)), _config(params, 1)


def _list_of(name: str, most: int, parse: Callable[[Any], T]) -> Callable[[Any], list[T]]:
    """A parser for a list parameter of at most ``most`` items, each parsed by ``parse``."""

    def parse_list(values: Any) -> list[T]:
        if not isinstance(values, list):
            raise invalid_params(f"Invalid params: expected a list of {name}")
        if len(values) > most:
            raise invalid_params(f"Too many inputs provided; max {most}")
        return [parse(v) for v in values]

    return parse_list


def _uint(v: Any, name: str, *, upper: int = 2**64 - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > upper:
        raise invalid_params(f"Invalid params: `{name}` must be an unsigned integer")
    return v


def _config(params: list[Any], i: int) -> dict[str, Any]:
    if i >= len(params) or params[i] is None:
        return {}
    cfg = params[i]
    if not isinstance(cfg, dict):
        raise invalid_params("Invalid params: configuration must be an object")
    return cfg


def _bool(cfg: dict[str, Any], key: str, default: bool = False) -> bool:
    v = cfg.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid_params(f"Invalid params: `{key}` must be a boolean")
    return v


def _encoding(cfg: dict[str, Any], default: str, allowed: tuple[str, ...]) -> str:
    enc = cfg.get("encoding") or default
    if enc not in allowed:
        raise invalid_params(
            f"Invalid params: unknown encoding `{enc}`, expected one of {', '.join(allowed)}"
        )
    return enc


def _data_slice(cfg: dict[str, Any]) -> dict[str, int] | None:
    ds = cfg.get("dataSlice")
    if ds is None:
        return None
    if not isinstance(ds, dict):
        raise invalid_params("Invalid params: `dataSlice` must be an object")
    return {
        "offset": _uint(ds.get("offset"), "offset"),
        "length": _uint(ds.get("length"), "length"),
    }


ACCOUNT_ENCODINGS = ("binary", "base58", "base64", "jsonParsed", "base64+zstd")
TX_ENCODINGS = ("json", "jsonParsed", "base58", "base64", "binary")


class RpcMethods:
    """The method table.  Each handler takes the params list, returns a result."""

    def __init__(self, svm: LocalSvm) -> None:
        self.svm = svm
        self.table: dict[str, Callable[[list[Any]], Any]] = {
            name[len("m_") :]: getattr(self, name) for name in dir(self) if name.startswith("m_")
        }

    # -- helpers -----------------------------------------------------------
    def _ctx(self, cfg: dict[str, Any], value: Any) -> dict[str, Any]:
        slot = self._slot(cfg)
        return {"context": {"apiVersion": SOLANA_CORE_VERSION, "slot": slot}, "value": value}

    def _slot(self, cfg: dict[str, Any]) -> int:
        slot = self.svm.current_slot()
        mcs = cfg.get("minContextSlot")
        if mcs is not None and _uint(mcs, "minContextSlot") > slot:
            raise RpcError(
                -32016, "Minimum context slot has not been reached", {"contextSlot": slot}
            )
        return slot

    def _encode_account(self, acc: Any, enc: str, ds: dict[str, int] | None) -> dict[str, Any]:
        if enc == "base64+zstd":
            raise invalid_params(
                "Invalid params: base64+zstd encoding is not supported by this localnet"
            )
        decimals = None
        if enc == "jsonParsed" and token_kind(acc) == "account":
            t = parse_token_account(bytes(acc.data))
            if t is not None:
                decimals = self.svm.mint_decimals(t["mint"])
        try:
            return encode_account(acc, enc, ds, decimals)
        except EncodingError as exc:
            raise RpcError(exc.code, str(exc)) from None

    # -- cluster/slot info ---------------------------------------------------
    def m_getHealth(self, p: list[Any]) -> str:
        return "ok"

    def m_getVersion(self, p: list[Any]) -> dict[str, Any]:
        return {"solana-core": SOLANA_CORE_VERSION, "feature-set": FEATURE_SET_ID}

    def m_getGenesisHash(self, p: list[Any]) -> str:
        return str(self.svm.genesis_hash)

    def m_getIdentity(self, p: list[Any]) -> dict[str, str]:
        return {"identity": str(self.svm.faucet.pubkey())}

    def m_getSlot(self, p: list[Any]) -> int:
        _arity(p, 1)
        return self._slot(_config(p, 0))

    def m_getBlockHeight(self, p: list[Any]) -> int:
        _arity(p, 1)
        return self._slot(_config(p, 0))

    def m_getTransactionCount(self, p: list[Any]) -> int:
        _arity(p, 1)
        self._slot(_config(p, 0))
        return self.svm.transaction_count()

    def m_getEpochInfo(self, p: list[Any]) -> dict[str, int]:
        _arity(p, 1)
        self._slot(_config(p, 0))
        return self.svm.epoch_info()

    def m_getEpochSchedule(self, p: list[Any]) -> dict[str, Any]:
        s = self.svm.litesvm.get_epoch_schedule()
        return {
            "firstNormalEpoch": s.first_normal_epoch,
            "firstNormalSlot": s.first_normal_slot,
            "leaderScheduleSlotOffset": s.leader_schedule_slot_offset,
            "slotsPerEpoch": s.slots_per_epoch,
            "warmup": s.warmup,
        }

    def m_getFirstAvailableBlock(self, p: list[Any]) -> int:
        return 0

    def m_minimumLedgerSlot(self, p: list[Any]) -> int:
        return 0

    def m_getMaxRetransmitSlot(self, p: list[Any]) -> int:
        return self.svm.current_slot()

    def m_getMaxShredInsertSlot(self, p: list[Any]) -> int:
        return self.svm.current_slot()

    def m_getBlockTime(self, p: list[Any]) -> int:
        _arity(p, 1)
        slot = _uint(_param(p, 0, "slot"), "slot")
        if slot > self.svm.current_slot():
            raise RpcError(-32004, f"Block not available for slot {slot}")
        return self.svm.block_time(slot)

    def m_getRecentPrioritizationFees(self, p: list[Any]) -> list[Any]:
        _arity(p, 1)
        if p and p[0] is not None:
            if not isinstance(p[0], list):
                raise invalid_params("Invalid params: expected a list of pubkeys")
            for k in p[0]:
                _pubkey(k)
        return []

    def m_getMinimumBalanceForRentExemption(self, p: list[Any]) -> int:
        _arity(p, 2)
        size = _uint(_param(p, 0, "dataLength"), "dataLength", upper=10 * 1024 * 1024)
        _config(p, 1)
        return self.svm.minimum_balance_for_rent_exemption(size)

    # -- blockhashes / fees ------------------------------------------------------
    def m_getLatestBlockhash(self, p: list[Any]) -> dict[str, Any]:
        _arity(p, 1)
        cfg = _config(p, 0)
        h, lvbh = self.svm.latest_blockhash()
        return self._ctx(cfg, {"blockhash": str(h), "lastValidBlockHeight": lvbh})

    def m_isBlockhashValid(self, p: list[Any]) -> dict[str, Any]:
        h, cfg = _one_with_config(p, "blockhash", _hash)
        return self._ctx(cfg, self.svm.is_blockhash_valid(h))

    def m_getFeeForMessage(self, p: list[Any]) -> dict[str, Any]:
        _arity(p, 2)
        raw = _param(p, 0, "message")
        if not isinstance(raw, str):
            raise invalid_params("Invalid params: message must be a base64 string")
        try:
            msg = from_bytes_versioned(base64.b64decode(raw, validate=True))
        except Exception as exc:  # noqa: BLE001 - untrusted bytes, any decode error
            raise invalid_params(f"invalid message: {exc}") from None
        cfg = _config(p, 1)
        return self._ctx(cfg, self.svm.fee_for_message(msg))

    # -- accounts --------------------------------------------------------------
    def m_getBalance(self, p: list[Any]) -> dict[str, Any]:
        key, cfg = _one_with_config(p, "pubkey", _pubkey)
        return self._ctx(cfg, self.svm.get_balance(key))

    def m_getAccountInfo(self, p: list[Any]) -> dict[str, Any]:
        key, cfg = _one_with_config(p, "pubkey", _pubkey)
        enc = _encoding(cfg, "binary", ACCOUNT_ENCODINGS)
        ds = _data_slice(cfg)
        ctx = self._ctx(cfg, None)
        acc = self.svm.get_account(key)
        if acc is not None:
            ctx["value"] = self._encode_account(acc, enc, ds)
        return ctx

    def m_getMultipleAccounts(self, p: list[Any]) -> dict[str, Any]:
        pks, cfg = _one_with_config(
            p, "pubkeys", _list_of("pubkeys", MAX_MULTIPLE_ACCOUNTS, _pubkey)
        )
        enc = _encoding(cfg, "base64", ACCOUNT_ENCODINGS)
        ds = _data_slice(cfg)
        ctx = self._ctx(cfg, None)
        out = []
        for k in pks:
            acc = self.svm.get_account(k)
            out.append(None if acc is None else self._encode_account(acc, enc, ds))
        ctx["value"] = out
        return ctx

    @staticmethod
    def _filters(raw: Any) -> list[Callable[[bytes], bool]]:
        if raw is None:
            return []
        if not isinstance(raw, list) or len(raw) > 4:
            raise invalid_params("Invalid params: filters must be a list of at most 4 filters")
        out: list[Callable[[bytes], bool]] = []
        for f in raw:
            if not isinstance(f, dict) or len(f) != 1:
                raise invalid_params(
                    "Invalid params: each filter must be one of dataSize, memcmp, tokenAccountState"
                )
            ((kind, val),) = f.items()
            if kind == "dataSize":
                size = _uint(val, "dataSize")
                out.append(lambda d, size=size: len(d) == size)
            elif kind == "memcmp":
                if not isinstance(val, dict):
                    raise invalid_params("Invalid params: memcmp must be an object")
                off = _uint(val.get("offset"), "offset")
                enc = val.get("encoding") or "base58"
                text = val.get("bytes")
                if not isinstance(text, str):
                    raise invalid_params("Invalid params: memcmp.bytes must be a string")
                try:
                    want = decode_filter_bytes(text, enc)
                except (EncodingError, ValueError, binascii.Error) as exc:
                    raise invalid_params(f"Invalid param: {exc}") from None
                out.append(
                    lambda d, off=off, want=want: (
                        d[off : off + len(want)] == want and len(d) >= off + len(want)
                    )
                )
            elif kind == "tokenAccountState":
                out.append(lambda d: len(d) >= 165 and d[108] != 0)
            else:
                raise invalid_params(f"Invalid params: unknown filter `{kind}`")
        return out

    def m_getProgramAccounts(self, p: list[Any]) -> Any:
        program, cfg = _one_with_config(p, "programId", _pubkey)
        enc = _encoding(cfg, "binary", ACCOUNT_ENCODINGS)
        ds = _data_slice(cfg)
        filters = self._filters(cfg.get("filters"))
        with_ctx = _bool(cfg, "withContext")
        slot = self._slot(cfg)
        out = []
        for key, acc in self.svm.program_accounts(program):
            data = bytes(acc.data)
            if all(f(data) for f in filters):
                out.append({"pubkey": str(key), "account": self._encode_account(acc, enc, ds)})
        if with_ctx:
            return {"context": {"apiVersion": SOLANA_CORE_VERSION, "slot": slot}, "value": out}
        return out

    # -- SPL token -------------------------------------------------------------
    def m_getTokenAccountBalance(self, p: list[Any]) -> dict[str, Any]:
        key, cfg = _one_with_config(p, "pubkey", _pubkey)
        acc = self.svm.get_account(key)
        tb = None if acc is None else self.svm.token_balance(acc)
        if tb is None:
            raise invalid_params(
                "Invalid param: could not find account"
                if acc is None
                else "Invalid param: not a Token account"
            )
        return self._ctx(cfg, tb["uiTokenAmount"])

    def m_getTokenSupply(self, p: list[Any]) -> dict[str, Any]:
        key, cfg = _one_with_config(p, "mint", _pubkey)
        acc = self.svm.get_account(key)
        m = parse_mint(bytes(acc.data)) if acc is not None and token_kind(acc) == "mint" else None
        if m is None:
            raise invalid_params("Invalid param: not a Token mint")
        return self._ctx(cfg, ui_token_amount(m["supply"], m["decimals"]))

    def m_getTokenAccountsByOwner(self, p: list[Any]) -> dict[str, Any]:
        _arity(p, 3)
        owner = _pubkey(_param(p, 0, "owner"))
        flt = _param(p, 1, "filter")
        if not isinstance(flt, dict) or len(flt) != 1 or not ({"mint", "programId"} & set(flt)):
            raise invalid_params("Invalid params: filter must be {mint} or {programId}")
        mint: Pubkey | None = None
        programs = TOKEN_PROGRAMS
        if "mint" in flt:
            mint = _pubkey(flt["mint"])
            macc = self.svm.get_account(mint)
            if macc is None or token_kind(macc) != "mint":
                raise invalid_params("Invalid param: could not find mint")
            programs = (macc.owner,)
        else:
            prog = _pubkey(flt["programId"])
            if prog not in TOKEN_PROGRAMS:
                raise invalid_params("Invalid param: unrecognized Token program id")
            programs = (prog,)
        cfg = _config(p, 2)
        enc = _encoding(cfg, "binary", ACCOUNT_ENCODINGS)
        ds = _data_slice(cfg)
        ctx = self._ctx(cfg, None)
        out = []
        for prog in programs:
            for key, acc in self.svm.program_accounts(prog):
                if token_kind(acc) != "account":
                    continue
                t = parse_token_account(bytes(acc.data))
                if t is None or t["owner"] != owner or (mint is not None and t["mint"] != mint):
                    continue
                out.append({"pubkey": str(key), "account": self._encode_account(acc, enc, ds)})
        ctx["value"] = out
        return ctx

    # -- transactions ------------------------------------------------------------
    @staticmethod
    def _decode_tx(p: list[Any], cfg: dict[str, Any]) -> VersionedTransaction:
        raw = _param(p, 0, "transaction")
        if not isinstance(raw, str):
            raise invalid_params("Invalid params: transaction must be an encoded string")
        enc = _encoding(cfg, "base58", ("base58", "base64"))
        try:
            if enc == "base58":
                if len(raw) > MAX_BASE58_TX_LEN:
                    raise ValueError(
                        f"base58 encoded transaction too large: {len(raw)} bytes "
                        f"(max: {MAX_BASE58_TX_LEN})"
                    )
                data = b58decode(raw)
            else:
                data = base64.b64decode(raw, validate=True)
            if len(data) > MAX_TX_BYTES:
                raise ValueError(
                    f"encoded transaction too large: {len(data)} bytes (max: {MAX_TX_BYTES} bytes)"
                )
            return VersionedTransaction.from_bytes(data)
        except Exception as exc:  # noqa: BLE001 - untrusted bytes, any decode error
            raise invalid_params(
                f"failed to deserialize solana_transaction::versioned::VersionedTransaction: {exc}"
            ) from None

    def m_sendTransaction(self, p: list[Any]) -> str:
        _arity(p, 2)
        cfg = _config(p, 1)
        tx = self._decode_tx(p, cfg)
        skip = _bool(cfg, "skipPreflight")
        self._slot(cfg)
        try:
            return str(self.svm.send_transaction(tx, skip_preflight=skip))
        except PreflightError as exc:
            raise RpcError(exc.code, exc.message, exc.rpc_data()) from None

    def m_simulateTransaction(self, p: list[Any]) -> dict[str, Any]:
        _arity(p, 2)
        cfg = _config(p, 1)
        tx = self._decode_tx(p, cfg)
        sig_verify = _bool(cfg, "sigVerify")
        replace = _bool(cfg, "replaceRecentBlockhash")
        if sig_verify and replace:
            raise invalid_params("sigVerify may not be used with replaceRecentBlockhash")
        want_inner = _bool(cfg, "innerInstructions")
        acc_cfg = cfg.get("accounts")
        addresses: list[Pubkey] = []
        acc_enc = "base64"
        if acc_cfg is not None:
            if not isinstance(acc_cfg, dict) or not isinstance(acc_cfg.get("addresses"), list):
                raise invalid_params(
                    "Invalid params: accounts must be {addresses: [...], encoding}"
                )
            addresses = [_pubkey(a) for a in acc_cfg["addresses"]]
            acc_enc = _encoding(
                acc_cfg, "base64", ("base64", "base58", "binary", "jsonParsed", "base64+zstd")
            )
        ctx = self._ctx(cfg, None)
        r = self.svm.simulate_transaction(
            tx, sig_verify=sig_verify, replace_recent_blockhash=replace
        )
        accounts = None
        if acc_cfg is not None:
            accounts = []
            for a in addresses:
                acc = r.post_accounts[a] if a in r.post_accounts else self.svm.get_account(a)
                accounts.append(None if acc is None else self._encode_account(acc, acc_enc, None))
        ctx["value"] = {
            "err": r.err,
            "logs": r.logs,
            "accounts": accounts,
            "unitsConsumed": r.units_consumed,
            "returnData": r.return_data,
            "innerInstructions": r.inner_instructions if want_inner else None,
            "replacementBlockhash": r.replacement_blockhash,
        }
        return ctx

    def m_requestAirdrop(self, p: list[Any]) -> str:
        _arity(p, 3)
        key = _pubkey(_param(p, 0, "pubkey"))
        lamports = _uint(_param(p, 1, "lamports"), "lamports")
        _config(p, 2)
        if lamports == 0:
            raise invalid_params("Invalid params: lamports must be positive")
        if lamports > MAX_AIRDROP_LAMPORTS:
            raise invalid_params(
                f"Invalid params: airdrop of {lamports} lamports exceeds the localnet's limit of "
                f"{MAX_AIRDROP_LAMPORTS} ({MAX_AIRDROP_LAMPORTS // 1_000_000_000} SOL) per request"
            )
        try:
            return str(self.svm.airdrop(key, lamports))
        except PreflightError as exc:
            raise RpcError(-32600, f"airdrop request failed: {exc.message}") from None

    def m_getSignatureStatuses(self, p: list[Any]) -> dict[str, Any]:
        parsed, cfg = _one_with_config(
            p, "signatures", _list_of("signatures", MAX_SIGNATURE_STATUSES, _signature)
        )
        ctx = self._ctx(cfg, None)
        ctx["value"] = [
            None
            if st is None
            else {
                "confirmationStatus": "finalized",
                "confirmations": None,
                "err": st.err,
                "slot": st.slot,
                "status": {"Ok": None} if st.err is None else {"Err": st.err},
            }
            for st in self.svm.signature_statuses(parsed)
        ]
        return ctx

    def m_getTransaction(self, p: list[Any]) -> dict[str, Any] | None:
        _arity(p, 2)
        sig = _signature(_param(p, 0, "signature"))
        if len(p) > 1 and isinstance(p[1], str):  # legacy: encoding as 2nd param
            cfg: dict[str, Any] = {"encoding": p[1]}
        else:
            cfg = _config(p, 1)
        enc = _encoding(cfg, "json", TX_ENCODINGS)
        max_version = cfg.get("maxSupportedTransactionVersion")
        if max_version is not None:
            _uint(max_version, "maxSupportedTransactionVersion")
        rec = self.svm.get_transaction(sig)
        if rec is None:
            return None
        vtx = VersionedTransaction.from_bytes(rec.raw)
        is_v0 = isinstance(vtx.message, MessageV0)
        if is_v0 and max_version is None:
            raise RpcError(
                -32015,
                "Transaction version (0) is not supported by the requesting client. "
                "Please try the request again "
                'with the following configuration parameter: "maxSupportedTransactionVersion": 0',
            )
        meta = dict(rec.meta)
        if meta.get("returnData") is None:
            meta.pop("returnData", None)
        out: dict[str, Any] = {
            "blockTime": rec.block_time,
            "meta": meta,
            "slot": rec.slot,
            "transaction": ui_transaction(vtx, rec.raw, enc),
        }
        if max_version is not None:
            out["version"] = 0 if is_v0 else "legacy"
        return out


def ui_transaction(vtx: VersionedTransaction, raw: bytes, encoding: str) -> Any:
    """EncodedTransaction in the requested encoding (jsonParsed -> json)."""
    if encoding == "base64":
        return [base64.b64encode(raw).decode(), "base64"]
    if encoding == "base58":
        return [b58encode(raw), "base58"]
    if encoding == "binary":
        return b58encode(raw)
    msg = vtx.message
    h = msg.header
    m: dict[str, Any] = {
        "accountKeys": [str(k) for k in msg.account_keys],
        "header": {
            "numReadonlySignedAccounts": h.num_readonly_signed_accounts,
            "numReadonlyUnsignedAccounts": h.num_readonly_unsigned_accounts,
            "numRequiredSignatures": h.num_required_signatures,
        },
        "instructions": [
            {
                "accounts": list(ix.accounts),
                "data": b58encode(bytes(ix.data)),
                "programIdIndex": ix.program_id_index,
                "stackHeight": None,
            }
            for ix in msg.instructions
        ],
        "recentBlockhash": str(msg.recent_blockhash),
    }
    if isinstance(msg, MessageV0):
        m["addressTableLookups"] = [
            {
                "accountKey": str(lookup.account_key),
                "readonlyIndexes": list(lookup.readonly_indexes),
                "writableIndexes": list(lookup.writable_indexes),
            }
            for lookup in msg.address_table_lookups
        ]
    return {"message": m, "signatures": [str(s) for s in vtx.signatures]}


# ------------------------------------------------------------------ dispatcher
def _error(code: int, message: str, req_id: Any = None, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "error": err, "id": req_id}


class Dispatcher:
    """JSON-RPC 2.0 framing (single + batch) around :class:`RpcMethods`."""

    def __init__(self, svm: LocalSvm) -> None:
        self.methods = RpcMethods(svm)

    def handle_one(self, req: Any) -> dict[str, Any]:
        if not isinstance(req, dict):
            return _error(-32600, "Invalid request")
        req_id = req.get("id")
        if isinstance(req_id, (dict, list, bool)):
            return _error(-32600, "Invalid request")
        method = req.get("method")
        if req.get("jsonrpc") != "2.0" or not isinstance(method, str):
            return _error(-32600, "Invalid request", req_id)
        fn = self.methods.table.get(method)
        if fn is None:
            return _error(-32601, "Method not found", req_id)
        params = req.get("params", [])
        if params is None:
            params = []
        if not isinstance(params, list):
            return _error(-32602, "Invalid params: expected an array of parameters", req_id)
        try:
            result = fn(params)
        except RpcError as exc:
            return _error(exc.code, exc.message, req_id, exc.data)
        except (KeyboardInterrupt, SystemExit, asyncio.CancelledError):
            raise
        except BaseException as exc:  # pyo3 PanicException is a BaseException
            log.exception("internal error in %s", method)
            return _error(-32603, f"Internal error: {type(exc).__name__}: {exc}", req_id)
        return {"jsonrpc": "2.0", "result": result, "id": req_id}

    def handle_payload(self, body: bytes) -> Any:
        try:
            payload = jsonsafe.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return _error(-32700, "Parse error")
        if isinstance(payload, list):
            if not payload:
                return _error(-32600, "Invalid request")
            if len(payload) > MAX_BATCH_REQUESTS:
                return _error(
                    -32600,
                    f"Invalid request: batch of {len(payload)} requests exceeds the limit of "
                    f"{MAX_BATCH_REQUESTS}; split it",
                )
            return [self.handle_one(r) for r in payload]
        return self.handle_one(payload)


SVM_KEY = web.AppKey("svm", LocalSvm)


def make_app(svm: LocalSvm) -> web.Application:
    """aiohttp application serving JSON-RPC on ``POST /`` and ``GET /health``."""
    dispatcher = Dispatcher(svm)

    async def rpc(request: web.Request) -> web.Response:
        body = await request.read()
        out = dispatcher.handle_payload(body)
        return web.Response(
            text=json.dumps(out, separators=(",", ":")), content_type="application/json"
        )

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[SVM_KEY] = svm
    app.router.add_post("/", rpc)
    app.router.add_get("/health", health)
    return app
