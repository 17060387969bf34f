"""Console roles: groups from the migration, role_of / can_operate / is_admin, DRF permissions, add_user."""

import io

import pytest
from django.contrib.auth.models import AnonymousUser, Group
from django.core.management import CommandError, call_command
from rest_framework.test import APIRequestFactory

from robots import roles
from robots.auth import RobotIdentity
from robots.models import Robot

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
    assert client.login(username="grace", password="a-long-enough-password-9")
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
