"""The gateway: sells usage for USDC, routes sessions to nodes from the registry, mints tokens."""
