"""The browser's wire formats: the console socket (/ws/console/, browser <-> server) and the WebRTC data channel
"teleop" (browser <-> robot). Same typed layer as the robot protocol (robots/wire.py): limits in bytes after UTF-8
encoding, nesting depth, string lengths, valid Unicode, patterns, numeric ranges. The server decodes every console
frame with ``CONSOLE.decode(raw, accept=BROWSER_MESSAGES)``; the robot decodes every data channel message with
``DATA_CHANNEL.decode``. docs/console.md describes the contract; docs/schema/console-protocol.schema.json and
docs/schema/teleop-channel.schema.json are generated from these classes.

Pure: stdlib only (the robot agent imports the data channel part).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from . import wire
from .protocol import (HELP_KINDS, MAX_HELP_TRACE, MAX_NAME, MAX_SDP, OPERATOR_OUTCOMES, ROLES, HelpSample, IceServer,
                       action_field, grip_field)
from .wire import NAME_PATTERN, UUID_PATTERN, Struct, spec

MAX_FRAME_BYTES = 64 * 1024  # browser -> server; an offer's SDP (printable ASCII, at most MAX_SDP) fits
MAX_SERVER_FRAME_BYTES = 16 * 1024 * 1024  # server -> browser: a hello lists the whole fleet
# daphne refuses to send a websocket message over 1 MiB; a hello's robots are split into frames of at most this much
HELLO_FRAME_BYTES = 512 * 1024
MAX_DC_BYTES = 2048  # data channel messages are tiny

ERROR_CODES = ("malformed", "invalid", "unknown_robot", "forbidden", "held", "not_holder", "robot_offline",
               "rate_limited", "too_many_errors", "server_error")

CONSOLE = wire.Protocol(
    "console-protocol", version=None, max_bytes=MAX_FRAME_BYTES, title="SOP console socket (/ws/console/)",
    description="Frames between an operator's browser and the server (docs/console.md). Browsers authenticate with "
                "their session cookie; every frame the server refuses is answered with an `error` frame.",
)
DATA_CHANNEL = wire.Protocol(
    "teleop-channel", version=None, max_bytes=MAX_DC_BYTES, title="SOP WebRTC data channel \"teleop\"",
    description="Messages between an operator's browser and a robot over the WebRTC data channel (docs/console.md).",
)

_TO_SERVER = "browser -> server"
_TO_BROWSER = "server -> browser"
_ROBOT = spec(pattern=NAME_PATTERN, max_len=100, description="robot name")
_SESSION = spec(pattern=UUID_PATTERN, max_len=36, description="a UUID the browser made for this video session")


# ---------------------------------------------------------------- browser -> server


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class Ping(wire.Message):
    """Answered with ``pong``; the browser learns the server's clock."""

    TYPE = "ping"
    DIRECTION = _TO_SERVER
    t: Optional[float] = None


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class OfferVideo(wire.Message):
    """A WebRTC offer (recvonly video + the "teleop" data channel, all ICE candidates gathered), relayed to the robot
    with the authenticated user and role. Any role may watch; offers are rate-limited per socket."""

    TYPE = "webrtc.offer"
    DIRECTION = _TO_SERVER
    robot: str = dataclasses.field(metadata=_ROBOT)
    session: str = dataclasses.field(metadata=_SESSION)
    sdp: str = dataclasses.field(metadata=spec(ascii=True, max_len=MAX_SDP))


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class CloseVideo(wire.Message):
    """Ends one of this socket's own video sessions."""

    TYPE = "webrtc.close"
    DIRECTION = _TO_SERVER
    robot: str = dataclasses.field(metadata=_ROBOT)
    session: str = dataclasses.field(metadata=_SESSION)


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class Takeover(wire.Message):
    """Operators and admins: take exclusive control (a lease). ``force`` (admins only) ends another holder's lease."""

    TYPE = "takeover"
    DIRECTION = _TO_SERVER
    robot: str = dataclasses.field(metadata=_ROBOT)
    reason: str = dataclasses.field(default="", metadata=spec(max_len=500))
    force: bool = False


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class Keepalive(wire.Message):
    """The lease holder, every second: the lease lives SOP_LEASE_TIMEOUT_S more."""

    TYPE = "keepalive"
    DIRECTION = _TO_SERVER
    robot: str = dataclasses.field(metadata=_ROBOT)


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class Release(wire.Message):
    TYPE = "release"
    DIRECTION = _TO_SERVER
    robot: str = dataclasses.field(metadata=_ROBOT)


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class Teleop(wire.Message):
    """The lease holder's teleop command over the websockets (the data channel's fallback), relayed as
    ``control.command`` with this socket's lease id."""

    TYPE = "teleop"
    DIRECTION = _TO_SERVER
    robot: str = dataclasses.field(metadata=_ROBOT)
    seq: int = dataclasses.field(metadata=spec(min=0))
    t: float = dataclasses.field(metadata=spec(description="robot clock, unix milliseconds"))
    action: Optional[list[float]] = action_field()
    grip: Optional[float] = grip_field()


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class Estop(wire.Message):
    """Operators and admins: latch (``engaged``) or clear the robot's e-stop. Audited."""

    TYPE = "estop"
    DIRECTION = _TO_SERVER
    robot: str = dataclasses.field(metadata=_ROBOT)
    engaged: bool


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class Label(wire.Message):
    """Operators and admins: end the running episode with this outcome. Audited."""

    TYPE = "label"
    DIRECTION = _TO_SERVER
    robot: str = dataclasses.field(metadata=_ROBOT)
    outcome: str = dataclasses.field(metadata=spec(choices=OPERATOR_OUTCOMES))
    episode_id: Optional[str] = dataclasses.field(default=None, metadata=spec(pattern=UUID_PATTERN, max_len=36))


_HELP_ID = spec(min=1, description="a help request's id")
_NOTE = spec(max_len=500)


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class HelpClaim(wire.Message):
    """Operators and admins: answer a help request by taking its robot over (the lease then belongs to this socket,
    as with ``takeover``). Someone else answers it already: ``held``."""

    TYPE = "help.claim"
    DIRECTION = _TO_SERVER
    id: int = dataclasses.field(metadata=_HELP_ID)


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class HelpResolve(wire.Message):
    """The operator who claimed the request is done: the robot goes back to its policy, after ending the running
    episode with ``outcome`` when one is given. Audited."""

    TYPE = "help.resolve"
    DIRECTION = _TO_SERVER
    id: int = dataclasses.field(metadata=_HELP_ID)
    outcome: Optional[str] = dataclasses.field(default=None, metadata=spec(choices=OPERATOR_OUTCOMES))
    note: str = dataclasses.field(default="", metadata=_NOTE)


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class HelpDismiss(wire.Message):
    """A false alarm: the request closes as dismissed (and the robot goes back to its policy if this socket held it
    for the request). Audited; the dismissals are the data for tuning the robot's detectors."""

    TYPE = "help.dismiss"
    DIRECTION = _TO_SERVER
    id: int = dataclasses.field(metadata=_HELP_ID)
    note: str = dataclasses.field(default="", metadata=_NOTE)


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class HelpCapacity(wire.Message):
    """How many help requests this operator is assigned at once (1 unless they ask for more; at most 5)."""

    TYPE = "help.capacity"
    DIRECTION = _TO_SERVER
    capacity: int = dataclasses.field(metadata=spec(min=1, max=5))


BROWSER_MESSAGES = (Ping, OfferVideo, CloseVideo, Takeover, Keepalive, Release, Teleop, Estop, Label, HelpClaim,
                    HelpResolve, HelpDismiss, HelpCapacity)


# ---------------------------------------------------------------- server -> browser (documented and tested)


@dataclasses.dataclass(frozen=True)
class LeaseView(Struct):
    """The active takeover lease of a robot."""

    id: int = dataclasses.field(metadata=spec(min=1))
    operator: str = dataclasses.field(metadata=spec(max_len=MAX_NAME))
    since: str = dataclasses.field(metadata=spec(max_len=40, description="ISO 8601"))


_TIME = spec(max_len=40, description="ISO 8601, UTC")


@dataclasses.dataclass(frozen=True)
class RobotView(Struct):
    """A robot as consoles see it (robots/selectors.py ``robot_states``): what the server knows and what the robot
    last reported, side by side, with ``mismatch`` listing where they disagree (the server is re-sending)."""

    id: int
    name: str = dataclasses.field(metadata=spec(pattern=NAME_PATTERN, max_len=100))
    connected: bool
    state: str = dataclasses.field(metadata=spec(choices=("offline", "idle", "running", "estopped")))
    last_seen: Optional[str] = dataclasses.field(metadata=_TIME)
    connected_at: Optional[str] = dataclasses.field(metadata=_TIME)
    current_task: Optional[str] = dataclasses.field(metadata=spec(max_len=100))
    current_prompt: str = dataclasses.field(metadata=spec(max_len=500))
    current_episode: Optional[str] = dataclasses.field(metadata=spec(pattern=UUID_PATTERN, max_len=36))
    current_step: int
    policy_version: Optional[int]
    policy_name: str = dataclasses.field(metadata=spec(max_len=100))
    policy_error: str = dataclasses.field(metadata=spec(max_len=300))
    control_source: str = dataclasses.field(metadata=spec(max_len=16))
    loop_hz: float
    loop_p99_ms: float
    spool_pending: int
    capabilities: list[str] = dataclasses.field(metadata=spec(max_len=50, max_items=32))
    agent_version: str = dataclasses.field(metadata=spec(max_len=50))
    revoked: bool
    revoked_at: Optional[str] = dataclasses.field(metadata=_TIME)
    episode_count: int
    verified_episode_count: int
    successful_episode_count: int
    rated_online_count: int = dataclasses.field(metadata=spec(
        description="online episodes that ended in success, failure or timeout"))
    autonomous_success_count: int = dataclasses.field(metadata=spec(
        description="of those, successes without any intervention"))
    estopped: bool = dataclasses.field(metadata=spec(description="the server's latch, or the robot's own report"))
    estopped_by: str = dataclasses.field(metadata=spec(max_len=MAX_NAME))
    estopped_at: Optional[str] = dataclasses.field(metadata=_TIME)
    deadman: bool
    operator_name: str = dataclasses.field(metadata=spec(max_len=MAX_NAME))
    video_fps: float
    viewers: int
    lease: Optional[LeaseView]
    operator: str = dataclasses.field(metadata=spec(max_len=MAX_NAME))
    reported_estopped: bool = dataclasses.field(metadata=spec(description="what the robot's last heartbeat said"))
    reported_lease: Optional[int] = dataclasses.field(metadata=spec(description="the lease the robot last reported"))
    mismatch: list[str] = dataclasses.field(metadata=spec(max_len=300, max_items=8))
    episodes_today: int
    success_rate_today: Optional[float]
    interventions_today: int
    as_of: float = dataclasses.field(metadata=spec(description="server time (unix s) the state was read at; a "
                                                               "console keeps the newest state per robot"))


@dataclasses.dataclass(frozen=True)
class HelpView(Struct):
    """A help request as consoles see it (robots/selectors.py ``help_views``)."""

    id: int
    robot: str = dataclasses.field(metadata=spec(pattern=NAME_PATTERN, max_len=100))
    kind: str = dataclasses.field(metadata=spec(choices=HELP_KINDS))
    reason: str = dataclasses.field(metadata=spec(max_len=200))
    urgency: int = dataclasses.field(metadata=spec(min=1, max=3))
    status: str = dataclasses.field(metadata=spec(choices=("open", "claimed", "resolved", "dismissed", "withdrawn")))
    episode_id: Optional[str] = dataclasses.field(metadata=spec(pattern=UUID_PATTERN, max_len=36))
    step: int
    raised_at: str = dataclasses.field(metadata=_TIME)
    robot_since: Optional[str] = dataclasses.field(metadata=_TIME)
    assigned_to: str = dataclasses.field(metadata=spec(max_len=MAX_NAME, description="the operator it is assigned "
                                                                                      "to; '' none"))
    claimed_by: str = dataclasses.field(metadata=spec(max_len=MAX_NAME))
    lease: Optional[int]
    closed_at: Optional[str] = dataclasses.field(metadata=_TIME)
    closed_by: str = dataclasses.field(metadata=spec(max_len=MAX_NAME))
    outcome: str = dataclasses.field(metadata=spec(max_len=16))
    note: str = dataclasses.field(metadata=_NOTE)
    trace: list[HelpSample] = dataclasses.field(metadata=spec(max_items=MAX_HELP_TRACE))


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class HelpRequests(wire.Message):
    """Help requests that changed (raised, assigned, claimed, closed); a closed one leaves the queue."""

    TYPE = "help"
    DIRECTION = _TO_BROWSER
    MAX_BYTES = MAX_SERVER_FRAME_BYTES
    requests: list[HelpView] = dataclasses.field(metadata=spec(max_items=10_000))


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class Hello(wire.Message):
    """The first frame of a console socket."""

    TYPE = "hello"
    DIRECTION = _TO_BROWSER
    MAX_BYTES = MAX_SERVER_FRAME_BYTES
    user: str = dataclasses.field(metadata=spec(max_len=MAX_NAME))
    role: str = dataclasses.field(metadata=spec(choices=ROLES))
    ice_servers: list[IceServer] = dataclasses.field(metadata=spec(max_items=4))
    lease_timeout_s: float
    deadman_ms: int
    robots: list[RobotView] = dataclasses.field(metadata=spec(max_items=100_000))
    help: list[HelpView] = dataclasses.field(default_factory=list, metadata=spec(
        max_items=10_000, description="the active help requests, most urgent first"))
    more: bool = dataclasses.field(default=False, metadata=spec(
        description="more robots follow in robot.list frames; the fleet is complete with the one whose more is false"))


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class RobotList(wire.Message):
    """The rest of the hello's robots, when the fleet does not fit one frame (a websocket message is at most
    HELLO_FRAME_BYTES here): the browser's socket (frontend/console/socket.js) joins them into one hello."""

    TYPE = "robot.list"
    DIRECTION = _TO_BROWSER
    MAX_BYTES = MAX_SERVER_FRAME_BYTES
    robots: list[RobotView] = dataclasses.field(metadata=spec(max_items=100_000))
    more: bool


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class RobotState(wire.Message):
    """A robot's state, on every heartbeat that changed what consoles show (at least once a heartbeat), connect,
    disconnect, lease or e-stop change."""

    TYPE = "robot.state"
    DIRECTION = _TO_BROWSER
    robot: RobotView


@dataclasses.dataclass(frozen=True)
class LiveView(Struct):
    """A robot's volatile values from its latest heartbeat, without a database read: what moves on every heartbeat
    while nothing else the console shows has changed."""

    name: str = dataclasses.field(metadata=spec(pattern=NAME_PATTERN, max_len=100))
    last_seen: Optional[str] = dataclasses.field(metadata=_TIME)
    current_step: int
    loop_hz: float
    loop_p99_ms: float
    spool_pending: int
    video_fps: float
    as_of: float = dataclasses.field(metadata=spec(description="server time (unix s) the heartbeat arrived at; "
                                                               "older than the robot's last robot.state: ignored"))


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class RobotLive(wire.Message):
    """Volatile values of robots whose heartbeats changed nothing else (at most once a heartbeat per robot),
    several robots to a frame. Merged into the robot's last ``robot.state``."""

    TYPE = "robot.live"
    DIRECTION = _TO_BROWSER
    MAX_BYTES = MAX_SERVER_FRAME_BYTES
    robots: list[LiveView] = dataclasses.field(metadata=spec(max_items=100_000))


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class RobotRemoved(wire.Message):
    """The robot's token was revoked: drop its tile."""

    TYPE = "robot.removed"
    DIRECTION = _TO_BROWSER
    robot: str = dataclasses.field(metadata=_ROBOT)


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class LeaseEvent(wire.Message):
    """A lease started (``active``) or ended (``reason``: released, disconnected, timeout, forced, robot_offline,
    role_changed)."""

    TYPE = "lease"
    DIRECTION = _TO_BROWSER
    robot: str = dataclasses.field(metadata=_ROBOT)
    lease: int
    operator: str = dataclasses.field(metadata=spec(max_len=MAX_NAME))
    active: bool
    reason: str = dataclasses.field(metadata=spec(max_len=500))


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class VideoAnswer(wire.Message):
    """The robot's answer to one of this socket's offers (only this socket receives it)."""

    TYPE = "webrtc.answer"
    DIRECTION = _TO_BROWSER
    robot: str = dataclasses.field(metadata=_ROBOT)
    session: str = dataclasses.field(metadata=_SESSION)
    sdp: str = dataclasses.field(metadata=spec(ascii=True, max_len=MAX_SDP))
    error: str = dataclasses.field(metadata=spec())


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class Pong(wire.Message):
    TYPE = "pong"
    DIRECTION = _TO_BROWSER
    t: Optional[float]
    server_t: int = dataclasses.field(metadata=spec(description="server clock, unix milliseconds"))


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class RoleChanged(wire.Message):
    """The user's role changed (an admin promoted or demoted them): video sessions of this socket were closed and
    leases of a user who may no longer operate ended; the page reloads."""

    TYPE = "role"
    DIRECTION = _TO_BROWSER
    role: str = dataclasses.field(metadata=spec(choices=ROLES))


@CONSOLE.register
@dataclasses.dataclass(frozen=True)
class Error(wire.Message):
    """A frame the server refused; ``ref`` is the ``type`` of that frame (null if it had none)."""

    TYPE = "error"
    DIRECTION = _TO_BROWSER
    code: str = dataclasses.field(metadata=spec(choices=ERROR_CODES))
    detail: str = dataclasses.field(metadata=spec())
    ref: Optional[str] = dataclasses.field(metadata=spec(max_len=50))


# ---------------------------------------------------------------- the WebRTC data channel "teleop"


@DATA_CHANNEL.register
@dataclasses.dataclass(frozen=True)
class ChannelCommand(wire.Message):
    """browser -> robot: a teleop command; counts only while this session's user holds the lease."""

    TYPE = "cmd"
    DIRECTION = "browser -> robot"
    seq: int = dataclasses.field(metadata=spec(min=0))
    t: float = dataclasses.field(metadata=spec(description="robot clock, unix milliseconds"))
    action: Optional[list[float]] = action_field()
    grip: Optional[float] = grip_field()


@DATA_CHANNEL.register
@dataclasses.dataclass(frozen=True)
class ChannelKeepalive(wire.Message):
    """browser -> robot: a command without motion; keeps the deadman off."""

    TYPE = "keepalive"
    DIRECTION = "browser -> robot"
    seq: int = dataclasses.field(metadata=spec(min=0))
    t: float


@DATA_CHANNEL.register
@dataclasses.dataclass(frozen=True)
class ChannelPing(wire.Message):
    """browser -> robot: answered with ``pong`` (the browser learns the robot's clock offset)."""

    TYPE = "ping"
    DIRECTION = "browser -> robot"
    id: Optional[int] = None
    t: Optional[float] = None


@DATA_CHANNEL.register
@dataclasses.dataclass(frozen=True)
class ChannelTrace(wire.Message):
    """browser -> robot: when did command ``seq`` arrive and first drive a step (latency benchmark); the robot
    answers with the same type and the robot unix ms ``accepted_t`` / ``applied_t`` (null: unknown)."""

    TYPE = "trace"
    DIRECTION = "browser <-> robot"
    seq: int = dataclasses.field(metadata=spec(min=0))
    accepted_t: Optional[float] = None
    applied_t: Optional[float] = None


@DATA_CHANNEL.register
@dataclasses.dataclass(frozen=True)
class ChannelEstop(wire.Message):
    """browser -> robot: latch the e-stop (clearing needs the console socket). Accepted from operator and admin
    sessions only; the robot reports it to the server, which audits it."""

    TYPE = "estop"
    DIRECTION = "browser -> robot"


@DATA_CHANNEL.register
@dataclasses.dataclass(frozen=True)
class ChannelPong(wire.Message):
    """robot -> browser: RTT = now - t; robot clock offset = robot_t - (t + now) / 2."""

    TYPE = "pong"
    DIRECTION = "robot -> browser"
    id: Optional[int]
    t: Optional[float]
    robot_t: float


@dataclasses.dataclass(frozen=True)
class DropCounts(Struct):
    """Teleop commands the robot dropped since it started, by reason."""

    stale: int
    replayed: int


@DATA_CHANNEL.register
@dataclasses.dataclass(frozen=True)
class ChannelHud(wire.Message):
    """robot -> browser, every 100 ms while the session is open: what the robot is doing under the operator."""

    TYPE = "hud"
    DIRECTION = "robot -> browser"
    deadman: bool
    lease: Optional[int]
    operator: str = dataclasses.field(metadata=spec(max_len=MAX_NAME))
    estopped: bool
    estopped_by: str = dataclasses.field(metadata=spec(max_len=MAX_NAME))
    last_command_age_ms: Optional[float]
    applied_seq: Optional[int]
    applied_t: Optional[float]
    accepted_seq: Optional[int]
    accepted_t: Optional[float]
    deadman_reaction_ms: Optional[float]
    dropped: DropCounts
    step: int
    video_fps: float
    # the last control step, for the robot page's live plot (None before the first step)
    hand: Optional[list[float]] = dataclasses.field(default=None, metadata=spec(min=-100, max=100, min_items=3,
                                                                                max_items=3))
    grip: Optional[float] = dataclasses.field(default=None, metadata=spec(min=-100, max=100))
    action: Optional[list[float]] = dataclasses.field(default=None, metadata=spec(min=-100, max=100, max_items=8))
    driver: Optional[str] = dataclasses.field(default=None, metadata=spec(choices=("policy", "operator",
                                                                                   "sim_operator")))


@DATA_CHANNEL.register
@dataclasses.dataclass(frozen=True)
class ChannelError(wire.Message):
    """robot -> browser: a message the robot refused (``forbidden``: e.g. an e-stop from a viewer's session)."""

    TYPE = "error"
    DIRECTION = "robot -> browser"
    code: str = dataclasses.field(metadata=spec(choices=("invalid", "forbidden")))
    detail: str = dataclasses.field(metadata=spec())
    ref: Optional[str] = dataclasses.field(default=None, metadata=spec(max_len=50))


CHANNEL_BROWSER_MESSAGES = (ChannelCommand, ChannelKeepalive, ChannelPing, ChannelTrace, ChannelEstop)


def schemas() -> dict[str, dict]:
    """Every published schema, by file name (docs/schema/)."""
    from .protocol import PROTOCOL

    return {f"{p.name}.schema.json": p.json_schema() for p in (PROTOCOL, CONSOLE, DATA_CHANNEL)}
