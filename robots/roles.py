"""Console roles (docs/console.md, "Roles"): Django groups ``viewer``, ``operator`` and ``admin``.

- viewer: watches video and state (a logged-in user in no role group is a viewer);
- operator: also takes over, teleoperates, e-stops and labels;
- admin: also manages tasks, robots, training, rollbacks and may force a takeover. Superusers and staff count as admin.

``role_of`` reads the user's groups from the database on every call, so a role change applies at the next check.
The DRF permission classes below are for API views; robot tokens never pass them.
"""

from __future__ import annotations

from typing import Optional

from rest_framework import permissions

VIEWER = "viewer"
OPERATOR = "operator"
ADMIN = "admin"
ROLES = (VIEWER, OPERATOR, ADMIN)  # from least to most privileged


def _is_console_user(user) -> bool:
    # A robot identity (robots.auth.RobotIdentity) has no pk: it is never a console user.
    return bool(user is not None and getattr(user, "is_authenticated", False) and getattr(user, "is_active", False)
                and getattr(user, "pk", None) is not None)


def role_of(user) -> Optional[str]:
    """``admin``, ``operator`` or ``viewer`` for a logged-in, active user; None for anyone else."""
    if not _is_console_user(user):
        return None
    if user.is_superuser or user.is_staff:
        return ADMIN
    names = set(user.groups.filter(name__in=(OPERATOR, ADMIN)).values_list("name", flat=True))
    if ADMIN in names:
        return ADMIN
    if OPERATOR in names:
        return OPERATOR
    return VIEWER


def can_operate(user) -> bool:
    """Take over, teleoperate, e-stop, label: operators and admins."""
    return role_of(user) in (OPERATOR, ADMIN)


def is_admin(user) -> bool:
    return role_of(user) == ADMIN


def ensure_groups():
    """The three role groups (the migration creates them; this is for code paths that run without it)."""
    from django.contrib.auth.models import Group

    return {name: Group.objects.get_or_create(name=name)[0] for name in ROLES}


def set_role(user, role: str) -> None:
    """Put the user in exactly one role group. ``admin`` also sets ``is_staff`` (the Django admin needs it) and gives
    the admin group every model permission, so that a non-superuser admin can use the Django admin."""
    from django.contrib.auth.models import Permission

    if role not in ROLES:
        raise ValueError(f"role must be one of {list(ROLES)}, not {role!r}")
    groups = ensure_groups()
    user.groups.remove(*[g for name, g in groups.items() if name != role])
    user.groups.add(groups[role])
    if role == ADMIN:
        groups[ADMIN].permissions.set(Permission.objects.all())
        if not user.is_staff:
            user.is_staff = True
            user.save(update_fields=["is_staff"])
    elif user.is_staff and not user.is_superuser:
        user.is_staff = False  # staff counts as admin: a demoted user must lose it
        user.save(update_fields=["is_staff"])


# ---------------------------------------------------------------- DRF permissions


def _api_user(request):
    from .models import Robot

    if isinstance(getattr(request, "auth", None), Robot):
        return None  # a robot token is never a console user
    return getattr(request, "user", None)


class IsViewer(permissions.BasePermission):
    """Any logged-in console user (every role), any method. Use for read-only views."""

    def has_permission(self, request, view):
        return role_of(_api_user(request)) is not None


class CanOperate(permissions.BasePermission):
    """Operators and admins."""

    def has_permission(self, request, view):
        return can_operate(_api_user(request))


class IsConsoleAdmin(permissions.BasePermission):
    """Admins (admin group, staff or superuser)."""

    def has_permission(self, request, view):
        return is_admin(_api_user(request))


class CanOperateOrReadOnly(permissions.BasePermission):
    """Every role reads (GET/HEAD/OPTIONS); operators and admins write. Viewers get 403 on writes."""

    def has_permission(self, request, view):
        user = _api_user(request)
        if request.method in permissions.SAFE_METHODS:
            return role_of(user) is not None
        return can_operate(user)


class IsConsoleAdminOrReadOnly(permissions.BasePermission):
    """Every role reads; only admins write (tasks, robots, training, rollbacks)."""

    def has_permission(self, request, view):
        user = _api_user(request)
        if request.method in permissions.SAFE_METHODS:
            return role_of(user) is not None
        return is_admin(user)
