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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-protocol server process (moto's), for SOP_STORAGE=s3: its endpoint URL."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("s3") / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/moto-api/", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the S3 server did not start (log: {log.name})")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)
    log.close()


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "sop-test", "AWS_SECRET_ACCESS_KEY": "sop-test-secret"}


@pytest.fixture
def s3_storage(s3_server, settings, monkeypatch):
    """SOP_STORAGE=s3 on a fresh bucket of the test S3 server: the settings a child process needs, as env vars."""
    import uuid

    import boto3

    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    bucket = f"sop-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="sop-test",
                 aws_secret_access_key="sop-test-secret").create_bucket(Bucket=bucket)
    env = {"SOP_STORAGE": "s3", "SOP_S3_BUCKET": bucket, "SOP_S3_ENDPOINT_URL": s3_server,
           "SOP_S3_REGION": "us-east-1"}
    settings.SOP_STORAGE, settings.SOP_S3_BUCKET = "s3", bucket
    settings.SOP_S3_ENDPOINT_URL, settings.SOP_S3_REGION = s3_server, "us-east-1"
    return {**env, **S3_CREDENTIALS}
