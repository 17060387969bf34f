"""Several web nodes behind a real nginx (docs/deploy.md): the same database and Redis channel layer, no stickiness.

- a console on node A takes over and e-stops a robot whose socket is on node B;
- through nginx: static files and checkpoint / MP4 downloads are sent by nginx (X-Accel-Redirect), never by Python,
  and the internal file locations cannot be asked for directly;
- a robot agent working through nginx has its upload chunks land on both nodes, survives the death of the node its
  socket was on (it reconnects through nginx to the other), and every episode it finished is verified exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request

import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import Client

from learner.models import Checkpoint, TrainingRun
from robots import fleet
from robots.models import ControlLease, Episode, Robot, Task, TaskAssignment
from robots.pages import video_path
from robots.roles import OPERATOR, set_role

from .conftest import console_socket, free_port, http_ok, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FAST = ("--hz", "20", "--image-size", "64", "--no-video")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
# the tests' data lives under private temp directories: nginx's workers read it as the user running the test
NGINX_USER = ("--user", "root") if os.geteuid() == 0 else ()


def require_nginx() -> None:
    if os.path.exists(NGINX):
        return
    why = "nginx is not installed (apt-get install nginx-core)"
    if os.environ.get("SOP_REQUIRE_PROXY") == "1":
        pytest.fail(f"SOP_REQUIRE_PROXY=1 but {why}")
    pytest.skip(why)


@pytest.fixture
def short_task():
    task = Task.objects.create(name="drawer-close", env_id="drawer-close-v3", prompts=["close the drawer"], max_steps=40)
    TaskAssignment.objects.create(robot=None, task=task)
    return task


class Node:
    """One daphne web node with its own access log (which requests reached it)."""

    def __init__(self, launcher, name: str, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_log = launcher.log_dir / f"{name}-access.log"
        self.proc = launcher.start(name, [sys.executable, "-m", "daphne", "--proxy-headers", "--access-log",
                                          str(self.access_log), "-b", "127.0.0.1", "-p", str(self.port),
                                          "sop_web.asgi:application"], **env)
        wait_for(lambda: http_ok(f"{self.url}/healthz"), 60, f"{name} /healthz", procs=(self.proc,))

    def requests(self, needle: str) -> int:
        return sum(needle in line for line in self.access_log.read_text(errors="replace").splitlines()) \
            if self.access_log.exists() else 0


@pytest.fixture
def proxied(launcher, tmp_path):
    """Two web nodes (static files and downloads left to the proxy) and nginx in front of both."""
    require_nginx()
    env = dict(SOP_SERVE_STATIC="0", SOP_ACCEL_REDIRECT="1", SOP_MAX_UPLOAD_CHUNK_BYTES=str(64 * 1024))
    nodes = [Node(launcher, "web-a", **env), Node(launcher, "web-b", **env)]
    call_command("collectstatic", "--noinput", verbosity=0)
    port = free_port()
    conf = tmp_path / "nginx.conf"
    call_command("proxy_config", *NGINX_USER, "--listen", f"127.0.0.1:{port}", "--prefix", str(tmp_path / "nginx"),
                 "--output", str(conf), *[arg for n in nodes for arg in ("--node", f"127.0.0.1:{n.port}")])
    proxy = launcher.start("nginx", [NGINX, "-c", str(conf), "-g", "daemon off;"])
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: http_ok(f"{url}/healthz"), 30, "nginx in front of the nodes", procs=(proxy,))
    yield {"url": url, "nodes": nodes, "proxy": proxy, "log": tmp_path / "nginx" / "error.log"}


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=20) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def frames_until(ws, kind: str, timeout: float = 20, **match) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        frame = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        if frame["type"] == kind and all(frame.get(k) == v for k, v in match.items()):
            return frame


def test_a_console_on_node_a_drives_and_estops_a_robot_on_node_b(launcher, short_task, operator, tmp_path):
    set_role(operator, OPERATOR)
    node_a, node_b = Node(launcher, "web-a"), Node(launcher, "web-b")
    robot, token = fleet.register_robot("arm-b")
    agent = launcher.agent("agent", node_b.url, token, tmp_path / "spool", *FAST)
    wait_for(lambda: Robot.objects.get(pk=robot.pk).connected, 60, "robot connected to node B", procs=(agent,))
    assert node_b.requests("/ws/robots/") >= 1 and node_a.requests("/ws/robots/") == 0

    console = console_socket(node_a.url, operator)
    try:
        console.send(json.dumps({"type": "takeover", "robot": robot.name, "reason": "cross-node"}))
        lease = frames_until(console, "lease", active=True, robot=robot.name)

        def obeys(expected):
            console.send(json.dumps({"type": "keepalive", "robot": robot.name}))
            return Robot.objects.get(pk=robot.pk).reported_lease == expected

        # The robot on node B reports the lease granted on node A: the command crossed the channel layer.
        wait_for(lambda: obeys(lease["lease"]), 30, "robot on node B obeys the lease from node A", interval=0.5,
                 procs=(agent,))
        console.send(json.dumps({"type": "release", "robot": robot.name}))
        frames_until(console, "lease", active=False, lease=lease["lease"])
        wait_for(lambda: Robot.objects.get(pk=robot.pk).reported_lease is None, 30, "robot back on its policy",
                 procs=(agent,))
        assert ControlLease.objects.get(pk=lease["lease"]).ended_at is not None

        console.send(json.dumps({"type": "estop", "robot": robot.name, "engaged": True}))
        wait_for(lambda: Robot.objects.get(pk=robot.pk).reported_estopped, 30, "robot on node B reports the e-stop",
                 procs=(agent,))
        console.send(json.dumps({"type": "estop", "robot": robot.name, "engaged": False}))
        wait_for(lambda: not Robot.objects.get(pk=robot.pk).reported_estopped, 30, "e-stop cleared", procs=(agent,))
    finally:
        console.close()
    assert agent.alive()


def test_nginx_serves_static_files_and_downloads_itself(proxied, operator, short_task):
    url = proxied["url"]
    code, headers, body = get(f"{url}/static/vendor/chart.umd.js")
    assert code == 200 and body == (settings.STATIC_ROOT / "vendor" / "chart.umd.js").read_bytes()
    assert "X-Frame-Options" not in headers, "a static file went through Django (its security headers are on it)"

    # A checkpoint: authenticated by the node, sent by nginx (which also answers ranges; the node's view does not).
    robot, token = fleet.register_robot("arm-dl")
    weights = settings.CHECKPOINT_DIR / "proxy-v1.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(300_000)
    weights.write_bytes(data)
    run = TrainingRun.objects.create(algorithm="bc")
    Checkpoint.objects.create(version=1, run=run, algorithm="bc", path=weights.name, size=len(data),
                              sha256=hashlib.sha256(data).hexdigest())
    auth = {"Authorization": f"Bearer {token}"}
    code, headers, body = get(f"{url}/api/robot/checkpoints/1", auth)
    assert code == 200 and body == data
    assert "X-Accel-Redirect" not in headers  # nginx consumed it
    code, headers, body = get(f"{url}/api/robot/checkpoints/1", {**auth, "Range": "bytes=10-19"})
    assert code == 206 and body == data[10:20]
    assert get(f"{url}/api/robot/checkpoints/1")[0] in (401, 403)  # no token: the node refuses, nothing is sent
    assert get(f"{url}/_sop_files/checkpoints/{weights.name}")[0] == 404  # internal: never reachable directly

    # An episode's MP4 for a logged-in console user.
    episode = Episode.objects.create(robot=robot, task=short_task, status=Episode.Status.VERIFIED, payload_path="x.h5",
                                     payload_sha256="cd" * 32, started_at="2026-01-01T00:00:00Z")
    video = video_path(episode)
    video.parent.mkdir(parents=True, exist_ok=True)
    video.write_bytes(b"\0\0\0\x18ftypmp42" + os.urandom(5000))
    client = Client()
    client.force_login(operator)
    cookie = {"Cookie": f"sessionid={client.cookies['sessionid'].value}"}
    code, headers, body = get(f"{url}/episodes/{episode.pk}/video.mp4", {**cookie, "Range": "bytes=0-99"})
    assert code == 206 and body == video.read_bytes()[:100] and headers["Content-Type"] == "video/mp4"
    assert headers.get("Cache-Control") == "private, max-age=86400"
    assert get(f"{url}/episodes/{episode.pk}/video.mp4")[0] == 302  # to the login page
    assert get(f"{url}/_sop_files/videos/{video.name}")[0] == 404


def test_an_agent_behind_nginx_survives_the_death_of_its_node(proxied, launcher, short_task, tmp_path):
    url, nodes = proxied["url"], proxied["nodes"]
    robot, token = fleet.register_robot("arm-lb")
    spool = tmp_path / "spool"
    agent = launcher.agent("agent", url, token, spool, *FAST)

    def verified() -> set[str]:
        return {str(e) for e in Episode.objects.filter(robot=robot, status=Episode.Status.VERIFIED)
                .values_list("id", flat=True)}

    # Small chunks (64 KiB per request): an episode is several PUTs, and round robin spreads them over both nodes.
    wait_for(lambda: len(verified()) >= 3 and all(n.requests("PUT /api/") for n in nodes), 150,
             "3 verified episodes with upload chunks on both nodes", procs=(agent, proxied["proxy"]))
    [holder] = [n for n in nodes if n.requests("/ws/robots/")]
    survivor = next(n for n in nodes if n is not holder)
    before_kill = verified()

    holder.proc.kill()  # SIGKILL: the robot's socket and any upload in flight on it die with it
    wait_for(lambda: survivor.requests("/ws/robots/") >= 1, 60, "the robot reconnected through nginx to the survivor",
             procs=(agent, proxied["proxy"]))
    wait_for(lambda: len(verified() - before_kill) >= 3, 150, "3 more verified episodes after the node died",
             procs=(agent, proxied["proxy"]))
    agent.stop()

    ended = Episode.objects.filter(robot=robot).exclude(status=Episode.Status.RECORDING)
    # Everything the robot finished is on the server exactly once, or still in its spool (nothing lost).
    pending = {p.stem for p in spool.glob("*.json")}
    finished = {str(e) for e in ended.values_list("id", flat=True)}
    assert finished - verified() <= pending, "an episode is neither verified nor still spooled"
    ids = list(Episode.objects.filter(robot=robot).values_list("id", flat=True))
    assert len(ids) == len(set(ids))
    for ep in Episode.objects.filter(robot=robot, status=Episode.Status.VERIFIED):
        assert (settings.PAYLOAD_DIR / ep.payload_path).stat().st_size == ep.payload_size
