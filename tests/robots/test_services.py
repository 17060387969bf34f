"""Fleet services called directly: tokens, assignment, live state, the periodic jobs."""

import datetime as dt
import os
import time
import uuid
from collections import Counter

import pytest
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from robots import auth, fleet, ingest, protocol, tasking
from robots.exceptions import ForbiddenEpisode, UnknownTask
from robots.models import AuditEvent, ControlLease, Episode, Robot, Task, TaskAssignment

pytestmark = pytest.mark.django_db


def make_task(name, enabled=True, prompts=("do it",)):
    return Task.objects.create(name=name, env_id=f"{name}-v3", prompts=list(prompts), enabled=enabled)


def assigned_tasks(robot, n=60) -> Counter:
    return Counter(tasking.next_assignment(robot).task for _ in range(n))


# ---------------------------------------------------------------- tokens


def test_a_new_robot_gets_a_token_that_is_stored_only_as_a_hash(robot):
    robot, token = robot
    assert token.startswith("sop_") and len(token) > 40
    robot.refresh_from_db()
    assert robot.token_hash == auth.hash_token(token) and token not in robot.token_hash
    assert token.startswith(robot.token_prefix) and len(robot.token_prefix) < len(token) // 2
    assert auth.authenticate_token(token) == robot
    issued = AuditEvent.objects.get(action="robot.token_issued")
    assert issued.detail == {"rotated": False}  # audit records are shown to viewers: no secret characters


def test_rotating_a_token_invalidates_the_old_one(robot, django_capture_on_commit_callbacks):
    robot, old = robot
    with django_capture_on_commit_callbacks() as callbacks:
        same, new = fleet.register_robot("sim-01")
    assert same.pk == robot.pk and new != old
    assert auth.authenticate_token(old) is None and auth.authenticate_token(new) == robot
    assert len(callbacks) == 1  # sockets opened with the old token are told to close


def test_it_rejects_a_revoked_token(robot, operator, django_capture_on_commit_callbacks):
    robot, token = robot
    with django_capture_on_commit_callbacks() as callbacks:
        fleet.revoke_robot(robot, actor=operator)
    assert auth.authenticate_token(token) is None
    assert robot.token_hash is None and robot.revoked_at is not None
    event = AuditEvent.objects.get(action="robot.token_revoked")
    assert (event.actor, event.actor_name, event.robot) == (operator, "alice", robot)
    assert len(callbacks) == 1


def test_a_revoked_robot_can_be_given_a_new_token(robot):
    robot, _ = robot
    fleet.revoke_robot(robot)
    _, token = fleet.register_robot("sim-01")
    assert auth.authenticate_token(token) == robot


@pytest.mark.parametrize("raw", [None, "", "sop_unknown", "not-a-sop-token", "sop_" + "x" * 500])
def test_unknown_or_malformed_tokens_authenticate_nobody(robot, raw):
    assert auth.authenticate_token(raw) is None


def test_robot_names_must_be_lowercase_identifiers(db):
    with pytest.raises(ValidationError):
        fleet.register_robot("Robot 1")


def test_the_token_is_read_from_the_authorization_header_only():
    assert auth.token_from_scope({"headers": [(b"authorization", b"Bearer sop_abc")]}) == "sop_abc"
    assert auth.token_from_scope({"headers": [(b"authorization", b"Basic c29wOng=")]}) is None
    assert auth.token_from_scope({"headers": [], "query_string": b"token=sop_abc"}) is None


# ---------------------------------------------------------------- assignment


def test_a_robots_own_assignments_come_first(robot, other_robot):
    robot, _ = robot
    reach, push, _ = make_task("reach"), make_task("push"), make_task("door-open")
    TaskAssignment.objects.create(robot=robot, task=reach)
    TaskAssignment.objects.create(robot=None, task=push)
    assert set(assigned_tasks(robot)) == {"reach"}
    assert set(assigned_tasks(other_robot[0])) == {"push"}  # no own entries: the fleet mix


def test_the_fleet_mix_is_weighted(robot):
    robot, _ = robot
    TaskAssignment.objects.create(task=make_task("reach"), weight=9.0, split="online")
    TaskAssignment.objects.create(task=make_task("push"), weight=1.0, split="eval")
    counts = assigned_tasks(robot, 400)
    assert set(counts) == {"reach", "push"} and counts["reach"] > 2 * counts["push"]
    splits = {a.task: a.split for a in (tasking.next_assignment(robot) for _ in range(300))}
    assert splits == {"reach": "online", "push": "eval"}


def test_disabled_tasks_are_never_assigned(robot):
    robot, _ = robot
    make_task("reach", enabled=False)
    make_task("push")
    assert set(assigned_tasks(robot)) == {"push"}  # no assignments at all: any enabled task
    TaskAssignment.objects.create(robot=robot, task=Task.objects.get(name="reach"))
    TaskAssignment.objects.create(robot=None, task=make_task("door-open"))
    assert set(assigned_tasks(robot)) == {"door-open"}  # own mix all disabled: falls back to the fleet mix


def test_no_enabled_task_means_wait(robot):
    make_task("reach", enabled=False)
    assert tasking.next_assignment(robot[0]) == protocol.TaskAssigned(task=None)


def test_an_assignment_carries_env_prompt_and_max_steps(robot):
    make_task("drawer-open", prompts=["open the drawer", "pull the drawer out"])
    prompts = {tasking.next_assignment(robot[0]).prompt for _ in range(40)}
    assignment = tasking.next_assignment(robot[0])
    assert prompts == {"open the drawer", "pull the drawer out"}
    assert (assignment.task, assignment.env_id, assignment.max_steps) == ("drawer-open", "drawer-open-v3", 150)


# ---------------------------------------------------------------- live state


def test_hello_records_the_agent_and_answers_welcome_and_a_task(robot, task):
    robot, _ = robot
    replies = fleet.robot_hello(robot, protocol.Hello(agent_version="0.3", capabilities=["metaworld"],
                                                         policy_version=2, policy="v2", spool_pending=4))
    assert [r.TYPE.value for r in replies] == ["welcome", "task.assigned"]
    assert replies[0].robot == "sim-01" and replies[1].task == "drawer-open"
    robot.refresh_from_db()
    reported = (robot.agent_version, robot.capabilities, robot.policy_version, robot.spool_pending)
    assert reported == ("0.3", ["metaworld"], 2, 4)
    assert (robot.current_task, robot.current_prompt) == (task, "open the drawer")


def test_hello_sends_the_published_policy_to_a_robot_running_another(robot, task):
    published = protocol.PolicyUpdated(version=7, url="/api/checkpoints/7/file", size=10, sha256="0" * 64)
    fleet.set_policy_source(lambda: published)
    try:
        stale = fleet.robot_hello(robot[0], protocol.Hello(agent_version="1", policy_version=6))
        current = fleet.robot_hello(robot[0], protocol.Hello(agent_version="1", policy_version=7))
    finally:
        fleet.set_policy_source(None)
    assert stale[-1] == published and published not in current


def test_a_heartbeat_updates_live_fields_and_checks_the_token(robot, task):
    robot, token = robot
    status = protocol.Status(state="running", task="drawer-open", episode_id=str(uuid.uuid4()), step=7,
                             control_source="operator", loop_hz=9.8, loop_p99_ms=120.0, policy_version=3, policy="v3")
    assert fleet.robot_status(robot, status, auth.hash_token(token)) is True
    robot.refresh_from_db()
    live = (robot.state, robot.current_task, robot.current_step, robot.control_source, robot.loop_hz, robot.connected)
    assert live == ("running", task, 7, "operator", 9.8, True)
    fleet.revoke_robot(robot)
    assert fleet.robot_status(robot, status, auth.hash_token(token)) is False


def test_a_heartbeat_that_moves_only_volatile_columns_is_not_written_until_the_interval(robot, task,
                                                                                          django_assert_num_queries):
    robot, token = robot
    now = [100.0]
    writer = fleet.StatusWriter(robot, auth.hash_token(token), write_every_s=5.0, recheck_s=3.0, clock=lambda: now[0])
    episode = str(uuid.uuid4())

    def status(step, **kw):
        return protocol.Status(state="running", task="drawer-open", episode_id=episode, step=step, loop_hz=9.9, **kw)

    first = status(10)
    assert not writer.unchanged(first), "nothing read yet: the first heartbeat goes to the database"
    with django_assert_num_queries(3):  # the task's id (once per reported task), the write, the control snapshot
        assert writer.store(first)["lease_id"] is None
    with django_assert_num_queries(0):  # only the step moved and the snapshot is fresh: no database at all
        assert writer.unchanged(status(20))
    assert writer.live["current_step"] == 20
    robot.refresh_from_db()
    assert (robot.current_step, robot.current_task, robot.state) == (10, task, "running")
    assert not writer.unchanged(status(30, deadman=True)), "a change a console or a safety check reads"
    with django_assert_num_queries(2):  # ... is written at once, and the snapshot read again
        writer.store(status(30, deadman=True))
    robot.refresh_from_db()
    assert (robot.deadman, robot.current_step) == (True, 30)
    now[0] += 3.0  # the snapshot is recheck_s old: read again (nothing written)
    assert not writer.unchanged(status(35, deadman=True))
    with django_assert_num_queries(1):
        writer.store(status(35, deadman=True))
    writer.recheck()  # a control message went to the robot: the next heartbeat is checked afresh
    assert not writer.unchanged(status(36, deadman=True))
    writer.store(status(36, deadman=True))
    now[0] += 2.0  # the write interval passed: the volatile columns are written too (last_seen never looks silent)
    assert not writer.unchanged(status(40, deadman=True))
    with django_assert_num_queries(2):
        writer.store(status(40, deadman=True))
    robot.refresh_from_db()
    assert robot.current_step == 40 and writer.writes == 3
    # the precompiled volatile write stores last_seen as the ORM does (SQLite compares the stored text)
    recent = timezone.now() - dt.timedelta(seconds=30)
    assert Robot.objects.filter(pk=robot.pk, last_seen__gte=recent, last_seen__lte=timezone.now()).exists()
    # marked offline behind the socket's back (its heartbeats stalled past SOP_ROBOT_SILENT_S): the next write
    # brings the whole row back, not just the volatile columns
    Robot.objects.filter(pk=robot.pk).update(connected=False, state="offline")
    now[0] += 5.0
    writer.store(status(45, deadman=True))
    robot.refresh_from_db()
    assert (robot.connected, robot.state, robot.current_step) == (True, "running", 45) and writer.revived
    fleet.revoke_robot(robot)
    now[0] += 5.0
    assert writer.store(status(50, deadman=True)) is None, "a heartbeat that reaches the database checks the token"


def test_agrees_is_exactly_when_reconcile_would_send_and_change_nothing(robot, operator):
    """control.agrees lets a heartbeat skip the database: it must never say yes where reconcile would act."""
    from robots import control, roles

    robot, token = robot
    roles.set_role(operator, roles.OPERATOR)
    fleet.robot_connected(robot, auth.hash_token(token))
    robot.refresh_from_db()
    lease = control.acquire_lease(robot, operator, "stuck", "chan-a")
    later = timezone.now() + dt.timedelta(seconds=30)
    earlier = timezone.now() - dt.timedelta(seconds=1)
    checked = 0
    for lease_id, expires in ((None, None), (lease.pk, later), (lease.pk, earlier)):
        for latched in (False, True):
            for reported_lease in (None, lease.pk, lease.pk + 1000):
                for estopped, local in ((False, False), (True, False), (True, True)):
                    snapshot = {"estopped": latched, "estopped_by": "alice" if latched else "", "estop_seq": 1,
                                "lease_id": lease_id, "lease_expires_at": expires, "lease_operator": "alice",
                                "lease_reason": "stuck"}
                    msg = protocol.Status(state="running", lease=reported_lease, estopped=estopped,
                                          estop_local=local, estop_seq=1)
                    if lease_id is None and reported_lease == lease.pk:
                        continue  # the snapshot says no lease while the row has one: not a state a read gives
                    events_before = AuditEvent.objects.count()
                    with transaction.atomic():  # the rows say what the snapshot says (reconcile may re-read them)
                        if lease_id is not None:
                            ControlLease.objects.filter(pk=lease.pk).update(expires_at=expires)
                        Robot.objects.filter(pk=robot.pk).update(estopped=latched, estop_seq=1)
                        replies = control.reconcile(robot, msg, dict(snapshot))
                        changed = AuditEvent.objects.count() != events_before or ControlLease.objects.filter(
                            pk=lease.pk, ended_at__isnull=False).exists()
                        transaction.set_rollback(True)  # each case from the same rows
                    assert control.agrees(msg, snapshot) == (not replies and not changed), (snapshot, msg, replies)
                    checked += 1
    assert checked > 40


def test_a_heartbeat_ends_an_expired_lease_and_repairs_what_the_robot_missed(robot, operator):
    from robots import control, roles

    robot, token = robot
    roles.set_role(operator, roles.OPERATOR)
    fleet.robot_connected(robot, auth.hash_token(token))
    robot.refresh_from_db()
    lease = control.acquire_lease(robot, operator, "stuck", "chan-a")
    writer = fleet.StatusWriter(robot, auth.hash_token(token))
    missed = protocol.Status(state="running", lease=None)
    repairs = control.reconcile(robot, missed, writer.store(missed))
    assert [type(r).__name__ for r in repairs] == ["ControlTakeover"] and repairs[0].lease == lease.pk
    ControlLease.objects.filter(pk=lease.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    obeying = protocol.Status(state="running", lease=lease.pk, operator="alice", control_source="operator")
    repairs = control.reconcile(robot, obeying, writer.store(obeying))
    lease.refresh_from_db()
    assert lease.end_reason == "timeout" and lease.ended_at is not None
    assert [(type(r).__name__, r.lease) for r in repairs] == [("ControlRelease", lease.pk)]


def test_a_rejected_checkpoint_reported_by_the_robot_is_shown_until_it_clears(robot, task):
    robot, token = robot
    bad = protocol.Status(state="running", policy_version=3, policy="v3", policy_error="v4: sha256 mismatch")
    fleet.robot_status(robot, bad, auth.hash_token(token))
    robot.refresh_from_db()
    assert (robot.policy_version, robot.policy_error) == (3, "v4: sha256 mismatch"), "old policy kept, error shown"
    fleet.robot_status(robot, protocol.Status(state="running", policy_version=5, policy="v5"), auth.hash_token(token))
    robot.refresh_from_db()
    assert (robot.policy_version, robot.policy_error) == (5, "")


def test_an_old_socket_closing_does_not_take_a_reconnected_robot_offline(robot):
    robot, token = robot
    first = fleet.robot_connected(robot, auth.hash_token(token))
    time.sleep(0.001)
    second = fleet.robot_connected(robot, auth.hash_token(token))
    fleet.robot_disconnected(robot, first)
    robot.refresh_from_db()
    assert robot.connected and robot.state == "idle"
    fleet.robot_disconnected(robot, second)
    robot.refresh_from_db()
    assert not robot.connected and robot.state == "offline"


def test_a_revoked_token_cannot_connect(robot):
    robot, token = robot
    fleet.revoke_robot(robot)
    assert fleet.robot_connected(robot, auth.hash_token(token)) is None


def test_silent_robots_are_marked_offline(robot, other_robot, settings):
    settings.SOP_ROBOT_SILENT_S = 20
    now = timezone.now()
    silent_since = now - dt.timedelta(seconds=30)
    Robot.objects.filter(pk=robot[0].pk).update(connected=True, state="running", last_seen=silent_since)
    Robot.objects.filter(pk=other_robot[0].pk).update(connected=True, state="idle", last_seen=now)
    assert fleet.mark_silent_robots_offline() == 1
    assert list(Robot.objects.values_list("name", "connected", "state")) == [
        ("sim-01", False, "offline"), ("sim-02", True, "idle")]


# ---------------------------------------------------------------- episodes over the socket


def started(episode_id, task="drawer-open"):
    return protocol.EpisodeStarted(episode_id=episode_id, task=task, prompt="open the drawer", started_at=time.time(),
                                   policy_version=3, policy="v3")


def test_an_episode_is_recorded_from_start_to_end(robot, task):
    robot, _ = robot
    eid = str(uuid.uuid4())
    ingest.episode_started(robot, started(eid))
    ingest.episode_started(robot, started(eid))  # a re-sent announcement is harmless
    ended = protocol.EpisodeEnded(episode_id=eid, steps=40, outcome="success", ended_at=time.time(), interventions=1,
                                  intervention_steps=5)
    nxt = ingest.episode_ended(robot, ended)
    episode = Episode.objects.get()
    assert (episode.status, episode.steps, episode.success, episode.intervention_count) == ("recording", 40, True, 1)
    assert nxt.task == "drawer-open"


def test_an_episode_id_of_another_robot_is_forbidden(robot, other_robot, task):
    eid = str(uuid.uuid4())
    ingest.episode_started(robot[0], started(eid))
    with pytest.raises(ForbiddenEpisode):
        ingest.episode_started(other_robot[0], started(eid))
    with pytest.raises(ForbiddenEpisode):
        ended = protocol.EpisodeEnded(episode_id=eid, steps=1, outcome="failure", ended_at=1e9)
        ingest.episode_ended(other_robot[0], ended)
    assert Episode.objects.get().robot == robot[0] and Episode.objects.get().outcome == ""


def test_an_episode_of_an_unknown_task_is_refused(robot):
    with pytest.raises(UnknownTask):
        ingest.episode_started(robot[0], started(str(uuid.uuid4()), task="juggle"))


def test_episode_end_does_not_overwrite_an_uploaded_episode(robot, task):
    eid = str(uuid.uuid4())
    ingest.episode_started(robot[0], started(eid))
    Episode.objects.filter(pk=eid).update(status="verified", steps=80, outcome="success", success=True)
    ingest.episode_ended(robot[0], protocol.EpisodeEnded(episode_id=eid, steps=3, outcome="aborted", ended_at=1e9))
    assert Episode.objects.filter(pk=eid, steps=80, outcome="success").exists()


# ---------------------------------------------------------------- periodic jobs


def test_stale_partial_uploads_are_cleaned_up(robot, task, payload_dir, settings):
    settings.SOP_STALE_UPLOAD_HOURS = 1
    stale, fresh = uuid.uuid4(), uuid.uuid4()
    for eid in (stale, fresh):
        Episode.objects.create(id=eid, robot=robot[0], task=task, started_at=timezone.now(), status="uploading",
                               payload_size=100, received_bytes=10)
        ingest.partial_path(eid).parent.mkdir(parents=True, exist_ok=True)
        ingest.partial_path(eid).write_bytes(b"x" * 10)
    orphan = ingest.partial_path("not-a-uuid")
    orphan.write_bytes(b"junk")
    two_hours_ago = time.time() - 7200
    for path in (ingest.partial_path(stale), orphan):
        os.utime(path, (two_hours_ago, two_hours_ago))
    assert ingest.cleanup_stale_uploads() == 2
    assert not ingest.partial_path(stale).exists() and not orphan.exists() and ingest.partial_path(fresh).exists()
    assert Episode.objects.get(pk=stale).received_bytes == 0
    assert Episode.objects.get(pk=fresh).received_bytes == 10


def test_the_periodic_jobs_are_registered_under_the_names_beat_uses(settings):
    from sop_web.celery import app

    import learner.tasks  # noqa: F401
    import robots.tasks  # noqa: F401

    for entry in settings.CELERY_BEAT_SCHEDULE.values():
        assert entry["task"] in app.tasks
    assert robots.tasks.mark_silent_robots_offline.run() == 0


@pytest.mark.django_db(transaction=True)
def test_chunks_racing_for_one_offset_from_threads_are_appended_once(robot, task, payload_dir):
    import threading

    from django.db import connection

    from robots.exceptions import OffsetMismatch, UploadBusy

    eid = uuid.uuid4()
    Episode.objects.create(id=eid, robot=robot[0], task=task, started_at=timezone.now(), status="uploading",
                           payload_size=1000, payload_sha256="0" * 64)
    barrier, outcomes = threading.Barrier(4), []

    def put():
        try:
            barrier.wait()
            ingest.append_upload(robot[0], eid, 0, b"y" * 100)
            outcomes.append("ok")
        except (OffsetMismatch, UploadBusy):  # behind the winner, or while it still holds the upload lock
            outcomes.append("mismatch")
        finally:
            connection.close()

    threads = [threading.Thread(target=put) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["mismatch"] * 3 + ["ok"]
    assert Episode.objects.get(pk=eid).received_bytes == 100
    assert ingest.partial_path(eid).read_bytes() == b"y" * 100
