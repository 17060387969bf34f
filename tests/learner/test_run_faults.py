"""Runs that lose their broker message, their worker or their database for a moment, and publishers that race:
nothing sticks, nothing fails for good on a transient error, and no committed checkpoint loses its file."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time

import pytest
from django.db import OperationalError
from django.utils import timezone

from learner import services
from learner.models import Checkpoint, TrainingRun
from robots.models import Task


pytestmark = pytest.mark.django_db

LONG_AGO = dt.timedelta(seconds=services.STALE_S + 5)


@pytest.fixture
def run(db):
    task = Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"], max_steps=50)
    return services.start_run("bc", [task], preset="debug", from_scratch=True, enqueue=False)


def set_run(run, **fields):
    TrainingRun.objects.filter(pk=run.pk).update(**fields)


# ---------------------------------------------------------------- the watchdog


def test_a_queued_run_whose_broker_message_was_lost_is_resumed(run):
    set_run(run, created_at=timezone.now() - LONG_AGO, next_round_at=None)
    assert services.stalled_runs() == [run.pk]


@pytest.mark.parametrize("status", ["queued", "waiting", "running"])
def test_an_unclaimed_run_whose_next_round_is_overdue_is_resumed(run, status):
    set_run(run, status=status, heartbeat_at=None, next_round_at=timezone.now() - LONG_AGO)
    assert services.stalled_runs() == [run.pk]


def test_a_run_whose_next_round_is_not_due_yet_is_left_alone(run):
    set_run(run, status="waiting", heartbeat_at=None, next_round_at=timezone.now() + dt.timedelta(seconds=30))
    assert services.stalled_runs() == []
    set_run(run, status="running", heartbeat_at=timezone.now())  # a live worker holds it
    assert services.stalled_runs() == []


def test_finished_runs_are_never_resumed(run):
    set_run(run, status="failed", heartbeat_at=None, next_round_at=timezone.now() - LONG_AGO)
    assert services.stalled_runs() == []


def test_enqueueing_a_round_records_when_it_is_due(run, django_capture_on_commit_callbacks, monkeypatch):
    from learner import queue
    from sop_web.celery import app

    sent = []
    monkeypatch.setattr(app, "send_task", lambda name, args, countdown=None: sent.append((name, args, countdown)))
    with django_capture_on_commit_callbacks(execute=True):
        queue.enqueue_round(run.pk, countdown=30)
    run.refresh_from_db()
    assert sent == [("learner.run_training", (run.pk, 0), 30)]
    assert 25 < (run.next_round_at - timezone.now()).total_seconds() <= 30


# ---------------------------------------------------------------- transient errors


def test_a_transient_database_error_retries_the_run_instead_of_failing_it(run, monkeypatch):
    claimed = services.claim_run(run.pk, "worker-a")

    def flaky(*args, **kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(services, "_train_round", flaky)
    for attempt in range(1, services.MAX_TRANSIENT_FAILURES):
        assert services.run_round(claimed) == "retry"
        fresh = TrainingRun.objects.get(pk=run.pk)
        assert (fresh.status, fresh.failures, fresh.heartbeat_at) == ("running", attempt, None)
        assert "transient" in fresh.message
        claimed = services.claim_run(run.pk, "worker-a")
    assert services.run_round(claimed) == "done"
    assert TrainingRun.objects.get(pk=run.pk).status == "failed", "a run that never recovers ends, with its reason"


def test_a_bug_still_fails_the_run_at_once(run, monkeypatch):
    claimed = services.claim_run(run.pk, "worker-a")
    monkeypatch.setattr(services, "_train_round", lambda *a: (_ for _ in ()).throw(ValueError("bad config")))
    assert services.run_round(claimed) == "done"
    fresh = TrainingRun.objects.get(pk=run.pk)
    assert fresh.status == "failed" and "bad config" in fresh.message


def test_retry_delays_back_off(run):
    delays = []
    for failures in (1, 2, 3, 10):
        set_run(run, failures=failures)
        delays.append(services.retry_delay(run.pk))
    assert delays == [2.0, 4.0, 8.0, 60.0]


# ---------------------------------------------------------------- the claim is a fence


def test_a_worker_that_lost_its_claim_publishes_nothing(run, trainer, checkpoint_dir):
    stale = services.claim_run(run.pk, "worker-a")
    set_run(run, heartbeat_at=timezone.now() - LONG_AGO)  # worker-a paused longer than STALE_S
    fresh = services.claim_run(run.pk, "worker-b")
    assert fresh is not None and fresh.worker != stale.worker
    with pytest.raises(services.ClaimLost):
        services.publish_checkpoint(stale, trainer)
    assert Checkpoint.objects.count() == 0
    assert list(checkpoint_dir.glob("*.safetensors")) == [], "the loser's file is removed with its attempt"
    services._release(stale, status="failed", message="must not land")  # a stale release is a no-op
    assert TrainingRun.objects.get(pk=run.pk).status == "running"
    assert services.publish_checkpoint(fresh, trainer).version == 1


def test_claims_are_unique_even_for_one_worker_name(run):
    first = services.claim_run(run.pk, "host:1")
    services._release(first)
    second = services.claim_run(run.pk, "host:1")
    assert first.worker != second.worker and second.worker.startswith("host:1/")


# ---------------------------------------------------------------- publishers racing for one version


def test_racing_publishers_never_delete_each_others_committed_file(trainer, checkpoint_dir, monkeypatch):
    """The second publisher reads the same next version while the first is between writing its file and committing
    its row. Before: it deleted the first one's file as an orphan (or its own, at the same path, on losing), leaving
    a committed checkpoint without weights."""
    original = trainer.save_state
    raced = []

    def save_state_then_race(path):
        original(path)
        if not raced:  # the first publisher is between its file and its row: a second one runs to completion
            raced.append(None)
            raced[0] = services.publish_checkpoint(None, trainer, checkpoint_dir / "other-state.safetensors")

    monkeypatch.setattr(trainer, "save_state", save_state_then_race)
    first = services.publish_checkpoint(None, trainer, checkpoint_dir / "state.safetensors")
    assert sorted(c.version for c in Checkpoint.objects.all()) == [1, 2]
    assert {raced[0].version, first.version} == {1, 2}
    for checkpoint in Checkpoint.objects.all():
        data = (checkpoint_dir / checkpoint.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == checkpoint.sha256, f"v{checkpoint.version} lost its weights"
    assert len(list(checkpoint_dir.glob("policy-v*.safetensors"))) == 2, "the loser removed only its own file"


def test_orphan_checkpoint_files_are_cleaned_up_later(trainer, checkpoint_dir):
    kept = services.publish_checkpoint(None, trainer)
    orphan = checkpoint_dir / "policy-v7-deadbeef.safetensors"
    orphan.write_bytes(b"written by a worker killed before its row committed")
    orphan.with_suffix(".json").write_text("{}")
    assert services.cleanup_orphan_checkpoints() == 0, "young files may still be committing"
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    os.utime(checkpoint_dir / kept.path, (old, old))
    assert services.cleanup_orphan_checkpoints() == 1
    assert not orphan.exists() and not orphan.with_suffix(".json").exists()
    assert (checkpoint_dir / kept.path).exists()
