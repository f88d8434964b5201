"""What every service process of the project shares, whatever its side of the network.

Config files (``settings``), log setup (``logs``) and JSON parsing of untrusted bytes
(``jsonsafe``). Nothing here knows about the chain, the gateway, a node or an agent: this package
imports nothing else of the project, so ``registry``, ``gateway``, ``node`` and ``agents`` can all
use it without importing each other.
"""
