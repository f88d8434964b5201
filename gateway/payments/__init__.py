"""Credit purchases: x402 on Solana (settled on chain here), EVM (verified; settled through a
configured RPC), and the MPP / TRON challenges. ``book.py`` holds the payment records and their
states; ``service.py`` moves a payment through them.

Wiring (``wiring.py``): ``create_app`` calls ``setup_payments(app)`` so the service starts with
the app (and reconciles pending payments at startup) and stops with it. Without that call the
service starts on the first purchase request instead, and reconciles then.
"""
