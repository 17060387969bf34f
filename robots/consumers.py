"""The robot websocket (/ws/robots/): the control plane of one robot, authenticated by its token (docs/protocol.md).

Each frame is decoded by robots/protocol.py (size first, then JSON, version, type, fields) and handed to one
service. A bad frame gets a typed ``error`` back and the socket stays open, up to SOP_MAX_BAD_MESSAGES a minute.
"""

from __future__ import annotations

import collections
import json
import logging
import time

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from . import protocol, services
from .auth import authenticate_token, hash_token, token_from_scope
from .exceptions import SopError
from .protocol import CloseCode, ErrorCode, ProtocolError

log = logging.getLogger(__name__)

BAD_MESSAGE_WINDOW_S = 60.0


class RobotConsumer(AsyncWebsocketConsumer):
    robot = None
    token_hash = ""
    connected_at = None
    closing = False

    async def connect(self):
        raw = token_from_scope(self.scope)
        robot = await database_sync_to_async(authenticate_token)(raw)
        if robot is None:
            reason = "unknown or revoked token" if raw else "no token"
            log.warning("robot socket from %s refused: %s", _client(self.scope), reason)
            await self.close()  # before accept: the handshake is answered with HTTP 403
            return
        self.bad_messages: collections.deque[float] = collections.deque()
        # Join the groups before robot_connected re-checks the token: a revocation committed after that check
        # reaches this socket as an event, one committed before it makes the check fail. Nothing slips between.
        await self.channel_layer.group_add(robot.group_name, self.channel_name)
        await self.channel_layer.group_add(services.FLEET_GROUP, self.channel_name)
        self.robot, self.token_hash = robot, hash_token(raw)
        self.connected_at = await database_sync_to_async(services.robot_connected)(robot, self.token_hash)
        if self.connected_at is None:
            log.warning("robot %s refused: token revoked during the handshake", robot.name)
            await self._leave_groups()
            self.robot = None
            await self.close()
            return
        await self.accept()
        log.info("robot %s connected from %s", robot.name, _client(self.scope))

    async def disconnect(self, code):
        if self.robot is None:
            return
        await self._leave_groups()
        await database_sync_to_async(services.robot_disconnected)(self.robot, self.connected_at)
        log.info("robot %s disconnected (code %s)", self.robot.name, code)

    async def receive(self, text_data=None, bytes_data=None):
        if self.closing:
            return
        if text_data is None:
            return await self._reject(ProtocolError(ErrorCode.MALFORMED, "binary frames are not part of the protocol"))
        try:
            msg = protocol.decode(text_data)
        except ProtocolError as exc:
            return await self._reject(exc)
        handler = self.HANDLERS.get(type(msg))
        if handler is None:
            kind = msg.TYPE.value
            refused = ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{kind!r} is sent by servers, not robots", kind)
            return await self._reject(refused)
        try:
            await handler(self, msg)
        except SopError as exc:  # valid message, refused by a service (another robot's episode, unknown task)
            await self._reject(ProtocolError(exc.protocol_code, str(exc.detail), msg.TYPE.value))

    # ------------------------------------------------------------ robot -> server

    async def on_hello(self, msg: protocol.Hello):
        for reply in await database_sync_to_async(services.robot_hello)(self.robot, msg):
            await self._send(reply)

    async def on_status(self, msg: protocol.Status):
        if not await database_sync_to_async(services.robot_status)(self.robot, msg, self.token_hash):
            await self._close_revoked()

    async def on_episode_started(self, msg: protocol.EpisodeStarted):
        await database_sync_to_async(services.episode_started)(self.robot, msg)

    async def on_episode_ended(self, msg: protocol.EpisodeEnded):
        await self._send(await database_sync_to_async(services.episode_ended)(self.robot, msg))

    HANDLERS = {
        protocol.Hello: on_hello,
        protocol.Status: on_status,
        protocol.EpisodeStarted: on_episode_started,
        protocol.EpisodeEnded: on_episode_ended,
    }

    # ------------------------------------------------------------ channel-layer events (services.py sends them)

    async def robot_revoked(self, event):
        await self._close_revoked()

    async def task_assigned(self, event):
        await self._relay(event)

    async def policy_updated(self, event):
        await self._relay(event)

    # ------------------------------------------------------------ helpers

    async def _relay(self, event):
        if not self.closing:
            await self.send(text_data=json.dumps(event["message"], separators=(",", ":")))

    async def _send(self, message: protocol.Message):
        await self.send(text_data=protocol.encode(message))

    async def _reject(self, exc: ProtocolError):
        """Answer a bad frame with a typed error; past the per-minute budget, close the socket."""
        name = self.robot.name if self.robot else "?"
        code = ErrorCode(exc.code).value
        log.warning("robot %s: bad %s message: %s (%s)", name, exc.ref_type or "?", code, exc.message)
        now = time.monotonic()
        self.bad_messages.append(now)
        while self.bad_messages and self.bad_messages[0] < now - BAD_MESSAGE_WINDOW_S:
            self.bad_messages.popleft()
        if len(self.bad_messages) > settings.SOP_MAX_BAD_MESSAGES:
            log.warning("robot %s: too many bad messages, closing its socket", name)
            limit = settings.SOP_MAX_BAD_MESSAGES
            await self._send(protocol.error(ErrorCode.TOO_MANY_ERRORS, f"more than {limit} bad messages in a minute"))
            self.closing = True
            await self.close(code=int(CloseCode.TOO_MANY_ERRORS))  # autobahn (daphne) wants a plain int
            return
        await self._send(protocol.error(exc.code, exc.message, exc.ref_type))

    async def _close_revoked(self):
        if self.closing:
            return
        self.closing = True
        log.warning("robot %s: token revoked, closing its socket", self.robot.name if self.robot else "?")
        await self._send(protocol.error(ErrorCode.REVOKED, "this robot's token was revoked"))
        await self.close(code=int(CloseCode.REVOKED))

    async def _leave_groups(self):
        await self.channel_layer.group_discard(self.robot.group_name, self.channel_name)
        await self.channel_layer.group_discard(services.FLEET_GROUP, self.channel_name)


def _client(scope) -> str:
    client = scope.get("client") or ("?", 0)
    return f"{client[0]}:{client[1]}"
