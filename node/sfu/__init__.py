"""The SFU role (``node --role sfu``): WebRTC rooms (audio, video, data) that LiveKit client SDKs
can join.

``create_role`` (``node.sfu.role``) is what the node agent loads. See node/sfu/README.md for the
operator's and the client's pages.
"""

from node.sfu.role import SfuRole, create_role

__all__ = ["SfuRole", "create_role"]
