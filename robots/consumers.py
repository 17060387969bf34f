"""The robot websocket (/ws/robots/): the control plane of one robot, authenticated by its token (docs/protocol.md).

Each frame is decoded by robots/protocol.py (size first, then JSON, version, type, fields) and handed to one
service. A bad frame gets a typed ``error`` back and the socket stays open, up to SOP_MAX_BAD_MESSAGES a minute.

It also relays the operator console's messages (docs/console.md) that robots/control.py and robots/console.py send to
the robot's group: takeover, release, e-stop, teleop commands, labels and WebRTC signalling; a ``webrtc.answer`` goes
back to the one console socket that sent the offer. After each connect, disconnect and heartbeat the robot's state is
broadcast to the consoles (at most once per heartbeat unless something the console shows changed), coalesced with the
other robots of the process (robots/livestate.py). A heartbeat that only moves volatile columns and agrees with the
control snapshot the socket read at most SOP_CONTROL_RECHECK_S ago costs no database work; the row is written only when
more than its volatile columns changed or every SOP_STATUS_WRITE_S (fleet.StatusWriter).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from channels.db import database_sync_to_async
from django.conf import settings

from . import control, events, fleet, helpqueue, ingest, livestate, metrics, protocol
from .auth import authenticate_token, hash_token, token_from_scope
from .exceptions import SopError
from .protocol import CloseCode, ErrorCode, ProtocolError
from .sockets import BadFrameBudget, GuardedConsumer
from sop_web.logformat import ids

log = logging.getLogger(__name__)

BAD_MESSAGE_WINDOW_S = 60.0
MAX_PENDING_OFFERS = 64  # WebRTC offers awaiting the robot's answer, per socket (oldest forgotten first)
MIN_STATE_INTERVAL_S = 0.2  # even a changed state is broadcast to consoles at most this often


class RobotConsumer(GuardedConsumer):
    robot = None
    token_hash = ""
    connected_at = None
    closing = False
    last_state_at = 0.0  # monotonic time of the last robot.state broadcast
    last_state_key = None  # what consoles show of the last heartbeat; a change is broadcast at once
    pending_state = None  # a task that broadcasts a change that came too soon after the previous broadcast
    help_reported = ""  # the id of the help request the last heartbeat carried (None: none; "": no heartbeat yet)

    async def connect(self):
        raw = token_from_scope(self.scope)
        robot = await database_sync_to_async(authenticate_token)(raw)
        if robot is None:
            reason = "unknown or revoked token" if raw else "no token"
            log.warning("robot socket from %s refused: %s", _client(self.scope), reason)
            await self.close()  # before accept: the handshake is answered with HTTP 403
            return
        self.budget = BadFrameBudget(settings.SOP_MAX_BAD_MESSAGES)
        self.offers: OrderedDict[str, str] = OrderedDict()  # WebRTC session -> console channel awaiting the answer
        # Join the groups before robot_connected re-checks the token: a revocation committed after that check
        # reaches this socket as an event, one committed before it makes the check fail. Nothing slips between.
        await self.channel_layer.group_add(robot.group_name, self.channel_name)
        await self.channel_layer.group_add(events.FLEET_GROUP, self.channel_name)
        self.robot, self.token_hash = robot, hash_token(raw)
        self.writer = fleet.StatusWriter(robot, self.token_hash)
        self.connected_at = await database_sync_to_async(fleet.robot_connected)(robot, self.token_hash)
        if self.connected_at is None:
            log.warning("robot %s refused: token revoked during the handshake", robot.name)
            await self._leave_groups()
            self.robot = None
            await self.close()
            return
        await self.accept()
        log.info("robot %s connected from %s", robot.name, _client(self.scope), extra=ids(robot=robot.name))
        await self._broadcast_state()

    async def disconnect(self, code):
        if self.robot is None:
            return
        self.closing = True
        if self.pending_state is not None:
            self.pending_state.cancel()
        # Each step on its own, the database one first: a channel layer that is down must not keep the robot shown
        # online with its takeover lease alive (mark_silent_robots_offline is the backstop if the database is down).
        for step in (self._mark_offline, self._leave_groups, self._answer_pending_offers, self._final_state):
            try:
                await step()
            except Exception:
                log.exception("robot %s: disconnect step %s failed", self.robot.name, step.__name__)
        log.info("robot %s disconnected (code %s)", self.robot.name, code, extra=ids(robot=self.robot.name))

    async def _mark_offline(self):
        await database_sync_to_async(fleet.robot_disconnected)(self.robot, self.connected_at)

    async def _answer_pending_offers(self):
        for session, console in self.offers.items():  # consoles still waiting for an answer learn it will not come
            await self._answer_console(console, session, error="robot disconnected")

    async def _final_state(self):
        self.writer.live = {}  # offline: the row (robot_disconnected) is the truth now, not the last heartbeat
        await self._broadcast_state(force=True)

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

    async def server_error(self, kind: str) -> None:
        """A valid frame (or an event) the server failed to handle, e.g. with its database down: say so, keep the socket
        (the robot's next heartbeat tries again)."""
        if kind == "websocket.receive" and not self.closing:
            await self._send(protocol.error(ErrorCode.SERVER_ERROR, "the server failed to handle this message"))

    # ------------------------------------------------------------ robot -> server

    async def on_hello(self, msg: protocol.Hello):
        for reply in await database_sync_to_async(fleet.robot_hello)(self.robot, msg):
            await self._send(reply)
        self.writer.recheck()
        await self._broadcast_state()

    async def on_status(self, msg: protocol.Status):
        metrics.inc("sop_heartbeats_total")
        if self.writer.unchanged(msg):  # only volatile columns moved and it agrees with a fresh snapshot: no database
            repairs = []
        else:
            ok, repairs = await database_sync_to_async(self._store_status)(msg)
            if not ok:
                return await self._close_revoked()
            for repair in repairs:  # what the robot should obey but does not report (a lost message): sent again
                await self._send(repair)
            if repairs:
                self.writer.recheck()
        help_id = msg.help["id"] if msg.help else None
        if help_id != self.help_reported:  # raised, withdrawn, or the socket's first word on it: the queue learns it
            if await database_sync_to_async(helpqueue.sync_reported)(self.robot, msg.help):
                self.help_reported = help_id  # else counted as another active request for now: asked again later
        key = (msg.state, msg.task, msg.episode_id, msg.control_source, msg.lease, msg.operator, msg.deadman,
               msg.estopped, msg.estop_local, msg.policy_version, msg.policy_error, msg.viewers, bool(repairs))
        revived, self.writer.revived = self.writer.revived, False
        if await self._broadcast_state(changed=key != self.last_state_key or revived):
            self.last_state_key = key  # a change skipped by the rate limit is still a change at the next heartbeat

    def _store_status(self, msg: protocol.Status):
        # One read (token, latch, lease; it also ends an expired lease), a write only when something beyond the
        # volatile columns changed or SOP_STATUS_WRITE_S passed (fleet.StatusWriter).
        snapshot = self.writer.store(msg)
        if snapshot is None:
            return False, None
        return True, control.reconcile(self.robot, msg, snapshot)

    async def on_episode_started(self, msg: protocol.EpisodeStarted):
        await database_sync_to_async(ingest.episode_started)(self.robot, msg)
        await self._broadcast_state(changed=True)

    async def on_episode_ended(self, msg: protocol.EpisodeEnded):
        await self._send(await database_sync_to_async(ingest.episode_ended)(self.robot, msg))
        await self._broadcast_state(changed=True)  # today's counters moved

    async def on_webrtc_answer(self, msg: protocol.WebrtcAnswer):
        console = self.offers.pop(msg.session, None)
        if console is None:
            log.warning("robot %s: answer to unknown WebRTC session %s dropped", self.robot.name, msg.session)
            return
        await self._answer_console(console, msg.session, sdp=msg.sdp, error=msg.error)

    HANDLERS = {
        protocol.Hello: on_hello,
        protocol.Status: on_status,
        protocol.EpisodeStarted: on_episode_started,
        protocol.EpisodeEnded: on_episode_ended,
        protocol.WebrtcAnswer: on_webrtc_answer,
    }

    # ------------------------------------------------------------ channel-layer events (robots/events.py sends them)

    async def robot_revoked(self, event):
        await self._close_revoked()

    async def task_assigned(self, event):
        await self._relay(event)

    async def policy_updated(self, event):
        await self._relay(event)

    # operator console (robots/control.py, robots/console.py): relayed as they are. After a lease or e-stop change
    # the next heartbeat is checked against a fresh control snapshot, not the one the socket holds.
    async def control_takeover(self, event):
        self.writer.recheck()
        await self._relay(event)

    async def control_release(self, event):
        self.writer.recheck()
        await self._relay(event)

    async def control_estop(self, event):
        self.writer.recheck()
        await self._relay(event)

    async def control_command(self, event):
        await self._relay(event)

    async def episode_label(self, event):
        await self._relay(event)

    async def webrtc_offer(self, event):
        """Remember which console asked, so that the robot's answer goes back to it (and to no other console)."""
        session = event["message"]["session"]
        self.offers.pop(session, None)
        self.offers[session] = event["console"]
        while len(self.offers) > MAX_PENDING_OFFERS:
            self.offers.popitem(last=False)
        await self._relay(event)

    async def webrtc_close(self, event):
        self.offers.pop(event["message"]["session"], None)
        await self._relay(event)

    # ------------------------------------------------------------ helpers

    async def _broadcast_later(self, delay: float):
        await asyncio.sleep(delay)
        self.pending_state = None
        if not self.closing:
            await self._broadcast_state(force=True)

    async def _relay(self, event):
        """Send a message another part of the server addressed to this robot. It is decoded and encoded again by the
        protocol layer: whatever a console or a service put into the event, the robot receives only a valid frame
        within its size limit (else nothing, and an error in the log)."""
        if self.closing:
            return
        try:
            text = protocol.encode(protocol.from_dict(event["message"]))
        except (ProtocolError, KeyError, TypeError) as exc:
            log.error("robot %s: not relaying an invalid %s message: %s", self.robot.name, event.get("type"),
                      getattr(exc, "message", exc))
            return
        await self.send(text_data=text)

    async def _send(self, message: protocol.Message):
        await self.send(text_data=protocol.encode(message))

    async def _answer_console(self, console: str, session: str, sdp: str = "", error: str = ""):
        event = {"type": "webrtc.answer", "robot": self.robot.name, "session": session, "sdp": sdp, "error": error}
        await self.channel_layer.send(console, event)

    async def _broadcast_state(self, changed: bool = True, force: bool = False) -> bool:
        """robot.state to the consoles: a heartbeat that changed nothing they show at most once per heartbeat,
        a change at once (or, too soon after the previous one, MIN_STATE_INTERVAL_S after it). Returns whether it was
        sent or scheduled."""
        now = time.monotonic()
        interval = MIN_STATE_INTERVAL_S if changed else settings.SOP_HEARTBEAT_S * 0.9
        if not force and now - self.last_state_at < interval:
            if changed and self.pending_state is None:
                self.pending_state = asyncio.ensure_future(self._broadcast_later(interval - (now - self.last_state_at)))
            return changed
        self.last_state_at = now
        # coalesced with the other robots of this process (robots/livestate.py): a change is one query and one group
        # send per flush for all of them; a heartbeat that moved only volatile values is sent without a query
        if changed or force:
            livestate.request(self.channel_layer, self.robot.pk, self.writer.live)
        else:
            livestate.request_live(self.channel_layer, self.robot.pk, self.robot.name, self.writer.live)
        return True

    async def _reject(self, exc: ProtocolError):
        """Answer a bad frame with a typed error; past the per-minute budget, close the socket."""
        name = self.robot.name if self.robot else "?"
        code = ErrorCode(exc.code).value
        log.warning("robot %s: bad %s message: %s (%s)", name, exc.ref_type or "?", code, exc.message[:200])
        if self.budget.spend():
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
        await self.channel_layer.group_discard(events.FLEET_GROUP, self.channel_name)


def _client(scope) -> str:
    client = scope.get("client") or ("?", 0)
    return f"{client[0]}:{client[1]}"
