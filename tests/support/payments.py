"""The payment tests' gateway: an in-process localnet of its own (the real Agave SVM over
LiteSVM, with the SPL Token program) whose clock a test can move, a test-USDC mint, and the real
gateway app with its payment rails on loopback (``Pay``, fixture ``pay``; registered as a pytest
plugin in tests/conftest.py). ``Pay`` also pays it as an x402 client would and snapshots everything
a refusal must leave unchanged."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from gateway.app import create_app
from gateway.auth import sign_request
from gateway.config import GatewayConfig
from gateway.ledger import Ledger
from gateway.payments import payer
from gateway.payments.book import PaymentBook
from gateway.payments.config import PaymentsConfig, SolanaPayments
from gateway.payments.wiring import PAYMENTS_KEY, setup_payments
from registry import usdc
from registry.client import RegistryClient
from registry.localnet import start_localnet
from tests.support.clock import Clock

PATH = "/v1/credits/purchase"
DEVNET = "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"


@dataclass
class Pay:
    """One localnet + mint + gateway. ``restart()`` replaces the app (same database, same chain)."""

    tmp: Path
    clock: Clock
    net: Any
    chain: RegistryClient
    config: GatewayConfig
    ledger: Ledger | None = None
    server: TestServer | None = None
    http: aiohttp.ClientSession | None = None
    url: str = ""
    mint: Pubkey = field(default_factory=Pubkey.default)
    signed: int = 0

    @property
    def keys(self) -> Path:
        return self.tmp / "keys"

    @property
    def service(self) -> Any:
        return self.server.app[PAYMENTS_KEY].service  # type: ignore[union-attr]

    @property
    def pay_to(self) -> Pubkey:
        return self.service.pay_to

    async def start(self) -> None:
        self.ledger = Ledger(self.config.database_url)

        async def no_nodes() -> list[Any]:
            return []

        app = create_app(self.config, Keypair(), no_nodes, ledger=self.ledger)
        setup_payments(app)  # a no-op once create_app does it itself
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        self.url = str(self.server.make_url("")).rstrip("/")
        self.http = self.http or aiohttp.ClientSession()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    # -- wallets -------------------------------------------------------------------------

    async def wallet(self, usdc_amount: str | None = "10", sol: bool = False) -> Keypair:
        kp = Keypair()
        if sol:
            await self.chain.airdrop(kp.pubkey(), 10**9)
        if usdc_amount is not None:
            await usdc.mint_test_usdc(
                self.chain,
                kp.pubkey(),
                usdc_amount,
                self.keys / "mint.json",
                self.keys / "mint-auth.json",
            )
        return kp

    async def usdc_of(self, owner: Pubkey, mint: Pubkey | None = None) -> int:
        resp = await self.chain.rpc.get_account_info(usdc.ata(owner, mint or self.mint))
        if resp.value is None:
            return 0
        return int.from_bytes(bytes(resp.value.data)[64:72], "little")

    async def snapshot(self, *owners: Pubkey) -> dict[str, Any]:
        """Everything a refusal must leave unchanged."""
        assert self.ledger is not None
        book = PaymentBook(self.ledger)
        out: dict[str, Any] = {"payments": await book.count_by_status()}
        for o in (*owners, self.pay_to):
            out[f"usdc:{o}"] = await self.usdc_of(o)
            acct = await self.ledger.get_account("solana", str(o))
            out[f"ledger:{o}"] = (
                None if acct is None else (acct.credit_balance, acct.available_balance)
            )
        return out

    # -- the HTTP exchange ---------------------------------------------------------------

    def auth(self, key: Keypair | str, path: str = PATH, chain: str = "solana") -> dict[str, str]:
        """Wallet-auth headers with a timestamp never used before in this test: the gateway
        answers one signed request per (wallet, method, path, second)."""
        self.signed = max(int(time.time()) - 25, self.signed + 1)
        return sign_request("POST", path, key, chain, now=self.signed)

    async def post(
        self,
        key: Keypair,
        body: dict[str, Any] | None = None,
        amount: float = 0.25,
        headers: dict[str, str] | None = None,
        auth: dict[str, str] | None = None,
    ) -> tuple[int, Any, Any]:
        assert self.http is not None
        body = body or {
            "wallet_address": str(key.pubkey()),
            "wallet_chain": "solana",
            "amount_usd": amount,
        }
        auth = auth or self.auth(key)
        async with self.http.post(
            self.url + PATH, json=body, headers={**auth, **(headers or {})}
        ) as r:
            text = await r.text()
            try:
                data = json.loads(text)
            except ValueError:
                data = {"error": text}
            return r.status, data, r.headers

    async def requirement(
        self, key: Keypair, amount: float = 0.25, version: int = 2
    ) -> dict[str, Any]:
        status, body, headers = await self.post(key, amount=amount)
        assert status == 402, body
        got_version, accepts = payer.requirements_from_402(headers if version == 2 else {}, body)
        assert got_version == version
        return accepts[0]

    async def pay(
        self,
        key: Keypair,
        amount: float = 0.25,
        version: int = 2,
        tx_amount: int | None = None,
        **build: Any,
    ) -> tuple[int, Any, Any]:
        req = await self.requirement(key, amount, version)
        tx = await payer.svm_transaction(key, req, self.net.url, amount=tx_amount, **build)
        name, value = payer.payment_header(version, req, {"transaction": tx})
        return await self.post(key, amount=amount, headers={name: value})


@pytest.fixture
async def pay(tmp_path: Path) -> AsyncIterator[Pay]:
    clock = Clock()
    net = await start_localnet(0, tmp_path / "ledger", now=clock)
    chain = RegistryClient(net.url)
    keys = tmp_path / "keys"
    mint, _ = await usdc.ensure_test_usdc(chain, keys / "mint.json", keys / "mint-auth.json")
    config = GatewayConfig(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/gateway.db",
        rpc_url=net.url,
        load_report_port=0,  # served by a TestServer on a free port
        payments=PaymentsConfig(
            solana=SolanaPayments(
                asset_keypair=keys / "mint.json",
                pay_to_keypair=keys / "pay-to.json",
                fee_payer_keypair=keys / "fee-payer.json",
                confirm_timeout_seconds=5,
                reconcile_interval_seconds=3600,
            )
        ),
    )
    p = Pay(tmp_path, clock, net, chain, config, mint=mint)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()
        if p.http:
            await p.http.close()
        await chain.close()
        await net.close()
