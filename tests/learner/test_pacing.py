"""A pinned learner (TrainConfig.max_steps_per_s) never runs ahead of its pace: fleet-size comparisons rely on it."""

from __future__ import annotations

import time

import pytest
from django.core.management import call_command

from learner import services
from learner.models import TrainingRun
from robots.models import Task

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("pace", [0.0, 25.0])
def test_a_pinned_run_trains_at_most_max_steps_per_s(payload_dir, checkpoint_dir, pace):
    task = Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"], max_steps=100)
    call_command("collect_demos", "--tasks", "reach", "--episodes", "1", "--workers", "1", "--image-size", "16")
    run = services.start_run("bc", [task], preset="debug", from_scratch=True, total_steps=50, enqueue=False,
                             overrides={"max_steps_per_s": pace, "checkpoint_every_steps": 1000})
    claimed = services.claim_run(run.pk, "worker-a")
    started = time.monotonic()
    assert services.run_round(claimed, round_s=60) == "done"
    elapsed = time.monotonic() - started
    assert TrainingRun.objects.get(pk=run.pk).step == 50
    if pace:
        assert elapsed >= 49 / pace, f"50 steps in {elapsed:.2f} s is faster than {pace} steps/s"
