"""End to end: training runs on a real Celery worker publish checkpoints; a killed worker loses no version."""

from __future__ import annotations

import signal

import pytest
from django.conf import settings
from django.core.management import call_command

from learner import services
from learner.checkpoints import load_checkpoint
from learner.models import Checkpoint, Deployment, TrainingRun
from robots.models import Task

from .conftest import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture
def demos(transactional_db):
    """Two small expert demonstrations of reach, ingested like robot uploads."""
    task = Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"], max_steps=100)
    call_command("collect_demos", "--tasks", "reach", "--episodes", "2", "--workers", "1", "--image-size", "32")
    return task


def debug_run(task, steps: int, every: int, **overrides) -> TrainingRun:
    return services.start_run("bc", [task], preset="debug", from_scratch=True, total_steps=steps,
                              overrides={"checkpoint_every_steps": every, "checkpoint_every_s": 1e9, **overrides})


def run_of(run: TrainingRun) -> TrainingRun:
    return TrainingRun.objects.get(pk=run.pk)


def versions(run: TrainingRun) -> list[int]:
    return list(Checkpoint.objects.filter(run=run).order_by("version").values_list("version", flat=True))


def test_a_worker_trains_in_rounds_and_publishes_checkpoints(launcher, demos):
    worker = launcher.worker("worker", SOP_TRAINING_ROUND_S="2")  # several rounds, each resuming the last
    # Pinned to 15 steps/s, 60 steps take >= 4 s: more than one 2 s round however fast the machine is (a quiet CI
    # host once trained all 60 unpinned steps inside the first round).
    run = debug_run(demos, steps=60, every=20, max_steps_per_s=15)

    wait_for(lambda: run_of(run).status == TrainingRun.Status.FINISHED, 180, "run finished", procs=(worker,))
    run = run_of(run)
    assert run.step == 60 and versions(run) == [1, 2, 3]
    assert run.attempts >= 2, "the run was trained in more than one round"
    latest = Checkpoint.objects.get(version=3)
    assert Deployment.objects.first().checkpoint == latest, "the fleet is rolled onto the newest checkpoint"
    loaded = load_checkpoint(settings.CHECKPOINT_DIR / latest.path, expected_sha256=latest.sha256,
                             expected_size=latest.size)
    assert loaded.version == 3 and loaded.meta["parent"] == 2
    assert run.metrics.exists(), "loss curves are recorded"


def test_a_killed_worker_resumes_without_skipping_or_duplicating_versions(launcher, demos):
    fast_watchdog = dict(SOP_TRAINING_STALE_S="4", SOP_TRAINING_HEARTBEAT_S="1", SOP_WATCHDOG_S="2")
    worker = launcher.worker("worker-1", **fast_watchdog)
    run = debug_run(demos, steps=400, every=40)
    wait_for(lambda: len(versions(run)) >= 1, 180, "a first checkpoint", procs=(worker,))

    worker.signal(signal.SIGKILL)  # the whole worker (and its pool) dies mid-round, its task unacknowledged
    worker.popen.wait()
    killed_at = run_of(run).step

    replacement = launcher.worker("worker-2", "-B", **fast_watchdog)  # with beat: the watchdog re-enqueues
    wait_for(lambda: run_of(run).status == TrainingRun.Status.FINISHED, 240, "run finished after the kill",
             procs=(replacement,))
    run = run_of(run)
    assert run.step == 400 and run.attempts >= 2 and killed_at < 400
    published = versions(run)
    assert published == list(range(1, len(published) + 1)), f"versions must be contiguous: {published}"
    assert len(published) == len(set(published))
    steps = list(Checkpoint.objects.filter(run=run).order_by("version").values_list("step", flat=True))
    assert steps == sorted(steps) and steps[-1] == 400


def test_a_run_without_data_waits_with_a_clear_status(launcher):
    task = Task.objects.create(name="push", env_id="push-v3", prompts=["push the puck"], max_steps=100)
    worker = launcher.worker("worker")
    run = services.start_run("hg_dagger", [task], preset="debug", from_scratch=True)
    wait_for(lambda: run_of(run).status == TrainingRun.Status.WAITING, 60, "waiting status", procs=(worker,))
    assert "no trainable frames" in run_of(run).message
    services.stop_run(run_of(run))
    assert run_of(run).status == TrainingRun.Status.STOPPED


def test_a_connected_robot_swaps_to_published_checkpoints_only_between_episodes(launcher, demos, tmp_path):
    from robots import fleet
    from robots.episode_file import EpisodeReader
    from robots.models import Episode, Robot, TaskAssignment

    Task.objects.filter(pk=demos.pk).update(max_steps=20)
    TaskAssignment.objects.create(robot=None, task=demos)
    robot, token = fleet.register_robot("arm-1")
    _, url = launcher.server()
    agent = launcher.agent("agent", url, token, tmp_path / "spool", "--policy", "learned", "--fallback", "expert",
                           "--hz", "20", "--image-size", "32")
    wait_for(lambda: Robot.objects.get(pk=robot.pk).connected, 60, "robot connected", procs=(agent,))

    # Checkpoints are published while the robot works.
    worker = launcher.worker("worker", SOP_TRAINING_ROUND_S="3")
    run = services.start_run("bc", [demos], preset="debug", from_scratch=True, total_steps=150,
                             overrides={"checkpoint_every_steps": 50, "checkpoint_every_s": 1e9})
    wait_for(lambda: run_of(run).status == TrainingRun.Status.FINISHED, 180, "run finished", procs=(worker, agent))
    assert versions(run) == [1, 2, 3]

    def learned_versions():
        rows = Episode.objects.filter(robot=robot, status=Episode.Status.VERIFIED, policy_version__isnull=False)
        return set(rows.values_list("policy_version", flat=True))

    wait_for(lambda: 3 in learned_versions(), 120, "episodes run by v3", procs=(agent,))
    assert Robot.objects.get(pk=robot.pk).policy_version == 3, "the robot reports the version it runs"
    episodes = Episode.objects.filter(robot=robot, status=Episode.Status.VERIFIED).order_by("started_at")
    seen = [e.policy_version for e in episodes]
    learned = [v for v in seen if v is not None]
    assert learned == sorted(learned), f"versions only move forward between episodes: {seen}"
    assert seen.index(learned[0]) == len([v for v in seen if v is None]), "scripted fallback only before v1"
    for ep in episodes:  # each file records exactly the one version its episode ran
        with EpisodeReader(settings.PAYLOAD_DIR / ep.payload_path) as reader:
            assert reader.meta["policy_version"] == (ep.policy_version if ep.policy_version else -1)


def test_published_checkpoints_are_evaluated_in_the_background_on_their_own_queue(launcher, demos):
    """make demo's setup: SOP_AUTO_EVALUATE on a queue of its own, consumed by a second (niced) worker, so the trainer
    never spends a round evaluating; an evaluator that falls behind evaluates the newest checkpoint, never a stale one
    after a newer exists."""
    import sys

    from learner.models import Evaluation

    env = dict(SOP_AUTO_EVALUATE="1", SOP_EVALUATION_QUEUE="evaluation", SOP_EVAL_EPISODES="2")
    trainer = launcher.worker("worker", SOP_TRAINING_ROUND_S="3", **env)
    evaluator = launcher.start("evaluator", ["nice", "-n", "15", sys.executable, "-m", "celery", "-A", "sop_web",
                                             "worker", "-l", "INFO", "--concurrency", "1", "-Q", "evaluation",
                                             "-n", "evaluator@%h", "--without-heartbeat", "--without-gossip",
                                             "--without-mingle"], **env)
    run = debug_run(demos, steps=60, every=20)
    wait_for(lambda: run_of(run).status == TrainingRun.Status.FINISHED, 180, "run finished", procs=(trainer,))
    assert versions(run) == [1, 2, 3]
    wait_for(lambda: Evaluation.objects.filter(checkpoint__version=3, status=Evaluation.Status.DONE).exists(), 180,
             "the newest checkpoint evaluated", procs=(evaluator,))
    newest = Evaluation.objects.get(checkpoint__version=3)
    assert (newest.task, newest.episodes) == (demos, 2)
    assert not Evaluation.objects.exclude(status=Evaluation.Status.DONE).exists(), "nothing left queued or running"
    assert "Task learner.evaluate_checkpoint[" not in trainer.output(), "the trainer never ran an evaluation"
    assert "Task learner.evaluate_checkpoint[" in evaluator.output()
