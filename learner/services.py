"""State changes of the learner: training runs, checkpoint publication, fleet deployments, evaluations.

Every door (API, admin, management commands, Celery tasks) calls these. Training itself is the pure core
(learner/trainer.py); this module feeds it verified episodes from the database and publishes what it produces.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max, Q
from django.urls import reverse
from django.utils import timezone

from learner import checkpoints as ckpt
from learner.algorithms import get_algorithm
from learner.buffer import FrameIndex
from learner.config import ConfigError, Preset, get_preset, to_dict
from learner.models import Checkpoint, Deployment, Evaluation, TrainingMetric, TrainingRun
from learner.policy import build_policy
from robots import protocol
from robots import services as fleet
from robots.models import AuditEvent, Episode, Task

log = logging.getLogger(__name__)

ROUND_S = float(os.environ.get("SOP_TRAINING_ROUND_S", "240"))  # one Celery task trains this long, then re-enqueues
HEARTBEAT_S = float(os.environ.get("SOP_TRAINING_HEARTBEAT_S", "5"))  # a running round refreshes its claim this often
STALE_S = float(os.environ.get("SOP_TRAINING_STALE_S", "30"))  # ... and a claim older than this is a dead worker's
METRIC_EVERY_STEPS = 25
WAIT_RETRY_S = 30.0  # a run waiting for data looks again this often


class LearnerError(ValueError):
    """A request the learner cannot carry out; the message says why, for people."""


# ---------------------------------------------------------------- runs


def start_run(
    algorithm: str,
    tasks: Iterable[Task | str],
    *,
    preset: str = "default",
    overrides: Optional[dict[str, Any]] = None,
    total_steps: Optional[int] = None,
    base_checkpoint: Optional[Checkpoint] = None,
    from_scratch: bool = False,
    user=None,
    enqueue: bool = True,
) -> TrainingRun:
    """Create a run and queue it on the ``learner`` queue (after commit). By default it fine-tunes the checkpoint the
    fleet currently runs; ``from_scratch`` starts from fresh weights (as pretraining does)."""
    task_objs = [t if isinstance(t, Task) else Task.objects.filter(name=t).first() for t in tasks]
    if not task_objs or any(t is None for t in task_objs):
        raise LearnerError("a run needs one or more existing tasks")
    try:
        get_algorithm(algorithm)
        base = get_preset(preset)
        # RECAP normalises returns by each task's episode limit, which episode files do not record: the tasks know it.
        limits = {"task_max_steps": [[t.name, t.max_steps] for t in task_objs]}
        train = to_dict(base.train) | {"algorithm": algorithm} | limits | dict(overrides or {})
        if total_steps is not None:
            train["steps"] = int(total_steps)
        config = Preset.from_dict({"name": base.name, "policy": to_dict(base.policy), "train": train})
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise LearnerError(str(exc)) from None
    if base_checkpoint is None and not from_scratch:
        base_checkpoint = current_checkpoint()
    with transaction.atomic():
        run = TrainingRun.objects.create(
            algorithm=algorithm, preset=preset, config=config.to_dict(), base_checkpoint=base_checkpoint,
            total_steps=config.train.steps, created_by=user, message="queued",
        )
        run.tasks.set(task_objs)
        _audit(user, "training.started", run=run.pk, algorithm=algorithm, tasks=[t.name for t in task_objs])
        if enqueue:
            from learner import tasks as celery_tasks

            transaction.on_commit(lambda: celery_tasks.run_training.delay(run.pk))
    return run


def stop_run(run: TrainingRun, user=None) -> TrainingRun:
    """Ask a run to stop. A queued or waiting run stops at once; a running one at its next step boundary."""
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().get(pk=run.pk)
        if run.status in (TrainingRun.Status.QUEUED, TrainingRun.Status.WAITING):
            run.status, run.finished_at, run.message = TrainingRun.Status.STOPPED, timezone.now(), "stopped before it ran"
        elif run.status == TrainingRun.Status.RUNNING:
            run.status, run.message = TrainingRun.Status.STOPPING, "stopping at the next step"
        else:
            return run
        run.save(update_fields=["status", "finished_at", "message"])
        _audit(user, "training.stopped", run=run.pk)
    return run


def claim_run(run_id: int, worker: str) -> Optional[TrainingRun]:
    """Claim a run for one round. A conditional UPDATE, so two workers (e.g. a redelivered task next to a live one)
    can never train the same run at once: only a run nobody holds, or whose holder stopped heartbeating, is taken."""
    now = timezone.now()
    stale = now - timezone.timedelta(seconds=STALE_S)
    orphan = Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=stale)
    # A run asked to stop whose worker is gone is simply stopped: its last checkpoint stands.
    TrainingRun.objects.filter(orphan, pk=run_id, status=TrainingRun.Status.STOPPING).update(
        status=TrainingRun.Status.STOPPED, heartbeat_at=None, finished_at=now, message="stopped (its worker was lost)")
    claimable = Q(status__in=[TrainingRun.Status.QUEUED, TrainingRun.Status.WAITING, TrainingRun.Status.RUNNING]) & orphan
    won = TrainingRun.objects.filter(claimable, pk=run_id).update(
        status=TrainingRun.Status.RUNNING, heartbeat_at=now, worker=worker[:200]
    )
    if not won:
        return None
    run = TrainingRun.objects.get(pk=run_id)
    TrainingRun.objects.filter(pk=run_id).update(attempts=run.attempts + 1, started_at=run.started_at or now)
    run.refresh_from_db()
    return run


def stalled_runs() -> list[int]:
    """Runs claimed by a worker that stopped heartbeating (killed, machine lost). The broker would redeliver their
    task only after its visibility timeout (an hour); the watchdog re-enqueues them now and the claim does the rest."""
    stale = timezone.now() - timezone.timedelta(seconds=STALE_S)
    return list(TrainingRun.objects.filter(status__in=[TrainingRun.Status.RUNNING, TrainingRun.Status.STOPPING],
                                           heartbeat_at__lt=stale).values_list("pk", flat=True))


def _release(run: TrainingRun, **fields) -> None:
    """End a round: drop the claim so the next round (or another worker) can take the run."""
    TrainingRun.objects.filter(pk=run.pk).update(heartbeat_at=None, **fields)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------- one round of training


class _RunCache:
    """Per worker process: the frame index of each run, grown incrementally with newly verified episodes."""

    indexes: dict[int, tuple[FrameIndex, set[str]]] = {}


def _index_for(run: TrainingRun, horizon: int, max_open: int) -> FrameIndex:
    index, seen = _RunCache.indexes.get(run.pk, (None, set()))
    if index is None:
        index = FrameIndex(horizon=horizon, max_open_episodes=max_open)
        _RunCache.indexes[run.pk] = (index, seen)
    new = (
        Episode.objects.filter(task__in=run.tasks.all(), status=Episode.Status.VERIFIED)
        .exclude(split=protocol.Split.EVAL.value)
        .exclude(id__in=[*seen])
        .order_by("verified_at")
        .values_list("id", "payload_path", "outcome")
    )
    for episode_id, rel, outcome in new.iterator():
        seen.add(str(episode_id))
        try:
            # The database's outcome wins over the file's: operators relabel stored episodes (RECAP's rewards use it).
            index.add_episode(settings.PAYLOAD_DIR / rel, outcome=outcome or None)
        except Exception as exc:  # a file that vanished or rotted must not stop training on the rest
            log.warning("episode %s is not usable for training: %s", episode_id, exc)
    return index


def trainer_state_path(run: TrainingRun) -> Path:
    return settings.CHECKPOINT_DIR / "runs" / str(run.uid) / "trainer.safetensors"


def run_round(run: TrainingRun, round_s: float = ROUND_S, clock: Callable[[], float] = time.monotonic,
              progress: Optional[Callable[[int, dict[str, Any]], None]] = None) -> str:
    """Train a claimed run for up to ``round_s`` seconds. Returns what should happen next: "continue" (enqueue another
    round), "wait" (no data yet; retry later) or "done" (finished, stopped or failed)."""
    from learner.trainer import Trainer

    preset = Preset.from_dict(run.config)
    algorithm_cls = get_algorithm(run.algorithm)
    index = _index_for(run, preset.policy.horizon, preset.train.max_open_episodes)
    trainable = algorithm_cls(preset.train).trainable_mask(index)
    if not len(index) or not trainable.any():
        task_names = ", ".join(run.tasks.values_list("name", flat=True))
        _release(run, status=TrainingRun.Status.WAITING,
                 message=f"waiting for data: no trainable frames yet for {task_names} "
                         f"({len(index.episodes)} episodes indexed; record demonstrations with collect_demos)")
        return "wait"

    state_path = trainer_state_path(run)
    published: dict[str, int] = {}

    def on_checkpoint(step: int) -> None:
        cp = publish_checkpoint(run, trainer, state_path)
        published["version"] = cp.version

    if state_path.exists():
        trainer = Trainer.resume(state_path, index, on_checkpoint=on_checkpoint)
    else:
        policy = _initial_policy(run, preset)
        trainer = Trainer(preset.train, index, policy, algorithm_cls(preset.train), on_checkpoint=on_checkpoint)

    def status_message() -> str:
        no_online = [name for name, frames in _task_frames(trainer, index).items() if not frames]
        return ("training" + (f" (no online labels yet for {', '.join(no_online)}: offline data only)"
                              if no_online else ""))[:500]

    message = status_message()
    TrainingRun.objects.filter(pk=run.pk).update(message=message)
    deadline = clock() + round_s
    last_beat = clock()
    stop_requested = False

    def should_stop() -> bool:
        nonlocal last_beat, stop_requested
        if clock() - last_beat >= HEARTBEAT_S:
            last_beat = clock()
            TrainingRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now(), step=trainer.step,
                                                         message=status_message())
            stop_requested = TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.STOPPING).exists()
            # Episodes verified since the round started join the index between steps.
            _index_for(run, preset.policy.horizon, preset.train.max_open_episodes)
        return stop_requested or clock() >= deadline

    try:
        with trainer:
            while trainer.step < run.total_steps and not should_stop():
                stats = trainer.train_step()
                if trainer.step % METRIC_EVERY_STEPS == 0:
                    _record_metric(run, trainer, stats)
                if progress is not None:
                    progress(trainer.step, stats)
            finished = trainer.step >= run.total_steps
            if finished or stop_requested:
                last = run.checkpoints.aggregate(step=Max("step"))["step"]
                if last is None or last < trainer.step:
                    publish_checkpoint(run, trainer, state_path)
            else:
                trainer.save_state(state_path)  # the next round continues exactly here
    except Exception as exc:
        log.exception("training run %s failed", run.pk)
        _release(run, status=TrainingRun.Status.FAILED, finished_at=timezone.now(), message=f"failed: {exc}"[:500])
        return "done"
    if finished or stop_requested:
        _RunCache.indexes.pop(run.pk, None)
        status = TrainingRun.Status.FINISHED if finished else TrainingRun.Status.STOPPED
        _release(run, status=status, step=trainer.step, finished_at=timezone.now(),
                 message=f"{status.label.lower()} at step {trainer.step}")
        return "done"
    _release(run, step=trainer.step, message=status_message())
    return "continue"


def _task_frames(trainer, index: FrameIndex) -> dict[str, int]:
    tasks = trainer.metrics().get("tasks", {})
    return {name: info.get("online_frames", 0) for name, info in tasks.items()} or {t: 0 for t in index.tasks}


def _initial_policy(run: TrainingRun, preset: Preset):
    if run.base_checkpoint is not None:
        loaded = ckpt.load_checkpoint(settings.CHECKPOINT_DIR / run.base_checkpoint.path,
                                      expected_sha256=run.base_checkpoint.sha256, expected_size=run.base_checkpoint.size)
        return loaded.policy
    return build_policy(preset.policy, seed=preset.train.seed)


def _record_metric(run: TrainingRun, trainer, stats: dict[str, Any]) -> None:
    metrics = trainer.metrics()
    values = {
        "loss": stats.get("loss"),
        "value_loss": stats.get("value_loss"),  # RECAP
        "positive_share": stats.get("positive_share"),  # RECAP: {task: share of positive advantages}
        "online_fraction": stats.get("online_fraction"),
        "sample_load_share": metrics["timing"]["sample_load_share"],
        "tasks": metrics["tasks"],
    }
    TrainingMetric.objects.update_or_create(run=run, step=trainer.step, defaults={"values": values})


# ---------------------------------------------------------------- checkpoints


def publish_checkpoint(run: Optional[TrainingRun], trainer, state_path: Optional[Path] = None, *,
                       deploy: bool = True) -> Checkpoint:
    """Write the trainer's policy as the next checkpoint version and (by default) roll the fleet onto it.

    Order matters for crash safety: weights file, then trainer state, then the database row. A worker killed before
    the row commits leaves an orphan file (overwritten on retry) and a trainer state that resumes at that step; the
    version number is only taken when the row commits, so no version is ever skipped or published twice.
    """
    directory = settings.CHECKPOINT_DIR
    parent = run.checkpoints.order_by("-version").first() if run else None
    parent = parent or (run.base_checkpoint if run else None)
    metrics = {k: v for k, v in trainer.metrics().items() if k in ("loss", "step", "tasks")}
    for _ in range(5):
        version = (Checkpoint.objects.aggregate(v=Max("version"))["v"] or 0) + 1
        path = ckpt.checkpoint_path(directory, version)
        if path.exists() and not Checkpoint.objects.filter(version=version).exists():
            path.unlink()  # an orphan from a worker that died before its row committed
            ckpt.sidecar_path(path).unlink(missing_ok=True)
        try:
            with trainer.published_weights() as policy:
                saved = ckpt.save_checkpoint(
                    directory, policy, version=version, parent=parent.version if parent else None,
                    algorithm=trainer.algorithm.name, step=trainer.step, metrics=metrics,
                    extra={"run": run.pk if run else None, "train_config": to_dict(trainer.config)},
                )
        except ckpt.CheckpointError:
            continue  # another worker took this version between our read and our write
        if state_path is not None:
            trainer.save_state(state_path)
        try:
            with transaction.atomic():
                checkpoint = Checkpoint.objects.create(
                    version=version, run=run, parent=parent, algorithm=trainer.algorithm.name, step=trainer.step,
                    path=saved.path.name, size=saved.size, sha256=saved.sha256,
                    config=run.config if run else {}, metrics=metrics,
                )
                if run:
                    TrainingRun.objects.filter(pk=run.pk).update(step=trainer.step, heartbeat_at=timezone.now())
                if deploy:
                    deploy_checkpoint(checkpoint, reason=f"published by run {run.pk}" if run else "published")
                if run and settings.SOP_AUTO_EVALUATE:
                    from learner import tasks as celery_tasks

                    transaction.on_commit(lambda: celery_tasks.evaluate_checkpoint.delay(checkpoint.pk))
        except IntegrityError:
            saved.path.unlink(missing_ok=True)
            saved.sidecar.unlink(missing_ok=True)
            continue
        log.info("published checkpoint v%d (run %s, step %d)", version, run.pk if run else "-", trainer.step)
        return checkpoint
    raise LearnerError("could not allocate a checkpoint version (too much contention)")


def current_checkpoint() -> Optional[Checkpoint]:
    deployment = Deployment.objects.select_related("checkpoint").first()
    return deployment.checkpoint if deployment else None


def deploy_checkpoint(checkpoint: Checkpoint, user=None, reason: str = "") -> Deployment:
    """Make ``checkpoint`` the fleet's policy (also a rollback to an older one). Robots swap at their next episode."""
    with transaction.atomic():
        deployment = Deployment.objects.create(checkpoint=checkpoint, by=user, reason=reason[:200])
        _audit(user, "policy.deployed", version=checkpoint.version, reason=reason)
        fleet.announce_policy(policy_message(checkpoint))
    return deployment


def policy_message(checkpoint: Checkpoint) -> protocol.PolicyUpdated:
    return protocol.PolicyUpdated(
        version=checkpoint.version,
        url=reverse("robot-checkpoint-file", kwargs={"version": checkpoint.version}),
        size=checkpoint.size,
        sha256=checkpoint.sha256,
    )


def current_policy_message() -> Optional[protocol.PolicyUpdated]:
    """What a robot connecting now should run (registered with robots.services.set_policy_source)."""
    checkpoint = current_checkpoint()
    return policy_message(checkpoint) if checkpoint else None


def checkpoint_file(version: int) -> Path:
    checkpoint = Checkpoint.objects.filter(version=version).first()
    if checkpoint is None:
        raise LearnerError(f"no checkpoint v{version}")
    return settings.CHECKPOINT_DIR / checkpoint.path


# ---------------------------------------------------------------- evaluation


def evaluate(checkpoint: Checkpoint, tasks: Optional[Iterable[Task]] = None, episodes: Optional[int] = None,
             progress: Optional[Callable[[str, int, int], None]] = None) -> list[Evaluation]:
    """Run ``episodes`` episodes per task with the checkpoint's policy and no interventions; store the results."""
    from learner.evaluation import evaluate_policy

    episodes = episodes or settings.SOP_EVAL_EPISODES
    tasks = list(tasks) if tasks is not None else (list(checkpoint.run.tasks.all()) if checkpoint.run else [])
    loaded = ckpt.load_checkpoint(settings.CHECKPOINT_DIR / checkpoint.path, expected_sha256=checkpoint.sha256,
                                  expected_size=checkpoint.size)
    results = []
    for task in tasks:
        evaluation, _ = Evaluation.objects.update_or_create(
            checkpoint=checkpoint, task=task, defaults={"status": Evaluation.Status.RUNNING, "episodes": 0,
                                                        "successes": 0, "mean_length": None})
        try:
            outcome = evaluate_policy(loaded.policy, task.env_id, list(task.prompts) or [task.name], task.max_steps,
                                      episodes, seed=checkpoint.version * 1000,
                                      progress=(lambda i, n, t=task.name: progress(t, i, n)) if progress else None)
        except Exception as exc:
            log.exception("evaluation of v%d on %s failed", checkpoint.version, task.name)
            evaluation.status, evaluation.message = Evaluation.Status.FAILED, str(exc)[:500]
        else:
            evaluation.episodes, evaluation.successes = outcome.episodes, outcome.successes
            evaluation.mean_length, evaluation.status = outcome.mean_length, Evaluation.Status.DONE
        evaluation.finished_at = timezone.now()
        evaluation.save()
        results.append(evaluation)
    return results


def _audit(user, action: str, **detail) -> None:
    AuditEvent.objects.create(actor=user, actor_name=getattr(user, "username", "") or "system", action=action,
                              detail=detail)
