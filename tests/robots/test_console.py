"""The operator console socket (/ws/console/) through the real ASGI app and the Redis channel layer, with robot
sockets on the other side (docs/console.md)."""

import asyncio
import json
import time
import uuid

import pytest
import pytest_asyncio
from channels import DEFAULT_CHANNEL_LAYER
from channels.db import database_sync_to_async
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from robots import console_protocol, control, fleet, protocol, roles
from robots.console_protocol import CONSOLE
from robots.models import AuditEvent, ControlLease, Robot
from sop_web.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 3
ORIGIN = b"http://localhost"
OPEN: list[WebsocketCommunicator] = []  # sockets a failed test left open: closed by the fixture below


@pytest_asyncio.fixture(autouse=True)
async def close_leftover_sockets():
    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)  # whatever an earlier test module left in it
    yield
    while OPEN:
        try:
            await OPEN.pop().disconnect()
        except BaseException:  # noqa: BLE001 - the application may have died with the failure
            pass
    # channels_redis keeps asyncio locks in its (process-wide) layer; one left behind by a receive cancelled on this
    # test's event loop would break the next test's loop. A fresh layer per test, as a fresh daphne process has.
    layer = channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)
    if layer is not None:
        await layer.close_pools()


# ---------------------------------------------------------------- helpers


@database_sync_to_async
def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


async def console_socket(user=None, origin=ORIGIN, host=b"localhost") -> WebsocketCommunicator:
    headers = [(b"origin", origin)] if origin else []
    if host:
        headers.append((b"host", host))
    if user is not None:
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={await session_cookie(user)}".encode()))
    return WebsocketCommunicator(application, "/ws/console/", headers=headers)


async def console(user) -> tuple[WebsocketCommunicator, dict]:
    comm = await console_socket(user)
    ok, _ = await comm.connect(timeout=TIMEOUT)
    assert ok
    OPEN.append(comm)
    hello = await comm.receive_json_from(timeout=TIMEOUT)
    assert hello["type"] == "hello"
    return comm, hello


async def robot_socket(token) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(application, "/ws/robots/", headers=[(b"authorization", f"Bearer {token}".encode())])
    ok, _ = await comm.connect(timeout=TIMEOUT)
    assert ok
    OPEN.append(comm)
    return comm


async def send(comm, **body):
    await comm.send_to(text_data=json.dumps(body))


async def next_of(comm, kind: str, timeout=TIMEOUT, **match) -> dict:
    """The next frame of type ``kind`` (matching ``match``), skipping others (robot.state broadcasts, tasks...)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {kind} {match} within {timeout}s"
        frame = await comm.receive_json_from(timeout=left)
        if frame.get("type") == kind and all(frame.get(k) == v for k, v in match.items()):
            return frame


async def frames_for(comm, seconds: float) -> list[dict]:
    """Everything the socket receives within ``seconds``."""
    frames = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        # receive_nothing polls without consuming; a receive that times out would cancel the application
        if not await comm.receive_nothing(timeout=min(left, 0.05), interval=0.01):
            frames.append(await comm.receive_json_from(timeout=TIMEOUT))
    return frames


async def error_for(comm, **body) -> dict:
    await send(comm, **body)
    return await next_of(comm, "error")


async def close(*comms):
    for comm in comms:
        await comm.disconnect()
        if comm in OPEN:
            OPEN.remove(comm)


@pytest.fixture
def cast(operator, other_operator, admin_user, django_user_model):
    """alice and bob operate, carol administers, dave only watches."""
    roles.set_role(operator, roles.OPERATOR)
    roles.set_role(other_operator, roles.OPERATOR)
    viewer = django_user_model.objects.create_user("dave", password="dave-password-1")
    return operator, other_operator, admin_user, viewer


def audit(action):
    return list(AuditEvent.objects.filter(action=action).values("actor_name", "detail"))


# ---------------------------------------------------------------- handshake


async def test_an_anonymous_console_socket_is_refused(robot):
    comm = await console_socket(None)
    ok, _ = await comm.connect(timeout=TIMEOUT)
    assert not ok


@pytest.mark.parametrize("origin, host", [
    (b"http://localhost:9999", b"localhost:8000"),  # another program on the same host: cookies span ports
    (b"https://localhost:8000", b"localhost:8000"),  # another scheme
    (b"http://localhost", b"localhost:8000"),
    (b"http://localhost:8000/path", b"localhost:8000"),
    (b"null", b"localhost:8000"),  # sandboxed iframes, file:// pages
    (b"http://evil.example:8000", b"evil.example:8000"),  # a host that is not in ALLOWED_HOSTS
    (None, b"localhost:8000"),
])
async def test_a_console_socket_from_another_origin_is_refused_scheme_host_and_port(robot, cast, origin, host):
    comm = await console_socket(cast[0], origin=origin, host=host)
    ok, _ = await comm.connect(timeout=TIMEOUT)
    assert not ok


async def test_a_console_socket_from_the_consoles_own_origin_is_accepted(robot, cast):
    comm = await console_socket(cast[0], origin=b"http://localhost:8000", host=b"localhost:8000")
    ok, _ = await comm.connect(timeout=TIMEOUT)
    assert ok
    await comm.disconnect()


async def test_a_console_socket_from_another_origin_is_refused(robot, cast):
    comm = await console_socket(cast[0], origin=b"http://evil.example")
    ok, _ = await comm.connect(timeout=TIMEOUT)
    assert not ok


async def test_hello_tells_the_user_role_ice_servers_and_the_fleet(robot, other_robot, cast, settings):
    settings.SOP_ICE_SERVERS = [{"urls": "stun:stun.example:3478"}]
    await database_sync_to_async(fleet.revoke_robot)(other_robot[0])
    comm, hello = await console(cast[3])
    assert (hello["user"], hello["role"], hello["ice_servers"]) == ("dave", "viewer", settings.SOP_ICE_SERVERS)
    assert (hello["lease_timeout_s"], hello["deadman_ms"]) == (settings.SOP_LEASE_TIMEOUT_S, 250)
    assert [r["name"] for r in hello["robots"]] == ["sim-01"]  # revoked robots are not shown
    state = hello["robots"][0]
    assert state["lease"] is None and state["estopped"] is False and state["connected"] is False
    for key in ("deadman", "operator", "video_fps", "viewers", "episodes_today", "success_rate_today",
                "interventions_today", "episode_count", "current_task", "reported_estopped", "mismatch"):
        assert key in state
    assert "token_prefix" not in state  # 8 secret characters of the robot's token: never shown to a viewer
    await send(comm, type="ping", t=123)
    pong = await next_of(comm, "pong")
    assert pong["t"] == 123 and abs(pong["server_t"] - time.time() * 1000) < 5000
    await close(comm)


# ---------------------------------------------------------------- roles


async def test_a_viewer_cannot_take_over_estop_label_or_teleoperate(robot, cast):
    bot = await robot_socket(robot[1])
    comm, _ = await console(cast[3])
    for body in (dict(type="takeover", robot="sim-01", reason="x"),
                 dict(type="estop", robot="sim-01", engaged=True),
                 dict(type="label", robot="sim-01", outcome="success"),
                 dict(type="teleop", robot="sim-01", seq=1, t=1.0, action=[0, 0, 0.1])):
        error = await error_for(comm, **body)
        assert (error["code"], error["ref"]) == ("forbidden", body["type"])
    assert not await database_sync_to_async(ControlLease.objects.exists)()
    assert not await database_sync_to_async(Robot.objects.filter(estopped=True).exists)()
    kinds = {f["type"] for f in await frames_for(bot, 0.3)}
    assert not kinds & {"control.takeover", "control.estop", "episode.label", "control.command"}
    await close(comm, bot)


# ---------------------------------------------------------------- leases


async def test_takeover_is_exclusive_and_an_admin_can_force_it(robot, cast):
    alice, bob, carol, _ = cast
    bot = await robot_socket(robot[1])
    a, _ = await console(alice)
    b, _ = await console(bob)
    c, _ = await console(carol)

    await send(a, type="takeover", robot="sim-01", reason="gripper stuck")
    lease = await next_of(a, "lease", active=True)
    assert (lease["robot"], lease["operator"]) == ("sim-01", "alice")
    takeover = await next_of(bot, "control.takeover")
    assert (takeover["lease"], takeover["operator"], takeover["reason"]) == (lease["lease"], "alice", "gripper stuck")

    held = await error_for(b, type="takeover", robot="sim-01")
    assert held["code"] == "held" and "alice" in held["detail"]
    assert (await error_for(b, type="takeover", robot="sim-01", force=True))["code"] == "forbidden"  # admins only

    await send(c, type="takeover", robot="sim-01", reason="demo", force=True)
    ended = await next_of(a, "lease", lease=lease["lease"])
    assert (ended["active"], ended["reason"]) == (False, "forced")
    release = await next_of(bot, "control.release")
    assert (release["lease"], release["reason"]) == (lease["lease"], "forced")
    second = await next_of(bot, "control.takeover")
    assert second["operator"] == "carol" and second["lease"] != lease["lease"]

    # the first holder lost it: its keepalives and teleop are refused
    assert (await error_for(a, type="keepalive", robot="sim-01"))["code"] == "not_holder"
    assert (await error_for(a, type="teleop", robot="sim-01", seq=1, t=1.0, action=[0, 0, 0]))["code"] == "not_holder"
    forced = await database_sync_to_async(audit)("forced_takeover")
    assert forced[0]["actor_name"] == "carol" and forced[0]["detail"]["previous_operator"] == "alice"
    assert await database_sync_to_async(ControlLease.objects.filter(ended_at__isnull=True).count)() == 1
    await close(a, b, c, bot)


async def test_racing_takeovers_produce_exactly_one_lease(robot, cast):
    bot = await robot_socket(robot[1])
    a, _ = await console(cast[0])
    b, _ = await console(cast[1])
    await asyncio.gather(send(a, type="takeover", robot="sim-01"), send(b, type="takeover", robot="sim-01"))
    frames = [*await frames_for(a, 1.0), *await frames_for(b, 1.0)]
    errors = [f for f in frames if f["type"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == "held"
    assert len({f["lease"] for f in frames if f["type"] == "lease" and f["active"]}) == 1
    assert await database_sync_to_async(ControlLease.objects.count)() == 1
    await close(a, b, bot)


async def test_a_console_that_disconnects_ends_its_lease(robot, cast):
    bot = await robot_socket(robot[1])
    a, _ = await console(cast[0])
    watcher, _ = await console(cast[3])
    await send(a, type="takeover", robot="sim-01")
    lease = await next_of(a, "lease", active=True)
    await next_of(bot, "control.takeover")
    await close(a)
    release = await next_of(bot, "control.release")
    assert (release["lease"], release["reason"]) == (lease["lease"], "disconnected")
    ended = await next_of(watcher, "lease", lease=lease["lease"], active=False)
    assert ended["reason"] == "disconnected"
    state = await next_of(watcher, "robot.state")
    assert state["robot"]["lease"] is None
    await close(watcher, bot)


async def test_keepalive_renews_and_release_ends_the_lease(robot, cast, settings):
    settings.SOP_LEASE_TIMEOUT_S = 0.6
    bot = await robot_socket(robot[1])
    a, _ = await console(cast[0])
    await send(a, type="takeover", robot="sim-01")
    lease = await next_of(a, "lease", active=True)
    for _ in range(3):  # 0.9 s in all: longer than the timeout, renewed every 0.3 s
        await asyncio.sleep(0.3)
        await send(a, type="keepalive", robot="sim-01")
        await send(a, type="ping", t=1)
        frame = await next_of(a, "pong")  # a keepalive has no reply; an error would have come before the pong
    assert await database_sync_to_async(control.expire_leases)() == 0
    await send(a, type="release", robot="sim-01")
    ended = await next_of(a, "lease", lease=lease["lease"])
    assert (ended["active"], ended["reason"]) == (False, "released")
    assert (await next_of(bot, "control.release"))["reason"] == "released"
    assert (await error_for(a, type="release", robot="sim-01"))["code"] == "not_holder"
    assert frame["type"] == "pong"
    await close(a, bot)


async def test_a_lease_that_is_not_renewed_expires(robot, cast, settings):
    settings.SOP_LEASE_TIMEOUT_S = 0.2
    bot = await robot_socket(robot[1])
    a, _ = await console(cast[0])
    await send(a, type="takeover", robot="sim-01")
    lease = await next_of(a, "lease", active=True)
    await asyncio.sleep(0.4)
    assert await database_sync_to_async(control.expire_leases)() == 1  # what the beat task robots.expire_leases does
    release = await next_of(bot, "control.release")
    assert (release["lease"], release["reason"]) == (lease["lease"], "timeout")
    ended = await next_of(a, "lease", lease=lease["lease"])
    assert (ended["active"], ended["reason"]) == (False, "timeout")
    assert await database_sync_to_async(audit)("lease_expired")
    await close(a, bot)


async def test_a_late_keepalive_finds_its_lease_expired(robot, cast, settings):
    settings.SOP_LEASE_TIMEOUT_S = 0.2
    bot = await robot_socket(robot[1])
    a, _ = await console(cast[0])
    await send(a, type="takeover", robot="sim-01")
    await next_of(a, "lease", active=True)
    await asyncio.sleep(0.4)
    assert (await error_for(a, type="keepalive", robot="sim-01"))["code"] == "not_holder"
    assert (await next_of(bot, "control.release"))["reason"] == "timeout"
    await close(a, bot)


async def test_a_robot_going_offline_ends_the_lease(robot, cast):
    bot = await robot_socket(robot[1])
    a, _ = await console(cast[0])
    await send(a, type="takeover", robot="sim-01")
    lease = await next_of(a, "lease", active=True)
    await close(bot)
    ended = await next_of(a, "lease", lease=lease["lease"])
    assert (ended["active"], ended["reason"]) == (False, "robot_offline")
    assert (await error_for(a, type="takeover", robot="sim-01"))["code"] == "robot_offline"
    await close(a)


# ---------------------------------------------------------------- e-stop, teleop, labels


async def test_estop_reaches_the_robot_is_audited_and_is_sent_again_after_a_reconnect(robot, task, cast):
    bot = await robot_socket(robot[1])
    a, _ = await console(cast[0])
    await send(a, type="estop", robot="sim-01", engaged=True)
    estop = await next_of(bot, "control.estop")
    assert (estop["engaged"], estop["by"]) == (True, "alice")
    # the first robot.state may be the robot's connect (coalesced, read before the e-stop): the e-stop's follows
    state = await next_of(a, "robot.state", timeout=3)
    while not state["robot"]["estopped"]:
        state = await next_of(a, "robot.state", timeout=3)
    assert state["robot"]["estopped_by"] == "alice"
    assert (await database_sync_to_async(audit)("estop"))[0]["actor_name"] == "alice"

    await close(bot)
    bot = await robot_socket(robot[1])
    await send(bot, v=1, type="hello", agent_version="0.1")
    again = await next_of(bot, "control.estop")
    assert again["engaged"] is True

    await send(a, type="estop", robot="sim-01", engaged=False)
    assert (await next_of(bot, "control.estop"))["engaged"] is False
    assert await database_sync_to_async(audit)("estop_cleared")
    await close(a, bot)


async def test_teleop_is_relayed_only_from_the_lease_holder(robot, cast):
    bot = await robot_socket(robot[1])
    a, _ = await console(cast[0])
    b, _ = await console(cast[1])
    await send(a, type="takeover", robot="sim-01")
    lease = await next_of(a, "lease", active=True)
    refused = await error_for(b, type="teleop", robot="sim-01", seq=1, t=1.0, action=[0.1, 0, 0])
    assert refused["code"] == "not_holder"
    await send(a, type="teleop", robot="sim-01", seq=7, t=1700000000000.0, action=[0.5, -0.25, 0], grip=1)
    command = await next_of(bot, "control.command")
    assert command == {"v": 1, "type": "control.command", "lease": lease["lease"], "seq": 7, "t": 1700000000000.0,
                       "action": [0.5, -0.25, 0], "grip": 1}
    assert (await error_for(a, type="teleop", robot="sim-01", seq=8, t=1.0, action=[2, 0, 0]))["code"] == "invalid"
    other = [f for f in await frames_for(bot, 0.3) if f["type"] == "control.command"]
    assert other == []  # neither bob's nor the invalid command reached the robot
    await close(a, b, bot)


async def test_a_label_is_relayed_and_audited(robot, cast):
    bot = await robot_socket(robot[1])
    a, _ = await console(cast[0])
    eid = str(uuid.uuid4())
    await send(a, type="label", robot="sim-01", outcome="failure", episode_id=eid)
    label = await next_of(bot, "episode.label")
    assert (label["outcome"], label["by"], label["episode_id"]) == ("failure", "alice", eid)
    assert (await error_for(a, type="label", robot="sim-01", outcome="timeout"))["code"] == "invalid"
    assert (await database_sync_to_async(audit)("label"))[0]["detail"] == {"outcome": "failure", "episode_id": eid}
    await close(a, bot)


# ---------------------------------------------------------------- WebRTC signalling


async def test_an_offer_is_relayed_and_the_answer_goes_back_to_that_console_only(robot, cast, settings):
    settings.SOP_ICE_SERVERS = [{"urls": "stun:stun.example:3478"}]
    bot = await robot_socket(robot[1])
    viewer, _ = await console(cast[3])
    other, _ = await console(cast[0])
    session = str(uuid.uuid4())
    await send(viewer, type="webrtc.offer", robot="sim-01", session=session, sdp="v=0\r\n" + "a=x\r\n" * 3000)
    offer = await next_of(bot, "webrtc.offer")
    assert (offer["session"], offer["user"], offer["ice_servers"]) == (session, "dave", settings.SOP_ICE_SERVERS)
    assert offer["sdp"].startswith("v=0")
    await send(bot, v=1, type="webrtc.answer", session=session, sdp="v=0 answer")
    answer = await next_of(viewer, "webrtc.answer")
    assert answer == {"type": "webrtc.answer", "robot": "sim-01", "session": session, "sdp": "v=0 answer", "error": ""}
    assert not [f for f in await frames_for(other, 0.3) if f["type"] == "webrtc.answer"]

    await send(viewer, type="webrtc.close", robot="sim-01", session=session)
    assert (await next_of(bot, "webrtc.close"))["session"] == session
    # another console cannot close (or learn about) this session
    assert (await error_for(other, type="webrtc.close", robot="sim-01", session=session))["code"] == "invalid"
    await close(viewer, other, bot)


async def test_signalling_for_unknown_revoked_or_offline_robots_is_refused(robot, other_robot, cast):
    viewer, _ = await console(cast[3])
    offer = dict(type="webrtc.offer", session=str(uuid.uuid4()), sdp="v=0")
    assert (await error_for(viewer, robot="sim-99", **offer))["code"] == "unknown_robot"
    assert (await error_for(viewer, robot="sim-02", **offer))["code"] == "robot_offline"
    await database_sync_to_async(fleet.revoke_robot)(other_robot[0])
    assert (await next_of(viewer, "robot.removed"))["robot"] == "sim-02"
    assert (await error_for(viewer, robot="sim-02", **offer))["code"] == "unknown_robot"
    await close(viewer)


async def test_closing_a_console_closes_its_video_sessions(robot, cast):
    bot = await robot_socket(robot[1])
    viewer, _ = await console(cast[3])
    session = str(uuid.uuid4())
    await send(viewer, type="webrtc.offer", robot="sim-01", session=session, sdp="v=0")
    await next_of(bot, "webrtc.offer")
    await close(viewer)
    assert (await next_of(bot, "webrtc.close"))["session"] == session
    await close(bot)


# ---------------------------------------------------------------- robot state and bad frames


async def test_robot_state_reaches_consoles_on_connect_status_and_disconnect(robot, task, cast):
    viewer, _ = await console(cast[3])
    bot = await robot_socket(robot[1])
    assert (await next_of(viewer, "robot.state"))["robot"]["connected"] is True
    await send(bot, v=1, type="status", state="running", task="drawer-open", step=4, video_fps=14.5, viewers=2,
               deadman=True, operator="alice")
    state = (await next_of(viewer, "robot.state"))["robot"]
    assert (state["state"], state["current_task"], state["video_fps"], state["viewers"]) == (
        "running", "drawer-open", 14.5, 2)
    assert (state["deadman"], state["operator"]) == (True, "alice")
    # an unchanged heartbeat right after is not broadcast again (at most once per heartbeat)
    await send(bot, v=1, type="status", state="running", task="drawer-open", step=5, video_fps=14.5, viewers=2,
               deadman=True, operator="alice")
    assert not [f for f in await frames_for(viewer, 0.3) if f["type"] == "robot.state"]
    await close(bot)
    state = (await next_of(viewer, "robot.state"))["robot"]
    assert (state["connected"], state["state"]) == (False, "offline")
    await close(viewer)


async def test_a_heartbeat_that_moves_only_volatile_values_reaches_consoles_as_robot_live(robot, task, cast, settings):
    settings.SOP_HEARTBEAT_S = 0.2  # an unchanged heartbeat is shown at most once per 0.9 heartbeat intervals
    viewer, _ = await console(cast[3])
    bot = await robot_socket(robot[1])
    beat = dict(v=1, type="status", state="running", task="drawer-open", loop_hz=9.5, spool_pending=3)
    await send(bot, step=4, **beat)
    state = await next_of(viewer, "robot.state")
    while state["robot"]["state"] != "running":
        state = await next_of(viewer, "robot.state")
    await asyncio.sleep(0.5)  # past a state broadcast that a change too soon after the connect's may have deferred
    await send(bot, step=9, **beat)
    live = await next_of(viewer, "robot.live")
    (mine,) = [r for r in live["robots"] if r["name"] == "sim-01"]
    assert (mine["current_step"], mine["loop_hz"], mine["spool_pending"]) == (9, 9.5, 3)
    assert mine["as_of"] >= state["robot"]["as_of"] and mine["last_seen"].endswith("Z")
    CONSOLE.decode(json.dumps(live), accept=(console_protocol.RobotLive,))  # the published schema holds
    await close(bot, viewer)


BAD = {
    "malformed": ["{nope", "[1, 2]", json.dumps({"type": 5})],
    "invalid": [json.dumps({"type": "teleport"}), json.dumps({"type": "takeover"}),
                json.dumps({"type": "estop", "robot": "sim-01", "engaged": "yes"}),
                json.dumps({"type": "webrtc.offer", "robot": "sim-01", "session": "nope", "sdp": "v=0"}),
                json.dumps({"type": "webrtc.offer", "robot": "sim-01", "session": str(uuid.uuid4()),
                            "sdp": "x" * (protocol.MAX_SDP + 1)}),
                json.dumps({"type": "ping", "pad": "x" * protocol.MAX_MESSAGE_BYTES})],
}


@pytest.mark.parametrize("code", BAD)
async def test_bad_frames_get_typed_errors_and_the_socket_stays_open(robot, cast, code):
    comm, _ = await console(cast[0])
    for raw in BAD[code]:
        await comm.send_to(text_data=raw)
        error = await next_of(comm, "error")
        assert error["code"] == code and error["detail"], raw[:80]
    await send(comm, type="ping", t=1)
    assert (await next_of(comm, "pong"))["t"] == 1
    await close(comm)


async def test_a_flood_of_bad_frames_closes_the_console_socket(robot, cast, settings):
    settings.SOP_MAX_BAD_MESSAGES = 3
    comm, _ = await console(cast[0])
    for _ in range(3):
        await comm.send_to(text_data="nope")
        assert (await next_of(comm, "error"))["code"] == "malformed"
    await comm.send_to(text_data="nope")
    assert (await next_of(comm, "error"))["code"] == "too_many_errors"
    while (output := await comm.receive_output(timeout=TIMEOUT))["type"] != "websocket.close":
        pass
    assert output["code"] == protocol.CloseCode.TOO_MANY_ERRORS


async def test_a_fleet_too_large_for_one_frame_comes_as_a_hello_in_parts(cast, monkeypatch):
    """daphne sends no websocket message over 1 MiB, ~1,200 robots' states: the hello's robots are split."""
    names = [f"arm-{i:02d}" for i in range(7)]
    for name in names:
        await database_sync_to_async(fleet.register_robot)(name)
    monkeypatch.setattr(console_protocol, "HELLO_FRAME_BYTES", 2500)  # ~2-3 robot states a frame
    comm = await console_socket(cast[3])
    ok, _ = await comm.connect(timeout=TIMEOUT)
    assert ok
    OPEN.append(comm)
    frames = [await comm.receive_json_from(timeout=TIMEOUT)]
    while frames[-1]["more"]:
        frames.append(await comm.receive_json_from(timeout=TIMEOUT))
        assert frames[-1]["type"] == "robot.list"
    assert frames[0]["type"] == "hello" and len(frames) >= 3
    assert sorted(r["name"] for f in frames for r in f["robots"]) == names
    for frame in frames:
        assert len(json.dumps(frame).encode()) < 2500 + 2000  # one robot over the budget at most, plus the envelope
        CONSOLE.decode(json.dumps(frame))  # each part valid as published
    await close(comm)
