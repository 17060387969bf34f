"""The operator console socket (/ws/console/, docs/console.md): browsers, authenticated by their session cookie and
origin-checked (sop_web/asgi.py wraps this consumer in robots/origin.py's check + AuthMiddlewareStack).

Every frame is decoded by the typed layer (robots/console_protocol.py: bytes, depth, fields); a bad or refused frame
gets ``{"type": "error", "code", "detail", "ref"}`` (``ref``: the type of the frame that caused it) and the socket
stays open, up to SOP_MAX_BAD_MESSAGES malformed or invalid frames a minute. Frames are rate-limited per socket, video
offers more tightly (each one costs the robot a negotiation), so that a viewer cannot disturb a robot it only
watches. State changes go through robots/control.py; WebRTC signalling and teleop commands are re-encoded as robot
protocol messages (whose byte limit is checked before they are relayed) and sent to the robot's channel-layer group;
a robot's answer comes back to this socket only (robots/consumers.py routes it by session).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Optional

from channels.db import database_sync_to_async
from django.conf import settings

from . import console_protocol as cp
from . import control, events, helpqueue, protocol, roles, selectors
from .exceptions import SopError
from .models import Robot
from .protocol import CloseCode, ProtocolError
from .sockets import BadFrameBudget, GuardedConsumer, TokenBucket

log = logging.getLogger(__name__)

MAX_SESSIONS = 32  # open WebRTC sessions per console socket (a fleet page shows a tile per robot)
MAX_SESSIONS_PER_ROBOT = 2  # per console socket: a tab watches a robot once (plus one renegotiation in flight)
FRAME_RATE, FRAME_BURST = 100.0, 200.0  # frames per second per socket (teleop is 20 Hz)
OFFER_RATE, OFFER_BURST = 0.5, 8.0  # video offers per second per socket, after a burst that fills a fleet page
ERROR_CODES = cp.ERROR_CODES
COUNTED_ERRORS = ("malformed", "invalid", "unknown_robot")  # a flood of these closes the socket; races do not count
PRESENCE_EVERY_S = 20.0  # an operator's presence row is refreshed with a ping at most this often


class ConsoleError(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


class ConsoleConsumer(GuardedConsumer):
    user = None
    role: Optional[str] = None
    closing = False
    present_at = 0.0  # monotonic time the presence row was last refreshed (operators and admins)

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_active:
            log.warning("console socket from %s refused: not logged in", _client(self.scope))
            await self.close()  # before accept: the handshake is answered with HTTP 403
            return
        self.user = user
        self.role = await database_sync_to_async(roles.role_of)(user)
        self.budget = BadFrameBudget(settings.SOP_MAX_BAD_MESSAGES)
        self.frames = TokenBucket(FRAME_RATE, FRAME_BURST)
        self.offer_bucket = TokenBucket(OFFER_RATE, OFFER_BURST)
        self.leases: dict[str, tuple[int, str]] = {}  # robot name -> (lease id, robot group): leases held here
        self.sessions: dict[str, tuple[str, str]] = {}  # WebRTC session -> (robot name, robot group)
        self.state_as_of: dict[str, float] = {}  # robot name -> as_of of the newest state sent to the browser
        # Join before reading the fleet: a change made meanwhile arrives as an event (maybe twice, never lost).
        await self.channel_layer.group_add(events.CONSOLE_GROUP, self.channel_name)
        await self.channel_layer.group_add(events.user_group(user.pk), self.channel_name)
        await self.accept()
        hello = await database_sync_to_async(selectors.console_hello)(user)
        self.state_as_of.update({r["name"]: r["as_of"] for r in hello["robots"]})
        await self._send_hello(hello)
        if self.role in (roles.OPERATOR, roles.ADMIN):  # can be assigned help requests from now on
            await database_sync_to_async(helpqueue.operator_online)(user, self.channel_name)
            self.present_at = time.monotonic()
        log.info("console %s (%s) connected from %s", user.get_username(), self.role, _client(self.scope))

    async def disconnect(self, code):
        if self.user is None:
            return
        # Each step on its own: a channel layer that is down must not keep the leases from ending.
        for step in (self._leave_groups, self._close_sessions):
            try:
                await step()
            except Exception:
                log.exception("console %s: disconnect step %s failed", self.user.get_username(), step.__name__)
        ended = await database_sync_to_async(control.end_leases_for_channel)(self.channel_name)
        try:
            await database_sync_to_async(helpqueue.operator_offline)(self.channel_name)
        except Exception:
            log.exception("console %s: presence not removed (it expires after SOP_PRESENCE_S)", self.user.get_username())
        log.info("console %s disconnected (code %s)%s", self.user.get_username(), code,
                 f", {ended} lease(s) ended" if ended else "")

    async def receive(self, text_data=None, bytes_data=None):
        if self.closing:
            return
        message = None
        try:
            if text_data is None:
                raise ConsoleError("malformed", "binary frames are not part of the console protocol")
            try:
                message = cp.CONSOLE.decode(text_data, accept=cp.BROWSER_MESSAGES)
            except ProtocolError as exc:
                raise _console_error(exc, text_data) from None
            if not self.frames.take():
                raise ConsoleError("rate_limited", f"more than {FRAME_RATE:g} frames a second")
            await self.HANDLERS[type(message)](self, message)
        except ConsoleError as exc:
            await self._error(exc.code, exc.detail, message.type_name() if message else _ref(exc))
        except SopError as exc:  # refused by a service: control.py's errors carry the console code
            code = exc.default_code if exc.default_code in ERROR_CODES else "invalid"
            await self._error(code, str(exc.detail), message.type_name() if message else None)

    async def server_error(self, kind: str) -> None:
        if kind == "websocket.receive":
            await self._error("server_error", "the server failed to handle this frame; try again", None)

    # ------------------------------------------------------------ browser -> server

    async def on_ping(self, msg: cp.Ping):
        await self.send_json({"type": "pong", "t": msg.t, "server_t": int(time.time() * 1000)})
        if self.present_at and time.monotonic() - self.present_at >= PRESENCE_EVERY_S:
            self.present_at = time.monotonic()
            await database_sync_to_async(helpqueue.operator_seen)(self.channel_name)

    async def on_webrtc_offer(self, msg: cp.OfferVideo):
        if msg.session not in self.sessions:
            if len(self.sessions) >= MAX_SESSIONS:
                raise ConsoleError("invalid", f"at most {MAX_SESSIONS} video sessions per console")
            if sum(1 for name, _ in self.sessions.values() if name == msg.robot) >= MAX_SESSIONS_PER_ROBOT:
                raise ConsoleError("invalid", f"at most {MAX_SESSIONS_PER_ROBOT} video sessions per robot and console;"
                                              " close one first")
        if not self.offer_bucket.take():
            raise ConsoleError("rate_limited", "too many video offers; wait a moment")

        def lookup():
            return control.online_robot(msg.robot), roles.role_of(self.user) or roles.VIEWER

        robot, role = await database_sync_to_async(lookup)()  # any role may watch
        offer = _relayable(protocol.WebrtcOffer, session=msg.session, sdp=msg.sdp, user=self.user.get_username(),
                           role=role, ice_servers=list(settings.SOP_ICE_SERVERS))
        self.sessions[msg.session] = (robot.name, robot.group_name)
        await self._to_robot(robot.group_name, offer, console=self.channel_name)

    async def on_webrtc_close(self, msg: cp.CloseVideo):
        opened = self.sessions.get(msg.session)
        if opened is None or opened[0] != msg.robot:
            raise ConsoleError("invalid", f"no video session {msg.session} with robot {msg.robot} on this socket")
        del self.sessions[msg.session]
        await self._to_robot(opened[1], protocol.WebrtcClose(session=msg.session))

    async def on_takeover(self, msg: cp.Takeover):
        lease = await self._db(control.acquire_lease, msg.robot, self.user, msg.reason, self.channel_name, msg.force)
        self.leases[msg.robot] = (lease.pk, Robot(pk=lease.robot_id).group_name)
        # The `lease` event itself reaches every console (this one included) through the console group.

    async def on_keepalive(self, msg: cp.Keepalive):
        try:
            lease = await self._db(control.renew_lease, msg.robot, self.user, self.channel_name)
        except SopError:
            self.leases.pop(msg.robot, None)
            raise
        self.leases[msg.robot] = (lease.pk, Robot(pk=lease.robot_id).group_name)

    async def on_release(self, msg: cp.Release):
        self.leases.pop(msg.robot, None)
        await self._db(control.release_lease, msg.robot, self.user, self.channel_name)

    async def on_teleop(self, msg: cp.Teleop):
        """The websocket fallback of the teleop data channel: only this socket's own lease, relayed with its id."""
        if self.role not in (roles.OPERATOR, roles.ADMIN):
            raise ConsoleError("forbidden", "operators and admins only")
        held = self.leases.get(msg.robot)
        if held is None:
            raise ConsoleError("not_holder", f"you do not hold robot {msg.robot}")
        command = _relayable(protocol.ControlCommand, lease=held[0], seq=msg.seq, t=msg.t, action=msg.action,
                             grip=msg.grip)
        await self._to_robot(held[1], command)

    async def on_estop(self, msg: cp.Estop):
        await self._db(control.set_estop, msg.robot, msg.engaged, self.user)

    async def on_label(self, msg: cp.Label):
        await self._db(control.label_episode, msg.robot, self.user, msg.outcome, msg.episode_id)

    async def on_help_claim(self, msg: cp.HelpClaim):
        def claim():
            request = control.claim_help(msg.id, self.user, self.channel_name)
            return request.lease_id, Robot.objects.get(pk=request.robot_id)

        lease_id, robot = await database_sync_to_async(claim)()
        self.leases[robot.name] = (lease_id, robot.group_name)  # this socket holds it, as after a takeover

    async def on_help_resolve(self, msg: cp.HelpResolve):
        def resolve():
            request = control.resolve_help(msg.id, self.user, self.channel_name, msg.outcome, msg.note)
            return Robot.objects.filter(pk=request.robot_id).values_list("name", flat=True).first()

        self.leases.pop(await database_sync_to_async(resolve)(), None)

    async def on_help_dismiss(self, msg: cp.HelpDismiss):
        await database_sync_to_async(control.dismiss_help)(msg.id, self.user, self.channel_name, msg.note)

    async def on_help_capacity(self, msg: cp.HelpCapacity):
        if self.role not in (roles.OPERATOR, roles.ADMIN):
            raise ConsoleError("forbidden", "operators and admins only")
        await database_sync_to_async(helpqueue.set_capacity)(self.user, self.channel_name, msg.capacity)

    HANDLERS = {
        cp.Ping: on_ping,
        cp.OfferVideo: on_webrtc_offer,
        cp.CloseVideo: on_webrtc_close,
        cp.Takeover: on_takeover,
        cp.Keepalive: on_keepalive,
        cp.Release: on_release,
        cp.Teleop: on_teleop,
        cp.Estop: on_estop,
        cp.Label: on_label,
        cp.HelpClaim: on_help_claim,
        cp.HelpResolve: on_help_resolve,
        cp.HelpDismiss: on_help_dismiss,
        cp.HelpCapacity: on_help_capacity,
    }

    # ------------------------------------------------------------ channel-layer events -> browser

    async def robot_state(self, event):
        state = event["robot"]
        # States come from several readers (each server process's coalesced heartbeats, control changes): one read
        # before a change may arrive after the change's own. The newest read wins; an older one is dropped.
        name, as_of = state.get("name"), state.get("as_of", 0.0)
        if as_of < self.state_as_of.get(name, 0.0):
            return
        self.state_as_of[name] = as_of
        if not state.get("connected"):  # its video sessions died with its socket
            for session in [s for s, (name, _) in self.sessions.items() if name == state.get("name")]:
                del self.sessions[session]
        await self.send_json({"type": "robot.state", "robot": event["robot"]})

    async def robot_states(self, event):
        """A coalesced batch from a server process's robot sockets (robots/livestate.py): one frame per robot."""
        for state in event["robots"]:
            await self.robot_state({"robot": state})

    async def robot_live(self, event):
        """Volatile values of several robots (robots/livestate.py), one frame; a value older than the robot's last
        state is dropped (that state already carries newer ones)."""
        newest = self.state_as_of
        fresh = [live for live in event["robots"] if live.get("as_of", 0.0) >= newest.get(live.get("name"), 0.0)]
        if fresh:
            await self.send_json({"type": "robot.live", "robots": fresh})

    async def help_requests(self, event):
        """Help requests that changed (robots/helpqueue.py), as they are after the change committed."""
        await self.send_json({"type": "help", "requests": event["requests"]})

    async def robot_removed(self, event):
        await self.send_json({"type": "robot.removed", "robot": event["robot"]})

    async def lease(self, event):
        held = self.leases.get(event["robot"])
        if not event["active"] and held is not None and held[0] == event["lease"]:
            self.leases.pop(event["robot"], None)  # ended elsewhere (timeout, forced, robot offline, role changed)
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

    async def role_changed(self, event):
        """The user's account changed (robots/signals.py). If their role did: the video sessions were negotiated with
        the old role (the robot trusts it for data channel e-stops), so they close, and the page reloads and offers
        again; a deactivated user's socket closes."""
        role = await database_sync_to_async(roles.role_of)(await database_sync_to_async(_fresh)(self.user))
        if role == self.role:
            return
        log.warning("console %s: role %s -> %s", self.user.get_username(), self.role, role)
        self.role = role
        await self._close_sessions()
        if role not in (roles.OPERATOR, roles.ADMIN):
            self.leases.clear()  # signals.py ended them on the server; their lease events may still be on the way
            self.present_at = 0.0
            await database_sync_to_async(helpqueue.operator_offline)(self.channel_name)
        if role is None:
            self.closing = True
            await self.close(code=4003)
            return
        if role in (roles.OPERATOR, roles.ADMIN) and not self.present_at:
            await database_sync_to_async(helpqueue.operator_online)(self.user, self.channel_name)
            self.present_at = time.monotonic()
        await self.send_json({"type": "role", "role": role})

    # ------------------------------------------------------------ helpers

    async def _db(self, fn, name: str, *args):
        """Resolve the robot by name and call a control service, in one worker thread."""

        def call():
            return fn(control.get_robot(name), *args)

        return await database_sync_to_async(call)()

    async def _to_robot(self, group: str, message: protocol.Message, **extra):
        await self.channel_layer.group_send(group, {"type": message.TYPE.value, "message": message.to_dict(), **extra})

    async def _close_sessions(self):
        for session, (_, group) in list(self.sessions.items()):  # free the robots' viewer slots at once
            await self._to_robot(group, protocol.WebrtcClose(session=session))
        self.sessions.clear()

    async def _leave_groups(self):
        await self.channel_layer.group_discard(events.CONSOLE_GROUP, self.channel_name)
        await self.channel_layer.group_discard(events.user_group(self.user.pk), self.channel_name)

    async def _send_hello(self, hello: dict[str, Any]):
        """The hello, its robots split over ``robot.list`` frames of at most HELLO_FRAME_BYTES each (a fleet of
        thousands does not fit the server's largest websocket message)."""
        chunks, chunk, size = [], [], 0
        for robot in hello["robots"]:
            n = len(json.dumps(robot, separators=(",", ":"), ensure_ascii=False).encode())
            if chunk and size + n > cp.HELLO_FRAME_BYTES:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(robot)
            size += n
        chunks.append(chunk)
        await self.send_json({**hello, "robots": chunks[0], "more": len(chunks) > 1})
        for i, rest in enumerate(chunks[1:], start=2):
            await self.send_json({"type": "robot.list", "robots": rest, "more": i < len(chunks)})

    async def send_json(self, content: dict[str, Any]):
        await self.send(text_data=json.dumps(content, separators=(",", ":"), ensure_ascii=False))

    async def _error(self, code: str, detail: str, ref: Optional[str]):
        name = self.user.get_username() if self.user else "?"
        log.info("console %s: %s refused: %s (%s)", name, ref or "frame", code, detail[:200])
        if code in COUNTED_ERRORS and self.budget.spend():
            log.warning("console %s: too many bad frames, closing its socket", name)
            await self.send_json({"type": "error", "code": "too_many_errors",
                                  "detail": f"more than {settings.SOP_MAX_BAD_MESSAGES} bad frames in a minute",
                                  "ref": ref})
            self.closing = True
            await self.close(code=int(CloseCode.TOO_MANY_ERRORS))
            return
        await self.send_json({"type": "error", "code": code, "detail": _printable(detail)[:protocol.MAX_STRING],
                              "ref": ref})


def _console_error(exc: ProtocolError, raw: str) -> ConsoleError:
    """The console's error code for a frame the typed layer refused (malformed, or invalid for everything else)."""
    code = "malformed" if exc.code == "malformed" or (exc.code == "unknown_type" and exc.ref_type is None) else "invalid"
    error = ConsoleError(code, exc.message)
    error.ref = exc.ref_type  # type: ignore[attr-defined]
    return error


def _ref(exc: ConsoleError) -> Optional[str]:
    return getattr(exc, "ref", None)


def _relayable(cls, **fields) -> protocol.Message:
    """A robot protocol message built from console input, refused if invalid or if its frame would exceed the robot's
    limit in bytes (checked here, before the relay, so that a robot never receives a frame it must drop)."""
    try:
        message = cls(**fields)
        protocol.encode(message)
    except ProtocolError as exc:
        raise ConsoleError("invalid", exc.message) from None
    return message


def _printable(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def _client(scope) -> str:
    client = scope.get("client") or ("?", 0)
    return f"{client[0]}:{client[1]}"


def _fresh(user):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.filter(pk=user.pk).first()
