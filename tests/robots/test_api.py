"""The operator read API: what the fleet page shows."""

import datetime as dt
import json
import uuid

import pytest
from django.utils import timezone

from robots import selectors
from robots.models import Episode, InterventionSegment, Robot, Task

pytestmark = pytest.mark.django_db


@pytest.fixture
def console(client, operator):
    client.force_login(operator)
    return client


def make_episode(robot, task, *, status="verified", split="online", outcome="success", minutes_ago=0):
    return Episode.objects.create(
        id=uuid.uuid4(), robot=robot, task=task, split=split, status=status, outcome=outcome,
        success=outcome == "success", started_at=timezone.now() - dt.timedelta(minutes=minutes_ago), steps=10,
    )


def test_robots_are_listed_with_live_state_and_episode_counts(console, robot, other_robot, task):
    robot, _ = robot
    Robot.objects.filter(pk=robot.pk).update(connected=True, state="running", current_task=task, loop_hz=9.5)
    make_episode(robot, task)
    make_episode(robot, task, outcome="failure")
    make_episode(robot, task, status="uploading")
    rows = console.get("/api/robots/").json()
    assert [r["name"] for r in rows] == ["sim-01", "sim-02"]
    first = rows[0]
    live = (first["connected"], first["state"], first["current_task"], first["loop_hz"])
    assert live == (True, "running", "drawer-open", 9.5)
    assert (first["episode_count"], first["verified_episode_count"], first["successful_episode_count"]) == (3, 2, 1)
    assert first["revoked"] is False and "token_hash" not in first and "token_prefix" not in first


def test_tasks_are_listed_with_counts(console, robot, task):
    make_episode(robot[0], task)
    Task.objects.create(name="reach", env_id="reach-v3", enabled=False)
    rows = console.get("/api/tasks/").json()
    assert [(t["name"], t["enabled"], t["verified_episode_count"]) for t in rows] == [
        ("drawer-open", True, 1), ("reach", False, 0)]


def test_episodes_are_filtered_and_paginated(console, robot, other_robot, task):
    reach = Task.objects.create(name="reach", env_id="reach-v3")
    make_episode(robot[0], task, minutes_ago=3)
    make_episode(robot[0], reach, split="eval", outcome="timeout", minutes_ago=2)
    make_episode(other_robot[0], task, status="rejected", outcome="", minutes_ago=1)

    def ids(query):
        return [(e["robot"], e["task"], e["status"]) for e in console.get(f"/api/episodes/?{query}").json()["results"]]

    assert ids("") == [("sim-02", "drawer-open", "rejected"), ("sim-01", "reach", "verified"),
                       ("sim-01", "drawer-open", "verified")]
    assert ids("task=reach") == [("sim-01", "reach", "verified")]
    assert ids("robot=sim-02") == [("sim-02", "drawer-open", "rejected")]
    assert ids("split=eval&outcome=timeout") == [("sim-01", "reach", "verified")]
    assert ids("status=verified&task=drawer-open") == [("sim-01", "drawer-open", "verified")]
    page = console.get("/api/episodes/?page_size=2").json()
    assert (page["count"], len(page["results"]), page["next"] is not None) == (3, 2, True)
    bad = console.get("/api/episodes/?status=lost")
    assert (bad.status_code, bad.json()["code"]) == (400, "invalid")


def test_an_episode_is_shown_with_its_segments(console, robot, task, operator):
    episode = make_episode(robot[0], task)
    InterventionSegment.objects.create(episode=episode, start_step=2, end_step=6, source="operator", operator=operator,
                                       operator_name="alice", reason="slipping")
    body = console.get(f"/api/episodes/{episode.id}/").json()
    summary = (body["id"], body["robot"], body["task"], body["status"])
    assert summary == (str(episode.id), "sim-01", "drawer-open", "verified")
    assert body["segments"] == [{"start_step": 2, "end_step": 6, "steps": 4, "source": "operator", "operator": "alice",
                                 "operator_name": "alice", "lease": None, "claimed_operator": "", "reason": "slipping"}]
    missing = console.get(f"/api/episodes/{uuid.uuid4()}/")
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")


def test_the_operator_api_needs_a_login(client, robot):
    reply = client.get("/api/robots/")
    assert reply.status_code == 403 and reply.json()["code"] == "not_authenticated"


def test_no_api_response_or_console_state_shows_a_token_prefix(console, robot, other_robot, task):
    """The first characters of a robot's secret are for admins in the Django admin, not for every viewer."""
    bots = [robot[0], other_robot[0]]
    for bot in bots:
        bot.refresh_from_db()
        assert bot.token_prefix.startswith("sop_") and len(bot.token_prefix) > 4
    episode = make_episode(robot[0], task)
    secrets = [bot.token_prefix for bot in bots] + [bot.token_prefix[4:] for bot in bots]
    for url in ("/api/robots/", "/api/tasks/", "/api/episodes/", f"/api/episodes/{episode.id}/", "/api/runs/",
                "/api/checkpoints/"):
        reply = console.get(url)
        assert reply.status_code == 200, url
        assert "token_prefix" not in reply.content.decode() and not any(s in reply.content.decode() for s in secrets)
    # the console sockets' robot.state / hello payloads are built by selectors.robot_states from RobotSerializer
    states = json.dumps(selectors.robot_states(), default=str)
    assert "sim-01" in states and "token_prefix" not in states and not any(s in states for s in secrets)
