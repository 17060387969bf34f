"""The help queue (docs/console.md, "Help queue"): robots ask through their heartbeat or the help button, operators
claim, resolve and dismiss through the console socket, the queue assigns requests across the operators online.
Real ASGI app, real channel layer, real robot and console sockets."""

import json
import uuid

import httpx
import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from robots import control, fleet, helpqueue, protocol
from robots.console_protocol import CONSOLE
from robots.episode_file import Segment
from robots.models import AuditEvent, ControlLease, HelpRequest, InterventionSegment, OperatorPresence
from sop_web.asgi import application

from .factories import announcement, bearer, episode_bytes, episode_data
from .test_console import (TIMEOUT, cast, close, close_leftover_sockets, console, error_for, frames_for,  # noqa: F401
                           next_of, robot_socket, send)

pytestmark = pytest.mark.django_db(transaction=True)


def signal(**overrides) -> dict:
    body = {"id": str(uuid.uuid4()), "kind": "stall", "reason": "hand moved 0.2 cm in the last 30 steps",
            "urgency": 2, "since": timezone.now().timestamp(), "step": 42,
            "trace": [{"t": -0.1 * i, "hand": [0.0, 0.6, 0.2], "grip": 0.5, "action": [0, 0, 0, -1],
                       "driver": "policy"} for i in range(3)]}
    return {**body, **overrides}


async def heartbeat(bot, help=None, **fields):
    body = {"v": 1, "type": "status", "state": "running", "task": None, "step": 42, **fields}
    if help is not None:
        body["help"] = help
    await send(bot, **body)


def requests(**filters):
    return database_sync_to_async(lambda: list(HelpRequest.objects.filter(**filters).order_by("pk")))()


async def help_frame(comm, status: str, robot: str = "sim-01", timeout=TIMEOUT) -> dict:
    """The next ``help`` frame carrying a request of ``robot`` in ``status``; checked against the published schema."""
    while True:
        frame = await next_of(comm, "help", timeout=timeout)
        CONSOLE.decode(json.dumps(frame))  # the frame is what the schema says
        for view in frame["requests"]:
            if view["robot"] == robot and view["status"] == status:
                return view


# ---------------------------------------------------------------- raised by the robot


async def test_a_heartbeats_help_request_reaches_every_console_once_and_is_withdrawn_when_the_robot_stops_asking(
        robot, cast):
    alice, _, _, dave = cast
    bot = await robot_socket(robot[1])
    a, hello = await console(alice)
    v, _ = await console(dave)  # a viewer sees the queue too
    assert hello["help"] == []
    ask = signal()
    for _ in range(3):  # repeated in every heartbeat: one request
        await heartbeat(bot, help=ask)
    view = await help_frame(a, "open")
    assert (view["kind"], view["reason"], view["urgency"], view["step"]) == ("stall", ask["reason"], 2, 42)
    assert len(view["trace"]) == 3 and view["trace"][0]["driver"] == "policy"
    assert (await help_frame(v, "open"))["id"] == view["id"]
    assert len(await requests()) == 1
    assert await database_sync_to_async(AuditEvent.objects.filter(action="help_requested").count)() == 1

    late, hello = await console(alice)  # a console that opens later finds it in its hello
    assert [r["id"] for r in hello["help"]] == [view["id"]]

    await heartbeat(bot)  # the robot no longer asks (it got moving again)
    withdrawn = await help_frame(a, "withdrawn")
    assert withdrawn["id"] == view["id"] and withdrawn["closed_at"]
    await close(a, v, late, bot)


async def test_a_malformed_help_signal_is_refused_with_a_typed_error_and_records_nothing(robot):
    bot = await robot_socket(robot[1])
    for bad in (signal(kind="panic"), signal(urgency=9), signal(id="not-a-uuid"), signal(reason="x" * 201),
                signal(trace=[{"t": 1.0, "hand": [0, 0, 0], "grip": 0, "action": [0], "driver": "policy"}]),
                signal(trace=[{"t": -1.0, "hand": [0, 0], "grip": 0, "action": [0], "driver": "policy"}]),
                signal(trace=[{"t": -1.0, "hand": [0, 0, 0], "grip": 0, "action": [0], "driver": "policy"}] * 41)):
        await heartbeat(bot, help=bad)
        error = await next_of(bot, "error")
        assert (error["code"], error["ref_type"]) == ("invalid", "status")
    assert await requests() == []
    await close(bot)


async def test_the_help_button_asks_through_the_robot_api_once_per_id(robot, other_robot):
    _, token = robot
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        press = {"reason": "gripper jammed", "id": str(uuid.uuid4())}
        first = await http.post("/api/robot/help", json=press, headers=bearer(token))
        again = await http.post("/api/robot/help", json=press, headers=bearer(token))
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.json() == again.json() == {"id": first.json()["id"], "status": "open"}
        assert (await http.post("/api/robot/help", json=press)).status_code == 401
        assert (await http.post("/api/robot/help", json={**press, "urgency": 7},
                                headers=bearer(token))).status_code == 400
        assert (await http.post("/api/robot/help", json={"reason": "x" * 201},
                                headers=bearer(token))).status_code == 400
        # the same id from another robot is that robot's own request, not a reply about sim-01's
        other = await http.post("/api/robot/help", json=press, headers=bearer(other_robot[1]))
        assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    [request, _] = await requests()
    assert (request.kind, request.urgency, request.reason) == ("button", 3, "gripper jammed")


def test_a_robot_cannot_flood_the_queue(robot):
    first, new = helpqueue.raise_request(robot[0], "button", "jammed")
    assert new
    for _ in range(20):  # new ids in quick succession: all the same request
        again, new = helpqueue.raise_request(robot[0], "stall", "still")
        assert (again.pk, new) == (first.pk, False)
    HelpRequest.objects.update(raised_at=timezone.now() - timezone.timedelta(seconds=helpqueue.RAISE_EVERY_S + 1))
    assert helpqueue.raise_request(robot[0], "stall", "still")[1]
    assert HelpRequest.objects.count() == 2


async def test_a_heartbeat_without_help_does_not_withdraw_a_button_request(robot):
    bot = await robot_socket(robot[1])
    await database_sync_to_async(helpqueue.raise_request)(robot[0], "button", "jammed")
    await heartbeat(bot)
    await frames_for(bot, 0.3)
    [request] = await requests()
    assert request.status == "open"
    await close(bot)


# ---------------------------------------------------------------- answered by operators


async def test_claim_takes_the_robot_over_once_and_resolve_labels_and_gives_it_back(robot, cast):
    alice, bob, _, dave = cast
    bot = await robot_socket(robot[1])
    await heartbeat(bot, help=signal())
    a, _ = await console(alice)
    b, _ = await console(bob)
    v, _ = await console(dave)
    [request] = await requests()

    error = await error_for(v, type="help.claim", id=request.pk)
    assert (error["code"], error["ref"]) == ("forbidden", "help.claim")
    await send(a, type="help.claim", id=request.pk)
    claimed = await help_frame(b, "claimed")
    assert (claimed["claimed_by"], claimed["assigned_to"]) == ("alice", "alice") and claimed["lease"]
    takeover = await next_of(bot, "control.takeover")
    assert takeover["lease"] == claimed["lease"] and takeover["reason"].startswith(f"help #{request.pk}")
    error = await error_for(b, type="help.claim", id=request.pk)
    assert error["code"] == "held" and "alice" in error["detail"]
    error = await error_for(b, type="help.resolve", id=request.pk, outcome="success")
    assert error["code"] == "not_holder"

    await send(a, type="help.resolve", id=request.pk, outcome="failure", note="pushed the drawer shut")
    resolved = await help_frame(b, "resolved")
    assert (resolved["closed_by"], resolved["outcome"], resolved["note"]) == ("alice", "failure",
                                                                              "pushed the drawer shut")
    # the robot is given back, then the label ends the episode the operator saw
    sent = {f["type"]: f for f in await frames_for(bot, 1.0)}
    assert sent["control.release"]["lease"] == claimed["lease"]
    assert (sent["episode.label"]["outcome"], sent["episode.label"]["by"]) == ("failure", "alice")
    lease = await database_sync_to_async(ControlLease.objects.get)(pk=claimed["lease"])
    assert lease.end_reason == "released"
    error = await error_for(a, type="help.dismiss", id=request.pk)
    assert error["code"] == "invalid" and "resolved by alice" in error["detail"]
    actions = await database_sync_to_async(
        lambda: list(AuditEvent.objects.filter(action__startswith="help").order_by("at").values_list("action",
                                                                                                     flat=True)))()
    assert actions == ["help_requested", "help_claimed", "help_resolved"]
    await close(a, b, v, bot)


async def test_a_plain_takeover_answers_the_open_request_and_its_end_resolves_it(robot, cast):
    alice = cast[0]
    bot = await robot_socket(robot[1])
    await heartbeat(bot, help=signal())
    a, _ = await console(alice)
    await send(a, type="takeover", robot="sim-01", reason="looks stuck")
    claimed = await help_frame(a, "claimed")
    await send(a, type="release", robot="sim-01")
    resolved = await help_frame(a, "resolved")
    assert resolved["id"] == claimed["id"] and resolved["note"] == "takeover ended (released)"
    await close(a, bot)


async def test_dismissing_a_false_alarm_closes_it_and_another_operators_claim_is_theirs(robot, other_robot, cast):
    alice, bob, carol, _ = cast
    bot1, bot2 = await robot_socket(robot[1]), await robot_socket(other_robot[1])
    await heartbeat(bot1, help=signal())
    await heartbeat(bot2, help=signal())
    a, _ = await console(alice)
    b, _ = await console(bob)
    first = (await requests(robot__name="sim-01"))[0]
    second = (await requests(robot__name="sim-02"))[0]
    await send(b, type="help.dismiss", id=first.pk, note="it was thinking")
    dismissed = await help_frame(a, "dismissed")
    assert (dismissed["closed_by"], dismissed["note"]) == ("bob", "it was thinking")

    await send(a, type="help.claim", id=second.pk)
    await help_frame(b, "claimed", robot="sim-02")
    error = await error_for(b, type="help.dismiss", id=second.pk)
    assert error["code"] == "held"  # alice answers it: hers to close
    c, _ = await console(carol)  # an admin may close anyone's
    await send(c, type="help.dismiss", id=second.pk, note="duplicate")
    assert (await help_frame(a, "dismissed", robot="sim-02"))["closed_by"] == "carol"
    await close(a, b, c, bot1, bot2)


# ---------------------------------------------------------------- assignment across operators


async def test_requests_are_spread_over_the_operators_online_one_each_unless_they_ask_for_more(
        robot, other_robot, cast, django_user_model):
    alice, bob, _, dave = cast
    third = await database_sync_to_async(fleet.register_robot)("sim-03")
    v, _ = await console(dave)  # viewers are never assigned
    bots = [await robot_socket(t) for t in (robot[1], other_robot[1], third[1])]
    for i, bot in enumerate(bots):  # three robots ask while no operator is online
        await heartbeat(bot, help=signal(urgency=3 if i == 2 else 2))
        await help_frame(v, "open", robot=f"sim-0{i + 1}")

    def assigned():
        return {r.robot.name: (r.assigned_to.username if r.assigned_to else None)
                for r in HelpRequest.objects.select_related("robot", "assigned_to")}

    assert set((await database_sync_to_async(assigned)()).values()) == {None}
    a, _ = await console(alice)
    b, _ = await console(bob)
    shown = await database_sync_to_async(assigned)()
    assert sorted(n for n in shown.values() if n) == ["alice", "bob"]  # one each
    assert shown["sim-03"] == "alice" and shown["sim-01"] == "bob"  # the most urgent, then the oldest
    assert shown["sim-02"] is None

    await send(a, type="help.capacity", capacity=2)  # alice asks for more
    for _ in range(50):
        shown = await database_sync_to_async(assigned)()
        if None not in shown.values():
            break
        await frames_for(a, 0.05)
    assert sorted(shown.values()) == ["alice", "alice", "bob"]

    await close(b)  # bob leaves: what he had not claimed goes back to the queue
    for _ in range(50):
        shown = await database_sync_to_async(assigned)()
        if "bob" not in shown.values():
            break
        await frames_for(a, 0.05)
    assert "bob" not in shown.values()
    assert await database_sync_to_async(OperatorPresence.objects.filter(user=dave).exists)() is False
    await close(a, v, *bots)


def test_an_operator_driving_a_robot_nobody_asked_about_is_busy(robot, other_robot, cast):
    alice, bob, _, _ = cast
    for user, channel in ((alice, "chan-a"), (bob, "chan-b")):
        helpqueue.operator_online(user, channel)
    for online in (robot[0], other_robot[0]):
        online.connected = True
        online.save()
    control.acquire_lease(robot[0], alice, "checking", "chan-a")  # no request: a takeover of her own
    request, _ = helpqueue.raise_request(other_robot[0], "button", "jammed")
    request.refresh_from_db()
    assert request.assigned_to == bob
    # a robot that goes offline: its open request is withdrawn (nobody can answer it) and the operator is free again
    from robots import fleet as fleet_services

    other = other_robot[0]
    other.refresh_from_db()
    fleet_services.robot_disconnected(other, other.connected_at)
    request.refresh_from_db()
    assert (request.status, request.note) == ("withdrawn", "the robot went offline")


def test_an_unanswered_request_grows_more_urgent_with_time(robot, other_robot, settings):
    low, _ = helpqueue.raise_request(robot[0], "button", "jammed", urgency=1)
    answered, _ = helpqueue.raise_request(other_robot[0], "button", "jammed", urgency=1)
    HelpRequest.objects.filter(pk=answered.pk).update(status="claimed")
    start = timezone.now()
    assert helpqueue.escalate(start) == []  # not yet
    step = timezone.timedelta(seconds=settings.SOP_HELP_ESCALATE_S + 1)
    assert helpqueue.escalate(start + step) == [low.pk]
    assert helpqueue.escalate(start + step) == []  # once per interval
    assert helpqueue.escalate(start + 2 * step) == [low.pk]
    assert helpqueue.escalate(start + 3 * step) == []  # 3 is the top
    low.refresh_from_db()
    answered.refresh_from_db()
    assert (low.urgency, answered.urgency) == (3, 1)  # a claimed request stays as it was


def test_presence_not_refreshed_within_sop_presence_s_does_not_count(robot, cast, settings):
    alice = cast[0]
    helpqueue.operator_online(alice, "chan-a")
    OperatorPresence.objects.update(seen_at=timezone.now() - timezone.timedelta(seconds=settings.SOP_PRESENCE_S + 1))
    request, _ = helpqueue.raise_request(robot[0], "button", "jammed")
    request.refresh_from_db()
    assert request.assigned_to is None


# ---------------------------------------------------------------- the episode carries the request


async def test_the_segment_driven_under_the_claiming_lease_carries_the_request(robot, task, cast, tmp_path,
                                                                             payload_dir):
    alice = cast[0]
    fleet_robot, token = robot

    def claim():
        fleet_robot.connected = True
        fleet_robot.save()
        request, _ = helpqueue.raise_request(fleet_robot, "stall", "still")
        lease = control.claim_help(request.pk, alice, "chan-a").lease
        control.end_lease(lease, "released", actor=alice)
        return request, lease

    request, lease = await database_sync_to_async(claim)()
    data = episode_data(segments=[Segment(0, 2, "operator", "alice", "help", lease.pk),
                                  Segment(3, 5, "sim_operator", "sim-operator", "scripted")])
    payload = episode_bytes(tmp_path, data)
    body = announcement(data, payload)
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        opened = await http.post("/api/robot/episodes/", json=body, headers=bearer(token))
        done = await http.put(f"/api/robot/episodes/{body['id']}/payload", content=payload,
                              headers={**bearer(token), "Upload-Offset": "0",
                                       "Content-Type": "application/octet-stream"})
        assert (opened.status_code, done.json()["status"]) == (201, "verified")
    rows = await database_sync_to_async(lambda: list(InterventionSegment.objects.filter(episode_id=body["id"])
                                                     .order_by("start_step").values_list("source", "help_request")))()
    assert rows == [("operator", request.pk), ("sim_operator", None)]


def test_the_console_protocol_documents_every_help_frame():
    names = set(CONSOLE.registry)
    assert {"help.claim", "help.resolve", "help.dismiss", "help.capacity", "help"} <= names
    assert protocol.Status(state="running", help=signal()).help["kind"] == "stall"
