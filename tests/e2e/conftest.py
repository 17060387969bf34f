"""Real processes for end-to-end tests: a daphne server on the test database, robot agents, Celery workers.

The subprocesses share the pytest-django test database (tests that use them need ``transactional_db`` so their rows
are committed and visible), the data directory and the Redis of the test run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_database_url() -> str:
    """The URL of the database pytest-django created, for child processes."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgresql://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def child_env(**extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DATABASE_URL": test_database_url(),
           "SOP_DATA_DIR": str(settings.DATA_DIR), "REDIS_URL": settings.REDIS_URL}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Proc:
    """A child process with its output in a log file (shown when a test fails)."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}-{int(time.time() * 1000)}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait()
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait()
        self._log.close()

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2, procs: tuple = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            if not p.alive():
                raise AssertionError(f"{p.name} exited with {p.popen.returncode} while waiting for {what}:\n"
                                     f"{p.output()[-4000:]}")
        time.sleep(interval)
    tails = "\n".join(f"--- {p.name}:\n{p.output()[-3000:]}" for p in procs)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tails}")


def robot_socket(url: str, token: str):
    """A websocket to /ws/robots/ of the daphne at ``url``, authenticated by a robot token."""
    from websockets.sync.client import connect

    return connect(url.replace("http", "ws", 1) + "/ws/robots/", max_size=None, open_timeout=20,
                   additional_headers={"Authorization": f"Bearer {token}"})


def console_socket(url: str, user):
    """A websocket to /ws/console/ of the daphne at ``url``, logged in as ``user`` from the console's own origin; the
    server's ``hello`` is read."""
    import json

    from django.test import Client
    from websockets.sync.client import connect

    client = Client()
    client.force_login(user)
    ws = connect(url.replace("http", "ws", 1) + "/ws/console/", max_size=None, open_timeout=20, origin=url,
                 additional_headers={"Cookie": f"sessionid={client.cookies['sessionid'].value}"})
    assert json.loads(ws.recv(timeout=10))["type"] == "hello"
    return ws


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


class ProcessLauncher:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, cmd: list[str], **env) -> Proc:
        proc = Proc(name, cmd, child_env(**env), self.log_dir)
        self.procs.append(proc)
        return proc

    def server(self, port: int | None = None, host: str = "127.0.0.1", **env) -> tuple[Proc, str]:
        port = port or free_port()
        proc = self.start("daphne", [sys.executable, "-m", "daphne", "-b", host, "-p", str(port),
                                     "sop_web.asgi:application"], **env)
        url = f"http://{host}:{port}"
        wait_for(lambda: http_ok(f"{url}/healthz"), 60, "daphne /healthz", procs=(proc,))
        return proc, url

    def agent(self, name: str, server: str, token: str, spool: Path, *args: str) -> Proc:
        return self.start(name, [sys.executable, "-m", "robots.agent", "--server", server, "--spool", str(spool),
                                 *args], SOP_ROBOT_TOKEN=token)

    def worker(self, name: str = "worker", *args: str, **env) -> Proc:
        """A real Celery worker on the default and learner queues (``"-B"`` in args adds beat)."""
        schedule = self.log_dir / f"{name}-beat-schedule"
        return self.start(name, [sys.executable, "-m", "celery", "-A", "sop_web", "worker", "-l", "INFO",
                                 "--concurrency", "1", "-Q", "default,learner", "--without-heartbeat",
                                 "--without-gossip", "--without-mingle", "--schedule", str(schedule), *args], **env)

    def stop_all(self):
        for proc in reversed(self.procs):
            if proc.alive():
                proc.stop()


@pytest.fixture
def launcher(log_dir, transactional_db):
    # Jobs queued by earlier tests (whose rows are gone, and whose ids SQLite reuses) must not reach this test's workers.
    from sop_web.celery import app

    app.control.purge()
    launcher = ProcessLauncher(log_dir)
    yield launcher
    launcher.stop_all()
