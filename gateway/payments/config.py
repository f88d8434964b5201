"""The ``payments:`` section of the gateway config: which rails are offered and how they settle.

Defaults work with ``make up`` on the localnet: Solana test USDC (the mint ``make up`` creates,
.local/keys/usdc-mint.json), a pay-to wallet and a fee payer created under .local/keys on first
start, and the devnet CAIP-2 id on the wire (the official x402 client accepts only
mainnet/devnet/testnet ids). EVM, MPP and TRON are off unless configured.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

SOLANA_MAINNET = "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"
SOLANA_DEVNET = "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"
SOLANA_TESTNET = "solana:4uhcVJyU9pJkvQyS88uRDiswHXSCkY3z"
# x402 v1 spells networks by name; v2 by CAIP-2 id.
SOLANA_V1_NAMES = {
    SOLANA_MAINNET: "solana",
    SOLANA_DEVNET: "solana-devnet",
    SOLANA_TESTNET: "solana-testnet",
}
EVM_V1_NAMES = {8453: "base", 84532: "base-sepolia"}
# The highest compute-unit price the config accepts: 5 lamports per CU (DESIGN section 8, and the
# official x402 facilitator's cap), in micro-lamports as ComputeBudget counts it.
MAX_CU_PRICE_MICROLAMPORTS = 5_000_000
# What the fee payer signs for by default. The priority fee is price x limit / 10^6 lamports, so:
#   worst-case priority fee = 50,000 x 40,000 / 10^6 = 2,000 lamports
#   plus the base fee of two signatures (2 x 5,000)  = 12,000 lamports = 0.000012 SOL per purchase.
# At SOL = $500 that is $0.001 of priority fee (1% of the smallest purchase, $0.10) and $0.006 in
# all (6%). The official x402 client asks 20,000 CU at 1 micro-lamport per CU (x402 2.25.0,
# DEFAULT_COMPUTE_UNIT_LIMIT / DEFAULT_COMPUTE_UNIT_PRICE_MICROLAMPORTS): well inside both caps.
# (The previous caps, 5 lamports/CU x 200,000 CU, let a payer spend 0.001 SOL of our fees.)
DEFAULT_MAX_CU_PRICE_MICROLAMPORTS = 50_000
DEFAULT_MAX_CU_LIMIT = 40_000
BASE_FEE_LAMPORTS_PER_SIGNATURE = 5_000


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SolanaPayments(_Model):
    enabled: bool = True
    # The CAIP-2 id advertised; on the localnet the devnet id (DESIGN section 8).
    network: str = SOLANA_DEVNET
    # JSON-RPC used to co-sign, send and confirm; null = the gateway's rpc_url.
    rpc_url: str | None = None
    # The SPL mint paid in (USDC); null = the localnet test USDC whose keypair is asset_keypair.
    asset: str | None = None
    asset_keypair: Path = Path(".local/keys/usdc-mint.json")
    # The wallet that receives the payments (its USDC token account is credited); null = the
    # public key of pay_to_keypair, created on first start (localnet convenience).
    pay_to: str | None = None
    pay_to_keypair: Path = Path(".local/keys/gateway-pay-to.json")
    # Co-signs every payment as fee payer (it pays the network fees, never the amount).
    fee_payer_keypair: Path = Path(".local/keys/gateway-fee-payer.json")
    # Caps on what a payer's transaction may make the fee payer pay (arithmetic above); a payment
    # above either is refused (402, ..._compute_price_instruction_too_high / _limit_..._too_high).
    max_compute_unit_price_microlamports: int = Field(
        default=DEFAULT_MAX_CU_PRICE_MICROLAMPORTS, ge=0, le=MAX_CU_PRICE_MICROLAMPORTS
    )
    max_compute_unit_limit: int = Field(default=DEFAULT_MAX_CU_LIMIT, ge=1_000, le=1_400_000)
    max_timeout_seconds: int = Field(default=60, ge=5, le=3600)
    confirm_timeout_seconds: float = Field(default=30.0, gt=0)
    # Pending payments older than this are reconciled against the chain by a background loop
    # (and all of them at startup).
    reconcile_interval_seconds: float = Field(default=10.0, gt=0)

    def worst_case_fee_lamports(self) -> int:
        """The most one purchase can cost the fee payer under these caps: the base fee of its two
        signatures plus the priority fee, which Solana rounds up to whole lamports."""
        priority = -(
            -self.max_compute_unit_price_microlamports * self.max_compute_unit_limit // 1_000_000
        )
        return 2 * BASE_FEE_LAMPORTS_PER_SIGNATURE + priority


class EvmPayments(_Model):
    """x402 exact scheme on an EVM chain (USDC on Base): EIP-3009 transferWithAuthorization."""

    enabled: bool = False
    chain_id: int = 8453
    rpc_url: str | None = None
    asset: str = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"  # USDC on Base
    decimals: int = 6
    # EIP-712 domain of the token contract (USDC on Base: "USD Coin", "2").
    token_name: str = "USD Coin"
    token_version: str = "2"
    pay_to: str | None = None
    # The key that submits transferWithAuthorization and pays gas (hex private key in a file).
    relayer_key_file: Path = Path(".local/keys/gateway-evm-relayer.hex")
    max_timeout_seconds: int = Field(default=300, ge=30, le=86400)
    confirm_timeout_seconds: float = Field(default=60.0, gt=0)


class MppPayments(_Model):
    """Machine Payments Protocol (Tempo): the challenge is answered; settlement is not built."""

    realm: str = "voicenet-gateway"
    recipient: str = "0x0000000000000000000000000000000000000000"
    currency: str = "0x20c0000000000000000000000000000000000000"
    chain_id: int = 4217
    challenge_ttl_seconds: int = Field(default=300, ge=30)
    # HMAC key binding challenge ids; null = a random key per process.
    secret_file: Path | None = None


class TronPayments(_Model):
    """TRON USDT (TRC-20) via the Bank of AI facilitator: the challenge only, here."""

    network: str = "tron:mainnet"
    asset: str = "TR7NHqjeKQxGTCi8q8ZY4pL8otSzgjLj6t"
    decimals: int = 6
    pay_to: str = "T9yD14Nj9j7xAB4dbGeiX9h8unkKHxuWwb"
    facilitator_url: str | None = None


class PaymentsConfig(_Model):
    solana: SolanaPayments = SolanaPayments()
    evm: EvmPayments = EvmPayments()
    mpp: MppPayments = MppPayments()
    tron: TronPayments = TronPayments()
