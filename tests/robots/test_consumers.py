"""The robot socket through the real ASGI app and the Redis channel layer."""

import json
import time
import uuid

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from robots import fleet, protocol, tasking
from robots.models import Episode, Robot
from sop_web.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 3


def socket(token=None) -> WebsocketCommunicator:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return WebsocketCommunicator(application, "/ws/robots/", headers=headers)


async def connected(token) -> WebsocketCommunicator:
    comm = socket(token)
    ok, _ = await comm.connect(timeout=TIMEOUT)
    assert ok
    return comm


async def receive(comm) -> dict:
    return await comm.receive_json_from(timeout=TIMEOUT)


async def send(comm, **body):
    await comm.send_to(text_data=json.dumps({"v": 1, **body}))


async def say_hello(comm) -> list[dict]:
    await send(comm, type="hello", agent_version="0.1", capabilities=["metaworld"])
    return [await receive(comm), await receive(comm)]


async def closed_with(comm) -> int:
    output = await comm.receive_output(timeout=TIMEOUT)
    assert output["type"] == "websocket.close", output
    assert type(output["code"]) is int  # daphne (autobahn) refuses anything else, even an IntEnum
    return output["code"]


@database_sync_to_async
def snapshot():
    robots = list(Robot.objects.order_by("pk").values())
    for r in robots:
        r.pop("last_seen")  # heartbeats may refresh it; everything else must stay
    return robots, list(Episode.objects.order_by("pk").values())


# ---------------------------------------------------------------- handshake


async def test_it_refuses_a_missing_token(robot):
    ok, _ = await socket().connect(timeout=TIMEOUT)
    assert not ok


async def test_it_refuses_an_unknown_token(robot):
    ok, _ = await socket("sop_" + "x" * 43).connect(timeout=TIMEOUT)
    assert not ok


async def test_it_refuses_a_revoked_token(robot):
    await database_sync_to_async(fleet.revoke_robot)(robot[0])
    ok, _ = await socket(robot[1]).connect(timeout=TIMEOUT)
    assert not ok


async def test_hello_is_answered_with_welcome_and_a_task(robot, task):
    comm = await connected(robot[1])
    welcome, assigned = await say_hello(comm)
    assert (welcome["type"], welcome["robot"], welcome["heartbeat_s"]) == ("welcome", "sim-01", 2.0)
    assert assigned == {"v": 1, "type": "task.assigned", "task": "drawer-open", "env_id": "drawer-open-v3",
                        "prompt": "open the drawer", "max_steps": 150, "split": "online"}
    live = await database_sync_to_async(Robot.objects.get)(pk=robot[0].pk)
    assert live.connected and live.state == "idle" and live.agent_version == "0.1"
    await comm.disconnect()
    live = await database_sync_to_async(Robot.objects.get)(pk=robot[0].pk)
    assert not live.connected and live.state == "offline"


async def test_a_heartbeat_updates_the_live_state(robot, task):
    comm = await connected(robot[1])
    eid = str(uuid.uuid4())
    await send(comm, type="status", state="running", task="drawer-open", episode_id=eid, step=9, loop_hz=10.0)
    await send(comm, type="hello", agent_version="0.1")  # a reply proves the status was handled
    await receive(comm)
    live = await database_sync_to_async(Robot.objects.get)(pk=robot[0].pk)
    assert (live.state, str(live.current_episode), live.current_step, live.loop_hz) == ("running", eid, 9, 10.0)
    await comm.disconnect()


# ---------------------------------------------------------------- bad messages


BAD_FRAMES = {
    "malformed": "{this is not json",
    "unknown_type": json.dumps({"v": 1, "type": "teleport"}),
    "too_large": json.dumps({"v": 1, "type": "hello", "agent_version": "x" * (protocol.MAX_MESSAGE_BYTES + 10)}),
    "bad_version": json.dumps({"v": 99, "type": "hello", "agent_version": "x"}),
    "invalid": json.dumps({"v": 1, "type": "status", "state": "flying"}),
}


@pytest.mark.parametrize("code", BAD_FRAMES)
async def test_a_bad_message_gets_a_typed_error_and_the_socket_stays_open(robot, task, code):
    comm = await connected(robot[1])
    await comm.send_to(text_data=BAD_FRAMES[code])
    error = await receive(comm)
    assert (error["type"], error["code"]) == ("error", code) and error["message"]
    welcome, _ = await say_hello(comm)  # still open and working
    assert welcome["type"] == "welcome"
    await comm.disconnect()


async def test_binary_frames_and_server_messages_from_a_robot_are_refused(robot, task):
    comm = await connected(robot[1])
    await comm.send_to(bytes_data=b"\x00\x01")
    assert (await receive(comm))["code"] == "malformed"
    await send(comm, type="welcome", robot="sim-01", heartbeat_s=1.0, server_time=1.0)
    assert (await receive(comm))["code"] == "unknown_type"
    await comm.disconnect()


async def test_a_flood_of_bad_messages_closes_the_socket(robot, settings):
    settings.SOP_MAX_BAD_MESSAGES = 3
    comm = await connected(robot[1])
    for _ in range(3):
        await comm.send_to(text_data="nope")
        assert (await receive(comm))["code"] == "malformed"
    await comm.send_to(text_data="nope")
    assert (await receive(comm))["code"] == "too_many_errors"
    assert await closed_with(comm) == protocol.CloseCode.TOO_MANY_ERRORS == 4008


async def test_bad_messages_touch_nothing_stored(robot, other_robot, task):
    comm = await connected(robot[1])
    await say_hello(comm)
    eid = str(uuid.uuid4())
    await send(comm, type="episode.started", episode_id=eid, task="drawer-open", prompt="p", started_at=time.time())
    await comm.send_to(text_data="{")  # episode.started has no reply: this error proves it was handled
    assert (await receive(comm))["code"] == "malformed"
    before = await snapshot()
    for raw in [*BAD_FRAMES.values(),
                json.dumps({"v": 1, "type": "status", "state": "running", "step": -5}),
                json.dumps({"v": 1, "type": "status", "state": "offline"}),
                json.dumps({"v": 1, "type": "episode.ended", "episode_id": eid, "steps": 3, "outcome": "exploded",
                            "ended_at": 1}),
                json.dumps({"v": 2, "type": "episode.ended", "episode_id": eid, "steps": 3, "outcome": "success",
                            "ended_at": 1}),
                json.dumps({"v": 1, "type": "episode.started", "episode_id": str(uuid.uuid4()), "task": "juggle",
                            "prompt": "p", "started_at": 1})]:
        await comm.send_to(text_data=raw)
        assert (await receive(comm))["type"] == "error"
    assert await snapshot() == before
    await comm.disconnect()


# ---------------------------------------------------------------- revocation


async def test_revoking_the_token_closes_a_live_socket_at_once(robot, task):
    comm = await connected(robot[1])
    await say_hello(comm)
    await database_sync_to_async(fleet.revoke_robot)(robot[0])
    error = await receive(comm)
    assert (error["type"], error["code"]) == ("error", "revoked")
    assert await closed_with(comm) == protocol.CloseCode.REVOKED == 4003


async def test_a_heartbeat_notices_a_revocation_whose_broadcast_was_lost(robot, task):
    comm = await connected(robot[1])
    # Revoke without any channel-layer message: only the heartbeat's token check can notice.
    await database_sync_to_async(Robot.objects.filter(pk=robot[0].pk).update)(token_hash=None)
    await send(comm, type="status", state="idle")
    assert (await receive(comm))["code"] == "revoked"
    assert await closed_with(comm) == 4003


async def test_rotating_the_token_closes_sockets_opened_with_the_old_one(robot, task):
    comm = await connected(robot[1])
    await database_sync_to_async(fleet.register_robot)("sim-01")
    assert (await receive(comm))["code"] == "revoked"
    assert await closed_with(comm) == 4003


# ---------------------------------------------------------------- episodes and broadcasts


async def test_a_robot_cannot_announce_an_episode_id_owned_by_another_robot(robot, other_robot, task):
    eid = str(uuid.uuid4())
    mine, theirs = await connected(robot[1]), await connected(other_robot[1])
    started = dict(type="episode.started", episode_id=eid, task="drawer-open", prompt="p", started_at=time.time())
    await send(mine, **started)
    await mine.send_to(text_data="{")  # no reply to episode.started: this error proves it was handled
    await receive(mine)
    await send(theirs, **started)
    error = await receive(theirs)
    assert (error["code"], error["ref_type"]) == ("forbidden", "episode.started")
    await send(theirs, type="episode.ended", episode_id=eid, steps=2, outcome="failure", ended_at=time.time())
    assert (await receive(theirs))["code"] == "forbidden"
    episode = await database_sync_to_async(Episode.objects.select_related("robot").get)(pk=eid)
    assert episode.robot.name == "sim-01" and episode.outcome == ""
    await mine.disconnect()
    await theirs.disconnect()


async def test_an_ended_episode_is_recorded_and_followed_by_the_next_task(robot, task):
    comm = await connected(robot[1])
    await say_hello(comm)
    eid = str(uuid.uuid4())
    await send(comm, type="episode.started", episode_id=eid, task="drawer-open", prompt="open the drawer",
               started_at=time.time(), policy_version=2)
    await send(comm, type="episode.ended", episode_id=eid, steps=42, outcome="timeout", ended_at=time.time())
    assert (await receive(comm))["type"] == "task.assigned"
    episode = await database_sync_to_async(Episode.objects.get)(pk=eid)
    assert (episode.status, episode.steps, episode.outcome, episode.success, episode.policy_version) == (
        "recording", 42, "timeout", False, 2)
    await comm.disconnect()


async def test_new_policies_and_assignments_are_relayed_to_live_robots(robot, other_robot, task):
    one, two = await connected(robot[1]), await connected(other_robot[1])
    policy = protocol.PolicyUpdated(version=5, url="/api/checkpoints/5/file", size=99, sha256="f" * 64)
    await database_sync_to_async(fleet.announce_policy)(policy)
    for comm in (one, two):
        assert protocol.decode(json.dumps(await receive(comm))) == policy
    await database_sync_to_async(tasking.reassign_robot)(robot[0])
    assert (await receive(one))["type"] == "task.assigned"
    assert await two.receive_nothing(timeout=0.3)
    await one.disconnect()
    await two.disconnect()


async def test_hello_records_the_cameras_and_refuses_hostile_names(robot, task):
    comm = await connected(robot[1])
    await send(comm, type="hello", agent_version="0.1", cameras=["corner3", "gripperPOV"])
    assert (await receive(comm))["type"] == "welcome"
    live = await database_sync_to_async(Robot.objects.get)(pk=robot[0].pk)
    assert live.cameras == ["corner3", "gripperPOV"]
    await comm.disconnect()
    for cameras in (["../etc"], ["a"] * 6, ["x" * 41], [1]):
        comm = await connected(robot[1])
        await send(comm, type="hello", agent_version="0.1", cameras=cameras)
        reply = await receive(comm)
        assert reply["type"] == "error" and "cameras" in reply["message"], reply
        await comm.disconnect()
    live = await database_sync_to_async(Robot.objects.get)(pk=robot[0].pk)
    assert live.cameras == ["corner3", "gripperPOV"]
