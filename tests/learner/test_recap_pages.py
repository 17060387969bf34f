"""RECAP in the console: the run page's value loss / positive-advantage share, and the episode page's value plot.

``/episodes/<id>/value.json`` answers 200 for every existing episode; ``available`` says whether there are values.
Without a value function (or without stored frames) it is ``{"available": false, "reason": ..., "message": ...}``.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from learner import services
from learner.algorithms import build_algorithm
from learner.buffer import FrameIndex
from learner.config import get_preset
from learner.models import TrainingMetric, TrainingRun
from learner.pages import NO_VALUE_MESSAGE, render_episode_value
from learner.policy import build_policy
from learner.trainer import Trainer
from learner.value import ValueFunction, save_value
from robots import fleet
from robots.episode_file import EpisodeReader
from robots.models import Episode, InterventionSegment, Robot, Task

from .conftest import OPERATOR, FakeEmbedder, make_episode

pytestmark = pytest.mark.django_db
torch.set_num_threads(1)


@pytest.fixture
def viewer(django_user_model):
    return django_user_model.objects.create_user("dave", password="dave-password-1")


@pytest.fixture
def dirs(settings, tmp_path):
    settings.DATA_DIR = tmp_path
    settings.PAYLOAD_DIR = tmp_path / "payloads"
    settings.CHECKPOINT_DIR = tmp_path / "checkpoints"
    return tmp_path


@pytest.fixture
def task(db):
    return Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the target"], max_steps=20)


def _stored(task, outcome="success", steps=9, segments=((3, 5, OPERATOR),)):
    """A verified episode row with a real (tiny, 16x16) payload file."""
    rel = f"episodes/{outcome}-{Episode.objects.count()}.h5"
    (settings.PAYLOAD_DIR / "episodes").mkdir(parents=True, exist_ok=True)
    path = make_episode(settings.PAYLOAD_DIR / rel, task=task.name, split="online", steps=steps, outcome=outcome,
                        segments=segments, seed=Episode.objects.count())
    robot = Robot.objects.first() or fleet.register_robot("sim-01")[0]
    ep = Episode.objects.create(robot=robot, task=task, prompt=f"{task.name} the target", split="online", steps=steps,
                                outcome=outcome, status=Episode.Status.VERIFIED, started_at=timezone.now(), payload_path=rel, control_hz=30.0,
                                payload_sha256="cd" * 32, payload_size=path.stat().st_size)
    for start, end, _ in segments:
        InterventionSegment.objects.create(episode=ep, start_step=start, end_step=end, source="operator")
    return ep


def _pretrained_value(task, name="value-reach.safetensors"):
    """A tiny value function saved the way ``manage.py pretrain_value`` saves it (learner.value.save_value)."""
    value = ValueFunction(get_preset("debug").policy, get_preset("debug").train.value_bins)
    value.net.prompts._embedder = FakeEmbedder()
    value.prompts.ensure([f"{task.name} the target"])
    return save_value(settings.CHECKPOINT_DIR / "value" / name, value,
                      {"c_fail": 1.0, "task_max_steps": {task.name: task.max_steps}, "tasks": [task.name]})


def test_the_run_metrics_of_a_recap_run_carry_the_value_loss_and_positive_share(client, viewer, task):
    run = TrainingRun.objects.create(algorithm="recap", status=TrainingRun.Status.RUNNING, step=75, total_steps=100,
                                     config={"train": {"positive_share": 0.4}})
    run.tasks.set([task])
    TrainingMetric.objects.create(run=run, step=25, values={"loss": 1.0, "value_loss": 3.0, "positive_share": None,
                                                            "tasks": {"reach": {"loss_online": 1.0}}})
    TrainingMetric.objects.create(run=run, step=50, values={"loss": 0.9, "value_loss": None,
                                                            "positive_share": {"reach": 0.45},
                                                            "tasks": {"reach": {"loss_online": 0.9}}})
    TrainingMetric.objects.create(run=run, step=75, values={  # only under tasks[task] (metrics()["tasks"])
        "loss": 0.8, "tasks": {"reach": {"loss_online": 0.8, "positive_share": 0.5}}})
    client.force_login(viewer)
    d = client.get(reverse("training_run_metrics", args=[run.pk])).json()
    assert d["algorithm"] == "recap" and d["steps"] == [25, 50, 75]
    assert d["value_loss"] == [3.0, None, None]
    assert d["positive_share"] == {"reach": [None, 0.45, 0.5]}
    page = client.get(reverse("training_run", args=[run.pk])).content.decode()
    assert 'id="chart-value-loss"' in page and 'id="chart-positive"' in page and 'data-target="0.4"' in page


def test_other_runs_look_as_before(client, viewer, task):
    run = TrainingRun.objects.create(algorithm="hg_dagger", status=TrainingRun.Status.RUNNING, total_steps=100)
    TrainingMetric.objects.create(run=run, step=25, values={"loss": 1.0, "tasks": {}})
    client.force_login(viewer)
    d = client.get(reverse("training_run_metrics", args=[run.pk])).json()
    assert "value_loss" not in d and "positive_share" not in d
    assert "chart-value-loss" not in client.get(reverse("training_run", args=[run.pk])).content.decode()


def test_value_json_needs_a_login_and_an_episode(client, viewer, dirs, task):
    ep = _stored(task)
    url = reverse("episode_value", args=[ep.pk])
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    client.force_login(viewer)
    assert client.get(reverse("episode_value", args=["00000000-0000-0000-0000-000000000000"])).status_code == 404


def test_without_a_value_function_value_json_says_so(client, viewer, dirs, task):
    ep = _stored(task)
    client.force_login(viewer)
    d = client.get(reverse("episode_value", args=[ep.pk])).json()
    assert d == {"available": False, "reason": "no_value_function", "message": NO_VALUE_MESSAGE}
    page = client.get(reverse("episode", args=[ep.pk])).content.decode()
    assert reverse("episode_value", args=[ep.pk]) in page and 'id="episode-segments"' in page
    # an episode without stored frames has no values either
    Episode.objects.filter(pk=ep.pk).update(status=Episode.Status.UPLOADING)
    assert client.get(reverse("episode_value", args=[ep.pk])).json()["reason"] == "no_frames"


def value_json(client, episode) -> dict:
    """The value plot as the episode page gets it: first the background job's progress (nobody waits for the value
    network in a request), then, once the job ran (here in-process, as the Celery task does), the values."""
    url = reverse("episode_value", args=[episode.pk])
    first = client.get(url).json()
    if first.get("reason") != "rendering":
        return first
    assert (first["available"], first["state"], first["progress"]) == (False, "queued", 0.0)
    assert render_episode_value(str(episode.pk)) == "done"
    return client.get(url).json()


def test_value_json_with_a_pretrained_value_function(client, viewer, dirs, task):
    ok, bad = _stored(task, "success", steps=9), _stored(task, "failure", steps=7)
    path = _pretrained_value(task)
    client.force_login(viewer)
    d = value_json(client, ok)
    assert d["available"] and d["steps"] == 9 and len(d["values"]) == 9
    assert all(-1.0 <= v <= 0.0 for v in d["values"])
    assert d["source"] == {"kind": "pretrained", "run": None, "label": f"pretrained {path.name}", "file": path.name}
    # the return-to-go (M = the task's 20 steps, c_fail 1 -> S = 40): success ends at 0
    assert d["returns"][-1] == 0.0 and d["returns"][0] == pytest.approx(-8 / 40)
    assert value_json(client, bad)["returns"][-1] == pytest.approx(-20 / 40)
    # cached on disk, atomically, keyed by the episode and the value function
    cached = list((dirs / "values").glob(f"{ok.pk}-*.json"))
    assert len(cached) == 1 and not list((dirs / "values").glob("*.part"))
    again = client.get(reverse("episode_value", args=[ok.pk])).json()
    assert again["cached"] and again["values"] == d["values"]
    # a newer value file is another value function: computed afresh
    _pretrained_value(task, "value-reach-2.safetensors")
    os.utime(settings.CHECKPOINT_DIR / "value" / "value-reach-2.safetensors", (2e9, 2e9))
    assert client.get(reverse("episode_value", args=[ok.pk])).json()["reason"] == "rendering"
    newer = value_json(client, ok)
    assert newer["available"] and newer["source"]["file"] == "value-reach-2.safetensors"


def test_value_json_uses_a_recap_runs_value_network(client, viewer, dirs, task):
    ep = _stored(task, steps=8)
    config = dataclasses.replace(get_preset("debug").train, algorithm="recap",
                                 task_max_steps=((task.name, task.max_steps),))
    index = FrameIndex(horizon=2)
    index.add_episode(settings.PAYLOAD_DIR / ep.payload_path)
    run = TrainingRun.objects.create(algorithm="recap", status=TrainingRun.Status.RUNNING, total_steps=100)
    trainer = Trainer(config, index, build_policy(get_preset("debug").policy, FakeEmbedder(), seed=0),
                      build_algorithm(config))
    trainer.run(3)  # value_pretrain_steps = 2: V is ready
    state = services.trainer_state_path(run)
    trainer.save_state(state)
    client.force_login(viewer)
    d = value_json(client, ep)
    assert d["available"] and d["source"]["kind"] == "run" and d["source"]["run"] == run.pk
    with EpisodeReader(settings.PAYLOAD_DIR / ep.payload_path) as reader:
        expected = trainer.algorithm.value.predict(reader.column("observation/image"),
                                                   reader.column("observation/state"), f"{task.name} the target")
    np.testing.assert_allclose(d["values"], expected, atol=1e-4)
    index.close()

