"""A policy package outside the project's source, end to end: installed from tests/plugins/ into a directory of its
own (as `pip install` would put it on a worker and on a robot), trained in a real run on a Celery worker, published,
pushed to a robot that has it and swapped between episodes; a robot without the package refuses the checkpoint with
a clear error and keeps working on its fallback. No file of the project changes."""

from __future__ import annotations

import sys

import pytest

from learner import services
from learner.models import Checkpoint, TrainingRun
from robots import fleet
from robots.models import Episode, Robot, Task, TaskAssignment

from ..learner.test_policy_plugins import install_plugin
from .conftest import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


def test_a_plugin_policy_trains_in_a_run_and_reaches_the_robots_that_have_it(launcher, tmp_path, monkeypatch):
    from django.core.management import call_command

    packages = install_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(packages))  # the server validates the run's policy name where it is started
    task = Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"], max_steps=100)
    call_command("collect_demos", "--tasks", "reach", "--episodes", "2", "--workers", "1", "--image-size", "32")
    Task.objects.filter(pk=task.pk).update(max_steps=20)
    TaskAssignment.objects.create(robot=None, task=task)

    with_plugin = {"PYTHONPATH": str(packages)}
    _, url = launcher.server()
    worker = launcher.worker("worker", SOP_TRAINING_ROUND_S="3", **with_plugin)
    robots = {name: fleet.register_robot(name) for name in ("has-plugin", "lacks-plugin")}
    args = ("--policy", "learned", "--fallback", "expert", "--hz", "20", "--image-size", "32", "--no-video")
    agents = {
        "has-plugin": launcher.start("has-plugin", [sys.executable, "-m", "robots.agent", "--server", url, "--spool",
                                                    str(tmp_path / "spool-1"), *args],
                                     SOP_ROBOT_TOKEN=robots["has-plugin"][1], **with_plugin),
        "lacks-plugin": launcher.agent("lacks-plugin", url, robots["lacks-plugin"][1], tmp_path / "spool-2", *args),
    }
    everyone = (worker, *agents.values())

    run = services.start_run("bc", [task], preset="debug", from_scratch=True, total_steps=90, policy="toy_mlp",
                             policy_options={"hidden": 16},
                             overrides={"checkpoint_every_steps": 30, "checkpoint_every_s": 1e9})
    wait_for(lambda: TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.FINISHED, 240,
             "the plug-in's run finished", procs=everyone)
    newest = Checkpoint.objects.order_by("-version").first()
    assert newest.version == 3 and newest.config["policy"]["name"] == "toy_mlp"
    assert newest.config["policy"]["options"] == {"hidden": 16}

    has, lacks = (robots[n][0] for n in ("has-plugin", "lacks-plugin"))
    wait_for(lambda: Episode.objects.filter(robot=has, status=Episode.Status.VERIFIED, policy_version=3).exists(),
             120, "episodes run by the plug-in's v3", procs=everyone)
    assert Robot.objects.get(pk=has.pk).policy_version == 3
    wait_for(lambda: "toy_mlp" in Robot.objects.get(pk=lacks.pk).policy_error, 120,
             "the robot without the package reports why it cannot run v3", procs=everyone)
    before = Episode.objects.filter(robot=lacks, status=Episode.Status.VERIFIED).count()
    wait_for(lambda: Episode.objects.filter(robot=lacks, status=Episode.Status.VERIFIED).count() > before, 120,
             "it keeps working on its fallback", procs=everyone)
    assert not Episode.objects.filter(robot=lacks, policy_version=3).exists()
