"""Login throttling (django-axes): a username + address pair is locked out after AXES_FAILURE_LIMIT failures."""

from __future__ import annotations

import datetime as dt

import pytest
from axes.models import AccessAttempt, AccessFailureLog
from django.conf import settings
from django.test import Client
from django.utils import timezone

pytestmark = pytest.mark.django_db

PASSWORD = "alice-password-1"  # tests/conftest.py's operator


def attempt(client: Client, password: str, username: str = "alice"):
    return client.post("/login/", {"username": username, "password": password})


def logged_in(client: Client) -> bool:
    return client.get("/api/robots/").status_code == 200


def test_the_defaults_lock_out_after_10_failures_for_15_minutes():
    assert settings.AXES_FAILURE_LIMIT == 10 and settings.AXES_COOLOFF_TIME == dt.timedelta(minutes=15)
    assert settings.AUTHENTICATION_BACKENDS[0] == "axes.backends.AxesStandaloneBackend"


def test_twelve_wrong_passwords_lock_the_right_one_out_with_a_clear_message(operator):
    client = Client()
    replies = [attempt(client, f"wrong-{i}") for i in range(12)]
    assert [r.status_code for r in replies[:9]] == [200] * 9  # the login page again: "Wrong username or password."
    assert b"Wrong username or password" in replies[0].content
    assert all(r.status_code == 429 for r in replies[9:])  # the 10th failure locks
    right = attempt(client, PASSWORD)
    assert right.status_code == 429 and not logged_in(client)
    page = right.content.decode()
    assert "Too many failed logins for alice" in page and "locked for 0:15:00" in page
    # audit: axes keeps the attempts and every failure
    record = AccessAttempt.objects.get(username="alice")
    assert record.failures_since_start >= 10 and record.ip_address == "127.0.0.1"
    assert AccessFailureLog.objects.filter(username="alice").count() >= 10


def test_the_lockout_is_per_address_and_ends_after_the_cool_off(operator):
    attacker = Client(REMOTE_ADDR="203.0.113.9")
    for i in range(10):
        attempt(attacker, f"wrong-{i}")
    assert attempt(attacker, PASSWORD).status_code == 429
    colleague = Client()  # the same user from another address is not locked out
    assert attempt(colleague, PASSWORD).status_code == 302 and logged_in(colleague)
    AccessAttempt.objects.filter(username="alice").update(attempt_time=timezone.now() - dt.timedelta(minutes=16))
    assert attempt(attacker, PASSWORD).status_code == 302 and logged_in(attacker)


def test_a_successful_login_resets_the_count(operator):
    client = Client()
    for i in range(9):
        attempt(client, f"wrong-{i}")
    assert attempt(client, PASSWORD).status_code == 302
    client.logout()
    for i in range(9):
        assert attempt(client, f"wrong-again-{i}").status_code == 200
    assert attempt(client, PASSWORD).status_code == 302
