"""The fixed cast shared by all tests, and the services they need.

Run through ``make test``, which points SOP_DATA_DIR at var/test so tests never share a database, payload store or
embedded Redis with a running demo.
"""

import pytest
from django.conf import settings

from sop_web import embedded


@pytest.fixture(scope="session", autouse=True)
def redis_server():
    """The real Redis the channel layer and Celery use: REDIS_URL if set (CI), else the embedded one."""
    proc = None
    if settings.EMBEDDED_REDIS:
        proc = embedded.start_redis(settings.DATA_DIR, settings.REDIS_SOCKET)
    yield settings.REDIS_URL
    embedded.stop(proc)


@pytest.fixture
def payload_dir(settings, tmp_path):
    """A fresh payload store per test."""
    settings.PAYLOAD_DIR = tmp_path / "payloads"
    return settings.PAYLOAD_DIR


@pytest.fixture
def operator(django_user_model):
    """Alice: a console operator."""
    return django_user_model.objects.create_user("alice", password="alice-password-1")


@pytest.fixture
def other_operator(django_user_model):
    """Bob: a second operator, used to check exclusivity and authorisation."""
    return django_user_model.objects.create_user("bob", password="bob-password-1")


@pytest.fixture
def admin_user(django_user_model):
    """Carol: an administrator."""
    return django_user_model.objects.create_superuser("carol", password="carol-password-1")
