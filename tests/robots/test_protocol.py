"""The wire format: every message survives encode/decode, and every way a frame can be wrong has its own code."""

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from robots import protocol
from robots.protocol import ErrorCode, ProtocolError

EPISODE = str(uuid.uuid4())

MESSAGES = [
    protocol.Hello(agent_version="0.1", capabilities=["metaworld", "webrtc"], policy_version=3, policy="v3",
                   spool_pending=2),
    protocol.Status(state="running", task="drawer-open", episode_id=EPISODE, step=12, control_source="operator",
                    loop_hz=9.9, loop_p99_ms=104.5, overruns=1, policy_version=None, policy="scripted-expert"),
    protocol.EpisodeStarted(episode_id=EPISODE, task="drawer-open", prompt="open the drawer", started_at=1.7e9,
                            policy_version=3, split="eval"),
    protocol.EpisodeEnded(episode_id=EPISODE, steps=80, outcome="success", ended_at=1.7e9 + 8, interventions=1,
                          intervention_steps=12),
    protocol.Welcome(robot="sim-01", heartbeat_s=2.0, server_time=1.7e9),
    protocol.TaskAssigned(task="drawer-open", env_id="drawer-open-v3", prompt="open the drawer", max_steps=150),
    protocol.TaskAssigned(task=None),
    protocol.PolicyUpdated(version=4, url="/api/checkpoints/4/file", size=1234, sha256="ab" * 32),
    protocol.error(ErrorCode.FORBIDDEN, "not yours", "episode.started"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.TYPE.value)
def test_every_message_survives_an_encode_decode_round_trip(message):
    assert protocol.decode(protocol.encode(message)) == message


def test_a_frame_carries_version_and_type():
    body = json.loads(protocol.encode(MESSAGES[0]))
    assert body["v"] == protocol.PROTOCOL_VERSION and body["type"] == "hello"


def test_unknown_extra_fields_are_ignored():
    assert protocol.decode('{"v":1,"type":"hello","agent_version":"x","added_in_v1_1":true}').agent_version == "x"


def _code(raw) -> tuple[str, str | None]:
    with pytest.raises(ProtocolError) as caught:
        protocol.decode(raw)
    return ErrorCode(caught.value.code).value, caught.value.ref_type


@pytest.mark.parametrize(
    "raw, code, ref_type",
    [
        ("{not json", "malformed", None),
        ("[1, 2]", "malformed", None),
        ('{"v":1,"type":"hello","agent_version":NaN}', "malformed", None),
        ("x" * (protocol.MAX_MESSAGE_BYTES + 1), "too_large", None),
        ('{"v":2,"type":"hello","agent_version":"x"}', "bad_version", "hello"),
        ('{"type":"hello","agent_version":"x"}', "bad_version", "hello"),
        ('{"v":1,"type":"teleport"}', "unknown_type", "teleport"),
        ('{"v":1}', "unknown_type", None),
        ('{"v":1,"type":"hello"}', "invalid", "hello"),  # missing field
        ('{"v":1,"type":"hello","agent_version":5}', "invalid", "hello"),  # wrong type
        ('{"v":1,"type":"status","state":"dancing"}', "invalid", "status"),  # bad enum value
        ('{"v":1,"type":"status","state":"idle","step":-1}', "invalid", "status"),
        ('{"v":1,"type":"status","state":"idle","step":true}', "invalid", "status"),  # bool is not an int
        ('{"v":1,"type":"episode.ended","episode_id":"nope","steps":1,"outcome":"success","ended_at":1}', "invalid",
         "episode.ended"),
    ],
)
def test_each_kind_of_bad_frame_has_its_own_error_code(raw, code, ref_type):
    assert _code(raw) == (code, ref_type)


@pytest.mark.parametrize("code", ["forbidden", "too_many_errors", "revoked"])
def test_server_side_error_codes_make_valid_error_messages(code):
    message = protocol.decode(protocol.encode(protocol.error(code, "why", "status")))
    assert (message.code, message.message, message.ref_type) == (code, "why", "status")


def test_an_error_message_with_an_unknown_code_cannot_be_built():
    with pytest.raises(ValueError):
        protocol.error("whatever", "x")


def test_the_pure_core_imports_without_django():
    code = (
        "import sys; import robots.protocol, robots.wire, robots.console_protocol, robots.payload_check, robots.schema, "
        "robots.episode_file, robots.catalog; "
        "assert 'django' not in sys.modules, sorted(m for m in sys.modules if m.startswith('django'))"
    )
    env = {"PATH": "/usr/bin:/bin"}  # no DJANGO_SETTINGS_MODULE
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).parents[2])
