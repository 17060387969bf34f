"""End to end on object storage (SOP_STORAGE=s3, a real S3-protocol server process): the web node, two worker hosts
and a robot share the database, Redis and a bucket, and no disk. A worker host dies mid-run; another resumes the run
from the trainer state in the bucket; the robot runs every published version, downloaded from the bucket."""

from __future__ import annotations

import hashlib
import signal

import boto3
import pytest
from django.core.management import call_command

from learner import services
from learner.models import Checkpoint, TrainingRun
from robots import fleet
from robots.models import Episode, Robot, Task, TaskAssignment
from sop_web import storage

from .conftest import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(480)]


def versions(run: TrainingRun) -> list[int]:
    return list(Checkpoint.objects.filter(run=run).order_by("version").values_list("version", flat=True))


def test_the_loop_runs_on_object_storage_with_no_shared_disk(launcher, s3_storage, settings, tmp_path):
    settings.PAYLOAD_DIR = tmp_path / "test-host" / "payloads"
    settings.CHECKPOINT_DIR = tmp_path / "test-host" / "checkpoints"
    bucket = boto3.resource("s3", endpoint_url=s3_storage["SOP_S3_ENDPOINT_URL"], region_name="us-east-1",
                            aws_access_key_id=s3_storage["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=s3_storage["AWS_SECRET_ACCESS_KEY"]).Bucket(s3_storage["SOP_S3_BUCKET"])

    def in_bucket(key: str) -> bytes:
        return bucket.Object(key).get()["Body"].read()

    task = Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"], max_steps=100)
    call_command("collect_demos", "--tasks", "reach", "--episodes", "2", "--workers", "1", "--image-size", "32")
    demos = list(Episode.objects.filter(task=task, status=Episode.Status.VERIFIED))
    assert len(demos) == 2 and all(in_bucket(storage.episode_key(e.payload_path)) for e in demos)
    Task.objects.filter(pk=task.pk).update(max_steps=20)  # short robot episodes from here on

    hosts = {name: tmp_path / name for name in ("web", "worker-a", "worker-b")}
    shared = {**s3_storage, "SECRET_KEY": settings.SECRET_KEY}  # what every cloud host is configured with
    fast_watchdog = dict(SOP_TRAINING_STALE_S="4", SOP_TRAINING_HEARTBEAT_S="1", SOP_WATCHDOG_S="2",
                         SOP_TRAINING_ROUND_S="3")
    TaskAssignment.objects.create(robot=None, task=task)
    robot, token = fleet.register_robot("arm-1")
    _, url = launcher.server(SOP_DATA_DIR=hosts["web"], **shared)
    agent = launcher.agent("agent", url, token, tmp_path / "spool", "--policy", "learned", "--fallback", "expert",
                           "--hz", "20", "--image-size", "32")
    wait_for(lambda: Robot.objects.get(pk=robot.pk).connected, 60, "robot connected", procs=(agent,))

    worker_a = launcher.worker("worker-a", SOP_DATA_DIR=hosts["worker-a"], **fast_watchdog, **shared)
    run = services.start_run("bc", [task], preset="debug", from_scratch=True, total_steps=150,
                             overrides={"checkpoint_every_steps": 50, "checkpoint_every_s": 1e9,
                                        "max_steps_per_s": 15})
    wait_for(lambda: len(versions(run)) >= 1, 180, "a first checkpoint", procs=(worker_a, agent))
    worker_a.signal(signal.SIGKILL)  # the host dies; its disk goes with it
    worker_a.popen.wait()

    worker_b = launcher.worker("worker-b", "-B", SOP_DATA_DIR=hosts["worker-b"], **fast_watchdog, **shared)
    wait_for(lambda: TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.FINISHED, 240, "run finished",
             procs=(worker_b, agent))
    run = TrainingRun.objects.get(pk=run.pk)
    assert versions(run) == [1, 2, 3], "no version skipped or published twice across the hosts"
    assert run.attempts >= 2
    for checkpoint in Checkpoint.objects.filter(run=run):
        weights = in_bucket(storage.checkpoint_key(checkpoint.path))
        assert hashlib.sha256(weights).hexdigest() == checkpoint.sha256
    # Worker B read the episodes through its own cache and continued from the state worker A left in the bucket.
    assert list((hosts["worker-b"] / "payloads" / "episodes").rglob("*.h5"))
    assert (hosts["worker-b"] / "checkpoints" / "runs" / str(run.uid) / "trainer.safetensors").exists()

    def learned_versions():
        rows = Episode.objects.filter(robot=robot, status=Episode.Status.VERIFIED, policy_version__isnull=False)
        return set(rows.values_list("policy_version", flat=True))

    wait_for(lambda: 3 in learned_versions(), 120, "episodes run by v3", procs=(agent,))
    # The robot's episodes are in the bucket; the web node never held the weights: robots fetched them from it.
    for episode in Episode.objects.filter(robot=robot, status=Episode.Status.VERIFIED):
        assert hashlib.sha256(in_bucket(storage.episode_key(episode.payload_path))).hexdigest() == \
            episode.payload_sha256
    assert not list((hosts["web"] / "checkpoints").glob("policy-v*.safetensors"))
