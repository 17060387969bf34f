"""The console pages of the fleet: tasks and task mixes, episodes (filters, MP4 replay, relabel), metrics, audit.

Django test client against real models; roles from robots/roles.py.
"""

from __future__ import annotations

import datetime as dt
import io
import uuid

import av
import numpy as np
import pytest
from django.urls import reverse
from django.utils import timezone

from robots import episode_file, fleet, replay, selectors, tasking
from robots.episode_file import Segment
from robots.models import AuditEvent, Episode, InterventionSegment, MediaJob, Task, TaskAssignment
from robots.roles import set_role

from .factories import episode_data

pytestmark = pytest.mark.django_db

PAGES = [("tasks", {}), ("task_new", {}), ("episodes", {}), ("metrics", {}), ("metrics_data", {}), ("audit", {})]


@pytest.fixture
def viewer(django_user_model):
    """Dave: logged in, in no role group, so a viewer."""
    return django_user_model.objects.create_user("dave", password="dave-password-1")


@pytest.fixture
def op(operator):
    set_role(operator, "operator")
    return operator


def client_for(client, user):
    client.force_login(user)
    return client


def make_episode(task, robot, *, outcome="success", minutes_ago=10.0, steps=100, interventions=0, iv_steps=0,
                 split="online", version=1, status=Episode.Status.VERIFIED, now=None):
    now = now or timezone.now()
    ended = now - dt.timedelta(minutes=minutes_ago)
    return Episode.objects.create(
        robot=robot, task=task, prompt=task.prompts[0] if task.prompts else "", policy_version=version, split=split,
        started_at=ended - dt.timedelta(seconds=steps / 10), ended_at=ended if outcome else None, steps=steps,
        outcome=outcome, success=(outcome == "success") if outcome else None, outcome_source="robot" if outcome else "",
        intervention_count=interventions, intervention_steps=iv_steps, control_hz=10.0, status=status)


@pytest.fixture
def tasks(db):
    return [Task.objects.create(name="drawer-open", env_id="drawer-open-v3", prompts=["open the drawer"]),
            Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal", "touch the target"])]


@pytest.fixture
def robots(db):
    return [fleet.register_robot("sim-01")[0], fleet.register_robot("sim-02")[0]]


# ---------------------------------------------------------------- access


def test_every_page_redirects_anonymous_users_to_login(client, tasks, robots):
    ep = make_episode(tasks[0], robots[0])
    urls = [reverse(name, kwargs=kw) for name, kw in PAGES] + [
        reverse("task_edit", args=["reach"]), reverse("episode", args=[ep.pk]), reverse("episode_video", args=[ep.pk])]
    for url in urls:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith(reverse("login")), url
    for url in (reverse("tasks"), reverse("task_new"), reverse("task_edit", args=["reach"]),
                reverse("episode_relabel", args=[ep.pk])):
        response = client.post(url, {})
        assert response.status_code == 302 and response["Location"].startswith(reverse("login")), url


def test_viewers_see_every_page_but_cannot_change_anything(client, viewer, tasks, robots):
    ep = make_episode(tasks[0], robots[0])
    client_for(client, viewer)
    for url in (reverse("tasks"), reverse("task_edit", args=["reach"]), reverse("episodes"),
                reverse("episode", args=[ep.pk]), reverse("metrics"), reverse("metrics_data"), reverse("audit")):
        assert client.get(url).status_code == 200, url
    page = client.get(reverse("tasks")).content.decode()
    assert "viewer" in page and "New task" not in page and "Only administrators change task mixes" in page
    assert client.get(reverse("task_new")).status_code == 403
    assert client.post(reverse("task_new"), {"name": "x", "env_id": "reach-v3", "prompts": "a",
                                              "max_steps": 10}).status_code == 403
    assert client.post(reverse("task_edit", args=["reach"]), {"env_id": "push-v3", "prompts": "a",
                                                              "max_steps": 10}).status_code == 403
    assert client.post(reverse("tasks"), {f"w-fleet-{tasks[0].pk}": "1"}).status_code == 403
    assert client.post(reverse("episode_relabel", args=[ep.pk]), {"outcome": "failure", "reason": "x"}).status_code == 403
    assert Task.objects.get(name="reach").env_id == "reach-v3" and not TaskAssignment.objects.exists()
    assert Episode.objects.get(pk=ep.pk).outcome == "success"


def test_operators_cannot_edit_tasks(client, op, tasks):
    client_for(client, op)
    assert client.get(reverse("task_new")).status_code == 403
    assert client.post(reverse("task_edit", args=["reach"]), {"env_id": "push-v3", "prompts": "a",
                                                              "max_steps": 10}).status_code == 403


def test_posts_need_a_csrf_token(admin_user, tasks):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    response = client.post(reverse("task_edit", args=["reach"]), {"env_id": "push-v3", "prompts": "a", "max_steps": 10})
    assert response.status_code == 403
    assert Task.objects.get(name="reach").env_id == "reach-v3"


def test_the_nav_shows_the_role_and_admin_link(client, admin_user, op):
    page = client_for(client, admin_user).get(reverse("tasks")).content.decode()
    assert 'class="role role-admin"' in page and reverse("admin:index") in page
    for label in ("Fleet", "Tasks", "Episodes", "Training", "Metrics", "Audit"):
        assert f">{label}</a>" in page
    client.logout()
    page = client_for(client, op).get(reverse("tasks")).content.decode()
    assert 'class="role role-operator"' in page and reverse("admin:index") not in page


# ---------------------------------------------------------------- tasks


def test_admin_creates_a_task_and_it_is_audited(client, admin_user):
    client_for(client, admin_user)
    page = client.get(reverse("task_new")).content.decode()
    assert '<option value="drawer-open-v3">' in page  # the catalog's env ids as suggestions
    response = client.post(reverse("task_new"), {
        "name": "door-open", "env_id": "door-open-v3", "prompts": "open the door\n\n  pull the door open  \n",
        "max_steps": 120, "enabled": "on", "description": "A door."})
    assert response.status_code == 302 and response["Location"] == reverse("task_edit", args=["door-open"])
    task = Task.objects.get(name="door-open")
    assert task.prompts == ["open the door", "pull the door open"] and task.max_steps == 120 and task.enabled
    event = AuditEvent.objects.get(action="task_saved")
    assert event.actor == admin_user and event.detail["task"] == "door-open" and event.detail["created"] is True


def test_task_form_validation_errors_are_shown(client, admin_user, tasks):
    client_for(client, admin_user)
    response = client.post(reverse("task_new"), {"name": "Bad Name", "env_id": "has space", "prompts": "  \n ",
                                                  "max_steps": 0})
    assert response.status_code == 400
    assert set(response.context["form"].errors) == {"name", "env_id", "prompts", "max_steps"}
    page = response.content.decode()
    assert "slug" in page and "This field is required" in page and "no spaces" in page
    assert "Between 1 and 10000 steps" in page and 'class="field invalid"' in page
    response = client.post(reverse("task_new"), {"name": "ok", "env_id": "reach-v3", "prompts": "x" * 501, "max_steps": 5})
    assert "at most 500 characters" in response.content.decode()
    response = client.post(reverse("task_new"), {"name": "reach", "env_id": "reach-v3", "prompts": "x", "max_steps": 5})
    assert response.status_code == 400 and "already exists" in response.content.decode()
    assert Task.objects.count() == 2 and not AuditEvent.objects.filter(action="task_saved").exists()


def test_admin_edits_a_task_but_not_its_name(client, admin_user, tasks):
    client_for(client, admin_user)
    response = client.post(reverse("task_edit", args=["reach"]), {
        "name": "renamed", "env_id": "reach-wall-v3", "prompts": "reach it", "max_steps": 80, "description": ""})
    assert response.status_code == 302
    task = Task.objects.get(pk=tasks[1].pk)
    assert task.name == "reach" and task.env_id == "reach-wall-v3" and task.prompts == ["reach it"]
    assert task.max_steps == 80 and task.enabled is False  # an unchecked box disables
    assert AuditEvent.objects.get(action="task_saved").detail["enabled"] is False


def test_task_list_shows_counts_and_recent_success(client, viewer, tasks, robots):
    for outcome in ("success", "success", "failure", "aborted"):
        make_episode(tasks[0], robots[0], outcome=outcome)
    make_episode(tasks[0], robots[0], outcome="success", split="offline")
    page = client_for(client, viewer).get(reverse("tasks")).content.decode()
    row = page.split("drawer-open</strong>")[1].split("</tr>")[0]
    assert '<td class="num">5</td>' in row and '<td class="num">4</td>' in row  # stored, online
    assert "67%" in row and "of 3" in row  # 2 of 3 rated online episodes (aborted is not rated)


def test_admin_saves_the_task_mixes(client, admin_user, tasks, robots):
    drawer, reach = tasks
    TaskAssignment.objects.create(robot=None, task=drawer, weight=1.0)
    client_for(client, admin_user)
    page = client.get(reverse("tasks")).content.decode()
    assert f'name="w-fleet-{drawer.pk}" value="1"' in page
    response = client.post(reverse("tasks"), {
        f"w-fleet-{drawer.pk}": "3", f"w-fleet-{reach.pk}": "1", "split-fleet": "online",
        f"w-{robots[0].pk}-{reach.pk}": "2.5", f"split-{robots[0].pk}": "eval",
        f"w-{robots[1].pk}-{drawer.pk}": "0", f"split-{robots[1].pk}": "online"})
    assert response.status_code == 302
    mix = {(a.robot_id, a.task.name): (a.weight, a.split) for a in TaskAssignment.objects.select_related("task")}
    assert mix == {(None, "drawer-open"): (3.0, "online"), (None, "reach"): (1.0, "online"),
                   (robots[0].pk, "reach"): (2.5, "eval")}
    events = AuditEvent.objects.filter(action="assignments_saved")
    assert {e.detail["scope"] for e in events} == {"fleet", "sim-01"}  # sim-02's mix did not change
    fleet = events.get(detail__scope="fleet")
    assert fleet.detail["before"] == {"drawer-open": [1.0, "online"]} and fleet.actor == admin_user
    # the next assignment follows the new mix
    assert tasking.next_assignment(robots[0]).task == "reach" and tasking.next_assignment(robots[0]).split == "eval"


def test_bad_weights_are_refused_with_a_message(client, admin_user, tasks, robots):
    client_for(client, admin_user)
    response = client.post(reverse("tasks"), {f"w-fleet-{tasks[0].pk}": "lots", "split-fleet": "online",
                                              f"w-{robots[0].pk}-{tasks[1].pk}": "-1"})
    assert response.status_code == 400
    page = response.content.decode()
    assert "&#x27;lots&#x27; is not a number" in page and "a weight is a number from 0" in page
    assert not TaskAssignment.objects.exists()


# ---------------------------------------------------------------- episodes


def test_episode_filters(client, viewer, tasks, robots):
    a = make_episode(tasks[0], robots[0], outcome="success", version=1)
    b = make_episode(tasks[1], robots[1], outcome="failure", version=2, interventions=2, iv_steps=10)
    c = make_episode(tasks[1], robots[0], outcome="timeout", version=2, split="eval")
    d = make_episode(tasks[0], robots[1], outcome="", version=None, status=Episode.Status.RECORDING)
    client_for(client, viewer)

    def shown(**params):
        response = client.get(reverse("episodes"), params)
        assert response.status_code == 200
        return {e.pk for e in response.context["page"]}

    assert shown() == {a.pk, b.pk, c.pk, d.pk}
    assert shown(task="reach") == {b.pk, c.pk}
    assert shown(robot="sim-01") == {a.pk, c.pk}
    assert shown(version="2") == {b.pk, c.pk}
    assert shown(outcome="failure") == {b.pk}
    assert shown(outcome="none") == {d.pk}
    assert shown(intervened="yes") == {b.pk}
    assert shown(intervened="no") == {a.pk, c.pk, d.pk}
    assert shown(split="eval") == {c.pk}
    assert shown(task="reach", intervened="no") == {c.pk}
    assert shown(version="x") == set()  # an invalid filter shows nothing rather than everything


def test_episode_list_is_paginated(client, viewer, tasks, robots):
    for i in range(55):
        make_episode(tasks[0], robots[0], minutes_ago=i)
    client_for(client, viewer)
    first = client.get(reverse("episodes"), {"task": "drawer-open"})
    assert len(first.context["page"]) == 50 and "page=2" in first.content.decode()
    assert "task=drawer-open" in first.content.decode().split("Older")[0].rsplit("href=", 1)[1]
    second = client.get(reverse("episodes"), {"task": "drawer-open", "page": 2})
    assert len(second.context["page"]) == 5


def _stored_episode(task, robot, steps=12, segments=None, hz=10.0):
    """A verified episode with a real payload file (robots/episode_file.py writer)."""
    from django.conf import settings

    data = episode_data(steps=steps, segments=segments or [])
    data.images[:] = (data.images // 2)  # any content; decodable either way
    rel = f"episodes/{data.meta['episode_id']}.h5"
    path = settings.PAYLOAD_DIR / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    episode_file.write_episode(path, data)
    ep = make_episode(task, robot, steps=steps)
    Episode.objects.filter(pk=ep.pk).update(payload_path=rel, payload_size=path.stat().st_size, payload_sha256="ab" * 32,
                                            control_hz=hz, image_shape=[8, 8, 3])
    ep.refresh_from_db()
    return ep


@pytest.fixture
def data_dirs(settings, tmp_path):
    settings.PAYLOAD_DIR = tmp_path / "payloads"
    settings.DATA_DIR = tmp_path
    return tmp_path


def test_the_video_endpoint_returns_a_decodable_mp4_with_one_frame_per_step(client, viewer, tasks, robots, data_dirs,
                                                                           monkeypatch):
    ep = _stored_episode(tasks[0], robots[0], steps=23, hz=12.5)
    client_for(client, viewer)
    # not made yet: the request does not wait for an encoder, it says how far the background job is
    pending = client.get(reverse("episode_video", args=[ep.pk]))
    assert pending.status_code == 202 and pending["Retry-After"] == "1"
    assert pending.json() == {"state": "queued", "progress": 0.0, "error": ""}
    assert client.get(reverse("episode_video", args=[ep.pk])).status_code == 202  # still one job
    assert MediaJob.objects.filter(episode=ep, kind="video").count() == 1
    seen = []
    monkeypatch.setattr(replay.Progress, "__call__", lambda self, fraction: seen.append(fraction))
    job = replay.render_video(str(ep.pk))  # what the Celery task runs
    assert (job.state, job.progress, job.error) == ("done", 1.0, "")
    assert seen == [(i + 1) / 23 for i in range(23)]  # frame by frame (the job row is written every 0.5 s)
    response = client.get(reverse("episode_video", args=[ep.pk]))
    assert response.status_code == 200 and response["Content-Type"] == "video/mp4"
    body = b"".join(response.streaming_content)
    with av.open(io.BytesIO(body)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert abs(float(stream.average_rate) - 12.5) < 0.01
    assert len(frames) == 23
    assert frames[0].width >= 8 and frames[0].width % 2 == 0
    cached = list((data_dirs / "videos").glob("*.mp4"))
    assert len(cached) == 1 and not list((data_dirs / "videos").glob("*.part.mp4"))
    # the second request serves the cached file
    mtime = cached[0].stat().st_mtime_ns
    again = client.get(reverse("episode_video", args=[ep.pk]))
    assert b"".join(again.streaming_content) == body and cached[0].stat().st_mtime_ns == mtime
    assert again["Accept-Ranges"] == "bytes"
    # byte ranges, so that browsers can seek in the replay
    part = client.get(reverse("episode_video", args=[ep.pk]), HTTP_RANGE="bytes=10-19")
    assert part.status_code == 206 and part.content == body[10:20]
    assert part["Content-Range"] == f"bytes 10-19/{len(body)}"
    tail = client.get(reverse("episode_video", args=[ep.pk]), HTTP_RANGE="bytes=-5")
    assert tail.status_code == 206 and tail.content == body[-5:]
    assert client.get(reverse("episode_video", args=[ep.pk]), HTTP_RANGE=f"bytes={len(body)}-").status_code == 416


def test_a_replay_whose_payload_is_unreadable_fails_once_and_says_why(client, viewer, tasks, robots, data_dirs):
    ep = _stored_episode(tasks[0], robots[0], steps=5)
    (data_dirs / "payloads" / ep.payload_path).write_bytes(b"not an episode file")
    client_for(client, viewer)
    assert client.get(reverse("episode_video", args=[ep.pk])).status_code == 202
    job = replay.render_video(str(ep.pk))
    assert job.state == "failed" and job.error
    failed = client.get(reverse("episode_video", args=[ep.pk]))
    assert failed.status_code == 404 and b"could not be made" in failed.content
    assert not list((data_dirs / "videos").glob("*.mp4"))  # no half-written file left behind


def test_a_verified_upload_queues_its_replay_at_once(client, viewer, tasks, robots, data_dirs, monkeypatch,
                                                      django_capture_on_commit_callbacks):
    from celery import current_app

    from robots import ingest

    ep = _stored_episode(tasks[0], robots[0], steps=5)
    sent = []
    monkeypatch.setattr(current_app, "send_task", lambda name, args: sent.append((name, args)))
    with django_capture_on_commit_callbacks(execute=True):
        replay.queue_replays(ep)
    assert sent == [("robots.render_episode_video", [str(ep.pk)]), ("learner.render_episode_value", [str(ep.pk)])]
    assert MediaJob.objects.get(episode=ep).state == "queued"
    assert ingest.payload_file is replay.payload_file


def test_an_episode_verified_just_now_sends_one_message_and_the_media_worker_sends_the_value_task(
        tasks, robots, data_dirs, monkeypatch, django_capture_on_commit_callbacks):
    from celery import current_app

    from robots import tasks as robot_tasks

    ep = _stored_episode(tasks[0], robots[0], steps=5)
    sent = []
    monkeypatch.setattr(current_app, "send_task", lambda name, args: sent.append((name, args)))
    with django_capture_on_commit_callbacks(execute=True):
        replay.queue_replays(ep, new=True)
    assert sent == [("robots.render_episode_video", [str(ep.pk), True])]
    assert MediaJob.objects.get(episode=ep).state == "queued"
    robot_tasks.render_episode_video(*sent[0][1])  # the worker's side: the value task first, then the MP4
    assert sent[1] == ("learner.render_episode_value", [str(ep.pk)])
    assert MediaJob.objects.get(episode=ep).state == "done"


def test_no_video_for_an_episode_without_frames(client, viewer, tasks, robots, data_dirs):
    ep = make_episode(tasks[0], robots[0], status=Episode.Status.RECORDING, outcome="")
    client_for(client, viewer)
    assert client.get(reverse("episode_video", args=[ep.pk])).status_code == 404
    assert client.get(reverse("episode_video", args=[uuid.uuid4()])).status_code == 404
    assert client.get(reverse("episode", args=[uuid.uuid4()])).status_code == 404


def test_episode_page_shows_the_timeline_and_segments(client, viewer, tasks, robots, data_dirs):
    ep = _stored_episode(tasks[0], robots[0], steps=20, segments=[Segment(2, 6, "sim_operator", "", "stalled")])
    InterventionSegment.objects.create(episode=ep, start_step=2, end_step=6, source="sim_operator", reason="stalled")
    InterventionSegment.objects.create(episode=ep, start_step=10, end_step=15, source="operator",
                                       operator_name="alice", reason="about to drop it")
    page = client_for(client, viewer).get(reverse("episode", args=[ep.pk])).content.decode()
    assert reverse("episode_video", args=[ep.pk]) in page
    assert 'class="seg sim_operator" style="left:10.000%;width:20.000%"' in page
    assert 'class="seg operator" style="left:50.000%;width:25.000%"' in page
    assert "about to drop it" in page and "alice" in page and "simulated operator" in page
    assert 'data-hz="10.0"' in page and 'data-steps="20"' in page
    assert "Operators and administrators relabel" in page  # a viewer gets no relabel form


def test_relabel_sets_the_outcome_and_is_audited(client, op, tasks, robots):
    ep = make_episode(tasks[0], robots[0], outcome="success")
    client_for(client, op)
    url = reverse("episode_relabel", args=[ep.pk])
    response = client.post(url, {"outcome": "failure"})  # no reason: refused
    assert response.status_code == 302 and Episode.objects.get(pk=ep.pk).outcome == "success"
    response = client.post(url, {"outcome": "failure", "reason": "the drawer bounced back"})
    assert response.status_code == 302 and response["Location"] == reverse("episode", args=[ep.pk])
    ep.refresh_from_db()
    assert (ep.outcome, ep.success, ep.outcome_source, ep.outcome_by) == ("failure", False, "operator", op)
    event = AuditEvent.objects.get(action="relabel")
    assert event.actor == op and event.robot == robots[0]
    assert event.detail == {"episode": str(ep.pk), "old": "success", "new": "failure", "reason": "the drawer bounced back"}
    page = client.get(reverse("episode", args=[ep.pk])).content.decode()
    assert "the drawer bounced back" in page and "by alice" in page
    assert client.post(url, {"outcome": "nonsense", "reason": "x"}).status_code == 302
    assert AuditEvent.objects.filter(action="relabel").count() == 1


# ---------------------------------------------------------------- metrics


def test_metrics_numbers_for_hand_made_episodes(client, viewer, tasks, robots):
    drawer, reach = tasks
    now = timezone.now().replace(minute=30, second=0, microsecond=0)
    # five hours of data -> hourly-or-finer buckets; reach v1: 1/2, v2: 2/2; drawer v1: 1 success, 1 timeout, 1 aborted
    rows = [
        (reach, "success", 300, 1, 0, 0), (reach, "failure", 290, 1, 2, 30),
        (reach, "success", 30, 2, 1, 10), (reach, "success", 20, 2, 0, 0),
        (drawer, "success", 280, 1, 0, 0), (drawer, "timeout", 100, 1, 1, 50), (drawer, "aborted", 10, 1, 0, 0),
    ]
    for task, outcome, minutes, version, iv, iv_steps in rows:
        make_episode(task, robots[0], outcome=outcome, minutes_ago=minutes, version=version, interventions=iv,
                     iv_steps=iv_steps, now=now)
    make_episode(reach, robots[0], outcome="success", split="offline", now=now)  # not online: ignored
    make_episode(reach, robots[0], outcome="", status=Episode.Status.RECORDING, now=now)  # not ended: ignored

    data = client_for(client, viewer).get(reverse("metrics_data")).json()
    assert data["tasks"] == ["drawer-open", "reach"]
    totals = data["totals"]
    assert totals["episodes"] == 7
    assert totals["success_rate"] == round(4 / 6, 4)  # aborted is not rated
    assert totals["interventions_per_episode"] == round(4 / 7, 4)
    assert totals["intervened_step_share"] == round(90 / 700, 4)
    assert totals["intervened_episode_share"] == round(3 / 7, 4)
    assert data["versions"]["versions"] == [1, 2]
    assert data["versions"]["success"]["reach"] == [{"rate": 0.5, "n": 2}, {"rate": 1.0, "n": 2}]
    assert data["versions"]["success"]["drawer-open"] == [{"rate": 0.5, "n": 2}, {"rate": None, "n": 0}]
    # the policy on its own: reach v2's second success needed an operator, so it is assisted, not autonomous
    assert totals["autonomous_success_rate"] == 0.5 and totals["assisted_success_rate"] == round(1 / 6, 4)
    assert totals["autonomous_success_rate"] + totals["assisted_success_rate"] == pytest.approx(totals["success_rate"],
                                                                                              abs=1e-4)
    assert data["versions"]["autonomous"]["reach"] == [{"rate": 0.5, "n": 2}, {"rate": 0.5, "n": 2}]
    assert data["versions"]["autonomous"]["drawer-open"] == [{"rate": 0.5, "n": 2}, {"rate": None, "n": 0}]
    assert sum(c["rate"] * c["n"] for c in data["autonomous"]["reach"] if c["n"]) == pytest.approx(2)
    # the fleet header's numbers: the same definition, per robot (online, rated, verified)
    (state,) = [r for r in selectors.robot_states() if r["name"] == robots[0].name]
    assert (state["rated_online_count"], state["autonomous_success_count"]) == (6, 3)
    # buckets cover the span evenly; their sums equal the totals
    width = dt.timedelta(seconds=data["bucket_s"])
    assert len(data["buckets"]) <= 48 and width <= dt.timedelta(hours=1)
    starts = [dt.datetime.fromisoformat(b) for b in data["buckets"]]
    assert all(b - a == width for a, b in zip(starts, starts[1:]))
    hours = data["bucket_s"] / 3600
    ended = sum(sum(v) for v in data["throughput"].values()) * hours
    assert round(ended) == 7 and round(sum(data["throughput"]["aborted"]) * hours) == 1
    assert sum(data["interventions"]["episodes"]) == 7
    rated = sum(c["n"] for c in data["success"]["reach"])
    assert rated == 4
    first = next(c for c in data["success"]["reach"] if c["n"])
    assert first == {"rate": 0.5, "n": 2} or first["n"] == 1  # the first two reach episodes (10 min apart)
    # the range filter
    recent = client.get(reverse("metrics_data"), {"range": "6h"}).json()
    assert recent["totals"]["episodes"] in (7, 5)  # depends only on "now"; all within 6 h of the real clock or not
    assert client.get(reverse("metrics_data"), {"range": "1y"}).status_code == 400


def test_metrics_with_no_data(client, viewer):
    data = client_for(client, viewer).get(reverse("metrics_data")).json()
    assert data["buckets"] == [] and data["tasks"] == [] and data["totals"] == {}
    assert client.get(reverse("metrics")).status_code == 200


def test_metrics_bucketing_is_hourly_for_long_spans(client, viewer, tasks, robots):
    now = timezone.now()
    for hours in (0, 10, 20, 30):
        make_episode(tasks[0], robots[0], minutes_ago=hours * 60 + 1, now=now)
    data = client_for(client, viewer).get(reverse("metrics_data")).json()
    assert data["bucket_s"] == 3600
    assert sum(c["n"] for c in data["success"]["drawer-open"]) == 4
    assert 30 <= len(data["buckets"]) <= 32


# ---------------------------------------------------------------- audit


def test_audit_filters(client, viewer, admin_user, op, robots):
    AuditEvent.objects.create(actor=admin_user, actor_name="carol", action="task_saved", detail={"task": "reach"})
    AuditEvent.objects.create(actor=op, actor_name="alice", action="relabel", robot=robots[0],
                              detail={"episode": str(uuid.uuid4()), "old": "success", "new": "failure"})
    AuditEvent.objects.create(actor=op, actor_name="alice", action="estop", robot=robots[1], detail={"engaged": True})
    client_for(client, viewer)

    def shown(**params):
        response = client.get(reverse("audit"), params)
        assert response.status_code == 200
        return sorted(e.action for e in response.context["page"])

    everything = shown()
    assert {"task_saved", "relabel", "estop"} <= set(everything)  # plus robot.token_issued from register_robot
    assert shown(action="relabel") == ["relabel"]
    assert shown(robot="sim-02") == ["estop", "robot.token_issued"]
    assert shown(user="alice") == ["estop", "relabel"]
    assert shown(user="alice", robot="sim-01") == ["relabel"]
    page = client.get(reverse("audit"), {"action": "relabel"}).content.decode()
    assert "alice" in page and "failure" in page and "/episodes/" in page


def test_timestamps_are_utc_on_the_server_and_labelled():
    """Tables render <time> in UTC with the zone named (the browser rewrites them into its own zone, labelled)."""
    import datetime as dt

    from robots.templatetags.console import when

    at = dt.datetime(2026, 12, 5, 23, 30, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert when(at, "Y-m-d H:i:s") == ('<time datetime="2026-12-05T21:30:05Z" data-format="Y-m-d H:i:s">'
                                       '2026-12-05 21:30:05 UTC</time>')
    assert when(None) == "–"


def test_the_demonstrations_recorder_is_not_a_fleet_tile(client, op, robots):
    """collect_demos and import_lerobot record as a data identity: no token, never online, not on the fleet page,
    in the console's robot list or in the task mix; a fleet robot's name cannot become one."""
    from robots import selectors

    recorder = fleet.recorder("demo-collector")
    assert recorder.recorder and recorder.token_hash is None
    assert fleet.recorder("demo-collector").pk == recorder.pk
    assert [r["name"] for r in selectors.robot_states()] == ["sim-01", "sim-02"]
    page = client_for(client, op).get("/").content.decode()
    assert "sim-01" in page and "demo-collector" not in page
    with pytest.raises(ValueError, match="robot of the fleet"):
        fleet.recorder("sim-01")


def test_help_precision_recall_operator_counters_and_coverage(client, viewer, tasks, robots, operator,
                                                              other_operator):
    from robots.models import ControlLease, HelpRequest

    now = timezone.now()
    alice, bob = operator, other_operator

    def lease(user, robot, minutes_ago, seconds):
        start = now - dt.timedelta(minutes=minutes_ago)
        return ControlLease.objects.create(robot=robot, operator=user, operator_name=user.username, started_at=start,
                                           renewed_at=start, expires_at=start,
                                           ended_at=start + dt.timedelta(seconds=seconds), end_reason="released")

    def request(robot, status, minutes_ago, answered_by=None, wait_s=0.0, closed_by=""):
        raised = now - dt.timedelta(minutes=minutes_ago)
        found = lease(answered_by, robot, minutes_ago - wait_s / 60, 30) if answered_by else None
        return HelpRequest.objects.create(
            robot=robot, kind="stall", reason="still", raised_at=raised, status=status, lease=found,
            claimed_name=answered_by.username if answered_by else "", closed_name=closed_by,
            claimed_at=raised + dt.timedelta(seconds=wait_s) if answered_by else None)

    # 4 requests: 2 answered (after 4 s and 10 s), 1 false alarm, 1 withdrawn; 1 still open (not decided yet)
    request(robots[0], "resolved", 50, answered_by=alice, wait_s=4)
    request(robots[1], "resolved", 40, answered_by=bob, wait_s=10)
    request(robots[0], "dismissed", 30, closed_by="alice")
    request(robots[1], "withdrawn", 20)
    request(robots[0], "open", 1)
    lease(alice, robots[1], 10, 60)  # a takeover nobody asked for: a miss of the detector
    # robot time: 2 episodes of 100 steps (10 s each), 20 intervened steps, 2 interventions
    make_episode(tasks[1], robots[0], outcome="success", interventions=1, iv_steps=10, now=now)
    make_episode(tasks[1], robots[1], outcome="failure", interventions=1, iv_steps=10, now=now)

    a = client_for(client, viewer).get(reverse("metrics_data")).json()["attention"]
    assert (a["requests"], a["answered"], a["dismissed"], a["withdrawn"], a["open"]) == (5, 2, 1, 1, 1)
    assert a["precision"] == 0.5  # 2 answered of 4 decided
    assert (a["takeovers"], a["takeovers_with_request"], a["recall"]) == (3, 2, round(2 / 3, 4))
    assert a["median_response_s"] == 10.0  # the upper median of [4, 10]
    assert a["operators"] == [
        {"name": "alice", "takeovers": 2, "driving_s": 90.0, "answered": 1, "false_alarms": 1},
        {"name": "bob", "takeovers": 1, "driving_s": 30.0, "answered": 1, "false_alarms": 0}]
    # an operator drives 10% of robot time and answers 2 takeovers per 20 robot-seconds after 10 s each:
    # busy = 0.1 + (2 / 20) * 10 = 1.1 -> one operator covers 0.9 robots
    assert a["intervened_step_share"] == 0.1 and a["interventions_per_robot_hour"] == 360.0
    assert a["robots_per_operator"] == 0.9


def test_the_replay_of_an_episode_with_more_cameras_shows_them_side_by_side(tmp_path):
    from robots.episode_file import write_episode

    from .factories import episode_data

    data = episode_data(steps=6)
    data.images[:] = 40
    data.cameras = {"gripperPOV": np.full((6, 4, 4, 3), 220, np.uint8)}  # half the primary's 8 px: scaled to 8
    write_episode(tmp_path / "e.h5", data)
    replay.encode_episode_video(tmp_path / "e.h5", tmp_path / "e.mp4", 10.0)
    with av.open(str(tmp_path / "e.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    assert len(frames) == 6
    h, w, _ = frames[0].shape
    assert w == 2 * h  # two square views of the same height
    left, right = frames[3][:, : w // 2 - 4].mean(), frames[3][:, w // 2 + 4:].mean()
    assert abs(left - 40) < 12 and abs(right - 220) < 12
