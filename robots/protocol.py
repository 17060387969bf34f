"""The robot websocket wire format (/ws/robots/): one dataclass per message, shared by server and agent.

Every frame is a JSON object ``{"v": PROTOCOL_VERSION, "type": "<dotted.name>", ...fields}`` of at most
``MAX_MESSAGE_BYTES`` bytes (UTF-8). ``decode`` checks the size in bytes before parsing, then the nesting depth, the
version, the type and every field (type, length, Unicode, pattern, range: robots/wire.py), and raises
``ProtocolError`` with a stable ``code`` that the server sends back in an ``error`` message. ``encode`` checks the
size again, so nothing relayed to a robot can exceed the frame size its client accepts. Unknown extra fields are
ignored so that a newer peer can add optional fields; anything that changes meaning bumps ``PROTOCOL_VERSION``.
The JSON Schema of this protocol (docs/schema/robot-protocol.schema.json) is generated from these classes.

This module is pure: stdlib only, imported by the Django server and by the Django-free robot agent.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar, Optional

from . import wire
from .wire import NAME_PATTERN, SHA256_PATTERN, UUID_PATTERN, ProtocolError, Struct, spec, values

CAMERA_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}"  # robots/episode_file.py CAMERA_NAME

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # control-plane messages are small; bytes travel over HTTP (the data plane)
MAX_STRING = wire.MAX_STRING
MAX_SDP = 32_000  # an SDP with all ICE candidates, printable ASCII: the only long string of the protocol
MAX_NAME = 150  # user names (Django's limit)

__all__ = ["ProtocolError", "PROTOCOL_VERSION", "MAX_MESSAGE_BYTES", "encode", "decode", "from_dict", "error"]


class ErrorCode(str, enum.Enum):
    MALFORMED = "malformed"  # not JSON, not an object, nested too deeply
    TOO_LARGE = "too_large"
    BAD_VERSION = "bad_version"
    UNKNOWN_TYPE = "unknown_type"
    INVALID = "invalid"  # a field is missing or has the wrong type / value
    FORBIDDEN = "forbidden"  # valid, but not allowed for this robot (e.g. another robot's episode)
    TOO_MANY_ERRORS = "too_many_errors"
    REVOKED = "revoked"
    SERVER_ERROR = "server_error"  # a valid message the server failed to handle (e.g. its database is down); retry


class CloseCode(enum.IntEnum):
    """Websocket close codes the server uses (4000-4999 are application codes)."""

    REVOKED = 4003  # the robot's token was revoked or rotated: reconnecting with it is refused (HTTP 403)
    TOO_MANY_ERRORS = 4008  # more than SOP_MAX_BAD_MESSAGES invalid messages within 60 s


class MessageType(str, enum.Enum):
    # robot -> server
    HELLO = "hello"
    STATUS = "status"
    EPISODE_STARTED = "episode.started"
    EPISODE_ENDED = "episode.ended"
    # server -> robot
    WELCOME = "welcome"
    TASK_ASSIGNED = "task.assigned"
    POLICY_UPDATED = "policy.updated"
    ERROR = "error"
    # operator console <-> robot (docs/console.md); the server relays them
    CONTROL_TAKEOVER = "control.takeover"  # server -> robot
    CONTROL_RELEASE = "control.release"  # server -> robot
    CONTROL_ESTOP = "control.estop"  # server -> robot
    CONTROL_COMMAND = "control.command"  # server -> robot: the websocket fallback of the teleop data channel
    EPISODE_LABEL = "episode.label"  # server -> robot
    WEBRTC_OFFER = "webrtc.offer"  # server -> robot
    WEBRTC_CLOSE = "webrtc.close"  # server -> robot
    WEBRTC_ANSWER = "webrtc.answer"  # robot -> server


class ControlSource(str, enum.Enum):
    """Who produced the executed action of a step. Stored per step in the episode file as ``CONTROL_SOURCE_CODES``."""

    POLICY = "policy"
    OPERATOR = "operator"  # a human in the console
    SIM_OPERATOR = "sim_operator"  # the scripted supervisor of headless runs


CONTROL_SOURCE_CODES = {ControlSource.POLICY: 0, ControlSource.OPERATOR: 1, ControlSource.SIM_OPERATOR: 2}


class RobotState(str, enum.Enum):
    OFFLINE = "offline"  # set by the server only
    IDLE = "idle"  # connected, waiting for a task
    RUNNING = "running"
    ESTOPPED = "estopped"


class Outcome(str, enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"  # labelled failure
    TIMEOUT = "timeout"  # ran out of steps without success
    ABORTED = "aborted"  # stopped early (shutdown, e-stop)


# Outcomes a success rate counts (aborted episodes, stopped by a shutdown or an e-stop, are not rated)
RATED_OUTCOMES = (Outcome.SUCCESS, Outcome.FAILURE, Outcome.TIMEOUT)


class Split(str, enum.Enum):
    OFFLINE = "offline"  # demonstrations recorded before/outside the online loop
    ONLINE = "online"  # on-policy fleet episodes (with interventions)
    EVAL = "eval"  # evaluation runs, never trained on


# Why a robot asks for an operator (docs/console.md, "Help queue"): its own stall detector, its policy's uncertainty,
# or a person pressing the robot's help button.
HELP_KINDS = ("stall", "uncertainty", "button")
MAX_HELP_TRACE = 40  # samples of the robot's last seconds sent with a help request

ROLES = ("viewer", "operator", "admin")  # console roles (robots/roles.py), from least to most privileged
ESTOP_ROLES = ("operator", "admin")  # who may engage or clear an e-stop, on every path

PROTOCOL = wire.Protocol(
    "robot-protocol", version=PROTOCOL_VERSION, max_bytes=MAX_MESSAGE_BYTES,
    title="SOP robot protocol (/ws/robots/)",
    description="Control-plane messages between a robot agent and the server (docs/protocol.md).",
)
REGISTRY = PROTOCOL.registry

_ROBOT_TO_SERVER = "robot -> server"
_SERVER_TO_ROBOT = "server -> robot"


def _uuid(**kw) -> dict:
    return spec(pattern=UUID_PATTERN, max_len=36, **kw)


def _name(**kw) -> dict:
    return spec(pattern=NAME_PATTERN, max_len=100, **kw)


def _count(**kw) -> dict:
    return spec(min=0, **kw)


def action_field():
    """A teleop command's ``action``: [dx, dy, dz] in [-1, 1] (hand velocity), or None for a keepalive. Shared by the
    three paths a command takes: the console socket, the relay to the robot, the data channel."""
    return dataclasses.field(default=None, metadata=spec(min=-1, max=1, min_items=3, max_items=3))


def grip_field():
    """A teleop command's ``grip``: -1 open .. 1 closed, or None to keep the gripper as it is."""
    return dataclasses.field(default=None, metadata=spec(min=-1, max=1))


@dataclasses.dataclass(frozen=True)
class Message(wire.Message):
    TYPE: ClassVar[MessageType]

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, **super().to_dict()}


def invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID.value, message)


# ---------------------------------------------------------------- robot -> server


@dataclasses.dataclass(frozen=True)
class HelpSample(Struct):
    """One control step shortly before a help request: what the robot's proprioception and its driver did."""

    t: float = dataclasses.field(metadata=spec(min=-600, max=0, description="seconds before the request"))
    hand: list[float] = dataclasses.field(metadata=spec(min=-100, max=100, min_items=3, max_items=3))
    grip: float = dataclasses.field(metadata=spec(min=-100, max=100))
    action: list[float] = dataclasses.field(metadata=spec(min=-100, max=100, min_items=1, max_items=8))
    driver: str = dataclasses.field(metadata=spec(choices=values(ControlSource)))


@dataclasses.dataclass(frozen=True)
class HelpSignal(Struct):
    """The robot asks for an operator. Repeated in every heartbeat until answered (a takeover), until the episode
    ends, or until the robot no longer needs it; ``id`` (made by the robot) makes the repeats one request."""

    id: str = dataclasses.field(metadata=_uuid())
    kind: str = dataclasses.field(metadata=spec(choices=HELP_KINDS))
    reason: str = dataclasses.field(metadata=spec(max_len=200))
    urgency: int = dataclasses.field(default=2, metadata=spec(min=1, max=3))
    since: float = dataclasses.field(default=0.0, metadata=_count(description="unix seconds, robot clock"))
    step: int = dataclasses.field(default=0, metadata=_count())
    trace: list[HelpSample] = dataclasses.field(default_factory=list, metadata=spec(max_items=MAX_HELP_TRACE))


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class Hello(Message):
    """First message after connecting. The server answers ``welcome`` and a ``task.assigned`` (if any task is open)."""

    TYPE = MessageType.HELLO
    DIRECTION = _ROBOT_TO_SERVER
    agent_version: str = dataclasses.field(metadata=spec(max_len=50))
    # e.g. ["metaworld", "webrtc", "teleop"]
    capabilities: list[str] = dataclasses.field(default_factory=list, metadata=spec(max_len=50, max_items=32))
    # checkpoint version loaded, None for scripted/random policies
    policy_version: Optional[int] = dataclasses.field(default=None, metadata=spec(min=-1))
    policy: str = dataclasses.field(default="", metadata=spec(max_len=100))  # "scripted-expert", "random", "v12"
    spool_pending: int = dataclasses.field(default=0, metadata=_count())  # episodes waiting in the local spool
    # the cameras it records, the primary (the one streamed first) first: what a policy may read from this robot
    cameras: list[str] = dataclasses.field(default_factory=list,
                                           metadata=spec(pattern=CAMERA_PATTERN, max_len=40, max_items=5))


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class Status(Message):
    """Heartbeat, sent every ``heartbeat_s`` and on every state change. The server reconciles it with what it asked
    for (docs/console.md, "Reconciliation"): an e-stop or takeover the robot does not report is sent again."""

    TYPE = MessageType.STATUS
    DIRECTION = _ROBOT_TO_SERVER
    state: str = dataclasses.field(metadata=spec(choices=values(RobotState)))
    task: Optional[str] = dataclasses.field(default=None, metadata=_name())
    episode_id: Optional[str] = dataclasses.field(default=None, metadata=_uuid())
    step: int = dataclasses.field(default=0, metadata=_count())
    control_source: str = dataclasses.field(default=ControlSource.POLICY.value,
                                            metadata=spec(choices=values(ControlSource)))
    loop_hz: float = dataclasses.field(default=0.0, metadata=_count())  # measured control rate over the last window
    loop_p99_ms: float = dataclasses.field(default=0.0, metadata=_count())  # p99 step period over the last window
    overruns: int = dataclasses.field(default=0, metadata=_count())  # steps longer than the nominal period
    policy_version: Optional[int] = dataclasses.field(default=None, metadata=spec(min=-1))
    policy: str = dataclasses.field(default="", metadata=spec(max_len=100))
    spool_pending: int = dataclasses.field(default=0, metadata=_count())
    # why the last announced checkpoint was not loaded (the old one keeps running); "" = none
    policy_error: str = dataclasses.field(default="", metadata=spec(max_len=300))
    # operator control (docs/console.md): the lease the robot obeys, who drives, the deadman and the e-stop latch
    lease: Optional[int] = dataclasses.field(default=None, metadata=spec(min=1))  # None while its policy drives
    operator: str = dataclasses.field(default="", metadata=spec(max_len=MAX_NAME))  # who holds the lease
    deadman: bool = False  # under a takeover and no fresh command for DEADMAN_S: holding still
    estopped: bool = False  # the e-stop latch is set (state is then "estopped")
    # the ``seq`` of the last control.estop the robot applied (None: none yet); a latch set on the robot itself
    # (the WebRTC data channel) is ``estop_local`` until the server has acknowledged it with a control.estop
    estop_seq: Optional[int] = dataclasses.field(default=None, metadata=spec(min=0))
    estop_local: bool = False
    estopped_by: str = dataclasses.field(default="", metadata=spec(max_len=MAX_NAME))
    # age of the last applied operator command, during a takeover
    last_command_age_ms: Optional[float] = dataclasses.field(default=None, metadata=_count())
    video_fps: float = dataclasses.field(default=0.0, metadata=_count())  # frames/s sent over WebRTC
    viewers: int = dataclasses.field(default=0, metadata=_count())  # open WebRTC sessions
    # the robot asks for an operator (docs/console.md, "Help queue"); None: it does not
    help: Optional[HelpSignal] = None


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class EpisodeStarted(Message):
    TYPE = MessageType.EPISODE_STARTED
    DIRECTION = _ROBOT_TO_SERVER
    episode_id: str = dataclasses.field(metadata=_uuid())
    task: str = dataclasses.field(metadata=_name())
    prompt: str = dataclasses.field(metadata=spec(max_len=500))
    started_at: float = dataclasses.field(metadata=_count(description="unix seconds"))
    policy_version: Optional[int] = dataclasses.field(default=None, metadata=spec(min=-1))
    policy: str = dataclasses.field(default="", metadata=spec(max_len=100))
    split: str = dataclasses.field(default=Split.ONLINE.value, metadata=spec(choices=values(Split)))


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class EpisodeEnded(Message):
    """The episode is over; its payload follows over HTTP. The payload's own metadata is authoritative."""

    TYPE = MessageType.EPISODE_ENDED
    DIRECTION = _ROBOT_TO_SERVER
    episode_id: str = dataclasses.field(metadata=_uuid())
    steps: int = dataclasses.field(metadata=_count())
    outcome: str = dataclasses.field(metadata=spec(choices=values(Outcome)))
    ended_at: float = dataclasses.field(metadata=_count(description="unix seconds"))
    interventions: int = dataclasses.field(default=0, metadata=_count())  # intervention segments
    intervention_steps: int = dataclasses.field(default=0, metadata=_count())


# ---------------------------------------------------------------- server -> robot


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class Welcome(Message):
    TYPE = MessageType.WELCOME
    DIRECTION = _SERVER_TO_ROBOT
    robot: str = dataclasses.field(metadata=_name())
    heartbeat_s: float = dataclasses.field(metadata=spec(min=0))
    server_time: float = dataclasses.field(metadata=_count(description="unix seconds"))


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class TaskAssigned(Message):
    """What the robot runs from its next episode on. ``task=None`` means: stop after this episode and wait."""

    TYPE = MessageType.TASK_ASSIGNED
    DIRECTION = _SERVER_TO_ROBOT
    task: Optional[str] = dataclasses.field(metadata=_name())
    env_id: str = dataclasses.field(default="", metadata=spec(max_len=100))
    prompt: str = dataclasses.field(default="", metadata=spec(max_len=500))
    max_steps: int = dataclasses.field(default=0, metadata=_count())
    split: str = dataclasses.field(default=Split.ONLINE.value, metadata=spec(choices=values(Split)))

    def validate(self):
        if self.task is not None and self.max_steps <= 0:
            raise invalid("max_steps must be positive")


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class PolicyUpdated(Message):
    """A new checkpoint is published: download in the background, verify, swap at the next episode boundary."""

    TYPE = MessageType.POLICY_UPDATED
    DIRECTION = _SERVER_TO_ROBOT
    version: int = dataclasses.field(metadata=spec(min=1))
    url: str = dataclasses.field(metadata=spec(ascii=True, max_len=2000))
    size: int = dataclasses.field(metadata=spec(min=1))
    sha256: str = dataclasses.field(metadata=spec(pattern=SHA256_PATTERN, max_len=64))


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class Error(Message):
    TYPE = MessageType.ERROR
    DIRECTION = _SERVER_TO_ROBOT
    code: str = dataclasses.field(metadata=spec(choices=values(ErrorCode)))
    message: str = dataclasses.field(metadata=spec())
    # the type of the message that caused it, when known
    ref_type: Optional[str] = dataclasses.field(default=None, metadata=spec(max_len=50))


# ---------------------------------------------------------------- operator control (docs/console.md)

DEADMAN_S = 0.25  # during a takeover, no command or keepalive for this long -> the robot holds still
STALE_COMMAND_S = 0.5  # operator commands older than this (robot clock) are dropped
OPERATOR_OUTCOMES = ("success", "failure")


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class ControlTakeover(Message):
    """An operator holds the robot from now on (``lease`` is the ControlLease id). Until the operator's first command
    the robot holds still; the deadman applies from this moment. Sent again after a reconnect while the lease lives,
    and whenever a heartbeat shows the robot is not under it (the first one was lost)."""

    TYPE = MessageType.CONTROL_TAKEOVER
    DIRECTION = _SERVER_TO_ROBOT
    lease: int = dataclasses.field(metadata=spec(min=1))
    operator: str = dataclasses.field(metadata=spec(max_len=MAX_NAME))
    reason: str = dataclasses.field(default="", metadata=spec(max_len=500))

    def validate(self):
        if not self.operator:
            raise invalid("operator must not be empty")


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class ControlRelease(Message):
    """The lease ended (release, console gone, timeout, forced takeover): the policy drives again. A release of a lease
    the robot is not under is ignored (a newer takeover may have overtaken it)."""

    TYPE = MessageType.CONTROL_RELEASE
    DIRECTION = _SERVER_TO_ROBOT
    lease: int = dataclasses.field(metadata=spec(min=1))
    reason: str = dataclasses.field(default="", metadata=spec(max_len=500))


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class ControlEstop(Message):
    """``engaged=True`` latches the e-stop: the robot ends the running episode (aborted), holds still and starts no
    episode until ``engaged=False`` clears it. It wins over everything else, takeovers included. ``seq`` numbers the
    server's e-stop changes of this robot; the robot reports the last one it applied (``status.estop_seq``), and the
    server re-sends the current one until the robot's report agrees."""

    TYPE = MessageType.CONTROL_ESTOP
    DIRECTION = _SERVER_TO_ROBOT
    engaged: bool
    by: str = dataclasses.field(default="", metadata=spec(max_len=MAX_NAME))
    seq: int = dataclasses.field(default=0, metadata=spec(min=0))


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class ControlCommand(Message):
    """One teleop command relayed over the websockets (the fallback of the WebRTC data channel, same fields).

    ``seq`` grows per lease; ``t`` is the command's time in the robot's clock, unix milliseconds (the browser learns its
    offset from ping/pong). ``action`` is [dx, dy, dz] in [-1, 1] (hand velocity, the environment's action scale) or
    None for a keepalive; ``grip`` -1 open / 1 close / None keep."""

    TYPE = MessageType.CONTROL_COMMAND
    DIRECTION = _SERVER_TO_ROBOT
    lease: int = dataclasses.field(metadata=spec(min=1))
    seq: int = dataclasses.field(metadata=spec(min=0))
    t: float = dataclasses.field(metadata=spec(description="robot clock, unix milliseconds"))
    action: Optional[list[float]] = action_field()
    grip: Optional[float] = grip_field()


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class EpisodeLabel(Message):
    """An operator decided the running episode's outcome: the robot ends it at the next step with this outcome,
    recorded as decided by ``by``."""

    TYPE = MessageType.EPISODE_LABEL
    DIRECTION = _SERVER_TO_ROBOT
    outcome: str = dataclasses.field(metadata=spec(choices=OPERATOR_OUTCOMES))
    by: str = dataclasses.field(metadata=spec(max_len=MAX_NAME))
    # the episode the operator saw; the robot ignores the label if another one runs
    episode_id: Optional[str] = dataclasses.field(default=None, metadata=_uuid())


@dataclasses.dataclass(frozen=True)
class IceServer(Struct):
    """An RTCIceServer: a STUN or TURN server the peers may use."""

    urls: str | list[str] = dataclasses.field(metadata=spec(max_len=500, max_items=4))
    username: Optional[str] = dataclasses.field(default=None, metadata=spec(max_len=200))
    credential: Optional[str] = dataclasses.field(default=None, metadata=spec(max_len=500))


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class WebrtcOffer(Message):
    """A browser's SDP offer (recvonly video + a data channel "teleop"), with all ICE candidates gathered. ``user``
    and ``role`` are the console user and role the server authenticated: the robot accepts teleop on this session
    only while ``user`` holds the lease, and an e-stop over its data channel only from ``ESTOP_ROLES``."""

    TYPE = MessageType.WEBRTC_OFFER
    DIRECTION = _SERVER_TO_ROBOT
    session: str = dataclasses.field(metadata=_uuid())
    sdp: str = dataclasses.field(metadata=spec(ascii=True, max_len=MAX_SDP))
    user: str = dataclasses.field(metadata=spec(max_len=MAX_NAME))
    role: str = dataclasses.field(default="viewer", metadata=spec(choices=ROLES))
    # at most 4 x 2.7 KB: with the largest SDP the offer still fits MAX_MESSAGE_BYTES
    ice_servers: list[IceServer] = dataclasses.field(default_factory=list, metadata=spec(max_items=4))


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class WebrtcClose(Message):
    TYPE = MessageType.WEBRTC_CLOSE
    DIRECTION = _SERVER_TO_ROBOT
    session: str = dataclasses.field(metadata=_uuid())


@PROTOCOL.register
@dataclasses.dataclass(frozen=True)
class WebrtcAnswer(Message):
    """The robot's SDP answer to ``session``, or ``error`` (then ``sdp`` is empty) if it cannot serve video."""

    TYPE = MessageType.WEBRTC_ANSWER
    DIRECTION = _ROBOT_TO_SERVER
    session: str = dataclasses.field(metadata=_uuid())
    sdp: str = dataclasses.field(default="", metadata=spec(ascii=True, max_len=MAX_SDP))
    error: str = dataclasses.field(default="", metadata=spec())


ROBOT_MESSAGES = (Hello, Status, EpisodeStarted, EpisodeEnded, WebrtcAnswer)  # what a robot may send
SERVER_MESSAGES = tuple(cls for cls in REGISTRY.values() if cls not in ROBOT_MESSAGES)


# ---------------------------------------------------------------- encode / decode


def encode(message: Message) -> str:
    """The frame of ``message``; ``ProtocolError`` (too_large) if it exceeds MAX_MESSAGE_BYTES in UTF-8."""
    return PROTOCOL.encode(message)


def decode(raw: str | bytes, accept=None) -> Message:
    """Parse and validate one frame. Raises ``ProtocolError``; never returns a half-valid message."""
    return PROTOCOL.decode(raw, accept)


def from_dict(body: dict[str, Any]) -> Message:
    """A message from a parsed object (a channel-layer event's ``message``), validated like a frame."""
    return PROTOCOL.from_dict(body)


def error(code: str | ErrorCode, message: str, ref_type: Optional[str] = None) -> Error:
    ref = ref_type[:50] if isinstance(ref_type, str) and wire.valid_text(ref_type) else None
    return Error(code=ErrorCode(code).value, message=_printable(message)[:MAX_STRING], ref_type=ref)


def _printable(text: str) -> str:
    """An error text safe to send back: a refused frame's content (lone surrogates included) may be quoted in it."""
    return text.encode("utf-8", "replace").decode("utf-8")
