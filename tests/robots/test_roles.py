"""Console roles: groups from the migration, role_of / can_operate / is_admin, DRF permissions, add_user."""

import io

import pytest
from django.contrib.auth.models import AnonymousUser, Group
from django.core.management import CommandError, call_command
from django.test import Client
from rest_framework.test import APIRequestFactory

from learner.models import TrainingRun

from robots import roles
from robots.auth import RobotIdentity
from robots.models import Robot, Task

pytestmark = pytest.mark.django_db


def test_the_migration_creates_the_role_groups():
    assert set(Group.objects.filter(name__in=roles.ROLES).values_list("name", flat=True)) == set(roles.ROLES)


def test_roles_of_users(operator, other_operator, admin_user, django_user_model):
    assert roles.role_of(operator) == roles.VIEWER  # logged in, in no group
    roles.set_role(operator, roles.OPERATOR)
    roles.set_role(other_operator, roles.ADMIN)
    staff = django_user_model.objects.create_user("erin", is_staff=True)
    inactive = django_user_model.objects.create_user("frank", is_active=False)
    roles.set_role(inactive, roles.ADMIN)
    cases = {operator: "operator", other_operator: "admin", admin_user: "admin", staff: "admin", inactive: None,
             AnonymousUser(): None, None: None, RobotIdentity(Robot(name="sim-01")): None}
    for user, role in cases.items():
        assert roles.role_of(user) == role, user
        assert roles.can_operate(user) == (role in ("operator", "admin"))
        assert roles.is_admin(user) == (role == "admin")


def test_set_role_keeps_one_role_group_and_staff_only_for_admins(operator):
    roles.set_role(operator, roles.ADMIN)
    operator.refresh_from_db()
    assert operator.is_staff and operator.has_perm("robots.view_episode")
    roles.set_role(operator, roles.OPERATOR)
    operator.refresh_from_db()
    assert not operator.is_staff
    assert list(operator.groups.values_list("name", flat=True)) == ["operator"]
    with pytest.raises(ValueError):
        roles.set_role(operator, "overlord")


@pytest.mark.parametrize("permission, method, allowed", [
    (roles.IsViewer, "get", {"viewer", "operator", "admin"}),
    (roles.IsViewer, "post", {"viewer", "operator", "admin"}),
    (roles.CanOperate, "get", {"operator", "admin"}),
    (roles.CanOperate, "post", {"operator", "admin"}),
    (roles.IsConsoleAdmin, "post", {"admin"}),
    (roles.CanOperateOrReadOnly, "get", {"viewer", "operator", "admin"}),
    (roles.CanOperateOrReadOnly, "post", {"operator", "admin"}),
    (roles.IsConsoleAdminOrReadOnly, "get", {"viewer", "operator", "admin"}),
    (roles.IsConsoleAdminOrReadOnly, "delete", {"admin"}),
])
def test_drf_permissions(django_user_model, robot, permission, method, allowed):
    users = {}
    for role in roles.ROLES:
        users[role] = django_user_model.objects.create_user(f"u-{role}")
        roles.set_role(users[role], role)
    request = getattr(APIRequestFactory(), method)("/api/x/")
    for role, user in users.items():
        request.user, request.auth = user, None
        assert permission().has_permission(request, None) == (role in allowed), role
    request.user, request.auth = AnonymousUser(), None
    assert not permission().has_permission(request, None)
    request.user, request.auth = RobotIdentity(robot[0]), robot[0]  # a robot token is never a console user
    assert not permission().has_permission(request, None)


def test_add_user_creates_a_user_with_a_role(monkeypatch, django_user_model, client):
    monkeypatch.setenv("NEW_PASSWORD", "a-long-enough-password-9")
    out = io.StringIO()
    call_command("add_user", "grace", "--role", "operator", "--password-env", "NEW_PASSWORD", stdout=out)
    assert "created, role operator" in out.getvalue()
    user = django_user_model.objects.get(username="grace")
    assert user.check_password("a-long-enough-password-9") and roles.role_of(user) == "operator"
    assert not user.is_staff
    call_command("add_user", "grace", "--role", "admin", stdout=io.StringIO())  # existing: role changes only
    user.refresh_from_db()
    assert roles.role_of(user) == "admin" and user.is_staff
    assert user.check_password("a-long-enough-password-9")
    # through the login page: axes (login throttling) needs the request, which Client.login() does not give
    login = client.post("/login/", {"username": "grace", "password": "a-long-enough-password-9"})
    assert login.status_code == 302 and client.session.get("_auth_user_id") == str(user.pk)
    assert client.get("/admin/robots/episode/").status_code == 200  # admin role: the Django admin works


def test_add_user_refuses_missing_or_weak_passwords(monkeypatch, django_user_model):
    with pytest.raises(CommandError, match="NOPE"):
        call_command("add_user", "heidi", "--role", "viewer", "--password-env", "NOPE")
    monkeypatch.setenv("WEAK", "123")
    with pytest.raises(CommandError, match="password refused"):
        call_command("add_user", "heidi", "--role", "viewer", "--password-env", "WEAK")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no terminal to prompt on
    with pytest.raises(CommandError, match="--password-env"):
        call_command("add_user", "heidi", "--role", "viewer")
    with pytest.raises(CommandError):
        call_command("add_user", "heidi", "--role", "overlord", "--password-env", "WEAK")
    assert not django_user_model.objects.filter(username="heidi").exists()


# ---------------------------------------------------------------- the training-run API follows the roles


@pytest.fixture
def run_users(django_user_model):
    """A user in the admin group who is not staff, staff in no group, an operator and a viewer."""
    group_admin = django_user_model.objects.create_user("ivan")
    group_admin.groups.add(roles.ensure_groups()[roles.ADMIN])
    staff = django_user_model.objects.create_user("judy", is_staff=True)
    op = django_user_model.objects.create_user("ken")
    roles.set_role(op, roles.OPERATOR)
    viewer = django_user_model.objects.create_user("lena")
    assert not group_admin.is_staff and roles.is_admin(group_admin) and roles.is_admin(staff)
    return {"group_admin": group_admin, "staff": staff, "operator": op, "viewer": viewer}


def _api(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize("who, allowed", [("group_admin", True), ("staff", True), ("operator", False),
                                          ("viewer", False)])
def test_starting_and_stopping_runs_follows_the_console_admin_role(run_users, who, allowed):
    Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"])
    client = _api(run_users[who])
    body = {"algorithm": "hg_dagger", "tasks": ["reach"], "preset": "debug"}
    started = client.post("/api/runs/", body, content_type="application/json")
    run = TrainingRun.objects.create(algorithm="bc")
    stopped = client.post(f"/api/runs/{run.pk}/stop")
    if allowed:
        assert started.status_code == 201 and started.json()["status"] == "queued"
        assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    else:
        assert (started.status_code, started.json()["code"]) == (403, "permission_denied")
        assert (stopped.status_code, stopped.json()["code"]) == (403, "permission_denied")
        assert TrainingRun.objects.count() == 1 and TrainingRun.objects.get().status == "queued"
    assert client.get("/api/runs/").status_code == 200  # every role reads the runs


def test_a_demoted_admin_loses_the_run_api(run_users):
    user = run_users["group_admin"]
    roles.set_role(user, roles.OPERATOR)
    run = TrainingRun.objects.create(algorithm="bc")
    assert _api(user).post(f"/api/runs/{run.pk}/stop").status_code == 403
