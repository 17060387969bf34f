"""Takeover leases, e-stop and labels as services (robots/control.py), without sockets."""

import datetime as dt
import threading
import uuid

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

import robots.tasks
from robots import control, fleet, protocol, roles, selectors
from robots.models import AuditEvent, ControlLease, Episode, Robot

pytestmark = pytest.mark.django_db


@pytest.fixture
def live(robot):
    """sim-01, connected."""
    robot, _ = robot
    Robot.objects.filter(pk=robot.pk).update(connected=True, connected_at=timezone.now(), state="idle")
    robot.refresh_from_db()
    return robot


@pytest.fixture
def cast(operator, other_operator, admin_user, django_user_model):
    roles.set_role(operator, roles.OPERATOR)
    roles.set_role(other_operator, roles.OPERATOR)
    return operator, other_operator, admin_user, django_user_model.objects.create_user("dave", password="x-pass-1234")


def test_a_takeover_creates_one_lease_and_tells_the_robot(live, cast, django_capture_on_commit_callbacks):
    alice = cast[0]
    with django_capture_on_commit_callbacks() as callbacks:
        lease = control.acquire_lease(live, alice, "stuck", "chan-a")
    assert (lease.operator, lease.operator_name, lease.reason, lease.forced, lease.active) == (
        alice, "alice", "stuck", False, True)
    assert lease.expires_at > timezone.now()
    assert len(callbacks) == 3  # control.takeover to the robot, lease + robot.state to the consoles
    assert AuditEvent.objects.get(action="takeover").detail == {"lease": lease.pk, "reason": "stuck"}


def test_a_held_robot_is_refused_naming_the_holder(live, cast):
    alice, bob, _, _ = cast
    control.acquire_lease(live, alice, "", "chan-a")
    with pytest.raises(control.LeaseHeld) as exc:
        control.acquire_lease(live, bob, "", "chan-b")
    assert "alice" in str(exc.value.detail) and exc.value.extra["holder"] == "alice"
    with pytest.raises(control.LeaseHeld):  # the same user from another console too
        control.acquire_lease(live, alice, "", "chan-other")
    again = control.acquire_lease(live, alice, "", "chan-a")  # the holder's own console: a renewal
    assert ControlLease.objects.filter(ended_at__isnull=True).get() == again


def test_only_admins_force_and_a_forced_takeover_ends_the_old_lease(live, cast):
    alice, bob, carol, _ = cast
    first = control.acquire_lease(live, alice, "", "chan-a")
    with pytest.raises(control.Forbidden):
        control.acquire_lease(live, bob, "", "chan-b", force=True)
    second = control.acquire_lease(live, carol, "mine now", "chan-c", force=True)
    first.refresh_from_db()
    assert (first.end_reason, first.ended_at is not None) == ("forced", True)
    assert second.forced and second.operator_name == "carol"
    event = AuditEvent.objects.get(action="forced_takeover")
    assert (event.actor, event.detail["previous_operator"]) == (carol, "alice")
    assert AuditEvent.objects.get(action="release").detail["reason"] == "forced"


def test_viewers_cannot_take_over_estop_or_label(live, cast):
    viewer = cast[3]
    assert roles.role_of(viewer) == roles.VIEWER
    for call in (lambda: control.acquire_lease(live, viewer, "", "c"), lambda: control.set_estop(live, True, viewer),
                 lambda: control.label_episode(live, viewer, "success")):
        with pytest.raises(control.Forbidden):
            call()
    assert not ControlLease.objects.exists()
    assert not AuditEvent.objects.filter(action__in=["takeover", "estop", "label"]).exists()


def test_an_offline_robot_cannot_be_taken_over(robot, cast):
    with pytest.raises(control.RobotOffline):
        control.acquire_lease(robot[0], cast[0], "", "c")


def test_the_unique_constraint_allows_one_active_lease_per_robot(live, cast):
    now = timezone.now()
    fields = dict(robot=live, operator_name="x", started_at=now, renewed_at=now, expires_at=now)
    ControlLease.objects.create(**fields)
    ControlLease.objects.create(**fields, ended_at=now)  # ended leases do not count
    with pytest.raises(IntegrityError), transaction.atomic():
        ControlLease.objects.create(**fields)


def test_a_takeover_that_loses_the_insert_race_gets_held(live, cast, monkeypatch):
    """Both passed the "is it free?" check; the constraint decides (what happens on PostgreSQL under a race)."""
    alice, bob, _, _ = cast
    control.acquire_lease(live, alice, "", "chan-a")
    real = ControlLease.objects.select_for_update

    class Blind:  # the check sees no active lease, as a concurrent transaction would before the other commits
        def filter(self, **kw):
            return ControlLease.objects.none()

    monkeypatch.setattr(ControlLease.objects, "select_for_update", lambda: Blind())
    with pytest.raises(control.LeaseHeld) as exc:
        control.acquire_lease(live, bob, "", "chan-b")
    monkeypatch.setattr(ControlLease.objects, "select_for_update", real)
    assert exc.value.extra["holder"] == "alice"
    assert ControlLease.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_racing_takeovers_from_two_threads_produce_exactly_one_lease(live, cast):
    alice, bob, _, _ = cast
    barrier = threading.Barrier(2)
    results = {}

    def attempt(user):
        try:
            barrier.wait(timeout=5)
            results[user.username] = control.acquire_lease(Robot.objects.get(pk=live.pk), user, "", f"c-{user}")
        except control.LeaseHeld as exc:
            results[user.username] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=attempt, args=(u,)) for u in (alice, bob)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    leases = [r for r in results.values() if isinstance(r, ControlLease)]
    held = [r for r in results.values() if isinstance(r, control.LeaseHeld)]
    assert len(leases) == 1 and len(held) == 1
    assert held[0].extra["holder"] == leases[0].operator_name
    assert ControlLease.objects.filter(ended_at__isnull=True).count() == 1


def test_keepalive_renews_and_only_the_holder_can_renew_or_release(live, cast, settings):
    alice, bob, _, _ = cast
    lease = control.acquire_lease(live, alice, "", "chan-a")
    with pytest.raises(control.NotHolder):
        control.renew_lease(live, bob, "chan-b")
    with pytest.raises(control.NotHolder):
        control.renew_lease(live, alice, "another-socket")
    before = lease.expires_at
    assert control.renew_lease(live, alice, "chan-a").expires_at >= before
    with pytest.raises(control.NotHolder):
        control.release_lease(live, bob, "chan-b")
    control.release_lease(live, alice, "chan-a")
    lease.refresh_from_db()
    assert lease.end_reason == "released"
    with pytest.raises(control.NotHolder):
        control.renew_lease(live, alice, "chan-a")


def test_leases_expire_when_not_renewed(live, cast, django_capture_on_commit_callbacks):
    lease = control.acquire_lease(live, cast[0], "", "chan-a")
    assert control.expire_leases() == 0
    ControlLease.objects.filter(pk=lease.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    with django_capture_on_commit_callbacks() as callbacks:
        assert robots.tasks.expire_leases.run() == 1  # the beat task
    assert len(callbacks) == 3  # control.release, lease, robot.state
    lease.refresh_from_db()
    assert lease.end_reason == "timeout"
    assert AuditEvent.objects.get(action="lease_expired").detail["lease"] == lease.pk
    assert control.expire_leases() == 0  # ends once


def test_an_expired_lease_does_not_block_a_new_takeover(live, cast):
    lease = control.acquire_lease(live, cast[0], "", "chan-a")
    ControlLease.objects.filter(pk=lease.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    assert control.acquire_lease(live, cast[1], "", "chan-b").operator_name == "bob"


def test_a_console_disconnect_ends_its_leases_only(live, other_robot, cast):
    other = other_robot[0]
    Robot.objects.filter(pk=other.pk).update(connected=True)
    mine = control.acquire_lease(live, cast[0], "", "chan-a")
    theirs = control.acquire_lease(other, cast[1], "", "chan-b")
    assert control.end_leases_for_channel("chan-a") == 1
    assert control.end_leases_for_channel("") == 0
    mine.refresh_from_db()
    theirs.refresh_from_db()
    assert (mine.end_reason, theirs.active) == ("disconnected", True)


def test_a_robot_going_offline_ends_its_lease(live, cast):
    lease = control.acquire_lease(live, cast[0], "", "chan-a")
    assert fleet.robot_disconnected(live, live.connected_at)
    lease.refresh_from_db()
    assert lease.end_reason == "robot_offline"


def test_a_silent_robot_marked_offline_loses_its_lease(live, cast):
    lease = control.acquire_lease(live, cast[0], "", "chan-a")
    Robot.objects.filter(pk=live.pk).update(last_seen=timezone.now() - dt.timedelta(hours=1))
    assert fleet.mark_silent_robots_offline() == 1
    lease.refresh_from_db()
    assert lease.end_reason == "robot_offline"


def test_estop_latches_is_audited_and_is_sent_again_at_hello(live, cast, task):
    alice = cast[0]
    control.set_estop(live, True, alice)
    live.refresh_from_db()
    assert (live.estopped, live.estopped_by) == (True, "alice")
    assert AuditEvent.objects.get(action="estop").actor == alice
    replies = fleet.robot_hello(live, protocol.Hello(agent_version="0.1"))
    assert protocol.ControlEstop(engaged=True, by="alice", seq=1) in replies
    control.set_estop(live, False, alice)
    live.refresh_from_db()
    assert not live.estopped and AuditEvent.objects.filter(action="estop_cleared").exists()
    assert not [r for r in fleet.robot_hello(live, protocol.Hello(agent_version="0.1"))
                if isinstance(r, protocol.ControlEstop)]


def test_an_active_lease_is_sent_again_at_hello(live, cast, task):
    lease = control.acquire_lease(live, cast[0], "why", "chan-a")
    replies = fleet.robot_hello(live, protocol.Hello(agent_version="0.1"))
    assert protocol.ControlTakeover(lease=lease.pk, operator="alice", reason="why") in replies


def test_a_heartbeat_under_an_ended_lease_gets_the_release_again(live, cast):
    lease = control.acquire_lease(live, cast[0], "", "chan-a")
    assert control.stale_release(live, lease.pk) is None
    assert control.stale_release(live, None) is None
    control.release_lease(live, cast[0], "chan-a")
    assert control.stale_release(live, lease.pk) == protocol.ControlRelease(lease=lease.pk, reason="released")


def test_labels_are_validated_and_audited(live, other_robot, cast, task):
    alice = cast[0]
    with pytest.raises(control.InvalidRequest):
        control.label_episode(live, alice, "timeout")
    theirs = Episode.objects.create(id=uuid.uuid4(), robot=other_robot[0], task=task, started_at=timezone.now())
    with pytest.raises(control.InvalidRequest):
        control.label_episode(live, alice, "success", str(theirs.id))
    eid = str(uuid.uuid4())
    control.label_episode(live, alice, "success", eid)
    assert AuditEvent.objects.get(action="label").detail == {"outcome": "success", "episode_id": eid}


def test_robot_states_carry_the_console_fields_and_todays_counters(live, cast, task):
    now = timezone.now()
    for outcome, interventions in (("success", 2), ("failure", 1), ("success", 0)):
        Episode.objects.create(id=uuid.uuid4(), robot=live, task=task, started_at=now, ended_at=now, outcome=outcome,
                               success=outcome == "success", intervention_count=interventions)
    Episode.objects.create(id=uuid.uuid4(), robot=live, task=task, started_at=now - dt.timedelta(days=2),
                           ended_at=now - dt.timedelta(days=2), outcome="success", success=True)
    lease = control.acquire_lease(live, cast[0], "", "chan-a")
    (state,) = selectors.robot_states()
    assert (state["episodes_today"], state["success_rate_today"], state["interventions_today"]) == (3, 0.667, 3)
    assert state["lease"]["id"] == lease.pk and state["lease"]["operator"] == "alice"
    assert state["episode_count"] == 4 and state["name"] == "sim-01"
    fleet.revoke_robot(live)
    assert selectors.robot_states() == [] and selectors.robot_state(live.pk) is None
