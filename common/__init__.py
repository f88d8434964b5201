"""What every service process of the project shares, whatever its side of the network.

Config files (``settings``), log setup (``logs``), JSON parsing of untrusted bytes
(``jsonsafe``), the command-line frame (``cli``), coded errors (``errors``), background tasks
(``tasks``) and ``async with`` for clients (``closing``). Nothing here knows about the chain,
the gateway, a node or an agent: this package imports nothing else of the project, so
``registry``, ``gateway``, ``node`` and ``agents`` can all use it without importing each other.
"""
