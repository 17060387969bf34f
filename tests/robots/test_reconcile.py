"""At-least-once control: every heartbeat is compared with what the server asked the robot to obey, and what the
robot missed is sent again (docs/console.md "Reconciliation"); the console shows what the robot reports. Also: a
demoted operator loses control at once, and e-stops latched on the robot itself are adopted and audited.

Through the real ASGI app and Redis channel layer; the robot side is a raw socket that drops what a lossy channel
would drop."""

import asyncio
import json

import pytest
from channels.db import database_sync_to_async

from robots import control, roles
from robots.models import AuditEvent, ControlLease, Robot

from .test_console import OPEN, close, close_leftover_sockets, console, next_of, robot_socket, send  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def cast(operator, admin_user, django_user_model):
    roles.set_role(operator, roles.OPERATOR)
    viewer = django_user_model.objects.create_user("dave", password="dave-password-1")
    return operator, admin_user, viewer


async def hello(comm):
    await send(comm, v=1, type="hello", agent_version="test")
    await next_of(comm, "welcome")


async def status(comm, **fields):
    await send(comm, v=1, type="status", state=fields.pop("state", "idle"), **fields)


async def silence(comm, seconds=0.4) -> list[dict]:
    frames = []
    while not await comm.receive_nothing(timeout=seconds, interval=0.02):
        frames.append(await comm.receive_json_from(timeout=2))
    return frames


def row(robot):
    return Robot.objects.get(pk=robot.pk)


async def test_an_estop_the_robot_missed_is_sent_again_until_its_heartbeat_agrees(robot, cast):
    robot, token = robot
    alice, _, _ = cast
    bot = await robot_socket(token)
    await hello(bot)
    ui, _ = await console(alice)
    await send(ui, type="estop", robot="sim-01", engaged=True)
    first = await next_of(bot, "control.estop")  # ... and the robot "loses" it
    assert (first["engaged"], first["seq"]) == (True, 1)
    await status(bot, state="running", estopped=False)
    again = await next_of(bot, "control.estop")
    assert (again["engaged"], again["by"], again["seq"]) == (True, "alice", 1)
    await status(bot, state="estopped", estopped=True, estop_seq=1)
    assert [f for f in await silence(bot) if f["type"] == "control.estop"] == [], "agreement ends the re-sending"
    assert len(await database_sync_to_async(list)(AuditEvent.objects.filter(action="estop"))) == 1, \
        "a re-send is not a new e-stop"
    await close(bot, ui)


async def test_a_lost_clear_is_sent_again_but_never_clears_a_newer_latch(robot, cast):
    robot, token = robot
    alice, _, _ = cast
    bot = await robot_socket(token)
    await hello(bot)
    await database_sync_to_async(control.set_estop)(robot, True, alice)  # seq 1
    await database_sync_to_async(control.set_estop)(robot, False, alice)  # seq 2: the robot missed this clear
    await silence(bot)
    await status(bot, state="estopped", estopped=True, estop_seq=1)
    clear = await next_of(bot, "control.estop")
    assert (clear["engaged"], clear["seq"]) == (False, 2)
    await status(bot, state="idle", estopped=False, estop_seq=2)
    assert [f for f in await silence(bot) if f["type"] == "control.estop"] == []
    await close(bot)


async def test_an_estop_latched_on_the_robot_is_adopted_audited_and_acknowledged(robot, cast):
    """An operator hit E-STOP on the data channel (peer to peer, the server never saw it): the robot reports a local
    latch; the server latches it too, audits it, and acknowledges it with a numbered e-stop."""
    robot, token = robot
    alice, _, _ = cast
    bot = await robot_socket(token)
    await hello(bot)
    ui, _ = await console(alice)
    await status(bot, state="estopped", estopped=True, estop_local=True, estopped_by="alice")
    ack = await next_of(bot, "control.estop")
    assert (ack["engaged"], ack["seq"]) == (True, 1)
    fresh = await database_sync_to_async(row)(robot)
    assert (fresh.estopped, fresh.estopped_by, fresh.estop_seq) == (True, "alice", 1)
    event = await database_sync_to_async(AuditEvent.objects.get)(action="estop")
    assert event.detail["via"] == "data_channel" and event.actor_id is None and "reported by robot" in event.actor_name
    state = await next_of(ui, "robot.state")
    while not state["robot"]["estopped"]:  # a state read before the adoption may arrive first (coalesced): then it
        state = await next_of(ui, "robot.state", timeout=3)
    await status(bot, state="estopped", estopped=True, estop_seq=1)  # acknowledged: nothing more to say
    assert [f for f in await silence(bot) if f["type"] == "control.estop"] == []
    await close(bot, ui)


async def test_a_takeover_the_robot_missed_is_sent_again(robot, cast):
    robot, token = robot
    alice, _, _ = cast
    bot = await robot_socket(token)
    await hello(bot)
    ui, _ = await console(alice)
    await send(ui, type="takeover", robot="sim-01", reason="about to drop it")
    lease = await next_of(bot, "control.takeover")  # lost
    await status(bot, state="running")
    again = await next_of(bot, "control.takeover")
    assert again["lease"] == lease["lease"] and again["operator"] == "alice"
    await status(bot, state="running", lease=lease["lease"], operator="alice")
    assert [f for f in await silence(bot) if f["type"] == "control.takeover"] == []
    await close(bot, ui)


async def test_the_console_shows_a_mismatch_between_the_latch_and_the_robots_report(robot, cast, monkeypatch):
    from robots import selectors

    monkeypatch.setattr(selectors, "MISMATCH_GRACE_S", 0.0)
    robot, token = robot
    alice, _, _ = cast
    bot = await robot_socket(token)
    await hello(bot)
    ui, _ = await console(alice)
    await database_sync_to_async(control.set_estop)(robot, True, alice)
    await asyncio.sleep(0.05)
    await status(bot, state="running", estopped=False)
    state = await next_of(ui, "robot.state", timeout=3)
    while not state["robot"]["mismatch"]:
        state = await next_of(ui, "robot.state", timeout=3)
    assert state["robot"]["estopped"] is True and state["robot"]["reported_estopped"] is False
    assert "re-sending the e-stop" in state["robot"]["mismatch"][0]
    await status(bot, state="estopped", estopped=True, estop_seq=1)
    state = await next_of(ui, "robot.state", timeout=3)
    while state["robot"]["mismatch"]:
        state = await next_of(ui, "robot.state", timeout=3)
    await close(bot, ui)


async def test_a_demoted_operator_loses_the_robot_and_their_teleop_at_once(robot, cast):
    """Before: the lease and the socket's cached role survived a demotion, so teleop kept flowing."""
    robot, token = robot
    alice, _, _ = cast
    bot = await robot_socket(token)
    await hello(bot)
    ui, _ = await console(alice)
    await send(ui, type="takeover", robot="sim-01")
    lease = await next_of(bot, "control.takeover")
    await database_sync_to_async(roles.set_role)(alice, roles.VIEWER)
    release = await next_of(bot, "control.release")
    assert release["lease"] == lease["lease"] and release["reason"] == "role_changed"
    assert (await next_of(ui, "role"))["role"] == "viewer"
    ended = await database_sync_to_async(ControlLease.objects.get)(pk=lease["lease"])
    assert ended.end_reason == "role_changed"
    await send(ui, type="teleop", robot="sim-01", seq=1, t=1.0, action=[1, 0, 0])
    error = await next_of(ui, "error")
    assert error["code"] in ("forbidden", "not_holder")
    assert [f for f in await silence(bot) if f["type"] == "control.command"] == []
    await close(bot, ui)


async def test_an_oversized_offer_never_reaches_the_robot(robot, cast):
    """A 32k-character SDP of non-ASCII text was 190 KB once relayed (ASCII-escaped JSON): past the robot client's
    64 KiB frame limit, so its socket closed and its leases ended. Now it is refused at the console socket."""
    robot, token = robot
    alice, _, viewer = cast
    bot = await robot_socket(token)
    await hello(bot)
    await database_sync_to_async(Robot.objects.filter(pk=robot.pk).update)(connected=True)
    holder, _ = await console(alice)
    await send(holder, type="takeover", robot="sim-01")
    await next_of(bot, "control.takeover")
    watcher, _ = await console(viewer)
    for sdp in ("é" * 32000, "v=0\r\n" + "\U0001F916" * 8000, "x" * 32001):
        await send(watcher, type="webrtc.offer", robot="sim-01", session="5f0c9a4e-1b2c-4d3e-8f9a-0b1c2d3e4f50",
                   sdp=sdp)
        assert (await next_of(watcher, "error"))["code"] == "invalid"
    assert [f for f in await silence(bot) if f["type"] == "webrtc.offer"] == []
    big = "v=0\r\n" + "a" * (32000 - 5)  # the largest SDP the protocol allows still fits the robot's limit
    await send(watcher, type="webrtc.offer", robot="sim-01", session="5f0c9a4e-1b2c-4d3e-8f9a-0b1c2d3e4f51", sdp=big)
    offer = await next_of(bot, "webrtc.offer")
    assert offer["sdp"] == big and offer["role"] == "viewer" and offer["user"] == "dave"
    lease = await database_sync_to_async(ControlLease.objects.filter(ended_at__isnull=True).count)()
    assert lease == 1, "the operator's takeover is untouched"
    await close(bot, holder, watcher)


async def test_video_offers_are_rate_limited_per_console(robot, cast):
    robot, token = robot
    _, _, viewer = cast
    bot = await robot_socket(token)
    await hello(bot)
    watcher, _ = await console(viewer)
    codes = []
    for i in range(20):
        session = f"5f0c9a4e-1b2c-4d3e-8f9a-0b1c2d3e{i:04d}"
        await send(watcher, type="webrtc.offer", robot="sim-01", session=session, sdp="v=0\r\n")
        await send(watcher, type="webrtc.close", robot="sim-01", session=session)
    frames = await silence(watcher, 0.5)
    codes = [f["code"] for f in frames if f["type"] == "error"]
    relayed = [f for f in await silence(bot) if f["type"] == "webrtc.offer"]
    assert "rate_limited" in codes and len(relayed) <= 9
    await close(bot, watcher)


async def test_a_robot_socket_never_relays_an_invalid_event(robot):
    """Whatever another part of the server puts into a channel-layer event, the robot gets only valid frames."""
    from channels.layers import get_channel_layer

    robot, token = robot
    bot = await robot_socket(token)
    await hello(bot)
    layer = get_channel_layer()
    await layer.group_send(robot.group_name, {"type": "control.takeover",
                                              "message": {"v": 1, "type": "control.takeover", "lease": 0,
                                                          "operator": "x" * 10}})
    await layer.group_send(robot.group_name, {"type": "webrtc.offer", "console": "nobody",
                                              "message": {"v": 1, "type": "webrtc.offer", "session": "nope",
                                                          "sdp": "é" * 40000, "user": "dave"}})
    assert [f for f in await silence(bot) if f["type"] in ("control.takeover", "webrtc.offer")] == []
    await status(bot)  # still open
    await close(bot)


async def test_relayed_frames_are_measured_in_bytes(robot):
    from robots import protocol

    offer = protocol.WebrtcOffer(session="5f0c9a4e-1b2c-4d3e-8f9a-0b1c2d3e4f50", sdp="a" * protocol.MAX_SDP,
                                 user="u" * 150, role="admin",
                                 ice_servers=[{"urls": ["turn:" + "t" * 490] * 4, "username": "n" * 200,
                                               "credential": "c" * 500}] * 4)
    assert len(protocol.encode(offer).encode()) <= protocol.MAX_MESSAGE_BYTES
    label = protocol.EpisodeLabel(outcome="success", by="ü" * 150)
    assert json.loads(protocol.encode(label))["by"] == "ü" * 150  # sent as UTF-8, not as six-byte escapes
