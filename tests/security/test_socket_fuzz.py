"""Property-based fuzzing of both websockets through a real daphne (hypothesis).

Each test opens a socket to a live daphne on the test database and sends generated frames: valid messages with one
field mutated, arbitrary JSON, raw text and bytes, and the known nasties (deep nesting, UUIDs with a trailing
newline, lone surrogates, numbers past every range, strings past every limit, frames past the byte limit once
encoded). After every frame a sentinel (an unknown type on the robot socket, a ``ping`` on the console) proves the
frame was handled and the socket is still open. The properties:

- the socket never closes (no 1011: the server's bad-frame budget is raised for the fuzzer) and every reply is a
  valid frame of the protocol, errors with a documented code and never ``server_error``;
- a refused frame changes nothing in the database; a viewer's frames change nothing at all, valid or not;
- what reaches the robot from the console is a valid robot-protocol frame within the robot's 64 KiB limit, and the
  robot's socket stays open whatever a viewer sends;
- frames stay under daphne's transport limit (1 MiB, where it drops the connection: tested on its own below);
- after the fuzzer disconnects, the robot is shown offline (the disconnect bookkeeping ran), /healthz answers, and
  daphne logged no traceback.

SOP_FUZZ_EXAMPLES sets the number of frames per test (default 150).
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from websockets.exceptions import ConnectionClosed

from learner.models import Checkpoint, TrainingRun
from robots import console_protocol as cp
from robots import protocol
from robots.models import AuditEvent, ControlLease, Episode, InterventionSegment, Robot
from robots.roles import OPERATOR, set_role
from tests.e2e.conftest import console_socket, http_ok, robot_socket, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600),
              # sockets that live across hypothesis examples are closed by hand, not by a with block
              pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")]

EXAMPLES = int(os.environ.get("SOP_FUZZ_EXAMPLES", "150"))
FUZZ = hsettings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.data_too_large, HealthCheck.large_base_example])
# The daphne under fuzz: a bad-frame budget the fuzzer cannot exhaust, leases that do not expire on their own (so a
# state change can only come from a frame), and the default limits everywhere else.
SERVER_ENV = {"SOP_MAX_BAD_MESSAGES": 1_000_000, "SOP_LEASE_TIMEOUT_S": 3600}
REPLY_TIMEOUT_S = 15.0
ROBOT_ERRORS = {c.value for c in protocol.ErrorCode} - {"server_error", "too_many_errors", "revoked"}
CONSOLE_ERRORS = set(cp.ERROR_CODES) - {"server_error", "too_many_errors"}

# ---------------------------------------------------------------- what the fuzzer sends

UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"
NASTY = [
    None, True, 0, -1, 1.5, -1e308, 2**63, 2**64, -(2**63) - 1, 10**400, "", " ", "\n", "\x00", "é" * 40,
    UUID + "\n", UUID.upper(), "\n" + UUID, UUID + " ", "sim-01\n", "sim-01 ", "SIM-01", "../sim-01",
    "\ud800", "a\udfffb", "\U0001f916" * 20, "x" * 600, "é" * 33_000, "a" * 70_000,
    [], {}, [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]], {"a": {"b": {"c": {"d": {}}}}},
    [0.0] * 4, [1e9] * 4, [0.0] * 5000,
]
SURROGATE = st.sampled_from(["\ud800", "\udc00", "x\udbff", "\udfff\ud800"])


def json_values(max_leaves: int = 12):
    scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
               | st.text(max_size=40) | SURROGATE | st.sampled_from(NASTY))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=max_leaves)


def mutated(templates: list[dict]):
    """A valid message with at most two fields replaced, deleted or added."""

    @st.composite
    def build(draw):
        body = dict(draw(st.sampled_from(templates)))
        for _ in range(draw(st.integers(0, 2))):
            keys = sorted(body) + ["extra", "v", "type"]
            key = draw(st.sampled_from(keys) | st.text(max_size=12))
            if draw(st.booleans()) or key not in body:
                body[key] = draw(json_values())
            else:
                del body[key]
        return body

    return build()


def encoded(bodies):
    """A JSON text frame: UTF-8 or ASCII escapes (lone surrogates only survive as escapes)."""
    return st.tuples(bodies, st.booleans()).map(lambda pair: _dumps(*pair))


def _dumps(body: Any, ascii_only: bool) -> str:
    text = json.dumps(body, ensure_ascii=True)
    if not ascii_only:
        try:
            text = json.dumps(body, ensure_ascii=False).encode("utf-8").decode("utf-8")
        except UnicodeEncodeError:
            pass
    return text


def nested(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"v":1,"type":"status","state":"idle","x":' + '{"a":' * depth + "1" + "}" * depth + "}"


def frames(templates: list[dict]):
    return st.one_of(
        encoded(mutated(templates)),
        encoded(mutated(templates)),
        encoded(json_values(24)),
        st.text(max_size=200),
        st.binary(max_size=200),
        st.builds(nested, st.integers(30, 150_000), st.sampled_from(["list", "object"])),
    )


def robot_templates(task: str) -> list[dict]:
    v = protocol.PROTOCOL_VERSION
    return [
        {"v": v, "type": "hello", "agent_version": "fuzz", "capabilities": ["webrtc"], "policy_version": None},
        {"v": v, "type": "status", "state": "idle", "task": None, "episode_id": None},
        {"v": v, "type": "status", "state": "running", "task": task, "episode_id": UUID, "step": 3, "lease": 1,
         "estopped": False, "operator": "alice"},
        {"v": v, "type": "episode.started", "episode_id": UUID, "task": task, "prompt": "open", "started_at": 1.0e9},
        {"v": v, "type": "episode.ended", "episode_id": UUID, "steps": 10, "outcome": "success", "ended_at": 1.1e9},
        {"v": v, "type": "webrtc.answer", "session": UUID, "sdp": "v=0\r\n", "error": ""},
        {"v": v, "type": "control.estop", "engaged": True, "by": "robot"},  # server -> robot: refused from a robot
        {"v": v, "type": "welcome", "robot": "sim-01", "heartbeat_s": 1, "server_time": 1.0},
    ]


def console_templates(robot: str) -> list[dict]:
    session = str(uuid.UUID(UUID))
    return [
        {"type": "ping", "t": 1.0},
        {"type": "webrtc.offer", "robot": robot, "session": session, "sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n"},
        {"type": "webrtc.close", "robot": robot, "session": session},
        {"type": "takeover", "robot": robot, "reason": "fuzz", "force": False},
        {"type": "keepalive", "robot": robot},
        {"type": "release", "robot": robot},
        {"type": "teleop", "robot": robot, "seq": 1, "t": 1.0, "action": [0.1, 0.0, 0.0, 0.0], "grip": 0.5},
        {"type": "estop", "robot": robot, "engaged": True},
        {"type": "label", "robot": robot, "outcome": "failure", "episode_id": None},
    ]


# ---------------------------------------------------------------- sockets and state


def snapshot() -> tuple:
    """Everything a frame could change (not the heartbeat clock)."""
    robots = tuple(Robot.objects.order_by("pk").values_list(
        "pk", "connected", "state", "current_task_id", "current_episode", "current_step", "policy_version",
        "estopped", "estop_seq", "reported_estopped", "reported_lease", "capabilities", "agent_version",
        "operator_name", "token_hash", "revoked_at"))
    episodes = tuple(Episode.objects.order_by("id").values_list("id", "status", "steps", "outcome", "outcome_by"))
    leases = tuple(ControlLease.objects.order_by("pk").values_list("pk", "ended_at", "expires_at"))
    return (robots, episodes, leases, AuditEvent.objects.count(), InterventionSegment.objects.count(),
            TrainingRun.objects.count(), Checkpoint.objects.count())


class RobotPeer:
    """A robot's socket that only listens (and says hello): records and checks what the server relays to it."""

    def __init__(self, url: str, token: str):
        self.ws = robot_socket(url, token)
        self.frames: list[str] = []
        self.problems: list[str] = []
        self.closed: Any = None
        self.ws.send(protocol.encode(protocol.Hello(agent_version="fuzz-peer")))
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for raw in self.ws:
                self.frames.append(raw)
                size = len(raw.encode("utf-8")) if isinstance(raw, str) else len(raw)
                if size > protocol.MAX_MESSAGE_BYTES:
                    self.problems.append(f"a frame of {size} bytes reached the robot")
                try:
                    protocol.decode(raw)
                except protocol.ProtocolError as exc:
                    self.problems.append(f"the robot could not decode a relayed frame: {exc.message}")
        except ConnectionClosed as exc:
            self.closed = exc

    def close(self):
        self.ws.close()
        self.thread.join(10)


def replies_until(ws, done) -> list[dict]:
    """Frames received until one satisfies ``done``; fails if the socket closes or goes quiet."""
    seen = []
    while True:
        try:
            raw = ws.recv(timeout=REPLY_TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(f"no sentinel reply within {REPLY_TIMEOUT_S}s; got {seen[-5:]}") from None
        except ConnectionClosed as exc:
            raise AssertionError(f"the server closed the socket ({exc.rcvd})") from None
        body = json.loads(raw)
        if done(body):
            return seen
        seen.append(body)


def no_traceback(proc) -> None:
    log = proc.output()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]


@pytest.fixture
def fuzz_server(launcher):
    proc, url = launcher.server(**SERVER_ENV)
    return proc, url


# ---------------------------------------------------------------- the robot socket


def test_robot_socket_survives_any_frame_and_a_refused_frame_changes_nothing(fuzz_server, robot, task):
    proc, url = fuzz_server
    robot_row, token = robot
    ws = robot_socket(url, token)
    wait_for(lambda: Robot.objects.get(pk=robot_row.pk).connected, 20, "robot shown online")
    counter = iter(range(10**9))
    refused = {"n": 0}

    @FUZZ
    @given(frame=frames(robot_templates(task.name)))
    def check(frame):
        sentinel = f"zz.sentinel.{next(counter)}"
        before = snapshot()
        ws.send(frame)
        ws.send(json.dumps({"v": protocol.PROTOCOL_VERSION, "type": sentinel}))
        seen = replies_until(ws, lambda b: b.get("type") == "error" and b.get("ref_type") == sentinel)
        for body in seen:
            protocol.from_dict(body)  # every reply is a valid server frame
            assert body.get("code") != "server_error", (frame[:300], body)
        errors = [b for b in seen if b["type"] == "error"]
        assert all(b["code"] in ROBOT_ERRORS for b in errors), errors
        if errors:
            refused["n"] += 1
            assert snapshot() == before, f"a refused frame changed the database: {frame[:300]!r}"

    check()
    assert refused["n"] > EXAMPLES // 4, "the fuzzer should mostly send frames the server refuses"
    ws.close()
    wait_for(lambda: not Robot.objects.get(pk=robot_row.pk).connected, 20, "robot shown offline after disconnect")
    assert http_ok(f"{url}/healthz")
    no_traceback(proc)


@pytest.mark.parametrize("frame", [
    nested(100_000, "list"), nested(5000, "object"),
    json.dumps({"v": 1, "type": "episode.started", "episode_id": UUID + "\n", "task": "drawer-open", "prompt": "p",
                "started_at": 1.0}),
    json.dumps({"v": 1, "type": "episode.started", "episode_id": UUID, "task": "drawer-open", "prompt": "\ud800",
                "started_at": 1.0}),
    json.dumps({"v": 1, "type": "hello", "agent_version": "\udc00"}),
    json.dumps({"v": 1, "type": "status", "state": "idle", "step": 10**400}),
    json.dumps({"v": 1, "type": "webrtc.answer", "session": UUID, "sdp": "é" * 32_000}, ensure_ascii=False),
    b"\x00\xff" * 100,
], ids=["nested-list", "nested-object", "uuid-newline", "surrogate-prompt", "surrogate-hello", "huge-int",
        "non-ascii-sdp", "binary"])
def test_the_frames_that_crashed_the_robot_consumer_get_a_typed_error(fuzz_server, robot, task, frame):
    proc, url = fuzz_server
    robot_row, token = robot
    with robot_socket(url, token) as ws:
        before = snapshot()
        ws.send(frame)
        reply = json.loads(ws.recv(timeout=REPLY_TIMEOUT_S))
        assert reply["type"] == "error" and reply["code"] in ROBOT_ERRORS, reply
        assert snapshot() == before
        ws.send(protocol.encode(protocol.Hello(agent_version="still-here")))
        assert json.loads(ws.recv(timeout=REPLY_TIMEOUT_S))["type"] == "welcome"
    wait_for(lambda: not Robot.objects.get(pk=robot_row.pk).connected, 20, "robot shown offline")
    assert not Episode.objects.exists()
    no_traceback(proc)


def test_a_frame_over_daphnes_transport_limit_drops_only_that_socket_and_the_bookkeeping_runs(fuzz_server, robot):
    """Past 1 MiB daphne (autobahn) drops the connection before any consumer sees the frame; smaller oversized frames
    get a typed ``too_large``. Either way only the sender is affected and it is shown offline."""
    proc, url = fuzz_server
    robot_row, token = robot
    with robot_socket(url, token) as ws:
        wait_for(lambda: Robot.objects.get(pk=robot_row.pk).connected, 20, "robot shown online")
        ws.send("x" * (2 * 1024 * 1024))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=REPLY_TIMEOUT_S)
    wait_for(lambda: not Robot.objects.get(pk=robot_row.pk).connected, 20, "robot shown offline")
    with robot_socket(url, token) as ws:
        ws.send("x" * 100_000)
        assert json.loads(ws.recv(timeout=REPLY_TIMEOUT_S))["code"] == "too_large"
    assert http_ok(f"{url}/healthz")
    no_traceback(proc)


# ---------------------------------------------------------------- the console socket


def fuzz_console(proc, url, user, robot_row, token, *, viewer: bool):
    peer = RobotPeer(url, token)
    wait_for(lambda: Robot.objects.filter(pk=robot_row.pk, connected=True, agent_version="fuzz-peer").exists(), 20,
             "robot peer online and greeted")
    ws = console_socket(url, user)
    counter = iter(range(1, 10**9))
    refused = {"n": 0}

    @FUZZ
    @given(frame=frames(console_templates(robot_row.name)))
    def check(frame):
        t = 1e6 + next(counter) + 0.25  # a clock no fuzzed ping uses
        before = snapshot()
        ws.send(frame)
        ws.send(json.dumps({"type": "ping", "t": t}))
        seen = replies_until(ws, lambda b: b.get("type") == "pong" and b.get("t") == t)
        errors = [b for b in seen if b.get("type") == "error"]
        for body in errors:
            assert set(body) == {"type", "code", "detail", "ref"}, body
            assert body["code"] in CONSOLE_ERRORS, (frame[:300], body)
        if errors:
            refused["n"] += 1
        if errors or viewer:
            assert snapshot() == before, f"{'a viewer' if viewer else 'a refused frame'} changed the database: " \
                                         f"{frame[:300]!r}"

    try:
        check()
    finally:
        ws.close()
    assert refused["n"] > EXAMPLES // 4
    assert not peer.problems, peer.problems[:5]
    assert peer.closed is None, f"the robot's socket closed: {peer.closed}"
    relayed = {json.loads(f)["type"] for f in peer.frames}
    if viewer:  # a viewer reaches the robot with video signalling only
        assert relayed <= {"welcome", "task.assigned", "policy.updated", "webrtc.offer", "webrtc.close"}, relayed
    peer.close()
    wait_for(lambda: not Robot.objects.get(pk=robot_row.pk).connected, 20, "robot shown offline after disconnect")
    wait_for(lambda: not ControlLease.objects.filter(ended_at__isnull=True).exists(), 20,
             "the console's leases ended with its socket")
    assert http_ok(f"{url}/healthz")
    no_traceback(proc)


def test_console_socket_a_viewer_changes_nothing_and_cannot_disturb_the_robot(fuzz_server, robot, task, operator):
    proc, url = fuzz_server
    fuzz_console(proc, url, operator, robot[0], robot[1], viewer=True)  # alice has no role group: a viewer


def test_console_socket_an_operators_refused_frames_change_nothing(fuzz_server, robot, task, operator):
    set_role(operator, OPERATOR)
    proc, url = fuzz_server
    fuzz_console(proc, url, operator, robot[0], robot[1], viewer=False)


def test_a_viewers_non_ascii_sdp_is_refused_before_the_relay_and_an_ascii_one_fits(fuzz_server, robot, operator):
    """Issue 12, #2: 32 k characters of 'é' became ~190 KB once re-encoded as ASCII JSON and closed the robot's
    socket. Now limits hold in bytes after re-encoding: the offer is refused, the robot never sees it, and the
    largest legal offer still fits the robot's frame limit."""
    proc, url = fuzz_server
    robot_row, token = robot
    peer = RobotPeer(url, token)
    wait_for(lambda: Robot.objects.filter(pk=robot_row.pk, connected=True, agent_version="fuzz-peer").exists(), 20,
             "robot peer online and greeted")
    with console_socket(url, operator) as ws:
        ws.send(json.dumps({"type": "webrtc.offer", "robot": robot_row.name, "session": UUID, "sdp": "é" * 32_000},
                           ensure_ascii=False))
        reply = json.loads(ws.recv(timeout=REPLY_TIMEOUT_S))
        assert (reply["type"], reply["code"], reply["ref"]) == ("error", "invalid", "webrtc.offer"), reply
        big = "v=0\r\n" + "a" * (protocol.MAX_SDP - 5)
        ws.send(json.dumps({"type": "webrtc.offer", "robot": robot_row.name, "session": UUID, "sdp": big}))
        wait_for(lambda: any('"webrtc.offer"' in f for f in peer.frames), 20, "the legal offer reached the robot")
    offers = [json.loads(f) for f in peer.frames if '"webrtc.offer"' in f]
    assert len(offers) == 1 and offers[0]["sdp"] == big and offers[0]["role"] == "viewer"
    assert peer.closed is None and not peer.problems, (peer.closed, peer.problems)
    assert Robot.objects.get(pk=robot_row.pk).connected
    peer.close()
    no_traceback(proc)
