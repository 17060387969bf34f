"""The training pages: runs (start, stop, live metrics) and checkpoints (evaluate, roll the fleet back)."""

from __future__ import annotations

import pytest
from django.urls import reverse

from learner import services
from learner.models import Checkpoint, Deployment, Evaluation, TrainingMetric, TrainingRun
from learner.pages import CONTINUOUS_STEPS
from robots import fleet
from robots.models import AuditEvent, Robot, Task
from robots.roles import set_role

pytestmark = pytest.mark.django_db


@pytest.fixture
def viewer(django_user_model):
    return django_user_model.objects.create_user("dave", password="dave-password-1")


@pytest.fixture
def op(operator):
    set_role(operator, "operator")
    return operator


@pytest.fixture
def tasks(db):
    return [Task.objects.create(name="drawer-open", env_id="drawer-open-v3", prompts=["open the drawer"]),
            Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"])]


def _checkpoint(version, run=None, parent=None):
    return Checkpoint.objects.create(version=version, run=run, parent=parent, algorithm="hg_dagger", step=100 * version,
                                     path=f"v{version:06d}.safetensors", size=1000, sha256="0" * 64)


@pytest.fixture
def checkpoints(tasks):
    run = TrainingRun.objects.create(algorithm="hg_dagger", status=TrainingRun.Status.RUNNING, step=250,
                                     total_steps=CONTINUOUS_STEPS, config={"train": {"batch_size": 64}})
    run.tasks.set(tasks)
    v1 = _checkpoint(1)
    v2 = _checkpoint(2, run, v1)
    v3 = _checkpoint(3, run, v2)
    services.deploy_checkpoint(v3, reason="published")
    return run, [v1, v2, v3]


def login(client, user):
    client.force_login(user)
    return client


def test_anonymous_users_are_sent_to_login(client, checkpoints):
    run, _ = checkpoints
    for url in (reverse("training"), reverse("training_run", args=[run.pk]),
                reverse("training_run_metrics", args=[run.pk])):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    for url in (reverse("training_start"), reverse("training_stop", args=[run.pk]),
                reverse("checkpoint_evaluate", args=[1]), reverse("checkpoint_rollback", args=[1])):
        response = client.post(url)
        assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_viewers_see_training_but_cannot_change_it(client, viewer, checkpoints, tasks):
    run, cps = checkpoints
    login(client, viewer)
    page = client.get(reverse("training")).content.decode()
    assert "Start a run" not in page and "Evaluate" not in page and "Roll the fleet back" not in page
    assert client.get(reverse("training_run", args=[run.pk])).status_code == 200
    assert client.post(reverse("training_start"), {"algorithm": "bc", "tasks": ["reach"], "preset": "default",
                                                   "mode": "continuous"}).status_code == 403
    assert client.post(reverse("training_stop", args=[run.pk])).status_code == 403
    assert client.post(reverse("checkpoint_evaluate", args=[2])).status_code == 403
    assert client.post(reverse("checkpoint_rollback", args=[1])).status_code == 403
    assert TrainingRun.objects.count() == 1 and services.current_checkpoint() == cps[2]
    assert not Evaluation.objects.exists()


def test_operators_evaluate_but_do_not_start_stop_or_roll_back(client, op, checkpoints):
    run, cps = checkpoints
    login(client, op)
    page = client.get(reverse("training")).content.decode()
    assert "Evaluate" in page and "Start a run" not in page and "Roll the fleet back" not in page
    assert client.post(reverse("training_start"), {"algorithm": "bc", "tasks": ["reach"], "preset": "default",
                                                   "mode": "continuous"}).status_code == 403
    assert client.post(reverse("training_stop", args=[run.pk])).status_code == 403
    assert client.post(reverse("checkpoint_rollback", args=[1])).status_code == 403
    response = client.post(reverse("checkpoint_evaluate", args=[2]), {"next": "/training/runs/1/"})
    assert response.status_code == 302 and response["Location"] == "/training/runs/1/"
    evaluations = Evaluation.objects.filter(checkpoint=cps[1])
    assert {e.task.name for e in evaluations} == {"drawer-open", "reach"}
    assert {e.status for e in evaluations} == {"queued"}
    assert AuditEvent.objects.get(action="evaluation.requested").detail == {"version": 2, "tasks": ["drawer-open", "reach"]}
    page = client.get(reverse("training")).content.decode()
    assert "<em>queued</em>" in page
    # an external redirect target is ignored
    response = client.post(reverse("checkpoint_evaluate", args=[2]), {"next": "//evil.example/"})
    assert response["Location"] == reverse("training")


def test_admin_starts_a_continuous_run(client, admin_user, tasks, checkpoints):
    login(client, admin_user)
    response = client.post(reverse("training_start"), {"algorithm": "hg_dagger", "tasks": ["reach"],
                                                       "preset": "default", "mode": "continuous"})
    assert response.status_code == 302
    run = TrainingRun.objects.order_by("-pk").first()
    assert response["Location"] == reverse("training_run", args=[run.pk])
    assert run.algorithm == "hg_dagger" and run.total_steps == CONTINUOUS_STEPS and run.created_by == admin_user
    assert [t.name for t in run.tasks.all()] == ["reach"] and run.base_checkpoint.version == 3
    assert AuditEvent.objects.filter(action="training.started", detail__run=run.pk).exists()


def test_admin_starts_a_fixed_run_from_scratch(client, admin_user, tasks):
    login(client, admin_user)
    response = client.post(reverse("training_start"), {"algorithm": "bc", "tasks": ["reach", "drawer-open"],
                                                       "preset": "debug", "mode": "steps", "steps": "40",
                                                       "from_scratch": "on"})
    assert response.status_code == 302
    run = TrainingRun.objects.get()
    assert (run.algorithm, run.preset, run.total_steps, run.base_checkpoint) == ("bc", "debug", 40, None)
    assert run.config["train"]["steps"] == 40


def test_start_form_errors_are_shown(client, admin_user, tasks):
    login(client, admin_user)
    response = client.post(reverse("training_start"), {"algorithm": "bc", "preset": "default", "mode": "steps"})
    assert response.status_code == 400
    page = response.content.decode()
    assert "This field is required" in page and "Give the number of learner steps" in page
    response = client.post(reverse("training_start"), {"algorithm": "nope", "tasks": ["reach"], "preset": "default",
                                                       "mode": "continuous"})
    assert response.status_code == 400 and "Select a valid choice" in response.content.decode()
    assert not TrainingRun.objects.exists()


def test_admin_stops_runs(client, admin_user, checkpoints, tasks):
    running, _ = checkpoints
    queued = services.start_run("bc", ["reach"], user=admin_user, enqueue=False)
    login(client, admin_user)
    response = client.post(reverse("training_stop", args=[queued.pk]), {"next": reverse("training")})
    assert response.status_code == 302 and response["Location"] == reverse("training")
    queued.refresh_from_db()
    assert queued.status == "stopped"
    response = client.post(reverse("training_stop", args=[running.pk]))
    assert response["Location"] == reverse("training_run", args=[running.pk])
    running.refresh_from_db()
    assert running.status == "stopping"
    assert AuditEvent.objects.filter(action="training.stopped").count() == 2
    assert client.post(reverse("training_stop", args=[9999])).status_code == 404


def test_admin_rolls_the_fleet_back(client, admin_user, checkpoints):
    _, (v1, v2, v3) = checkpoints
    robot, _ = fleet.register_robot("sim-01")
    Robot.objects.filter(pk=robot.pk).update(policy_version=3)
    login(client, admin_user)
    page = client.get(reverse("training")).content.decode()
    assert "Roll the fleet back to this version" in page and "data-confirm=" in page
    row = page.split("<td><strong>v3</strong>")[1].split("</tr>")[0]
    assert "deployed" in row and "sim-01" in row
    response = client.post(reverse("checkpoint_rollback", args=[1]), {"reason": "v3 drops the drawer"})
    assert response.status_code == 302
    assert services.current_checkpoint() == v1
    deployment = Deployment.objects.first()
    assert deployment.by == admin_user and deployment.reason == "v3 drops the drawer"
    event = AuditEvent.objects.get(action="rollback")
    assert event.actor == admin_user and event.detail == {"from": 3, "to": 1, "reason": "v3 drops the drawer"}
    page = client.get(reverse("training")).content.decode()
    assert "deployed" in page.split("<td><strong>v1</strong>")[1].split("</tr>")[0]
    assert client.post(reverse("checkpoint_rollback", args=[99])).status_code == 404


def test_run_metrics_json(client, viewer, checkpoints):
    run, _ = checkpoints
    for step in (25, 50, 75):
        TrainingMetric.objects.create(run=run, step=step, values={
            "loss": 1.0 / step, "online_fraction": 0.5,
            "tasks": {"reach": {"loss_online": 0.1 * step, "loss_offline": None, "w_on": 0.6}}})
    data = login(client, viewer).get(reverse("training_run_metrics", args=[run.pk])).json()
    assert data["status"] == "running" and data["continuous"] is True and data["step"] == 250
    assert data["steps"] == [25, 50, 75] and data["loss"] == [1 / 25, 1 / 50, 1 / 75]
    assert data["tasks"]["reach"]["loss_online"] == [2.5, 5.0, 7.5]
    assert data["tasks"]["reach"]["loss_offline"] == [None, None, None]
    assert data["checkpoints"] == [{"version": 2, "step": 200}, {"version": 3, "step": 300}]
    page = client.get(reverse("training_run", args=[run.pk])).content.decode()
    assert reverse("training_run_metrics", args=[run.pk]) in page and "chart.umd.js" in page
    assert client.get(reverse("training_run_metrics", args=[999])).status_code == 404


def test_admin_starts_a_flow_policy_run_that_reads_two_cameras(client, admin_user, tasks, checkpoints):
    login(client, admin_user)
    page = client.get(reverse("training")).content.decode()
    assert 'value="flow_vla"' in page and "Cameras" in page
    response = client.post(reverse("training_start"), {"algorithm": "bc", "tasks": ["reach"], "preset": "debug",
                                                       "mode": "steps", "steps": "40", "from_scratch": "on",
                                                       "policy": "flow_vla", "cameras": "corner3, gripperPOV"})
    assert response.status_code == 302
    run = TrainingRun.objects.order_by("-pk").first()
    assert run.config["policy"]["name"] == "flow_vla" and run.config["policy"]["cameras"] == ["corner3", "gripperPOV"]
    # fine-tuning keeps the deployed checkpoint's cameras (it read the primary only): other cameras start from scratch
    response = client.post(reverse("training_start"), {"algorithm": "hg_dagger", "tasks": ["reach"],
                                                       "preset": "default", "mode": "continuous",
                                                       "cameras": "gripperPOV"})
    assert response.status_code == 400 and "starts from scratch" in response.content.decode()
    response = client.post(reverse("training_start"), {"algorithm": "hg_dagger", "tasks": ["reach"],
                                                       "preset": "default", "mode": "continuous", "cameras": "a/b"})
    assert response.status_code == 400 and "cameras must be" in response.content.decode()
