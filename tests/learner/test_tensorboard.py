"""The training scalars the console charts, also in TensorBoard: the same values at the same steps."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from learner import services
from learner.models import TrainingMetric
from learner.tensorboard import scalars
from robots.models import Task

pytestmark = pytest.mark.django_db


def test_scalars_flatten_nested_numbers_and_skip_the_rest():
    values = {"loss": 0.5, "value_loss": None, "ok": True, "tasks": {"reach": {"frames": 10, "name": "x"}},
              "nan": float("nan")}
    assert dict(scalars(values)) == {"loss": 0.5, "tasks/reach/frames": 10.0}


def test_a_run_writes_the_console_scalars_as_tensorboard_events(payload_dir, checkpoint_dir, settings, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings.SOP_TENSORBOARD_DIR = str(tmp_path / "tb")
    task = Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"], max_steps=100)
    call_command("collect_demos", "--tasks", "reach", "--episodes", "1", "--workers", "1", "--image-size", "16")
    run = services.start_run("bc", [task], preset="debug", from_scratch=True, total_steps=75, enqueue=False,
                             overrides={"checkpoint_every_steps": 1000})
    assert services.run_round(services.claim_run(run.pk, "worker-a"), round_s=120) == "done"

    events = EventAccumulator(str(tmp_path / "tb" / f"run-{run.pk}"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("loss")}
    charted = {m.step: m.values["loss"] for m in TrainingMetric.objects.filter(run=run)}
    assert charted and logged.keys() == charted.keys()  # every 25 steps, the same steps as the console
    assert all(logged[s] == pytest.approx(charted[s], rel=1e-6) for s in charted)
    assert "sample_load_share" in events.Tags()["scalars"] and "online_fraction" in events.Tags()["scalars"]


def test_no_directory_no_events(payload_dir, checkpoint_dir, settings, tmp_path):
    settings.SOP_TENSORBOARD_DIR = ""
    task = Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"], max_steps=100)
    call_command("collect_demos", "--tasks", "reach", "--episodes", "1", "--workers", "1", "--image-size", "16")
    run = services.start_run("bc", [task], preset="debug", from_scratch=True, total_steps=30, enqueue=False,
                             overrides={"checkpoint_every_steps": 1000})
    assert services.run_round(services.claim_run(run.pk, "worker-a"), round_s=120) == "done"
    assert TrainingMetric.objects.filter(run=run).exists() and not list(tmp_path.rglob("events.out.tfevents*"))
