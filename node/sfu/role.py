"""The SFU role (``create_role``): HTTP routes (signal WebSocket, validate, refresh, revoke,
Twirp RoomService), the room table, webhooks through the agent's durable outbox, and the load
and measured capacity (``calibration.py``) the load reports carry."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message
from livekit.protocol import models
from livekit.protocol import room as room_pb
from livekit.protocol import rtc as rtc_pb

from common import jsonsafe
from common.settings import validate_settings
from node.roles import RoleContext
from node.sfu.calibration import MODEL, forwarding_cost
from node.sfu.forward import check_compatible
from node.sfu.ice import offer_host_addresses
from node.sfu.relay import RelayParticipant
from node.sfu.revoked import BadRevocation, Revocations, session_ids
from node.sfu.rtc import Participant, Room
from node.sfu.settings import SfuSettings
from registry.tokens import Claims, TokenError, verify_body

log = logging.getLogger("node.sfu")

WEBHOOK_PATH = "/v1/webhooks/sfu"
TWIRP_PREFIX = "/twirp/livekit.RoomService/"
MAX_REVOKE_BODY = 256 * 1024  # 1000 ids of 128 characters, quoted, fit


class Refusal(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code = status, code
        super().__init__(message)


# The validate answers carry no secret (a reason code for the token the caller already holds);
# LiveKit's own server opens them to any origin too.
CROSS_ORIGIN = {"Access-Control-Allow-Origin": "*"}


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query.get("access_token") or None


class SfuRole:
    name = "sfu"

    def __init__(self, context: RoleContext) -> None:
        self.context = context
        self.settings = validate_settings(
            SfuSettings, dict(context.settings or {}), "the sfu: section of the node config"
        )
        check_compatible()
        offer_host_addresses(self.settings.ice_addresses)
        self._capacity = context.capacity  # until start() measured it
        self.rooms: dict[str, Room] = {}
        self.draining = False
        self._janitor: asyncio.Task[None] | None = None
        self.events: list[dict[str, Any]] = []  # the last webhooks, for tests and /metrics
        self.revoked = Revocations(context.state_file("sfu-revoked"))

    @property
    def capacity(self) -> int:
        return self._capacity

    def load(self) -> int:
        return sum(len(r.visible()) for r in self.rooms.values())

    # ------------------------------------------------------------ lifecycle

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/rtc", self.rtc)
        app.router.add_get("/rtc/validate", self.validate)
        app.router.add_route("*", "/rtc/v1", self.not_v1)
        app.router.add_route("*", "/rtc/v1/{tail:.*}", self.not_v1)
        app.router.add_post("/rtc/refresh", self.refresh)
        app.router.add_post("/rtc/revoke", self.revoke)
        app.router.add_post(TWIRP_PREFIX + "{method}", self.twirp)
        app.router.add_post("/relay/link", self.relay_link)

    async def start(self) -> None:
        self._capacity = await self.context.measured_capacity(MODEL, forwarding_cost)
        self._janitor = asyncio.ensure_future(self._janitor_loop())

    async def drain(self) -> None:
        self.draining = True

    async def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
        for room in list(self.rooms.values()):
            for p in list(room.participants.values()):
                await p.close(models.DisconnectReason.SERVER_SHUTDOWN)
            await self._finish(room)
        self.revoked.close()

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for room in list(self.rooms.values()):
                empty = room.empty_for()
                if empty is not None and empty >= self.settings.empty_timeout:
                    await self._finish(room)
            self.revoked.prune()

    async def _finish(self, room: Room) -> None:
        if self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            await room.finish()

    # ------------------------------------------------------------ webhooks

    def _emit(self, event: str, body: dict[str, Any], issuer: str | None = None) -> None:
        # a unique id per event (LiveKit's WebhookEvent.id): the gateway applies each one once
        body = {**body, "id": f"EV_{uuid.uuid4().hex}", "createdAt": int(time.time())}
        self.events.append(body)
        del self.events[:-200]
        if self.settings.webhooks:
            self.context.outbox.enqueue(WEBHOOK_PATH, body, issuer=issuer)

    # ------------------------------------------------------------ authorisation

    async def authorise(
        self, token: str | None, room_hint: str | None = None, resuming: str | None = None
    ) -> Claims:
        """The claims of a token that may join now, or the ``Refusal`` a client is told. A
        participant resuming (``resuming``: its sid) is in the room already, so the room and
        node limits, and draining, do not apply to it."""
        if not token:
            raise Refusal(
                401,
                "no_token",
                "no token: pass Authorization: Bearer <token> or ?access_token=<token>",
            )
        try:
            claims = await self.context.verify(token)
        except TokenError as exc:
            raise Refusal(401, exc.code, str(exc)) from None
        if claims.session_id in self.revoked:
            raise Refusal(
                401,
                "session_ended",
                f"session {claims.session_id} has ended (settled "
                "by the gateway): ask the gateway for a new token",
            )
        grant = claims.grant
        room = grant.get("room")
        if not grant.get("roomJoin") or not room:
            raise Refusal(403, "no_room_join", "the token does not grant roomJoin to a room")
        if room_hint and room_hint != room:
            raise Refusal(403, "wrong_room", f"the token is for room {room!r}, not {room_hint!r}")
        if resuming and self.resumable(claims, resuming) is not None:
            return claims
        if self.draining:
            raise Refusal(503, "draining", "this node is draining; ask the gateway for another")
        existing = self.rooms.get(room)
        limit = self.settings.max_participants
        if limit and existing is not None and len(existing.visible()) >= limit:
            raise Refusal(403, "room_full", f"room {room!r} is full ({limit} participants)")
        if self.load() >= self.capacity:
            raise Refusal(503, "no_capacity", "this node is at capacity")
        return claims

    # ------------------------------------------------------------ routes

    async def not_v1(self, request: web.Request) -> web.Response:
        """Signal v1 (one peer connection) is not served: the v0 path (/rtc, two peer
        connections) is. A client that tried /rtc/v1 asks /rtc/v1/validate why it failed, and a
        404 whose body does not say "requested room does not exist" makes it retry on /rtc. A
        browser page reads that answer only if it is open to any origin (CORS)."""
        return web.Response(
            status=404, text="signal v1 is not served here; use /rtc", headers=CROSS_ORIGIN
        )

    async def revoke(self, request: web.Request) -> web.Response:
        """The gateway's list of settled sessions: their tokens are refused from now on and their
        live participants are disconnected (LiveKit ``leave``). Signed by a trusted issuer key
        over the exact body (``registry.tokens.sign_body``)."""

        def refuse(status: int, code: str, message: str) -> web.Response:
            log.info("refused a revoke: %s: %s", code, message)
            return web.json_response({"error": code, "message": message}, status=status)

        if (request.content_length or 0) > MAX_REVOKE_BODY:
            return refuse(413, "too_large", f"a revoke body is at most {MAX_REVOKE_BODY} bytes")
        body = await request.content.read(MAX_REVOKE_BODY + 1)
        if len(body) > MAX_REVOKE_BODY:
            return refuse(413, "too_large", f"a revoke body is at most {MAX_REVOKE_BODY} bytes")
        try:
            signer = verify_body(bearer(request) or "", body)
        except TokenError as exc:
            return refuse(401, exc.code, str(exc))
        if (
            signer not in await self.context.verifier.trusted_issuers()
            and signer not in await self.context.verifier.trusted_issuers(force=True)
        ):
            return refuse(
                403, "untrusted_issuer", f"{signer} is not a gateway key listed on the registry"
            )
        try:
            ids = session_ids(jsonsafe.loads(body))
        except (BadRevocation, ValueError) as exc:
            return refuse(400, "bad_request", str(exc))
        self.revoked.revoke(ids)
        wanted = set(ids)
        for room in list(self.rooms.values()):
            for p in list(room.participants.values()):
                if not p.remote and p.session_id in wanted:
                    log.info(
                        "session %s of %s in %s revoked; disconnecting",
                        p.session_id,
                        p.identity,
                        room.name,
                    )
                    await p.close(models.DisconnectReason.PARTICIPANT_REMOVED)
        return web.json_response({"revoked": len(ids)})

    async def validate(self, request: web.Request) -> web.Response:
        """Why a join would fail (or ``success``); readable by a page of any origin, as the
        browser client asks it after a failed WebSocket to tell the user the reason."""
        try:
            await self.authorise(bearer(request), request.query.get("room"))
        except Refusal as exc:
            return web.Response(status=exc.status, text=f"{exc.code}: {exc}", headers=CROSS_ORIGIN)
        return web.Response(text="success", headers=CROSS_ORIGIN)

    def resumable(self, claims: Claims, sid: str) -> Participant | None:
        """The participant ``sid`` in the token's room, if this token may resume it: the same
        identity and session, and not gone."""
        room = self.rooms.get(claims.grant.get("room", ""))
        participant = room.participants.get(sid) if room is not None else None
        if (
            participant is None
            or participant.closed.is_set()
            or participant.remote
            or participant.identity != claims.identity
            or participant.session_id != claims.session_id
        ):
            return None
        return participant

    async def rtc(self, request: web.Request) -> web.StreamResponse:
        resuming = request.query.get("sid") if request.query.get("reconnect") == "1" else None
        try:
            claims = await self.authorise(bearer(request), request.query.get("room"), resuming)
        except Refusal as exc:
            log.info("refused a join: %s", exc)
            return web.Response(status=exc.status, text=f"{exc.code}: {exc}")
        ws = web.WebSocketResponse(max_msg_size=1 << 20, heartbeat=None)
        await ws.prepare(request)
        if resuming:
            participant = self.resumable(claims, resuming)
            if participant is not None:
                await participant.resume(ws)
            else:  # gone (its grace ran out), or not this token's: start over, a fresh join
                log.info(
                    "%s cannot resume %s: no such participant of this identity and session here",
                    claims.identity,
                    resuming,
                )
                leave = rtc_pb.LeaveRequest(
                    can_reconnect=True,
                    reason=models.DisconnectReason.STATE_MISMATCH,
                    action=rtc_pb.LeaveRequest.Action.RECONNECT,
                )
                await ws.send_bytes(rtc_pb.SignalResponse(leave=leave).SerializeToString())
                await ws.close()
            return ws
        room_name = claims.grant["room"]
        room = self.rooms.get(room_name)
        if room is None:
            room = self.rooms[room_name] = Room(room_name, self.settings, self._emit)
        relay = request.query.get("relay") == "1" and bool(claims.grant.get("roomAdmin"))
        participant = Participant(
            room,
            claims,
            ws,
            self.settings,
            name=str(claims.raw.get("name", "")),
            remote=relay,
            # the SDKs' RoomOptions.autoSubscribe: false = only the tracks it asks for
            auto_subscribe=relay or request.query.get("auto_subscribe", "1") != "0",
        )
        log.info("%s joins room %s as %s", claims.identity, room_name, participant.sid)
        await room.join(participant)
        await participant.run()
        return ws

    async def refresh(self, request: web.Request) -> web.Response:
        """A token the gateway re-issued on extend: same session (jti), identity and room, a later
        expiry. The live participant stays in past its first token's expiry."""
        try:
            claims = await self.authorise(bearer(request))
        except Refusal as exc:
            if exc.code not in ("draining", "no_capacity", "room_full"):
                return web.json_response(
                    {"error": exc.code, "message": str(exc)}, status=exc.status
                )
            claims = await self.context.verify(bearer(request) or "")
            if claims.session_id in self.revoked:
                return web.json_response(
                    {"error": "session_ended", "message": "this session has ended"}, status=401
                )
        room = self.rooms.get(claims.grant["room"])
        target = room.by_identity(claims.identity) if room else None
        if target is None or target.session_id != claims.session_id:
            return web.json_response(
                {"error": "not_found", "message": "no live participant of this session"}, status=404
            )
        target.expires_at = max(target.expires_at, claims.expires_at)
        return web.json_response({"identity": target.identity, "expires_at": target.expires_at})

    # ------------------------------------------------------------ relay to a peer node

    async def relay_link(self, request: web.Request) -> web.Response:
        """Join this node's room to the same room on a peer SFU node (``peer_url``). The bearer is
        a roomAdmin token for this node; ``peer_token`` a roomAdmin token for the same room routed
        to the peer (tokens name their node), which the peer verifies against the chain."""
        token = bearer(request)
        try:
            claims = await self.authorise(token)
        except Refusal as exc:
            return web.json_response({"error": exc.code, "message": str(exc)}, status=exc.status)
        if not claims.grant.get("roomAdmin"):
            return web.json_response(
                {"error": "permission_denied", "message": "linking a room needs a roomAdmin token"},
                status=403,
            )
        try:
            body = jsonsafe.loads(await request.read())
            peer_url, peer_token = body["peer_url"], body["peer_token"]
            if not isinstance(peer_url, str) or not isinstance(peer_token, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.json_response(
                {
                    "error": "bad_request",
                    "message": 'body must be {"peer_url": "ws://...", '
                    '"peer_token": "<roomAdmin token for the peer '
                    'node>"}',
                },
                status=400,
            )
        room_name = claims.grant["room"]
        room = self.rooms.get(room_name)
        if room is None:
            room = self.rooms[room_name] = Room(room_name, self.settings, self._emit)
        identity = f"relay-{str(self.context.keypair.pubkey())[:8]}"
        link = RelayParticipant(room, peer_url, peer_token, identity)
        try:
            await link.start()
        except Exception as exc:
            await link.close()
            return web.json_response(
                {"error": "peer_unreachable", "message": f"{type(exc).__name__}: {exc}"}, status=502
            )
        log.info("room %s linked to %s", room_name, peer_url)
        return web.json_response(
            {
                "room": room_name,
                "relay_sid": link.sid,
                "peer_participant_sid": link.client.join.participant.sid,
            }
        )

    # ------------------------------------------------------------ Twirp RoomService

    async def twirp(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        handler = {
            "ListRooms": (room_pb.ListRoomsRequest, self._list_rooms),
            "ListParticipants": (room_pb.ListParticipantsRequest, self._list_participants),
            "GetParticipant": (room_pb.RoomParticipantIdentity, self._get_participant),
            "RemoveParticipant": (room_pb.RoomParticipantIdentity, self._remove_participant),
            "MutePublishedTrack": (room_pb.MuteRoomTrackRequest, self._mute_track),
            "UpdateParticipant": (room_pb.UpdateParticipantRequest, self._update_participant),
            "SendData": (room_pb.SendDataRequest, self._send_data),
            "DeleteRoom": (room_pb.DeleteRoomRequest, self._delete_room),
        }.get(method)
        if handler is None:
            return _twirp_error(404, "bad_route", f"no RoomService method {method}")
        message_type, fn = handler
        as_json = not request.content_type.startswith("application/protobuf")
        body = await request.read()
        req = message_type()
        try:
            if as_json:
                json_format.ParseDict(
                    jsonsafe.loads(body or b"{}"), req, ignore_unknown_fields=True
                )
            else:
                req.ParseFromString(body)
        except Exception as exc:
            return _twirp_error(400, "malformed", f"cannot decode {message_type.__name__}: {exc}")
        token = bearer(request)
        if not token:
            return _twirp_error(401, "unauthenticated", "no token")
        try:
            claims = await self.context.verify(token)
        except TokenError as exc:
            return _twirp_error(401, "unauthenticated", str(exc))
        if not claims.grant.get("roomAdmin"):
            return _twirp_error(403, "permission_denied", "the token lacks roomAdmin")
        admin_room = claims.grant.get("room")
        target = getattr(req, "room", None)
        if target and target != admin_room:
            return _twirp_error(
                403,
                "permission_denied",
                f"the token administers room {admin_room!r}, not {target!r}",
            )
        try:
            result = await fn(req, admin_room)
        except LookupError as exc:
            return _twirp_error(404, "not_found", str(exc))
        except ValueError as exc:
            return _twirp_error(400, "invalid_argument", str(exc))
        if as_json:
            return web.Response(
                body=json_format.MessageToJson(result), content_type="application/json"
            )
        return web.Response(body=result.SerializeToString(), content_type="application/protobuf")

    def _room(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            raise LookupError(f"room {name!r} is not live on this node")
        return room

    def _participant(self, room_name: str, identity: str) -> Participant:
        p = self._room(room_name).by_identity(identity)
        if p is None or p.remote:
            raise LookupError(f"no participant {identity!r} in room {room_name!r}")
        return p

    async def _list_rooms(self, req: room_pb.ListRoomsRequest, admin_room: str) -> Message:
        names = set(req.names) or {admin_room}
        return room_pb.ListRoomsResponse(
            rooms=[r.info() for n, r in self.rooms.items() if n == admin_room and n in names]
        )

    async def _list_participants(self, req: room_pb.ListParticipantsRequest, _: str) -> Message:
        return room_pb.ListParticipantsResponse(
            participants=[p.info() for p in self._room(req.room).visible()]
        )

    async def _get_participant(self, req: room_pb.RoomParticipantIdentity, _: str) -> Message:
        return self._participant(req.room, req.identity).info()

    async def _remove_participant(self, req: room_pb.RoomParticipantIdentity, _: str) -> Message:
        await self._participant(req.room, req.identity).close(
            models.DisconnectReason.PARTICIPANT_REMOVED
        )
        return room_pb.RemoveParticipantResponse()

    async def _mute_track(self, req: room_pb.MuteRoomTrackRequest, _: str) -> Message:
        from livekit.protocol import rtc

        p = self._participant(req.room, req.identity)
        track = p.tracks.get(req.track_sid)
        if track is None:
            raise LookupError(f"no track {req.track_sid!r} of {req.identity!r}")
        p.room.set_muted(p, track.sid, req.muted)
        p.send(rtc.SignalResponse(mute=rtc.MuteTrackRequest(sid=track.sid, muted=req.muted)))
        return room_pb.MuteRoomTrackResponse(track=track.info())

    async def _update_participant(self, req: room_pb.UpdateParticipantRequest, _: str) -> Message:
        """Metadata, name, attributes and permissions of a live participant; everyone in the room
        (the participant too) gets the new ParticipantInfo."""
        p = self._participant(req.room, req.identity)
        attributes = dict(p.attributes)
        for key, value in req.attributes.items():
            if value:
                attributes[key] = value
            else:
                attributes.pop(key, None)  # LiveKit: an empty value deletes the attribute
        # checked whole before anything changes: a refused update leaves the participant as it was
        for field, value, limit in (("metadata", req.metadata, 64 * 1024), ("name", req.name, 256)):
            if len(value.encode()) > limit:
                raise ValueError(f"{field} is {len(value.encode())} bytes; at most {limit}")
        if len(attributes) > 64:
            raise ValueError(f"{len(attributes)} attributes; at most 64")
        if any(len(k.encode()) + len(v.encode()) > 4096 for k, v in attributes.items()):
            raise ValueError("an attribute's key and value exceed 4096 bytes")
        if req.metadata:
            p.metadata = req.metadata
        if req.name:
            p.name = req.name
        p.attributes = attributes
        if req.HasField("permission"):
            p.set_permission(req.permission)
        p.room.broadcast_update([p])
        return p.info()

    async def _send_data(self, req: room_pb.SendDataRequest, _: str) -> Message:
        room = self._room(req.room)
        packet = models.DataPacket(
            kind=req.kind,
            user=models.UserPacket(
                payload=req.data,
                topic=req.topic if req.HasField("topic") else None,
                destination_identities=list(req.destination_identities),
            ),
        )
        packet.destination_identities.extend(req.destination_identities)
        label = "_lossy" if req.kind == models.DataPacket.Kind.LOSSY else "_reliable"
        room.send_data(packet, label, set(req.destination_identities))
        return room_pb.SendDataResponse()

    async def _delete_room(self, req: room_pb.DeleteRoomRequest, _: str) -> Message:
        await self._finish(self._room(req.room))
        return room_pb.DeleteRoomResponse()


def _twirp_error(status: int, code: str, msg: str) -> web.Response:
    return web.json_response({"code": code, "msg": msg}, status=status)


def create_role(context: RoleContext) -> SfuRole:
    """The plug-in entry point the node agent loads."""
    return SfuRole(context)
