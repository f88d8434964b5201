"""Attacks on the local network, one test per threat, each asserting the refusal and that nothing
moved (chain accounts, balances, sessions, transactions)."""
