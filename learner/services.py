"""State changes of the learner: training runs, checkpoint publication, fleet deployments, evaluations.

Every door (API, admin, management commands, Celery tasks) calls these. Training itself is the pure core
(learner/trainer.py); this module feeds it verified episodes from the database and publishes what it produces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, transaction
from django.db.models import Max, Q
from django.urls import reverse
from django.utils import timezone
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from learner import checkpoints as ckpt
from learner import devices, distributed, queue
from learner.algorithms import get_algorithm
from learner.buffer import FrameIndex
from learner.config import ConfigError, Preset, get_preset, to_dict
from learner.models import Checkpoint, Deployment, Evaluation, TrainingMetric, TrainingRun
from learner.policy import build_policy, policy_class
from learner.tensorboard import open_sink
from robots import protocol
from robots import fleet
from robots.models import AuditEvent, Episode, Task
from sop_web import storage
from sop_web.logformat import ids

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
    policy: Optional[str] = None,
    policy_options: Optional[dict[str, Any]] = None,
    cameras: Optional[Iterable[str]] = None,
    user=None,
    enqueue: bool = True,
) -> TrainingRun:
    """Create a run and queue it on the ``learner`` queue (after commit). By default it fine-tunes the checkpoint the
    fleet currently runs; ``from_scratch`` starts from fresh weights (as pretraining does). ``policy`` names another
    policy implementation (a built-in name, a plug-in's ``sop.policies`` entry point or ``module:Class``; docs/policy.md
    "Bring your own policy") and ``policy_options`` its settings; a run of another policy than the base checkpoint's
    starts from scratch. ``cameras`` names the cameras the policy reads (PolicyConfig.cameras); a fine-tuning run
    keeps its base checkpoint's, so asking for others means starting from scratch."""
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
        policy_config = to_dict(base.policy) | ({"name": policy} if policy else {}) | (
            {"options": dict(policy_options)} if policy_options else {}) | (
            {"cameras": list(cameras)} if cameras is not None else {})
        config = Preset.from_dict({"name": base.name, "policy": policy_config, "train": train})
        policy_class(config.policy.name)  # a typo or a package missing here fails now, not on the worker later
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise LearnerError(str(exc)) from None
    if base_checkpoint is None and not from_scratch:
        base_checkpoint = current_checkpoint()
    if base_checkpoint is not None and policy:
        base_policy = (base_checkpoint.config or {}).get("policy", {}).get("name", "small_vla")
        if base_policy != config.policy.name:
            raise LearnerError(f"the base checkpoint v{base_checkpoint.version} is a {base_policy} policy; a "
                               f"{config.policy.name} run starts from scratch (from_scratch)")
    if base_checkpoint is not None:  # the run indexes the cameras of the policy it fine-tunes
        base_cameras = tuple((base_checkpoint.config or {}).get("policy", {}).get("cameras", ()))
        if cameras is not None and tuple(cameras) != base_cameras:
            raise LearnerError(f"the base checkpoint v{base_checkpoint.version} reads cameras "
                               f"{list(base_cameras) or ['the primary']}; a policy of cameras {list(cameras)} starts "
                               f"from scratch (from_scratch)")
        config = dataclasses.replace(config, policy=dataclasses.replace(config.policy, cameras=base_cameras))
    with transaction.atomic():
        run = TrainingRun.objects.create(
            algorithm=algorithm, preset=preset, config=config.to_dict(), base_checkpoint=base_checkpoint,
            total_steps=config.train.steps, created_by=user, message="queued",
        )
        run.tasks.set(task_objs)
        _audit(user, "training.started", run=run.pk, algorithm=algorithm, tasks=[t.name for t in task_objs])
        if enqueue:
            queue.enqueue_round(run.pk)
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
    token = f"{worker[:180]}/{uuid.uuid4().hex[:12]}"  # unique per claim: the fence of every later write
    won = TrainingRun.objects.filter(claimable, pk=run_id).update(
        status=TrainingRun.Status.RUNNING, heartbeat_at=now, worker=token
    )
    if not won:
        return None
    run = TrainingRun.objects.get(pk=run_id)
    TrainingRun.objects.filter(pk=run_id).update(attempts=run.attempts + 1, started_at=run.started_at or now)
    run.refresh_from_db()
    return run


def stalled_runs() -> list[int]:
    """Active runs nobody is working on and nobody will: claimed by a worker that stopped heartbeating (killed,
    machine lost; the broker would redeliver its task only after the visibility timeout, an hour), or unclaimed with
    their next round overdue by STALE_S (the broker lost the message, or the enqueue never happened). The watchdog
    re-enqueues them; the claim makes a duplicate harmless."""
    stale = timezone.now() - timezone.timedelta(seconds=STALE_S)
    dead_worker = Q(status__in=[TrainingRun.Status.RUNNING, TrainingRun.Status.STOPPING], heartbeat_at__lt=stale)
    lost_round = Q(status__in=TrainingRun.ACTIVE, heartbeat_at__isnull=True) & (
        Q(next_round_at__lt=stale) | Q(next_round_at__isnull=True, created_at__lt=stale))
    return list(TrainingRun.objects.filter(dead_worker | lost_round).order_by("pk").values_list("pk", flat=True))


def retry_delay(run_id: int) -> float:
    """Seconds before retrying a run after its ``failures``-th transient error in a row: 2, 4, 8 ... at most 60."""
    failures = TrainingRun.objects.filter(pk=run_id).values_list("failures", flat=True).first() or 1
    return float(min(60, 2 ** failures))


def _release(run: TrainingRun, **fields) -> None:
    """End a round: drop the claim so the next round (or another worker) can take the run. A no-op for a worker whose
    claim was taken over: the row is the new holder's."""
    TrainingRun.objects.filter(pk=run.pk, worker=run.worker).update(heartbeat_at=None, **fields)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------- one round of training


class _RunCache:
    """Per worker process: the frame index of each run, grown incrementally with newly verified episodes."""

    indexes: dict[int, tuple[FrameIndex, set[str]]] = {}


def _index_for(run: TrainingRun, horizon: int, max_open: int, cameras: tuple[str, ...] = ()) -> FrameIndex:
    index, seen = _RunCache.indexes.get(run.pk, (None, set()))
    if index is None:
        index = FrameIndex(horizon=horizon, max_open_episodes=max_open, cameras=cameras)
        _RunCache.indexes[run.pk] = (index, seen)
    new = (
        Episode.objects.filter(task__in=run.tasks.all(), status=Episode.Status.VERIFIED)
        .exclude(split=protocol.Split.EVAL.value)
        .exclude(id__in=[*seen])
        .order_by("verified_at")
        .values_list("id", "payload_path", "outcome", "payload_sha256", "payload_size")
    )
    for episode_id, rel, outcome, sha256, size in new.iterator():
        seen.add(str(episode_id))
        try:
            # Object storage: fetched once into this host's cache (checked against the verified sha256); the index
            # then reads frames from the local file.
            path = storage.ensure_local(storage.episode_key(rel), sha256=sha256, size=size)
            # The database's outcome wins over the file's: operators relabel stored episodes (RECAP's rewards use it).
            index.add_episode(path, outcome=outcome or None)
        except storage.StorageError as exc:  # the bucket did not answer, or the transfer was torn: next refresh
            seen.discard(str(episode_id))
            log.warning("episode %s not fetched yet: %s", episode_id, exc)
        except Exception as exc:  # a file that vanished or rotted must not stop training on the rest
            log.warning("episode %s is not usable for training: %s", episode_id, exc)
    return index


def trainer_state_path(run: TrainingRun) -> Path:
    return settings.CHECKPOINT_DIR / "runs" / str(run.uid) / "trainer.safetensors"


def save_trainer_state(trainer, path: Path) -> None:
    """The run's resume point, written here and (object storage) uploaded, so any worker host can continue it."""
    trainer.save_state(path)
    storage.push_mutable(storage.key_of(path), path)


class ClaimLost(Exception):
    """Another worker claimed this run (ours stopped heartbeating for longer than STALE_S): stop at once, write
    nothing. The new holder resumes from the last saved state."""


# Errors that say "try again later", not "this run is broken": the database or broker went away, a disk filled up.
TRANSIENT_ERRORS = (OperationalError, InterfaceError, OSError, KombuOperationalError, RedisError)
MAX_TRANSIENT_FAILURES = 5  # in a row; then the run is marked failed


def run_round(run: TrainingRun, round_s: float = ROUND_S, clock: Callable[[], float] = time.monotonic,
              progress: Optional[Callable[[int, dict[str, Any]], None]] = None) -> str:
    """Train a claimed run for up to ``round_s`` seconds. Returns what should happen next: "continue" (enqueue another
    round), "wait" (no data yet; retry later), "retry" (a transient error; retry after ``retry_delay``) or "done"
    (finished, stopped, failed, or claimed by another worker)."""
    try:
        return _run_round(run, round_s, clock, progress)
    finally:
        _close_tensorboard(run)  # flushed: the events of the round are on disk when it ends


def _run_round(run: TrainingRun, round_s: float, clock: Callable[[], float],
               progress: Optional[Callable[[int, dict[str, Any]], None]]) -> str:
    try:
        return _train_round(run, round_s, clock, progress)
    except ClaimLost:
        log.warning("training run %s was claimed by another worker; this one stops without writing", run.pk)
        return "done"
    except TRANSIENT_ERRORS as exc:
        log.warning("training run %s hit a transient error: %s", run.pk, exc, exc_info=True)
        failures = (TrainingRun.objects.filter(pk=run.pk).values_list("failures", flat=True).first() or 0) + 1
        if failures >= MAX_TRANSIENT_FAILURES:
            _release(run, status=TrainingRun.Status.FAILED, finished_at=timezone.now(), failures=failures,
                     message=f"failed after {failures} transient errors in a row: {exc}"[:500])
            return "done"
        _release(run, failures=failures, message=f"retrying after a transient error ({failures}): {exc}"[:500])
        return "retry"
    except Exception as exc:
        log.exception("training run %s failed", run.pk, extra=ids(run=run.pk))
        _release(run, status=TrainingRun.Status.FAILED, finished_at=timezone.now(), message=f"failed: {exc}"[:500])
        return "done"


def _train_round(run: TrainingRun, round_s: float, clock: Callable[[], float],
                 progress: Optional[Callable[[int, dict[str, Any]], None]]) -> str:
    from learner.trainer import Trainer

    preset = Preset.from_dict(run.config)
    algorithm_cls = get_algorithm(run.algorithm)
    index = _index_for(run, preset.policy.horizon, preset.train.max_open_episodes, preset.policy.cameras)
    trainable = algorithm_cls(preset.train).trainable_mask(index)
    if not len(index) or not trainable.any():
        task_names = ", ".join(run.tasks.values_list("name", flat=True))
        _release(run, status=TrainingRun.Status.WAITING, failures=0,
                 message=f"waiting for data: no trainable frames yet for {task_names} "
                         f"({len(index.episodes)} episodes indexed; record demonstrations with collect_demos)")
        return "wait"

    state_path = trainer_state_path(run)

    def on_checkpoint(step: int) -> None:
        publish_checkpoint(run, trainer, state_path)

    if storage.pull_mutable(storage.key_of(state_path)) is not None:  # the newest state, whoever wrote it
        trainer = Trainer.resume(state_path, index, on_checkpoint=on_checkpoint)
    else:
        policy = _initial_policy(run, preset)
        trainer = Trainer(preset.train, index, policy, algorithm_cls(preset.train), on_checkpoint=on_checkpoint)

    def status_message() -> str:
        no_online = [name for name, frames in _task_frames(trainer, index).items() if not frames]
        return ("training" + (f" (no online labels yet for {', '.join(no_online)}: offline data only)"
                              if no_online else ""))[:500]

    _claimed(run).update(message=status_message())
    deadline = clock() + round_s
    last_beat = clock()
    stop_requested = False

    def should_stop() -> bool:
        nonlocal last_beat, stop_requested
        if clock() - last_beat >= HEARTBEAT_S:
            last_beat = clock()
            # Fenced by the claim: a worker that lost it (another one took the run over) learns it here and stops.
            if not _claimed(run).update(heartbeat_at=timezone.now(), step=trainer.step, message=status_message()):
                raise ClaimLost()
            stop_requested = TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.STOPPING).exists()
            # Episodes verified since the round started join the index between steps.
            _index_for(run, preset.policy.horizon, preset.train.max_open_episodes, preset.policy.cameras)
        return stop_requested or clock() >= deadline

    pace = preset.train.max_steps_per_s
    group = _start_group(run, trainer, index, state_path) if trainer.config.world_size > 1 else None
    indexed = len(index.episodes)
    round_start, round_first_step = clock(), trainer.step
    with trainer, _closing(group):
        while trainer.step < run.total_steps and not should_stop():
            if group is not None:
                if len(index.episodes) != indexed:  # the other ranks index what should_stop() just added
                    indexed = len(index.episodes)
                    distributed.write_episodes(group.episodes, _episode_list(index))
                group.step()
            stats = trainer.train_step()
            if pace > 0:  # pinned: never ahead of max_steps_per_s over the round
                ahead = (trainer.step - round_first_step) / pace - (clock() - round_start)
                if ahead > 0:
                    time.sleep(min(ahead, HEARTBEAT_S))
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
            _require_claim(run)
            save_trainer_state(trainer, state_path)  # the next round continues exactly here
    if finished or stop_requested:
        _RunCache.indexes.pop(run.pk, None)
        status = TrainingRun.Status.FINISHED if finished else TrainingRun.Status.STOPPED
        _release(run, status=status, step=trainer.step, finished_at=timezone.now(), failures=0,
                 message=f"{status.label.lower()} at step {trainer.step}")
        return "done"
    _release(run, step=trainer.step, failures=0, message=status_message())
    return "continue"


def _episode_list(index: FrameIndex) -> list[tuple[str, str]]:
    return [(str(e.path), e.outcome) for e in index.episodes]


def _start_group(run: TrainingRun, trainer, index: FrameIndex, state_path: Path) -> "distributed.Group":
    """Ranks 1..N-1 of a data-parallel run (learner/distributed.py): they start from this round's state (written
    after the first refresh, so that the normalisation is fitted once, here) and the files indexed here."""
    folder = state_path.parent / "ddp"
    folder.mkdir(parents=True, exist_ok=True)
    trainer.refresh()
    state = folder / "round.safetensors"
    trainer.save_state(state)
    episodes = folder / "episodes.json"
    distributed.write_episodes(episodes, _episode_list(index))
    log.info("training run %s: %d data-parallel processes", run.pk, trainer.config.world_size)
    with _heartbeat_meanwhile(run):  # the other ranks start, resume and index first: keep the claim alive
        return distributed.Group(trainer.config.world_size, state, episodes, device=str(trainer.device),
                                 num_threads=trainer.config.num_threads, log_dir=folder)


@contextlib.contextmanager
def _heartbeat_meanwhile(run: TrainingRun, every_s: float = 5.0):
    """Heartbeat the run's claim from a thread while the caller blocks (another worker would take a silent run)."""
    from django.db import connection

    stop = threading.Event()

    def beat():
        try:
            while not stop.wait(every_s):
                _claimed(run).update(heartbeat_at=timezone.now())
        except Exception:  # noqa: BLE001 - the round's own next heartbeat finds out what is wrong
            log.warning("training run %s: heartbeat while the ranks start failed", run.pk, exc_info=True)
        finally:
            connection.close()

    thread = threading.Thread(target=beat, name=f"run-{run.pk}-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def _closing(group: Optional["distributed.Group"]):
    """The other ranks stop with the round: told so when it ends normally, killed when it failed."""
    if group is None:
        yield
        return
    try:
        yield
    except BaseException:
        group.close(clean=False)
        raise
    codes = group.close()
    if any(codes):
        log.warning("data-parallel ranks exited with %s (their logs: %s)", codes, group.state.parent)


def _claimed(run: TrainingRun):
    """The run's row, as long as ``run``'s claim holds (``worker`` is unique per claim)."""
    return TrainingRun.objects.filter(pk=run.pk, worker=run.worker, heartbeat_at__isnull=False)


def _require_claim(run: TrainingRun) -> None:
    if not _claimed(run).exists():
        raise ClaimLost()


def _task_frames(trainer, index: FrameIndex) -> dict[str, int]:
    tasks = trainer.metrics().get("tasks", {})
    return {name: info.get("online_frames", 0) for name, info in tasks.items()} or {t: 0 for t in index.tasks}


def _initial_policy(run: TrainingRun, preset: Preset):
    if run.base_checkpoint is not None:
        loaded = ckpt.load_checkpoint(checkpoint_local(run.base_checkpoint),
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
    sink = _tensorboard(run)
    if sink is not None:
        sink.write(trainer.step, values)


_sinks: dict[int, Any] = {}  # run id -> this worker's TensorBoard sink for it, open for the length of a round


def _tensorboard(run: TrainingRun):
    """The run's TensorBoard sink (SOP_TENSORBOARD_DIR/run-<id>), or None when it is off or not installed."""
    if not settings.SOP_TENSORBOARD_DIR:
        return None
    if run.pk not in _sinks:
        _sinks[run.pk] = open_sink(Path(settings.SOP_TENSORBOARD_DIR) / f"run-{run.pk}")
    return _sinks[run.pk]


def _close_tensorboard(run: TrainingRun) -> None:
    sink = _sinks.pop(run.pk, None)
    if sink is not None:
        sink.close()


# ---------------------------------------------------------------- checkpoints


def publish_checkpoint(run: Optional[TrainingRun], trainer, state_path: Optional[Path] = None, *,
                       deploy: bool = True) -> Checkpoint:
    """Write the trainer's policy as the next checkpoint version and (by default) roll the fleet onto it.

    Order matters for crash safety: weights file, then trainer state, then the database row. The version number is
    taken only when the row commits (a unique constraint), so no version is ever skipped or published twice. Every
    attempt writes a file of its own (``policy-v<version>-<tag>``): two publishers racing for one version never touch
    each other's file, and the loser deletes only its own. A worker killed before its row commits leaves an orphan
    file, which ``cleanup_orphan_checkpoints`` removes later; a worker that lost its run's claim publishes nothing.
    """
    directory = settings.CHECKPOINT_DIR
    parent = run.checkpoints.order_by("-version").first() if run else None
    parent = parent or (run.base_checkpoint if run else None)
    metrics = {k: v for k, v in trainer.metrics().items() if k in ("loss", "step", "tasks")}
    for _ in range(5):
        if run is not None and run.worker:
            _require_claim(run)
        version = (Checkpoint.objects.aggregate(v=Max("version"))["v"] or 0) + 1
        with trainer.published_weights() as policy:
            saved = ckpt.save_checkpoint(
                directory, policy, version=version, parent=parent.version if parent else None,
                algorithm=trainer.algorithm.name, step=trainer.step, metrics=metrics, tag=uuid.uuid4().hex[:12],
                extra={"run": run.pk if run else None, "train_config": to_dict(trainer.config)},
            )
        try:
            # Object storage: weights and sidecar go to the bucket before the row exists, so a robot told about
            # the version can always fetch it.
            storage.upload(storage.checkpoint_key(saved.path.name), saved.path)
            storage.upload(storage.checkpoint_key(saved.sidecar.name), saved.sidecar)
            if state_path is not None:
                save_trainer_state(trainer, state_path)
            with transaction.atomic():
                if run is not None and run.worker and not _claimed(run).select_for_update().exists():
                    raise ClaimLost()  # checked under the row lock: the new holder cannot publish meanwhile
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
                    queue.enqueue_evaluation(checkpoint.pk, automatic=True)
        except IntegrityError:
            _discard(saved)
            continue  # another publisher took this version between our read and our commit
        except BaseException:
            _discard(saved)
            raise
        log.info("published checkpoint v%d (run %s, step %d)", version, run.pk if run else "-", trainer.step,
                 extra=ids(run=run.pk if run else None, checkpoint=version))
        return checkpoint
    raise LearnerError("could not allocate a checkpoint version (too much contention)")


def _discard(saved: ckpt.SavedCheckpoint) -> None:
    for path in (saved.path, saved.sidecar):
        try:
            storage.delete(storage.checkpoint_key(path.name))
        except Exception as exc:  # the orphan sweep removes what is left
            log.warning("could not delete %s: %s", path.name, exc)
            path.unlink(missing_ok=True)


def cleanup_orphan_checkpoints(min_age_s: float = 3600.0) -> int:
    """Delete checkpoint files no Checkpoint row points at, older than ``min_age_s`` (left by a publisher killed
    between writing the file and committing the row), in the store (local folder or bucket). Returns how many
    weight files were removed."""
    known = set(Checkpoint.objects.values_list("path", flat=True))
    cutoff = time.time() - min_age_s
    removed = 0
    for key, mtime in storage.list_keys("checkpoints"):
        name = key.rsplit("/", 1)[-1]
        if not (name.startswith("policy-v") and name.endswith(".safetensors")) or name in known or mtime > cutoff:
            continue
        if Checkpoint.objects.filter(path=name).exists():
            continue  # committed meanwhile
        storage.delete(key)
        storage.delete(storage.checkpoint_key(ckpt.sidecar_path(name).name))
        removed += 1
    if removed:
        log.info("removed %d orphan checkpoint file(s)", removed)
    return removed


def superseded(checkpoint: Checkpoint) -> bool:
    """A newer checkpoint of the same run exists (a run's checkpoints only; a base checkpoint never is)."""
    return checkpoint.run_id is not None and Checkpoint.objects.filter(
        run_id=checkpoint.run_id, version__gt=checkpoint.version).exists()


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


def checkpoint_row(version: int) -> Checkpoint:
    checkpoint = Checkpoint.objects.filter(version=version).first()
    if checkpoint is None:
        raise LearnerError(f"no checkpoint v{version}")
    return checkpoint


def checkpoint_local(checkpoint: Checkpoint) -> Path:
    """A local file with the checkpoint's weights (object storage: fetched into this host's cache, verified)."""
    return storage.ensure_local(storage.checkpoint_key(checkpoint.path), sha256=checkpoint.sha256,
                                size=checkpoint.size)


# ---------------------------------------------------------------- evaluation


def evaluate(checkpoint: Checkpoint, tasks: Optional[Iterable[Task]] = None, episodes: Optional[int] = None,
             progress: Optional[Callable[[str, int, int], None]] = None,
             guidance_beta: Optional[float] = None) -> list[Evaluation]:
    """Run ``episodes`` episodes per task with the checkpoint's policy and no interventions; store the results.

    Every checkpoint is evaluated on the same held-out placements (the eval stream of SOP_EVAL_SEED): comparisons
    between checkpoints are paired, and differences are the policy's, not the placements'. ``guidance_beta``
    overrides a RECAP checkpoint's evaluation beta for a sweep: those results are returned unsaved, so the stored
    evaluation stays the one the checkpoint is run with."""
    from learner.evaluation import evaluate_policy

    episodes = episodes or settings.SOP_EVAL_EPISODES
    tasks = list(tasks) if tasks is not None else (list(checkpoint.run.tasks.all()) if checkpoint.run else [])
    loaded = ckpt.load_checkpoint(checkpoint_local(checkpoint), expected_sha256=checkpoint.sha256,
                                  expected_size=checkpoint.size)
    loaded.policy.to(devices.resolve())  # the worker's SOP_DEVICE (CPU unless set)
    results = []
    store = guidance_beta is None
    for task in tasks:
        if store:
            evaluation, _ = Evaluation.objects.update_or_create(
                checkpoint=checkpoint, task=task, defaults={"status": Evaluation.Status.RUNNING, "episodes": 0,
                                                            "successes": 0, "mean_length": None})
        else:
            evaluation = Evaluation(checkpoint=checkpoint, task=task)
        try:
            outcome = evaluate_policy(loaded.policy, task.env_id, list(task.prompts) or [task.name], task.max_steps,
                                      episodes, seed=settings.SOP_EVAL_SEED, guidance_beta=guidance_beta,
                                      progress=(lambda i, n, t=task.name: progress(t, i, n)) if progress else None)
        except Exception as exc:
            log.exception("evaluation of v%d on %s failed", checkpoint.version, task.name)
            evaluation.status, evaluation.message = Evaluation.Status.FAILED, str(exc)[:500]
        else:
            evaluation.episodes, evaluation.successes = outcome.episodes, outcome.successes
            evaluation.mean_length, evaluation.status = outcome.mean_length, Evaluation.Status.DONE
        evaluation.finished_at = timezone.now()
        if store:
            evaluation.save()
        results.append(evaluation)
    return results


def _audit(user, action: str, **detail) -> None:
    AuditEvent.objects.create(actor=user, actor_name=getattr(user, "username", "") or "system", action=action,
                              detail=detail)
