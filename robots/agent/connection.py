"""The robot's control-plane link: a websocket to ``/ws/robots/`` that reconnects forever, plus the subscriber that
turns episode events into protocol messages.

Runs on the main thread's asyncio loop. Other threads hand messages over with ``send_threadsafe`` (through
``loop.call_soon_threadsafe`` into a bounded queue); nothing here ever blocks the control thread.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from robots import protocol
from robots.protocol import ControlSource

from .backoff import Backoff
from .config import AgentConfig
from .runtime import Episode, EpisodeResult, Step, Subscriber

log = logging.getLogger(__name__)

# Close codes that mean "this token is no good": the server's REVOKED, plus the generic policy violation.
AUTH_CLOSE_CODES = {int(protocol.CloseCode.REVOKED), 1008}
LONG_BACKOFF_FAILURES = 6  # after a close that a quick retry cannot fix, start from 0.5 s * 2**6, i.e. the cap
AUTH_ERROR_CODES = {protocol.ErrorCode.REVOKED.value, protocol.ErrorCode.FORBIDDEN.value}


class Connection:
    """Keeps one websocket to the server open, says hello, relays assignments, sends status heartbeats.

    ``hello()`` and ``status()`` build the current messages on the loop thread; ``on_assignment`` receives every
    ``task.assigned`` and ``on_policy`` every ``policy.updated`` (both must return at once: hand work to a thread).
    After a ``welcome``, ``robot_name`` and ``heartbeat_s`` hold what the server said.

    Operator console messages (docs/console.md) go to one callback each, called on the loop thread: ``on_takeover``
    (``control.takeover``), ``on_release``, ``on_estop``, ``on_command`` (the websocket fallback of the teleop data
    channel), ``on_label`` (``episode.label``), ``on_webrtc_offer`` and ``on_webrtc_close``; they must return at once
    (start a task for anything that awaits). ``on_disconnect`` runs when a session that said hello ends. ``send``
    queues a message (``webrtc.answer``) from the loop thread.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        hello: Callable[[], protocol.Hello],
        status: Callable[[], protocol.Status],
        on_assignment: Callable[[protocol.TaskAssigned], None],
        on_policy: Callable[[protocol.PolicyUpdated], None] = lambda message: None,
        on_takeover: Callable[[protocol.ControlTakeover], None] = lambda message: None,
        on_release: Callable[[protocol.ControlRelease], None] = lambda message: None,
        on_estop: Callable[[protocol.ControlEstop], None] = lambda message: None,
        on_command: Callable[[protocol.ControlCommand], None] = lambda message: None,
        on_label: Callable[[protocol.EpisodeLabel], None] = lambda message: None,
        on_webrtc_offer: Callable[[protocol.WebrtcOffer], None] = lambda message: None,
        on_webrtc_close: Callable[[protocol.WebrtcClose], None] = lambda message: None,
        on_disconnect: Callable[[], None] = lambda: None,
        outbox_size: int = 64,
    ):
        self.config = config
        self.url = config.ws_url
        self.hello = hello
        self.status = status
        self.on_assignment = on_assignment
        self.on_policy = on_policy
        self._console_handlers: dict[type, Callable] = {
            protocol.ControlTakeover: on_takeover,
            protocol.ControlRelease: on_release,
            protocol.ControlEstop: on_estop,
            protocol.ControlCommand: on_command,
            protocol.EpisodeLabel: on_label,
            protocol.WebrtcOffer: on_webrtc_offer,
            protocol.WebrtcClose: on_webrtc_close,
        }
        self.on_disconnect = on_disconnect
        self.robot_name: Optional[str] = None
        self.heartbeat_s = config.heartbeat_s
        self.policy_update: Optional[protocol.PolicyUpdated] = None  # the latest announced checkpoint
        self._assignment: Optional[protocol.TaskAssigned] = None
        self.connected = False  # hello sent on an open socket
        self.sessions = 0  # websocket sessions that reached welcome
        self._backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
        self._outbox_size = outbox_size
        self._outbox: Optional[asyncio.Queue[Optional[protocol.Message]]] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # ------------------------------------------------------------ any thread

    def send_threadsafe(self, message: Optional[protocol.Message]) -> None:
        """Queue a message for the server; ``None`` asks for a status message now. Dropped while disconnected or when
        the queue is full: the HTTP upload carries every episode's metadata anyway."""
        loop = self._loop
        if loop is None or not self.connected:
            return
        try:
            loop.call_soon_threadsafe(self._offer, message)
        except RuntimeError:  # the loop is closing
            pass

    def send(self, message: Optional[protocol.Message]) -> None:
        """Queue a message for the server from the loop thread (``None``: a status now). Dropped while disconnected or
        when the queue is full."""
        self._offer(message)

    def _offer(self, message: Optional[protocol.Message]) -> None:
        if not self.connected or self._outbox is None:
            return
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("outbox full; dropping %s", type(message).__name__ if message else "status request")

    # ------------------------------------------------------------ loop thread

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, serve, reconnect with backoff, until ``stop`` is set."""
        self._loop = asyncio.get_running_loop()
        self._outbox = asyncio.Queue(maxsize=self._outbox_size)
        headers = {"Authorization": f"Bearer {self.config.token}"}
        while not stop.is_set():
            try:
                async with connect(
                    self.url,
                    additional_headers=headers,
                    open_timeout=10,
                    max_size=protocol.MAX_MESSAGE_BYTES,
                ) as ws:
                    await self._session(ws, stop)
            except InvalidStatus as exc:
                code = exc.response.status_code
                if code in (401, 403):
                    log.error("server refused this robot's token (HTTP %d): check --token / SOP_ROBOT_TOKEN", code)
                else:
                    log.warning("websocket handshake refused: HTTP %d", code)
            except ConnectionClosed as exc:
                self._log_close(exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else "")
            except (OSError, asyncio.TimeoutError, InvalidHandshake, InvalidURI) as exc:
                log.warning("cannot reach %s: %s", self.url, exc or type(exc).__name__)
            except Exception:  # a bug must cost one session, not the robot's link to the fleet
                log.exception("websocket session failed")
            finally:
                self.connected = False
            if stop.is_set():
                break
            delay = self._backoff.next_delay()
            log.info("reconnecting in %.1f s", delay)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _session(self, ws: ClientConnection, stop: asyncio.Event) -> None:
        await ws.send(protocol.encode(self.hello()))
        self.connected = True
        log.info("connected to %s", self.url)
        tasks = {
            asyncio.create_task(self._read(ws), name="ws-read"),
            asyncio.create_task(self._write(ws), name="ws-write"),
            asyncio.create_task(stop.wait(), name="ws-stop"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.connected = False
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                self.on_disconnect()  # the server ends leases of an offline robot: stop obeying them here too
            except Exception:
                log.exception("on_disconnect failed")
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
        if not stop.is_set():
            self._log_close(ws.close_code, ws.close_reason or "")

    async def _read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            try:
                message = protocol.decode(raw)
            except protocol.ProtocolError as exc:
                log.warning("ignoring a bad message from the server (%s): %s", getattr(exc.code, "value", exc.code),
                            exc.message)
                continue
            self._handle(message)

    def _handle(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.Welcome):
            self.robot_name = message.robot
            if message.heartbeat_s > 0:
                self.heartbeat_s = message.heartbeat_s
            self.sessions += 1
            self._backoff.reset()  # only a welcome proves the server accepts us; a bare TCP connect does not
            log.info("welcomed as robot %r (heartbeat every %.1f s)", message.robot, self.heartbeat_s)
            self._offer(None)
        elif isinstance(message, protocol.TaskAssigned):
            # The server re-sends the assignment after every episode; only a change is worth a line at INFO.
            level = logging.DEBUG if message == self._assignment else logging.INFO
            self._assignment = message
            if message.task is None:
                log.log(level, "no task assigned: idling after the current episode")
            else:
                log.log(level, "assigned task %s (%s, max %d steps, %s)", message.task, message.env_id,
                        message.max_steps, message.split)
            self.on_assignment(message)
        elif isinstance(message, protocol.PolicyUpdated):
            # Download and verification run on their own thread (policy_updates); the swap waits for an episode end.
            self.policy_update = message
            log.info("policy v%d announced (%d bytes)", message.version, message.size)
            self.on_policy(message)
        elif type(message) in self._console_handlers:
            try:
                self._console_handlers[type(message)](message)
            except Exception:  # one bad console message must not end the session
                log.exception("handling %s failed", message.TYPE.value)
        elif isinstance(message, protocol.Error):
            level = logging.ERROR if message.code in AUTH_ERROR_CODES else logging.WARNING
            log.log(level, "server error %s: %s (about %s)", message.code, message.message, message.ref_type)
        else:
            log.warning("unexpected %s message from the server", message.TYPE.value)

    async def _write(self, ws: ClientConnection) -> None:
        """The only sender after hello: queued messages as they come, a status every ``heartbeat_s``."""
        assert self._outbox is not None
        loop = asyncio.get_running_loop()
        next_status = loop.time() + self.heartbeat_s
        while True:
            try:
                message = await asyncio.wait_for(self._outbox.get(), max(0.0, next_status - loop.time()))
            except asyncio.TimeoutError:
                message = None
            if message is None:
                message = self.status()
                next_status = loop.time() + self.heartbeat_s
            await ws.send(protocol.encode(message))

    def _log_close(self, code: Optional[int], reason: str) -> None:
        if code in AUTH_CLOSE_CODES:
            log.error("server closed the socket: token revoked or rotated (code %s %s); check the robot token",
                      code, reason)
            self._backoff.failures = max(self._backoff.failures, LONG_BACKOFF_FAILURES)
        elif code == protocol.CloseCode.TOO_MANY_ERRORS:
            log.error("server closed the socket: too many invalid messages (code %s); is the agent up to date?", code)
            self._backoff.failures = max(self._backoff.failures, LONG_BACKOFF_FAILURES)
        else:
            log.warning("connection to %s closed (code %s %s)", self.url, code, reason)


class EventReporter(Subscriber):
    """Tells the server about episodes as they happen: ``episode.started``, ``episode.ended``, and a status on each
    state change. Runs on the control thread, so it only builds messages and hands them to the connection."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self._interventions = 0
        self._intervention_steps = 0
        self._driver: tuple[ControlSource, str] = (ControlSource.POLICY, "")

    def on_episode_start(self, episode: Episode) -> None:
        self._interventions, self._intervention_steps = 0, 0
        self._driver = (ControlSource.POLICY, "")
        self._send(lambda: protocol.EpisodeStarted(
            episode_id=episode.id,
            task=episode.task,
            prompt=episode.prompt,
            started_at=episode.started_at,
            policy_version=episode.policy_version,
            policy=episode.policy,
            split=episode.split,
        ))
        self.connection.send_threadsafe(None)

    def on_step(self, episode: Episode, step: Step) -> None:
        # Counted like the recorder's segments: a run of steps by the same non-policy source and operator.
        driver = (ControlSource(step.decision.source), step.decision.operator)
        if driver[0] != ControlSource.POLICY:
            self._intervention_steps += 1
            if driver != self._driver:
                self._interventions += 1
        if driver != self._driver:
            self._driver = driver
            self.connection.send_threadsafe(None)  # the console shows who drives: tell it at once

    def on_episode_end(self, episode: Episode, result: EpisodeResult) -> None:
        self._send(lambda: protocol.EpisodeEnded(
            episode_id=episode.id,
            steps=result.steps,
            outcome=result.outcome.value,
            ended_at=result.ended_at,
            interventions=self._interventions,
            intervention_steps=self._intervention_steps,
        ))
        self.connection.send_threadsafe(None)

    def _send(self, build: Callable[[], protocol.Message]) -> None:
        if not self.connection.connected:
            return  # dropped while disconnected: the upload carries the same facts
        try:
            self.connection.send_threadsafe(build())
        except protocol.ProtocolError as exc:
            log.error("not sending an invalid message: %s", exc.message)
