"""Publishing checkpoints (Django side): versions, deployment, the robots' download endpoint, operator API."""

from __future__ import annotations

import hashlib

import pytest
from django.test import Client

from learner import services
from learner.models import Checkpoint, Deployment
from robots import protocol
from robots import fleet

pytestmark = pytest.mark.django_db

@pytest.fixture
def robot_client(db):
    robot, token = fleet.register_robot("arm-1")
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")

def test_versions_are_contiguous_and_the_fleet_runs_the_newest(trainer, checkpoint_dir, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        first = services.publish_checkpoint(None, trainer)
        trainer.train_step()
        second = services.publish_checkpoint(None, trainer)
    assert (first.version, second.version) == (1, 2)
    assert services.current_checkpoint() == second
    assert len(callbacks) == 2, "each deployment is announced to the fleet after commit"
    path = checkpoint_dir / second.path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == second.sha256 and path.stat().st_size == second.size
    message = services.current_policy_message()
    assert isinstance(message, protocol.PolicyUpdated) and message.version == 2 and message.sha256 == second.sha256

def test_an_orphaned_file_from_a_dead_worker_does_not_take_a_version(trainer, checkpoint_dir):
    checkpoint_dir.mkdir(parents=True)
    (checkpoint_dir / "policy-v1.safetensors").write_bytes(b"half-written by a worker that died")
    published = services.publish_checkpoint(None, trainer)
    assert published.version == 1
    assert Checkpoint.objects.count() == 1

def test_rolling_back_makes_an_older_checkpoint_current(trainer, checkpoint_dir, admin_user):
    first = services.publish_checkpoint(None, trainer)
    services.publish_checkpoint(None, trainer)
    services.deploy_checkpoint(first, admin_user, reason="v2 drops things")
    assert services.current_checkpoint() == first
    assert Deployment.objects.count() == 3

def test_robots_download_published_weights_with_their_token(trainer, checkpoint_dir, robot_client, operator):
    cp = services.publish_checkpoint(None, trainer)
    resp = robot_client.get(f"/api/robot/checkpoints/{cp.version}")
    assert resp.status_code == 200
    assert hashlib.sha256(b"".join(resp.streaming_content)).hexdigest() == cp.sha256

    assert robot_client.get("/api/robot/checkpoints/99").status_code == 404
    assert Client().get(f"/api/robot/checkpoints/{cp.version}").status_code == 401
    browser = Client()
    browser.force_login(operator)
    assert browser.get(f"/api/robot/checkpoints/{cp.version}").status_code in (401, 403)

def test_only_administrators_start_runs(operator, admin_user, db):
    from robots.models import Task

    Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"])
    body = {"algorithm": "hg_dagger", "tasks": ["reach"], "preset": "debug"}
    client = Client()
    client.force_login(operator)
    assert client.post("/api/runs/", body, content_type="application/json").status_code == 403
    client.force_login(admin_user)
    resp = client.post("/api/runs/", body, content_type="application/json")
    assert resp.status_code == 201 and resp.json()["status"] == "queued"
    bad = client.post("/api/runs/", {**body, "algorithm": "nope"}, content_type="application/json")
    assert bad.status_code == 400 and "unknown algorithm" in bad.json()["detail"]

def test_stopping_a_queued_run_stops_it_at_once(db, admin_user):
    from robots.models import Task

    task = Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"])
    run = services.start_run("bc", [task], preset="debug", enqueue=False)
    assert services.stop_run(run, admin_user).status == "stopped"
    assert services.claim_run(run.pk, "w") is None, "a stopped run is never claimed"

def test_a_claimed_run_cannot_be_claimed_twice(db):
    from robots.models import Task

    task = Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"])
    run = services.start_run("bc", [task], preset="debug", enqueue=False)
    assert services.claim_run(run.pk, "worker-a") is not None
    assert services.claim_run(run.pk, "worker-b") is None

def test_a_run_can_ask_for_a_moving_average_of_its_weights(db):
    from robots.models import Task

    Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach"], max_steps=50)
    plain = services.start_run("hg_dagger", ["reach"], enqueue=False)
    averaged = services.start_run("hg_dagger", ["reach"], overrides={"ema_decay": 0.999}, enqueue=False)
    assert plain.config["train"]["ema_decay"] == 0.0
    assert averaged.config["train"]["ema_decay"] == 0.999
    with pytest.raises(services.LearnerError, match="ema_decay"):
        services.start_run("hg_dagger", ["reach"], overrides={"ema_decay": 1.0}, enqueue=False)
