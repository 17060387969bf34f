"""The agent's side of the console messages: the connection routes each one to its callback, and the server stores
an operator's label from the payload (robots/ingest.py ``_payload_fields``)."""

import types
import uuid

import pytest

from robots import episode_file, protocol
from robots.agent.config import AgentConfig
from robots.agent.connection import Connection

from ..factories import episode_data


def test_the_connection_routes_console_messages_to_their_callbacks(tmp_path):
    got = []

    def record(name):
        return lambda message: got.append((name, message))

    connection = Connection(
        AgentConfig(server="http://h:1", token="sop_x", spool_dir=tmp_path),
        hello=lambda: None, status=lambda: None, on_assignment=record("assignment"),
        on_takeover=record("takeover"), on_release=record("release"), on_estop=record("estop"),
        on_command=record("command"), on_label=record("label"), on_webrtc_offer=record("offer"),
        on_webrtc_close=record("close"),
    )
    session = str(uuid.uuid4())
    messages = {
        "takeover": protocol.ControlTakeover(lease=3, operator="alice", reason="stuck"),
        "release": protocol.ControlRelease(lease=3, reason="released"),
        "estop": protocol.ControlEstop(engaged=True, by="alice"),
        "command": protocol.ControlCommand(lease=3, seq=1, t=1.0, action=[0.1, 0.0, 0.0], grip=None),
        "label": protocol.EpisodeLabel(outcome="success", by="alice"),
        "offer": protocol.WebrtcOffer(session=session, sdp="v=0", user="alice"),
        "close": protocol.WebrtcClose(session=session),
    }
    for message in messages.values():
        connection._handle(protocol.decode(protocol.encode(message)))  # as it arrives on the wire
    assert got == list(messages.items())


def raising(message):
    raise RuntimeError("boom")


def test_a_failing_console_callback_does_not_end_the_session(tmp_path):
    connection = Connection(
        AgentConfig(server="http://h:1", token="sop_x", spool_dir=tmp_path),
        hello=lambda: None, status=lambda: None, on_assignment=lambda m: None, on_takeover=raising,
    )
    connection._handle(protocol.ControlTakeover(lease=1, operator="alice"))  # logged, not raised


@pytest.mark.django_db
def test_the_server_reads_who_decided_the_outcome_from_the_payload(tmp_path, django_user_model):
    """A file's label fields alone never name a user (the server checks that it sent that label itself:
    tests/robots/test_ingest.py); a file without them (an older agent) reads as the robot's own outcome."""
    from robots.ingest import _payload_fields

    django_user_model.objects.create_user("alice")
    episode = types.SimpleNamespace(id=None, robot_id=None, task_id=None)
    data = episode_data()
    data.meta.update(outcome_source="operator", outcome_by="alice")
    path = tmp_path / "e.h5"
    episode_file.write_episode(path, data)
    with episode_file.EpisodeReader(path) as reader:
        meta = dict(reader.meta)
    episode.id = data.meta["episode_id"]
    fields = _payload_fields(meta, episode)
    assert (fields["outcome"], fields["outcome_source"], fields["outcome_by"]) == ("success", "robot", None)

    robot_data = episode_data()  # no label attributes at all (an older agent): the robot decided
    episode_file.write_episode(path, robot_data)
    with episode_file.EpisodeReader(path) as reader:
        meta = dict(reader.meta)
    episode.id = robot_data.meta["episode_id"]
    fields = _payload_fields(meta, episode)
    assert (fields["outcome_source"], fields["outcome_by"]) == ("robot", None)
