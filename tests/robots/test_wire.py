"""The typed message layer of both sockets and the data channel (robots/wire.py): limits in bytes, depth and
Unicode, one error type for every bad frame, and JSON Schemas that agree with the code."""

import json
import uuid

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from robots import console_protocol as cp
from robots import protocol, schema
from robots.wire import MAX_DEPTH, ProtocolError

SESSION = str(uuid.uuid4())
EPISODE = str(uuid.uuid4())
PROTOCOLS = {"robot": protocol.PROTOCOL, "console": cp.CONSOLE, "channel": cp.DATA_CHANNEL}

EXAMPLES = {
    "robot": [
        protocol.Hello(agent_version="0.1", capabilities=["metaworld"], policy_version=3, policy="v3"),
        protocol.Status(state="estopped", estopped=True, estop_seq=4, estop_local=True, estopped_by="alice",
                        lease=2, operator="alice", last_command_age_ms=12.5),
        protocol.EpisodeStarted(episode_id=EPISODE, task="drawer-open", prompt="open it", started_at=1.7e9),
        protocol.EpisodeEnded(episode_id=EPISODE, steps=3, outcome="aborted", ended_at=1.7e9),
        protocol.WebrtcAnswer(session=SESSION, sdp="v=0\r\n"),
        protocol.Welcome(robot="sim-01", heartbeat_s=2.0, server_time=1.7e9),
        protocol.TaskAssigned(task=None),
        protocol.PolicyUpdated(version=2, url="/api/robot/checkpoints/2", size=10, sha256="0" * 64),
        protocol.error("forbidden", "no"),
        protocol.ControlTakeover(lease=1, operator="alice"),
        protocol.ControlRelease(lease=1, reason="released"),
        protocol.ControlEstop(engaged=True, by="alice", seq=3),
        protocol.ControlCommand(lease=1, seq=0, t=1.0, action=[0.0, 0.5, -1.0], grip=None),
        protocol.EpisodeLabel(outcome="success", by="alice", episode_id=EPISODE),
        protocol.WebrtcOffer(session=SESSION, sdp="v=0\r\n", user="dave", role="viewer",
                             ice_servers=[{"urls": ["stun:stun.example:3478"]}]),
        protocol.WebrtcClose(session=SESSION),
    ],
    "console": [
        cp.Ping(t=1.0), cp.OfferVideo(robot="sim-01", session=SESSION, sdp="v=0\r\n"),
        cp.CloseVideo(robot="sim-01", session=SESSION), cp.Takeover(robot="sim-01", reason="x", force=True),
        cp.Keepalive(robot="sim-01"), cp.Release(robot="sim-01"),
        cp.Teleop(robot="sim-01", seq=3, t=2.0, action=[1, 0, 0], grip=-1),
        cp.Estop(robot="sim-01", engaged=False), cp.Label(robot="sim-01", outcome="failure"),
        cp.RobotRemoved(robot="sim-01"), cp.Pong(t=None, server_t=5), cp.RoleChanged(role="viewer"),
        cp.Error(code="held", detail="held by bob", ref="takeover"),
        cp.LeaseEvent(robot="sim-01", lease=1, operator="bob", active=False, reason="role_changed"),
        cp.VideoAnswer(robot="sim-01", session=SESSION, sdp="", error="too many viewers"),
    ],
    "channel": [
        cp.ChannelCommand(seq=1, t=1.0, action=[0, 0, 1]), cp.ChannelKeepalive(seq=2, t=1.0), cp.ChannelPing(id=1, t=2),
        cp.ChannelTrace(seq=1), cp.ChannelEstop(),
        cp.ChannelError(code="forbidden", detail="viewers cannot e-stop", ref="estop"),
    ],
}


def validator(name):
    return jsonschema.Draft202012Validator(PROTOCOLS[name].json_schema())


def test_the_published_schemas_are_up_to_date():
    for name, generated in cp.schemas().items():
        committed = (schema.DEFAULT_DIR / name).read_text()
        assert committed == schema.render(generated), f"docs/schema/{name} is stale: run python -m robots.schema"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_frame_the_code_encodes_validates_against_its_schema(name):
    check = validator(name)
    for message in EXAMPLES[name]:
        frame = json.loads(PROTOCOLS[name].encode(message))
        check.validate(frame)
        assert PROTOCOLS[name].decode(json.dumps(frame)) == message


@pytest.mark.parametrize("raw, code", [
    ("[" * 30_000 + "]" * 30_000, "malformed"),  # the parser's recursion: before, a RecursionError escaped
    ('{"v":1,"type":"status","state":"idle","x":' + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "}",
     "malformed"),  # deeper than the limit, even in an ignored field
    ('{"v":1,"type":"episode.ended","episode_id":"' + EPISODE + '\\n","steps":1,"outcome":"success","ended_at":1}',
     "invalid"),  # "$" in a regex accepts a trailing newline; fullmatch does not
    ('{"v":1,"type":"hello","agent_version":"\\ud800"}', "invalid"),  # a lone surrogate: no database stores it
    ('{"v":1,"type":"status","state":"idle","step":' + "9" * 5000 + "}", "malformed"),  # int() digit limit
    ('{"v":1,"type":"status","state":"idle","step":1e999}', "invalid"),  # inf
    ('{"v":1,"type":"status","state":"idle","step":1.5}', "invalid"),
    ('{"v":1,"type":"status","state":"idle","step":' + str(2**60) + "}", "invalid"),  # past what JS can hold
    ('{"v":1,"type":"hello","agent_version":"' + "é" * 33_000 + '"}', "too_large"),  # 66 KB in UTF-8
])
def test_hostile_robot_frames_get_a_protocol_error_and_nothing_else(raw, code):
    with pytest.raises(ProtocolError) as caught:
        protocol.decode(raw)
    assert caught.value.code == code


def test_a_message_is_measured_in_utf8_bytes_when_encoded_not_in_characters():
    import dataclasses

    from robots import wire

    tiny = wire.Protocol("tiny", version=None, max_bytes=100, title="tiny")

    @tiny.register
    @dataclasses.dataclass(frozen=True)
    class Note(wire.Message):
        TYPE = "note"
        text: str = dataclasses.field(metadata=wire.spec(max_len=60))

    assert len(tiny.encode(Note(text="a" * 60))) <= 100
    with pytest.raises(ProtocolError) as caught:
        tiny.encode(Note(text="é" * 60))  # 60 characters, 120 bytes: what the receiving peer counts
    assert caught.value.code == "too_large"
    with pytest.raises(ProtocolError):
        tiny.decode(json.dumps({"type": "note", "text": "é" * 45}, ensure_ascii=False))


def test_sdp_must_be_printable_ascii():
    for sdp in ("é", "v=0\x00", "\U0001F916"):
        with pytest.raises(ProtocolError):
            protocol.WebrtcOffer(session=SESSION, sdp=sdp, user="dave")


def test_a_browser_cannot_send_server_frames_on_the_console_socket():
    with pytest.raises(ProtocolError) as caught:
        cp.CONSOLE.decode('{"type":"hello","user":"x","role":"admin","ice_servers":[],"lease_timeout_s":1,'
                          '"deadman_ms":1,"robots":[]}', accept=cp.BROWSER_MESSAGES)
    assert caught.value.code == "unknown_type"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
TYPES = st.sampled_from(sorted({*protocol.REGISTRY, *cp.CONSOLE.registry, *cp.DATA_CHANNEL.registry, "x"}))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=TYPES, fields=st.dictionaries(st.sampled_from(
    ["v", "robot", "session", "sdp", "lease", "seq", "t", "action", "grip", "state", "step", "engaged", "outcome",
     "episode_id", "agent_version", "capabilities", "ice_servers", "user", "role", "estop_seq", "id", "x"]),
    JSON, max_size=8), version=st.sampled_from([1, None, 2]))
def test_any_frame_decodes_to_a_valid_message_or_a_protocol_error(kind, fields, version):
    body = {**fields, "type": kind}
    if version is not None:
        body["v"] = version
    raw = json.dumps(body)
    for name, proto in PROTOCOLS.items():
        try:
            message = proto.decode(raw)
        except ProtocolError as exc:
            assert exc.code in ("malformed", "too_large", "bad_version", "unknown_type", "invalid")
            continue
        frame = json.loads(proto.encode(message))  # what is accepted can be sent on, and is what the schema says
        validator(name).validate(frame)


@pytest.mark.django_db
def test_the_robot_state_consoles_receive_matches_the_published_schema(robot, operator, task):
    from django.utils import timezone

    from robots import selectors
    from robots.models import ControlLease, Robot

    robot, _ = robot
    now = timezone.now()
    Robot.objects.filter(pk=robot.pk).update(connected=True, state="running", last_seen=now, current_task=task,
                                             estopped=True, estopped_by="alice", estop_changed_at=now)
    ControlLease.objects.create(robot=robot, operator=operator, operator_name="alice", started_at=now, renewed_at=now,
                                expires_at=now)
    defs = cp.CONSOLE.json_schema()["$defs"]
    check = jsonschema.Draft202012Validator({"$ref": "#/$defs/RobotView", "$defs": defs})
    states = selectors.robot_states()
    assert states and states[0]["lease"]["operator"] == "alice"
    for state in states:
        check.validate(state)
    hello = selectors.console_hello(operator)
    jsonschema.Draft202012Validator({"$ref": "#/$defs/hello", "$defs": defs}).validate(hello)
