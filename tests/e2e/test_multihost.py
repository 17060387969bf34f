"""The loop across machines (issue 14): every web node, the worker, the proxy and each robot on a host of its own.

Hosts are network namespaces on a bridge (tests/e2e/netns.py ``Network``), each with its own address; PostgreSQL
and Redis stay on the machine and are reached through a forwarder on the bridge (they listen on loopback only). The
payload and checkpoint store is the shared filesystem, as docs/deploy.md requires. Through nginx (from
``manage.py proxy_config``), without stickiness:

- the robots' sockets are spread over both web nodes, and one console sees and drives them all;
- a training run on the worker host publishes checkpoints that reach every robot, which swap between episodes;
- one web node is killed mid-run: its robots reconnect through the proxy to the other, and every episode a robot
  finished is verified exactly once or still in its spool.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from urllib.parse import urlparse, urlunparse

import pytest
from django.conf import settings
from django.core.management import call_command

from learner import services
from learner.models import Checkpoint, TrainingRun
from robots import fleet
from robots.models import ControlLease, Episode, Robot, Task, TaskAssignment
from robots.roles import OPERATOR, set_role

from . import netns
from .conftest import console_socket, free_port, http_ok, wait_for
from .conftest import test_database_url as database_url  # (a test_ name would be collected as a test)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
# the tests' data lives under private temp directories: nginx's workers read it as the user running the test
NGINX_USER = ("--user", "root") if os.geteuid() == 0 else ()
PORT = 8000


def require(ok: bool, why: str) -> None:
    if ok:
        return
    if os.environ.get("SOP_REQUIRE_PROXY") == "1":
        pytest.fail(f"SOP_REQUIRE_PROXY=1 but {why}")
    pytest.skip(why)


@pytest.fixture
def network():
    ok, why = netns.available()
    require(ok, why)
    require(os.path.exists(NGINX), "nginx is not installed (apt-get install nginx-core)")
    net = netns.Network().create()
    yield net
    net.delete()


def _through(url: str, gateway: str, port: int) -> str:
    parts = urlparse(url)
    netloc = parts.netloc.rsplit("@", 1)
    auth = netloc[0] + "@" if len(netloc) == 2 else ""
    return urlunparse(parts._replace(netloc=f"{auth}{gateway}:{port}"))


class Deployment:
    """The processes of the deployment, each in its namespace, sharing the test's database, Redis and data dir."""

    def __init__(self, launcher, net: netns.Network, tmp_path):
        self.launcher, self.net, self.tmp = launcher, net, tmp_path
        self.hosts = {name: net.host(name) for name in ("proxy", "web-a", "web-b", "worker", "robot-1", "robot-2")}
        self.url = f"http://{self.hosts['proxy'].addr}:8080"
        addrs = ",".join(h.addr for h in self.hosts.values())  # the proxy's (robots, consoles) and the nodes' (probes)
        env = {"ALLOWED_HOSTS": f"{addrs},127.0.0.1,localhost",
               "SOP_SERVE_STATIC": "0", "SOP_ACCEL_REDIRECT": "1"}
        forwards = []
        db, redis = database_url(), settings.REDIS_URL
        if urlparse(db).hostname in ("127.0.0.1", "localhost"):
            port = free_port()
            forwards += [net.gateway, str(port), str(urlparse(db).port or 5432)]
            env["DATABASE_URL"] = _through(db, net.gateway, port)
        if urlparse(redis).scheme == "redis" and urlparse(redis).hostname in ("127.0.0.1", "localhost"):
            port = free_port()
            forwards += [net.gateway, str(port), str(urlparse(redis).port or 6379)]
            env["REDIS_URL"] = _through(redis, net.gateway, port)
        self.env = env  # a unix-socket Redis or a SQLite file needs no forwarding: namespaces share the filesystem
        if forwards:
            self.forwarder = launcher.start("forward", [sys.executable, "-m", "tests.e2e.forward", *forwards])
            wait_for(lambda: "forwarding" in self.forwarder.output(), 20, "the forwarder", procs=(self.forwarder,))
        self.nodes = {name: self._node(name) for name in ("web-a", "web-b")}
        conf = tmp_path / "nginx.conf"
        call_command("proxy_config", *NGINX_USER, "--listen", f"{self.hosts['proxy'].addr}:8080", "--prefix",
                     str(tmp_path / "nginx"), "--output", str(conf),
                     *[arg for name in self.nodes for arg in ("--node", f"{self.hosts[name].addr}:{PORT}")])
        self.proxy = launcher.start("nginx", self.hosts["proxy"].wrap([NGINX, "-c", str(conf), "-g", "daemon off;"]))
        wait_for(lambda: http_ok(f"{self.url}/healthz"), 60, "nginx and a web node", procs=(self.proxy,))
        self.worker = launcher.start("worker", self.hosts["worker"].wrap([
            sys.executable, "-m", "celery", "-A", "sop_web", "worker", "-B", "-l", "INFO", "--concurrency", "1",
            "-Q", "default,learner", "--schedule", str(tmp_path / "beat-schedule")]),
            SOP_TRAINING_ROUND_S="3", **env)

    def _node(self, name: str):
        log = self.tmp / f"{name}-access.log"
        host = self.hosts[name]
        proc = self.launcher.start(name, host.wrap([sys.executable, "-m", "daphne", "--proxy-headers", "--access-log",
                                                    str(log), "-b", host.addr, "-p", str(PORT),
                                                    "sop_web.asgi:application"]), **self.env)
        wait_for(lambda: http_ok(f"http://{host.addr}:{PORT}/healthz"), 60, f"{name} /healthz", procs=(proc,))
        return {"proc": proc, "log": log}

    def robot_sockets(self, name: str) -> int:
        """Robot sockets open on a node now (its access log's connects minus disconnects)."""
        log = self.nodes[name]["log"]
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        return (sum('"WSCONNECT /ws/robots/"' in ln for ln in lines)
                - sum('"WSDISCONNECT /ws/robots/"' in ln for ln in lines))

    def agent(self, name: str, token: str):
        return self.launcher.start(name, self.hosts[name].wrap([
            sys.executable, "-m", "robots.agent", "--server", self.url, "--spool", str(self.tmp / f"spool-{name}"),
            "--policy", "learned", "--fallback", "expert", "--hz", "20", "--image-size", "32", "--no-video"]),
            SOP_ROBOT_TOKEN=token, **self.env)


@pytest.fixture
def reach(transactional_db):
    task = Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the goal"], max_steps=100)
    call_command("collect_demos", "--tasks", "reach", "--episodes", "2", "--workers", "1", "--image-size", "32")
    Task.objects.filter(pk=task.pk).update(max_steps=20)
    TaskAssignment.objects.create(robot=None, task=task)
    return task


def test_the_loop_across_hosts_through_the_proxy_survives_a_web_node(launcher, network, reach, operator, tmp_path):
    set_role(operator, OPERATOR)
    deployment = Deployment(launcher, network, tmp_path)
    robots = {name: fleet.register_robot(name) for name in ("robot-1", "robot-2")}
    agents = {name: deployment.agent(name, token) for name, (_, token) in robots.items()}
    everyone = (*agents.values(), deployment.proxy, deployment.worker)

    def connected() -> bool:
        return all(Robot.objects.get(pk=r.pk).connected for r, _ in robots.values())

    wait_for(connected, 90, "both robots connected through the proxy", procs=everyone)
    # Round robin may put both sockets on one node; redial one robot until they span both (a robot reconnects
    # through the proxy exactly as after a network cut).
    for _ in range(6):
        if all(deployment.robot_sockets(n) == 1 for n in deployment.nodes):
            break
        agents["robot-2"].stop()
        agents["robot-2"] = deployment.agent("robot-2", robots["robot-2"][1])
        wait_for(lambda: sum(deployment.robot_sockets(n) for n in deployment.nodes) == 2 and connected(), 60,
                 "robot-2 back", procs=(agents["robot-2"],))
    assert [deployment.robot_sockets(n) for n in deployment.nodes] == [1, 1], "robots on both web nodes"
    everyone = (*agents.values(), deployment.proxy, deployment.worker)

    # One console, on whichever node the proxy gives it, sees and drives both robots.
    console = console_socket(deployment.url, operator)
    try:
        for name, (robot, _) in robots.items():
            console.send(json.dumps({"type": "takeover", "robot": name, "reason": "multi-host"}))
            lease = wait_for(lambda: ControlLease.objects.filter(robot=robot, ended_at__isnull=True).first(), 20,
                             f"a lease on {name}")

            def obeys(expected, name=name, robot=robot):
                console.send(json.dumps({"type": "keepalive", "robot": name}))
                return Robot.objects.get(pk=robot.pk).reported_lease == expected

            wait_for(lambda: obeys(lease.pk), 30, f"{name} obeys the console's lease", interval=0.5, procs=everyone)
            console.send(json.dumps({"type": "release", "robot": name}))
            wait_for(lambda: obeys(None), 30, f"{name} back on its policy", interval=0.5, procs=everyone)
    finally:
        console.close()

    # The worker host trains and publishes; every robot receives the checkpoints and swaps to the newest.
    run = services.start_run("bc", [reach], preset="debug", from_scratch=True, total_steps=150,
                             overrides={"checkpoint_every_steps": 50, "checkpoint_every_s": 1e9})
    wait_for(lambda: TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.FINISHED, 240,
             "the run finished on the worker host", procs=everyone)
    newest = Checkpoint.objects.order_by("-version").values_list("version", flat=True).first()
    assert newest == 3
    wait_for(lambda: all(Robot.objects.get(pk=r.pk).policy_version == newest for r, _ in robots.values()), 120,
             f"every robot runs v{newest}", procs=everyone)

    def verified(robot) -> set[str]:
        return {str(e) for e in Episode.objects.filter(robot=robot, status=Episode.Status.VERIFIED)
                .values_list("id", flat=True)}

    # A web node dies: its robot reconnects through the proxy to the other; nothing is lost.
    before = {name: verified(robot) for name, (robot, _) in robots.items()}
    deployment.nodes["web-a"]["proc"].kill()
    survivors = (*agents.values(), deployment.proxy, deployment.worker, deployment.nodes["web-b"]["proc"])
    wait_for(lambda: deployment.robot_sockets("web-b") == 2 and connected(), 90,
             "both robots on the surviving node", procs=survivors)
    wait_for(lambda: all(len(verified(r) - before[n]) >= 2 for n, (r, _) in robots.items()), 180,
             "2 more verified episodes per robot after the node died", procs=survivors)
    for agent in agents.values():
        agent.stop()

    for name, (robot, _) in robots.items():
        rows = list(Episode.objects.filter(robot=robot).values_list("id", "status"))
        assert len({r[0] for r in rows}) == len(rows), "no episode stored twice"
        pending = {p.stem for p in (tmp_path / f"spool-{name}").glob("*.json")}
        ended = {str(i) for i, status in rows if status != Episode.Status.RECORDING}
        assert ended - verified(robot) <= pending, f"{name}: an episode is neither verified nor still spooled"
        for ep in Episode.objects.filter(robot=robot, status=Episode.Status.VERIFIED):
            assert (settings.PAYLOAD_DIR / ep.payload_path).stat().st_size == ep.payload_size
        assert Episode.objects.filter(robot=robot, status=Episode.Status.VERIFIED,
                                      policy_version=newest).exists(), f"{name} ran episodes with v{newest}"
