"""The operator console socket (/ws/console/, docs/console.md): browsers, authenticated by their session cookie and
origin-checked (sop_web/asgi.py wraps this consumer in AllowedHostsOriginValidator + AuthMiddlewareStack).

Every frame is a JSON object with ``type``, checked here field by field; a bad or refused frame gets
``{"type": "error", "code", "detail", "ref"}`` (``ref``: the type of the frame that caused it) and the socket stays
open, up to SOP_MAX_BAD_MESSAGES malformed or invalid frames a minute. State changes go through robots/control.py;
WebRTC signalling and teleop commands are relayed to the robot's channel-layer group, and a robot's answer comes back
to this socket only (robots/consumers.py routes it by session).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import time
from typing import Any, Optional

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from . import control, events, protocol, roles, selectors
from .exceptions import SopError
from .models import Robot
from .protocol import CloseCode

log = logging.getLogger(__name__)

BAD_MESSAGE_WINDOW_S = 60.0
MAX_FRAME_BYTES = protocol.MAX_MESSAGE_BYTES  # 64 KB; an offer's SDP (up to protocol.MAX_SDP) fits
MAX_SESSIONS = 32  # open WebRTC sessions per console socket
ERROR_CODES = ("malformed", "unknown_robot", "forbidden", "held", "not_holder", "robot_offline", "invalid")
COUNTED_ERRORS = ("malformed", "invalid", "unknown_robot")  # a flood of these closes the socket; races do not count


class ConsoleError(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


class ConsoleConsumer(AsyncWebsocketConsumer):
    user = None
    role: Optional[str] = None
    closing = False

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_active:
            log.warning("console socket from %s refused: not logged in", _client(self.scope))
            await self.close()  # before accept: the handshake is answered with HTTP 403
            return
        self.user = user
        self.role = await database_sync_to_async(roles.role_of)(user)
        self.bad_frames: collections.deque[float] = collections.deque()
        self.leases: dict[str, tuple[int, str]] = {}  # robot name -> (lease id, robot group): leases held here
        self.sessions: dict[str, tuple[str, str]] = {}  # WebRTC session -> (robot name, robot group)
        # Join before reading the fleet: a change made meanwhile arrives as an event (maybe twice, never lost).
        await self.channel_layer.group_add(events.CONSOLE_GROUP, self.channel_name)
        await self.accept()
        await self.send_json(await database_sync_to_async(selectors.console_hello)(user))
        log.info("console %s (%s) connected from %s", user.get_username(), self.role, _client(self.scope))

    async def disconnect(self, code):
        if self.user is None:
            return
        await self.channel_layer.group_discard(events.CONSOLE_GROUP, self.channel_name)
        for session, (_, group) in list(self.sessions.items()):  # free the robots' viewer slots at once
            await self._to_robot(group, protocol.WebrtcClose(session=session))
        self.sessions.clear()
        ended = await database_sync_to_async(control.end_leases_for_channel)(self.channel_name)
        log.info("console %s disconnected (code %s)%s", self.user.get_username(), code,
                 f", {ended} lease(s) ended" if ended else "")

    async def receive(self, text_data=None, bytes_data=None):
        if self.closing:
            return
        kind = None
        try:
            if text_data is None:
                raise ConsoleError("malformed", "binary frames are not part of the console protocol")
            if len(text_data) > MAX_FRAME_BYTES:
                raise ConsoleError("invalid", f"frame of {len(text_data)} characters exceeds {MAX_FRAME_BYTES}")
            try:
                body = json.loads(text_data, parse_constant=_reject_constant)
            except ValueError as exc:
                raise ConsoleError("malformed", f"not valid JSON: {exc}") from None
            if not isinstance(body, dict) or not isinstance(body.get("type"), str):
                raise ConsoleError("malformed", "a frame must be a JSON object with a string 'type'")
            kind = body["type"][:50]
            handler = self.HANDLERS.get(kind)
            if handler is None:
                raise ConsoleError("invalid", f"unknown frame type {kind!r}")
            await handler(self, body)
        except ConsoleError as exc:
            await self._error(exc.code, exc.detail, kind)
        except SopError as exc:  # refused by a service: control.py's errors carry the console code
            code = exc.default_code if exc.default_code in ERROR_CODES else "invalid"
            await self._error(code, str(exc.detail), kind)

    # ------------------------------------------------------------ browser -> server

    async def on_ping(self, body):
        t = _number(body, "t", required=False)
        await self.send_json({"type": "pong", "t": t, "server_t": int(time.time() * 1000)})

    async def on_webrtc_offer(self, body):
        name, session = _robot_name(body), _session(body)
        sdp = _string(body, "sdp", max_len=protocol.MAX_SDP)
        if session not in self.sessions and len(self.sessions) >= MAX_SESSIONS:
            raise ConsoleError("invalid", f"at most {MAX_SESSIONS} video sessions per console")
        robot = await database_sync_to_async(control.online_robot)(name)  # any role may watch
        offer = _message(protocol.WebrtcOffer, session=session, sdp=sdp, user=self.user.get_username(),
                         ice_servers=list(settings.SOP_ICE_SERVERS))
        self.sessions[session] = (robot.name, robot.group_name)
        await self._to_robot(robot.group_name, offer, console=self.channel_name)

    async def on_webrtc_close(self, body):
        name, session = _robot_name(body), _session(body)
        opened = self.sessions.get(session)
        if opened is None or opened[0] != name:
            raise ConsoleError("invalid", f"no video session {session} with robot {name} on this socket")
        del self.sessions[session]
        await self._to_robot(opened[1], protocol.WebrtcClose(session=session))

    async def on_takeover(self, body):
        name = _robot_name(body)
        reason = _string(body, "reason", required=False, max_len=control.MAX_REASON) or ""
        force = _bool(body, "force", required=False) or False
        lease = await self._db(control.acquire_lease, name, self.user, reason, self.channel_name, force)
        self.leases[name] = (lease.pk, Robot(pk=lease.robot_id).group_name)
        # The `lease` event itself reaches every console (this one included) through the console group.

    async def on_keepalive(self, body):
        name = _robot_name(body)
        try:
            lease = await self._db(control.renew_lease, name, self.user, self.channel_name)
        except SopError:
            self.leases.pop(name, None)
            raise
        self.leases[name] = (lease.pk, Robot(pk=lease.robot_id).group_name)

    async def on_release(self, body):
        name = _robot_name(body)
        self.leases.pop(name, None)
        await self._db(control.release_lease, name, self.user, self.channel_name)

    async def on_teleop(self, body):
        """The websocket fallback of the teleop data channel: only this socket's own lease, relayed with its id."""
        name = _robot_name(body)
        if self.role not in (roles.OPERATOR, roles.ADMIN):
            raise ConsoleError("forbidden", "operators and admins only")
        held = self.leases.get(name)
        if held is None:
            raise ConsoleError("not_holder", f"you do not hold robot {name}")
        action = body.get("action")
        if action is not None and not (isinstance(action, list) and len(action) == 3
                                       and all(_is_number(a) for a in action)):
            raise ConsoleError("invalid", "action must be a list of 3 numbers or null")
        command = _message(protocol.ControlCommand, lease=held[0], seq=_int(body, "seq"), t=_number(body, "t"),
                           action=action, grip=_number(body, "grip", required=False))
        await self._to_robot(held[1], command)

    async def on_estop(self, body):
        name = _robot_name(body)
        engaged = _bool(body, "engaged")
        await self._db(control.set_estop, name, engaged, self.user)

    async def on_label(self, body):
        name = _robot_name(body)
        outcome = _string(body, "outcome")
        episode_id = _string(body, "episode_id", required=False)
        await self._db(control.label_episode, name, self.user, outcome, episode_id or None)

    HANDLERS = {
        "ping": on_ping,
        "webrtc.offer": on_webrtc_offer,
        "webrtc.close": on_webrtc_close,
        "takeover": on_takeover,
        "keepalive": on_keepalive,
        "release": on_release,
        "teleop": on_teleop,
        "estop": on_estop,
        "label": on_label,
    }

    # ------------------------------------------------------------ channel-layer events -> browser

    async def robot_state(self, event):
        state = event["robot"]
        if not state.get("connected"):  # its video sessions died with its socket
            for session in [s for s, (name, _) in self.sessions.items() if name == state.get("name")]:
                del self.sessions[session]
        await self.send_json({"type": "robot.state", "robot": event["robot"]})

    async def robot_removed(self, event):
        await self.send_json({"type": "robot.removed", "robot": event["robot"]})

    async def lease(self, event):
        held = self.leases.get(event["robot"])
        if not event["active"] and held is not None and held[0] == event["lease"]:
            self.leases.pop(event["robot"], None)  # ended elsewhere (timeout, forced, robot offline)
        fields = ("robot", "lease", "operator", "active", "reason")
        await self.send_json({"type": "lease", **{k: event[k] for k in fields}})

    async def webrtc_answer(self, event):
        opened = self.sessions.get(event["session"])
        if opened is None or opened[0] != event["robot"]:
            return  # closed meanwhile, or not ours
        if event.get("error"):
            self.sessions.pop(event["session"], None)
        await self.send_json({"type": "webrtc.answer", "robot": event["robot"], "session": event["session"],
                              "sdp": event.get("sdp", ""), "error": event.get("error", "")})

    # ------------------------------------------------------------ helpers

    async def _db(self, fn, name: str, *args):
        """Resolve the robot by name and call a control service, in one worker thread."""

        def call():
            return fn(control.get_robot(name), *args)

        return await database_sync_to_async(call)()

    async def _to_robot(self, group: str, message: protocol.Message, **extra):
        await self.channel_layer.group_send(group, {"type": message.TYPE.value, "message": message.to_dict(), **extra})

    async def send_json(self, content: dict[str, Any]):
        await self.send(text_data=json.dumps(content, separators=(",", ":")))

    async def _error(self, code: str, detail: str, ref: Optional[str]):
        name = self.user.get_username() if self.user else "?"
        log.info("console %s: %s refused: %s (%s)", name, ref or "frame", code, detail)
        if code in COUNTED_ERRORS:
            now = time.monotonic()
            self.bad_frames.append(now)
            while self.bad_frames and self.bad_frames[0] < now - BAD_MESSAGE_WINDOW_S:
                self.bad_frames.popleft()
            if len(self.bad_frames) > settings.SOP_MAX_BAD_MESSAGES:
                log.warning("console %s: too many bad frames, closing its socket", name)
                await self.send_json({"type": "error", "code": "too_many_errors",
                                      "detail": f"more than {settings.SOP_MAX_BAD_MESSAGES} bad frames in a minute",
                                      "ref": ref})
                self.closing = True
                await self.close(code=int(CloseCode.TOO_MANY_ERRORS))
                return
        await self.send_json({"type": "error", "code": code, "detail": detail[:protocol.MAX_STRING], "ref": ref})


# ---------------------------------------------------------------- field checks (raise ConsoleError "invalid")


def _message(cls, **fields) -> protocol.Message:
    try:
        return cls(**fields)
    except protocol.ProtocolError as exc:
        raise ConsoleError("invalid", exc.message) from None


def _missing(name: str) -> ConsoleError:
    return ConsoleError("invalid", f"{name} is required")


def _robot_name(body) -> str:
    name = body.get("robot")
    if not isinstance(name, str) or not name:
        raise ConsoleError("invalid", "robot must be a robot's name")
    if len(name) > 100:
        raise ConsoleError("unknown_robot", "no such robot")
    return name


def _session(body) -> str:
    session = body.get("session")
    if not isinstance(session, str) or not protocol._UUID.match(session):
        raise ConsoleError("invalid", "session must be a lowercase UUID")
    return session


def _string(body, name: str, required: bool = True, max_len: int = protocol.MAX_STRING) -> Optional[str]:
    value = body.get(name)
    if value is None:
        if required:
            raise _missing(name)
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise ConsoleError("invalid", f"{name} must be a string of at most {max_len} characters")
    return value


def _bool(body, name: str, required: bool = True) -> Optional[bool]:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, bool):
        raise ConsoleError("invalid", f"{name} must be true or false")
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(body, name: str, required: bool = True) -> Optional[float]:
    value = body.get(name)
    if value is None and not required:
        return None
    if not _is_number(value):
        raise ConsoleError("invalid", f"{name} must be a finite number")
    return value


def _int(body, name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConsoleError("invalid", f"{name} must be a non-negative integer")
    return value


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


def _client(scope) -> str:
    client = scope.get("client") or ("?", 0)
    return f"{client[0]}:{client[1]}"
