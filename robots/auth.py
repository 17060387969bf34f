"""Per-robot tokens: ``sop_`` + 43 random URL-safe characters, stored only as a sha256 hash; revocable.

One door for each transport: ``RobotTokenAuthentication`` for the HTTP data plane (``Authorization: Bearer``),
``token_from_scope`` for the robot websocket. Both end in ``authenticate_token``.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Optional

from rest_framework import authentication, exceptions, permissions

from . import hotsql
from .models import ApiToken, Robot

TOKEN_PREFIX = "sop_"
USER_TOKEN_PREFIX = "sopu_"  # a person's API token; never starts with TOKEN_PREFIX, so the two never mix
SHOWN_PREFIX_CHARS = 12  # "sop_" + 8 random characters: tells tokens apart in the admin, useless to an attacker
MAX_TOKEN_CHARS = 200


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(raw: str) -> str:
    # A plain sha256 is enough: tokens carry 256 random bits, so there is nothing for a slow hash to protect.
    return hashlib.sha256(raw.encode()).hexdigest()


def shown_prefix(raw: str) -> str:
    return raw[:SHOWN_PREFIX_CHARS]


def authenticate_token(raw: Optional[str]) -> Optional[Robot]:
    """The robot holding this token, or None for an unknown, malformed or revoked token."""
    if not raw or not raw.startswith(TOKEN_PREFIX) or len(raw) > MAX_TOKEN_CHARS:
        return None
    # Revocation clears token_hash, so a revoked token can never match; revoked_at is checked as a second lock.
    # Plain SQL: every robot request and socket starts here (robots/hotsql.py says why).
    return hotsql.one(Robot, "token_hash = %s AND revoked_at IS NULL", [hash_token(raw)])


def token_from_scope(scope) -> Optional[str]:
    """The bearer token of a websocket handshake (``Authorization: Bearer <token>``), or None.

    Only the header counts: a token in the URL would end up in access logs.
    """
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            return _bearer(value)
    return None


def _bearer(value: bytes) -> Optional[str]:
    parts = value.split()
    if len(parts) != 2 or parts[0].lower() != b"bearer":
        return None
    try:
        return parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None


class RobotIdentity:
    """What ``request.user`` is on robot endpoints: authenticated, but never a Django user, staff or superuser."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False

    def __init__(self, robot: Robot):
        self.robot = robot
        self.pk = None  # no Django user behind it

    def __str__(self):
        return f"robot:{self.robot.name}"


ROBOT_AUTH_HEADER = 'Bearer realm="robots"'  # WWW-Authenticate of a robot endpoint's 401


def robot_from_authorization(header) -> Robot:
    """The robot an ``Authorization`` header (bytes or str, as received) names; raises NotAuthenticated without one,
    AuthenticationFailed for a malformed, unknown or revoked token. Every robot HTTP request comes through here (the
    DRF views by RobotTokenAuthentication, the ingest route of robots/ingest_http.py directly)."""
    if isinstance(header, str):
        header = header.encode("latin-1")
    if not header:
        raise exceptions.NotAuthenticated()
    raw = _bearer(header)
    if raw is None:
        raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <robot token>'.")
    robot = authenticate_token(raw)
    if robot is None:
        raise exceptions.AuthenticationFailed("Unknown or revoked robot token.")
    return robot


class RobotTokenAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer sop_...``. Sets ``request.user`` to a RobotIdentity and ``request.auth`` to the Robot."""

    def authenticate(self, request):
        header = authentication.get_authorization_header(request)
        if not header:
            return None  # DRF answers NotAuthenticated (401) once every class had its say
        robot = robot_from_authorization(header)
        return RobotIdentity(robot), robot

    def authenticate_header(self, request):
        return ROBOT_AUTH_HEADER  # makes DRF answer 401 (not 403) without credentials


class IsRobot(permissions.BasePermission):
    """Only requests authenticated by a robot token."""

    def has_permission(self, request, view):
        return isinstance(request.auth, Robot)


class IsOperator(permissions.BasePermission):
    """A logged-in console user. A robot token never passes, even if robot auth were enabled on the view."""

    def has_permission(self, request, view):
        return bool(request.user and request.user.is_authenticated and request.user.is_active) and not isinstance(
            request.auth, Robot
        )


# ---------------------------------------------------------------- people's API tokens (scripts)


def generate_user_token() -> str:
    return USER_TOKEN_PREFIX + secrets.token_urlsafe(32)


def authenticate_user_token(raw: Optional[str]) -> Optional[ApiToken]:
    """The active token with this value (its user active too), or None."""
    if not raw or not raw.startswith(USER_TOKEN_PREFIX) or len(raw) > MAX_TOKEN_CHARS:
        return None
    token = ApiToken.objects.select_related("user").filter(token_hash=hash_token(raw), revoked_at__isnull=True).first()
    if token is None or not token.active or not token.user.is_active:
        return None
    return token


LAST_USED_EVERY_S = 60  # a token's last_used_at is written at most this often (not on every request)


class UserTokenAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer sopu_...``: a person's API token, acting with that person's role. Other bearer tokens
    (a robot's) are not this class's business: it returns None and the view's permission refuses them."""

    def authenticate(self, request):
        header = authentication.get_authorization_header(request)
        if not header:
            return None
        raw = _bearer(header)
        if raw is None or not raw.startswith(USER_TOKEN_PREFIX):
            return None
        token = authenticate_user_token(raw)
        if token is None:
            raise exceptions.AuthenticationFailed("Unknown, expired or revoked API token.")
        from django.utils import timezone

        now = timezone.now()
        if token.last_used_at is None or (now - token.last_used_at).total_seconds() > LAST_USED_EVERY_S:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user, token

    def authenticate_header(self, request):
        return 'Bearer realm="api"'
