"""Celery tasks of the learner: thin doors into learner/services.py. Ids in, re-fetch, call a service.

Both run on the ``learner`` queue (GPU workers take it in a multi-machine deployment). acks_late +
reject_on_worker_lost (settings) redeliver a task whose worker was killed; the claim in the database decides who
trains, so a redelivered task never trains a run that a live worker holds.
"""

from __future__ import annotations

import logging

from celery import shared_task

from learner import queue, services
from learner.models import Checkpoint, TrainingRun

log = logging.getLogger(__name__)

CLAIM_RETRIES = 3  # a task that finds the run held retries this often, STALE_S apart, then leaves it to the holder


@shared_task(name="learner.run_training", bind=True, ignore_result=True)
def run_training(self, run_id: int, claim_attempt: int = 0) -> str:
    run = services.claim_run(run_id, services.worker_name())
    if run is None:
        current = TrainingRun.objects.filter(pk=run_id).first()
        if current is None or current.status not in TrainingRun.ACTIVE:
            return "not active"
        if claim_attempt < CLAIM_RETRIES:
            # Held by someone: alive (then its own chain goes on) or a killed worker whose claim goes stale soon.
            queue.enqueue_round(run_id, countdown=services.STALE_S + 1, claim_attempt=claim_attempt + 1)
        return "held"
    outcome = services.run_round(run)
    if outcome == "continue":
        queue.enqueue_round(run_id)
    elif outcome == "wait":
        queue.enqueue_round(run_id, countdown=services.WAIT_RETRY_S)
    elif outcome == "retry":  # a transient error (database, broker, disk): the run resumes from its last state
        queue.enqueue_round(run_id, countdown=services.retry_delay(run_id))
    return outcome


@shared_task(name="learner.evaluate_checkpoint", ignore_result=True)
def evaluate_checkpoint(checkpoint_id: int, task_names: list[str] | None = None, episodes: int | None = None,
                        automatic: bool = False) -> int:
    checkpoint = Checkpoint.objects.filter(pk=checkpoint_id).first()
    if checkpoint is None:
        return 0
    if automatic and services.superseded(checkpoint):
        log.info("automatic evaluation of v%d skipped: its run has published a newer checkpoint", checkpoint.version)
        return 0
    from robots.models import Task

    tasks = Task.objects.filter(name__in=task_names) if task_names else None
    return len(services.evaluate(checkpoint, tasks, episodes))


@shared_task(name="learner.resume_stalled_runs", ignore_result=True)
def resume_stalled_runs() -> list[int]:
    """Beat, every SOP_WATCHDOG_S: hand runs whose worker died to a live worker."""
    stalled = services.stalled_runs()
    for run_id in stalled:
        log.warning("training run %s lost its worker or its queued round; re-enqueueing it", run_id)
        queue.enqueue_round(run_id)
    return stalled


@shared_task(name="learner.cleanup_orphan_checkpoints", ignore_result=True)
def cleanup_orphan_checkpoints() -> int:
    """Beat, hourly: weight files a publisher wrote but never committed (it was killed in between)."""
    return services.cleanup_orphan_checkpoints()


@shared_task(name="learner.render_episode_value", acks_late=True)
def render_episode_value(episode_id: str):
    """An episode's value plot V(o_t), made in the background after it was verified or when a page asks for it."""
    from learner import pages

    return pages.render_episode_value(episode_id)
