"""The SFU role (``node --role sfu``): WebRTC audio rooms that LiveKit client SDKs can join.

See node/sfu/README.md for the operator's and the client's pages.
"""

from __future__ import annotations

from node.roles import RoleContext


def create_role(context: RoleContext):  # -> node.sfu.role.SfuRole
    from node.sfu.role import SfuRole

    return SfuRole(context)
