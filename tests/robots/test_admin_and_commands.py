"""The admin and the management commands: the operator's doors into the same services."""

import pytest
from django.core.management import CommandError, call_command

from robots import auth, catalog
from robots.models import AuditEvent, Robot, Task

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.mark.parametrize("model", ["robot", "task", "taskassignment", "episode", "auditevent"])
def test_every_model_has_an_admin_page(admin_client, robot, task, model):
    assert admin_client.get(f"/admin/robots/{model}/").status_code == 200


def test_the_admin_never_shows_a_token_hash(admin_client, robot):
    robot, _ = robot
    page = admin_client.get(f"/admin/robots/robot/{robot.pk}/change/").content.decode()
    assert robot.token_prefix in page and robot.token_hash not in page


def test_the_admin_revokes_tokens(admin_client, robot, admin_user):
    robot, token = robot
    reply = admin_client.post("/admin/robots/robot/", {"action": "revoke_token", "_selected_action": [robot.pk]})
    assert reply.status_code == 302
    assert auth.authenticate_token(token) is None
    assert AuditEvent.objects.get(action="robot.token_revoked").actor == admin_user


def test_episodes_and_the_audit_log_are_read_only_in_the_admin(admin_client):
    assert admin_client.get("/admin/robots/episode/add/").status_code == 403
    assert admin_client.get("/admin/robots/auditevent/add/").status_code == 403


def test_add_robot_prints_the_token_once_with_an_agent_hint(capsys):
    call_command("add_robot", "sim-07")
    out = capsys.readouterr().out
    token = next(word for word in out.split() if word.startswith("sop_"))
    assert auth.authenticate_token(token) == Robot.objects.get(name="sim-07")
    assert f"python -m robots.agent --server http://127.0.0.1:8000 --token {token}" in out


def test_add_robot_rotates_an_existing_robot_only_when_asked(capsys):
    call_command("add_robot", "sim-07")
    with pytest.raises(CommandError, match="--rotate"):
        call_command("add_robot", "sim-07")
    call_command("add_robot", "sim-07", "--rotate")
    assert Robot.objects.count() == 1
    with pytest.raises(CommandError, match="invalid robot name"):
        call_command("add_robot", "Bad Name")


def test_revoke_robot_revokes(robot):
    robot, token = robot
    call_command("revoke_robot", "sim-01")
    assert auth.authenticate_token(token) is None
    with pytest.raises(CommandError):
        call_command("revoke_robot", "nobody")


def test_add_tasks_loads_the_catalog_idempotently():
    call_command("add_tasks", "--all")
    Task.objects.filter(name="reach").update(enabled=False, prompts=["old"])
    call_command("add_tasks", "--all")
    assert Task.objects.count() == 10
    reach = Task.objects.get(name="reach")
    prompts = list(catalog.CATALOG["reach"].prompts)
    assert (reach.enabled, reach.prompts, reach.env_id, reach.max_steps) == (False, prompts, "reach-v3", 150)


def test_add_tasks_takes_names_or_env_ids():
    call_command("add_tasks", "drawer-open", "window-close-v3")
    assert sorted(Task.objects.values_list("name", flat=True)) == ["drawer-open", "window-close"]
    with pytest.raises(CommandError, match="juggle"):
        call_command("add_tasks", "juggle")
    with pytest.raises(CommandError):
        call_command("add_tasks")


def test_the_catalog_is_meta_world_mt10():
    assert len(catalog.MT10) == 10
    for spec in catalog.MT10:
        assert spec.env_id == f"{spec.name}-v3" and 2 <= len(spec.prompts) <= 3 and spec.max_steps == 150
        Task(name=spec.name, env_id=spec.env_id).full_clean(exclude=["prompts", "description"])
