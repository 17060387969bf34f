"""The robot websocket wire format (/ws/robots/): one dataclass per message, shared by server and agent.

Every frame is a JSON object ``{"v": PROTOCOL_VERSION, "type": "<dotted.name>", ...fields}``. ``decode`` checks the
size before parsing, then the version, the type and every field's type, and raises ``ProtocolError`` with a stable
``code`` that the server sends back in an ``error`` message. Unknown extra fields are ignored so that a newer peer can
add optional fields without breaking an older one; anything that changes meaning bumps ``PROTOCOL_VERSION``.

This module is pure: stdlib only, imported by the Django server and by the Django-free robot agent.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import types
import typing
from typing import Any, ClassVar, Optional

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # control-plane messages are small; bytes travel over HTTP (the data plane)
MAX_STRING = 2000


class ProtocolError(ValueError):
    """A message that cannot be accepted. ``code`` is stable and machine-readable."""

    def __init__(self, code: str, message: str, ref_type: Optional[str] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref_type = ref_type


class ErrorCode(str, enum.Enum):
    MALFORMED = "malformed"  # not JSON, not an object
    TOO_LARGE = "too_large"
    BAD_VERSION = "bad_version"
    UNKNOWN_TYPE = "unknown_type"
    INVALID = "invalid"  # a field is missing or has the wrong type / value
    FORBIDDEN = "forbidden"  # valid, but not allowed for this robot (e.g. another robot's episode)
    TOO_MANY_ERRORS = "too_many_errors"
    REVOKED = "revoked"


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


class Split(str, enum.Enum):
    OFFLINE = "offline"  # demonstrations recorded before/outside the online loop
    ONLINE = "online"  # on-policy fleet episodes (with interventions)
    EVAL = "eval"  # evaluation runs, never trained on


_NAME = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,99}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

REGISTRY: dict[str, type["Message"]] = {}


def _register(cls):
    REGISTRY[cls.TYPE.value] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class Message:
    TYPE: ClassVar[MessageType]

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _hints(type(self))[f.name], LONG_FIELDS.get(f.name, MAX_STRING))
        self.validate()

    def validate(self) -> None:
        """Value checks beyond types; raise ``invalid(...)``."""

    def to_dict(self) -> dict[str, Any]:
        body = {"v": PROTOCOL_VERSION, "type": self.TYPE.value}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            body[f.name] = value.value if isinstance(value, enum.Enum) else value
        return body


def invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID, message)


# ---------------------------------------------------------------- robot -> server


@_register
@dataclasses.dataclass(frozen=True)
class Hello(Message):
    """First message after connecting. The server answers ``welcome`` and a ``task.assigned`` (if any task is open)."""

    TYPE = MessageType.HELLO
    agent_version: str
    capabilities: list[str] = dataclasses.field(default_factory=list)  # e.g. ["metaworld", "webrtc", "teleop"]
    policy_version: Optional[int] = None  # checkpoint version loaded, None for scripted/random policies
    policy: str = ""  # human-readable policy name ("scripted-expert", "random", "v12")
    spool_pending: int = 0  # episodes waiting in the local spool


@_register
@dataclasses.dataclass(frozen=True)
class Status(Message):
    """Heartbeat, sent every ``heartbeat_s`` and on every state change."""

    TYPE = MessageType.STATUS
    state: str
    task: Optional[str] = None
    episode_id: Optional[str] = None
    step: int = 0
    control_source: str = ControlSource.POLICY.value
    loop_hz: float = 0.0  # measured control rate over the last window
    loop_p99_ms: float = 0.0  # p99 step period over the last window
    overruns: int = 0  # steps that took longer than the nominal period, since start
    policy_version: Optional[int] = None
    policy: str = ""
    spool_pending: int = 0
    policy_error: str = ""  # why the last announced checkpoint was not loaded (the old one keeps running); "" = none
    # operator control (docs/console.md): the lease the robot obeys, who drives, the deadman and the e-stop latch
    lease: Optional[int] = None  # the takeover lease the robot is under, None while its policy drives
    operator: str = ""  # username of the operator holding the lease
    deadman: bool = False  # under a takeover and no fresh command for DEADMAN_S: holding still
    estopped: bool = False  # the e-stop latch is set (state is then "estopped")
    last_command_age_ms: Optional[float] = None  # age of the last applied operator command, during a takeover
    video_fps: float = 0.0  # camera frames per second sent over WebRTC (all viewers share one source)
    viewers: int = 0  # open WebRTC sessions

    def validate(self):
        _enum_value("state", self.state, RobotState)
        _enum_value("control_source", self.control_source, ControlSource)
        _optional_uuid("episode_id", self.episode_id)
        _non_negative("step", self.step)


@_register
@dataclasses.dataclass(frozen=True)
class EpisodeStarted(Message):
    TYPE = MessageType.EPISODE_STARTED
    episode_id: str
    task: str
    prompt: str
    started_at: float  # unix seconds
    policy_version: Optional[int] = None
    policy: str = ""
    split: str = Split.ONLINE.value

    def validate(self):
        _uuid("episode_id", self.episode_id)
        _name("task", self.task)
        _enum_value("split", self.split, Split)


@_register
@dataclasses.dataclass(frozen=True)
class EpisodeEnded(Message):
    """The episode is over; its payload follows over HTTP. The payload's own metadata is authoritative."""

    TYPE = MessageType.EPISODE_ENDED
    episode_id: str
    steps: int
    outcome: str
    ended_at: float
    interventions: int = 0  # intervention segments
    intervention_steps: int = 0

    def validate(self):
        _uuid("episode_id", self.episode_id)
        _enum_value("outcome", self.outcome, Outcome)
        _non_negative("steps", self.steps)


# ---------------------------------------------------------------- server -> robot


@_register
@dataclasses.dataclass(frozen=True)
class Welcome(Message):
    TYPE = MessageType.WELCOME
    robot: str
    heartbeat_s: float
    server_time: float


@_register
@dataclasses.dataclass(frozen=True)
class TaskAssigned(Message):
    """What the robot runs from its next episode on. ``task=None`` means: stop after this episode and wait."""

    TYPE = MessageType.TASK_ASSIGNED
    task: Optional[str]
    env_id: str = ""
    prompt: str = ""
    max_steps: int = 0
    split: str = Split.ONLINE.value

    def validate(self):
        if self.task is not None:
            _name("task", self.task)
            if self.max_steps <= 0:
                raise invalid("max_steps must be positive")
        _enum_value("split", self.split, Split)


@_register
@dataclasses.dataclass(frozen=True)
class PolicyUpdated(Message):
    """A new checkpoint is published: download in the background, verify, swap at the next episode boundary."""

    TYPE = MessageType.POLICY_UPDATED
    version: int
    url: str
    size: int
    sha256: str

    def validate(self):
        if self.version < 1 or self.size <= 0:
            raise invalid("version and size must be positive")
        if not _SHA256.match(self.sha256):
            raise invalid("sha256 must be 64 lowercase hex characters")


@_register
@dataclasses.dataclass(frozen=True)
class Error(Message):
    TYPE = MessageType.ERROR
    code: str
    message: str
    ref_type: Optional[str] = None  # the type of the message that caused it, when known


# ---------------------------------------------------------------- operator control (docs/console.md)

DEADMAN_S = 0.25  # during a takeover, no command or keepalive for this long -> the robot holds still
STALE_COMMAND_S = 0.5  # operator commands older than this (robot clock) are dropped
MAX_SDP = 32_000  # an SDP with all ICE candidates; the only long string of the protocol
OPERATOR_OUTCOMES = ("success", "failure")


@_register
@dataclasses.dataclass(frozen=True)
class ControlTakeover(Message):
    """An operator holds the robot from now on (``lease`` is the ControlLease id). Until the operator's first command
    the robot holds still; the deadman applies from this moment. Sent again after a reconnect while the lease lives."""

    TYPE = MessageType.CONTROL_TAKEOVER
    lease: int
    operator: str
    reason: str = ""

    def validate(self):
        if self.lease < 1 or not self.operator:
            raise invalid("lease must be positive and operator non-empty")


@_register
@dataclasses.dataclass(frozen=True)
class ControlRelease(Message):
    """The lease ended (release, console gone, timeout, forced takeover): the policy drives again. A release of a lease
    the robot is not under is ignored (a newer takeover may have overtaken it)."""

    TYPE = MessageType.CONTROL_RELEASE
    lease: int
    reason: str = ""


@_register
@dataclasses.dataclass(frozen=True)
class ControlEstop(Message):
    """``engaged=True`` latches the e-stop: the robot ends the running episode (aborted), holds still and starts no
    episode until ``engaged=False`` clears it. It wins over everything else, takeovers included."""

    TYPE = MessageType.CONTROL_ESTOP
    engaged: bool
    by: str = ""


@_register
@dataclasses.dataclass(frozen=True)
class ControlCommand(Message):
    """One teleop command relayed over the websockets (the fallback of the WebRTC data channel, same fields).

    ``seq`` grows per lease; ``t`` is the command's time in the robot's clock, unix milliseconds (the browser learns its
    offset from ping/pong). ``action`` is [dx, dy, dz] in [-1, 1] (hand velocity, the environment's action scale) or
    None for a keepalive; ``grip`` -1 open / 1 close / None keep."""

    TYPE = MessageType.CONTROL_COMMAND
    lease: int
    seq: int
    t: float
    action: Optional[list[float]] = None
    grip: Optional[float] = None

    def validate(self):
        if self.action is not None and (len(self.action) != 3 or any(abs(a) > 1.0 for a in self.action)):
            raise invalid("action must be 3 numbers in [-1, 1]")
        if self.grip is not None and abs(self.grip) > 1.0:
            raise invalid("grip must be in [-1, 1]")
        _non_negative("seq", self.seq)


@_register
@dataclasses.dataclass(frozen=True)
class EpisodeLabel(Message):
    """An operator decided the running episode's outcome: the robot ends it at the next step with this outcome,
    recorded as decided by ``by``."""

    TYPE = MessageType.EPISODE_LABEL
    outcome: str
    by: str
    episode_id: Optional[str] = None  # the episode the operator saw; the robot ignores the label if another one runs

    def validate(self):
        if self.outcome not in OPERATOR_OUTCOMES:
            raise invalid(f"outcome must be one of {list(OPERATOR_OUTCOMES)}")
        _optional_uuid("episode_id", self.episode_id)


@_register
@dataclasses.dataclass(frozen=True)
class WebrtcOffer(Message):
    """A browser's SDP offer (recvonly video + a data channel "teleop"), with all ICE candidates gathered. ``user`` is
    the console user the server authenticated; the robot accepts teleop on this session only while ``user`` holds the
    lease."""

    TYPE = MessageType.WEBRTC_OFFER
    session: str
    sdp: str
    user: str
    ice_servers: list[dict] = dataclasses.field(default_factory=list)  # RTCIceServer dicts: urls, username, credential

    def validate(self):
        _uuid("session", self.session)


@_register
@dataclasses.dataclass(frozen=True)
class WebrtcClose(Message):
    TYPE = MessageType.WEBRTC_CLOSE
    session: str

    def validate(self):
        _uuid("session", self.session)


@_register
@dataclasses.dataclass(frozen=True)
class WebrtcAnswer(Message):
    """The robot's SDP answer to ``session``, or ``error`` (then ``sdp`` is empty) if it cannot serve video."""

    TYPE = MessageType.WEBRTC_ANSWER
    session: str
    sdp: str = ""
    error: str = ""

    def validate(self):
        _uuid("session", self.session)


LONG_FIELDS = {"sdp": MAX_SDP}  # string fields allowed past MAX_STRING


# ---------------------------------------------------------------- encode / decode


def encode(message: Message) -> str:
    return json.dumps(message.to_dict(), separators=(",", ":"), allow_nan=False)


def decode(raw: str | bytes) -> Message:
    """Parse and validate one frame. Raises ``ProtocolError``; never returns a half-valid message."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "a message must be a JSON object")
    kind = body.get("type")
    ref = kind if isinstance(kind, str) else None
    if body.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.BAD_VERSION, f"protocol version {body.get('v')!r} not supported (want {PROTOCOL_VERSION})", ref
        )
    cls = REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}", ref)
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in body.items() if k in names})
    except ProtocolError as exc:
        exc.ref_type = ref
        raise
    except TypeError as exc:  # missing required field
        raise ProtocolError(ErrorCode.INVALID, str(exc).replace(cls.__name__ + ".__init__() ", ""), ref) from None


def error(code: str | ErrorCode, message: str, ref_type: Optional[str] = None) -> Error:
    return Error(code=ErrorCode(code).value, message=message[:MAX_STRING], ref_type=ref_type)


# ---------------------------------------------------------------- validation helpers


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _check_type(name: str, value: Any, annotation: Any, max_string: int = MAX_STRING) -> None:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return
        return _check_type(name, value, next(a for a in args if a is not type(None)), max_string)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list) or len(value) > 100:
            raise invalid(f"{name} must be a list of at most 100 items")
        for i, v in enumerate(value):
            _check_type(f"{name}[{i}]", v, item)
        return
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is dict:
        ok = isinstance(value, dict) and len(json.dumps(value)) <= MAX_STRING
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is str:
        ok = isinstance(value, str) and len(value) <= max_string
    else:
        ok = isinstance(value, annotation)
    if not ok:
        raise invalid(f"{name} must be {getattr(annotation, '__name__', annotation)}, got {type(value).__name__}")


def _enum_value(name, value, enum_cls):
    if value not in {m.value for m in enum_cls}:
        raise invalid(f"{name} must be one of {[m.value for m in enum_cls]}")


def _name(name, value):
    if not _NAME.match(value):
        raise invalid(f"{name} must be a lowercase identifier")


def _uuid(name, value):
    if not _UUID.match(value):
        raise invalid(f"{name} must be a lowercase UUID")


def _optional_uuid(name, value):
    if value is not None:
        _uuid(name, value)


def _non_negative(name, value):
    if value < 0:
        raise invalid(f"{name} must be >= 0")
