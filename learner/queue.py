"""Enqueue the learner's Celery jobs by task name, after the surrounding transaction commits.

The services call these instead of importing learner/tasks.py (which imports the services): the task names are the
contract. ``enqueue_round`` also records when the round is due (``TrainingRun.next_round_at``), so that the watchdog
(``learner.resume_stalled_runs``) can tell a run whose broker message was lost from one that is merely waiting.
"""

from __future__ import annotations

import datetime as dt
from typing import Optional

from django.conf import settings
from django.db import transaction
from django.utils import timezone

RUN_TRAINING = "learner.run_training"
EVALUATE_CHECKPOINT = "learner.evaluate_checkpoint"


def _send(name: str, args: tuple, countdown: Optional[float] = None, queue: Optional[str] = None) -> None:
    from sop_web.celery import app

    options = {"queue": queue} if queue else {}
    transaction.on_commit(lambda: app.send_task(name, args=args, countdown=countdown, **options))


def enqueue_round(run_id: int, countdown: float = 0.0, claim_attempt: int = 0) -> None:
    """Queue the next training round of a run (``countdown`` seconds from now)."""
    from learner.models import TrainingRun

    TrainingRun.objects.filter(pk=run_id).update(next_round_at=timezone.now() + dt.timedelta(seconds=countdown))
    _send(RUN_TRAINING, (run_id, claim_attempt), countdown or None)


def enqueue_evaluation(checkpoint_id: int, task_names: Optional[list[str]] = None,
                       episodes: Optional[int] = None, automatic: bool = False) -> None:
    """Queue an evaluation on SOP_EVALUATION_QUEUE. ``automatic`` (SOP_AUTO_EVALUATE, after each publish): skipped
    when a newer checkpoint of the same run exists by the time a worker gets to it, so a slow evaluator follows the
    newest policy instead of falling further behind; an operator's request is always carried out."""
    _send(EVALUATE_CHECKPOINT, (checkpoint_id, task_names, episodes, automatic),
          queue=settings.SOP_EVALUATION_QUEUE)
