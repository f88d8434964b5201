"""Voice agents on the network: a spoken conversation through our SFU, STT and TTS nodes.

Imports ``gateway.client`` (the SDK an agent developer uses anyway) and never the gateway's
server side nor ``node/``.
"""
