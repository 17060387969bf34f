"""End to end: real robot agents (Meta-World) against a real daphne server, episodes stored and verified."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings

from robots import fleet
from robots.episode_file import EpisodeReader
from robots.models import Episode, Robot, Task, TaskAssignment

from .conftest import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

FAST = ("--hz", "20", "--image-size", "64")  # keep episodes short; the default is 10 Hz at 96x96


@pytest.fixture
def short_task():
    """drawer-close with a 25-step limit: episodes end quickly whether or not they succeed."""
    task = Task.objects.create(name="drawer-close", env_id="drawer-close-v3", prompts=["close the drawer"], max_steps=25)
    TaskAssignment.objects.create(robot=None, task=task)
    return task


def verified(robot: Robot) -> list[Episode]:
    return list(Episode.objects.filter(robot=robot, status=Episode.Status.VERIFIED).order_by("started_at"))


def spooled_ids(spool: Path) -> set[str]:
    return {p.stem for p in spool.glob("*.json")}


def test_agent_episodes_are_stored_verified_and_round_trip(launcher, short_task, tmp_path):
    robot, token = fleet.register_robot("arm-1")
    _, url = launcher.server()
    agent = launcher.agent("agent", url, token, tmp_path / "spool", "--episodes", "2", *FAST)

    wait_for(lambda: len(verified(robot)) >= 2, 120, "2 verified episodes", procs=())
    assert agent.popen.wait(60) == 0, agent.output()[-3000:]

    episodes = verified(robot)
    assert len(episodes) == 2
    for ep in episodes:
        assert ep.task == short_task and ep.prompt == "close the drawer"
        assert ep.split == "online" and ep.outcome in ("success", "timeout")
        path = settings.PAYLOAD_DIR / ep.payload_path
        assert path.stat().st_size == ep.payload_size
        with EpisodeReader(path) as reader:
            assert reader.meta["episode_id"] == str(ep.id)
            assert reader.steps == ep.steps > 0
            data = reader.load()
        assert data.images.dtype == np.uint8 and data.images.shape == (ep.steps, 64, 64, 3)
        assert data.states.shape == (ep.steps, 39) and data.actions.shape == (ep.steps, 4)
        assert data.states.dtype == data.actions.dtype == np.float32
        assert np.all(np.diff(data.timestamps) > 0), "timestamps are measured and increasing"
        assert ep.steps == 25 or data.successes[-1]
    # The agent deletes its copy only after the server verified it.
    assert spooled_ids(tmp_path / "spool") == set()


def test_an_agent_killed_with_a_full_spool_uploads_everything_after_restart(launcher, short_task, tmp_path):
    robot, token = fleet.register_robot("arm-2")
    spool = tmp_path / "spool"
    server, url = launcher.server()
    port = int(url.rsplit(":", 1)[1])
    agent = launcher.agent("agent", url, token, spool, *FAST)
    wait_for(lambda: Robot.objects.get(pk=robot.pk).current_task_id, 60, "task assigned", procs=(agent,))

    # The server goes away: the robot keeps working on its assignment and spools what it cannot upload.
    server.kill()
    wait_for(lambda: len(spooled_ids(spool)) >= 2, 90, "2 spooled episodes", procs=(agent,))
    agent.kill()  # SIGKILL: no chance to clean up
    pending = spooled_ids(spool)
    assert len(pending) >= 2

    launcher.server(port=port)
    restarted = launcher.agent("agent-restarted", url, token, spool, *FAST)
    wait_for(lambda: pending <= {str(e.id) for e in verified(robot)}, 120, "spooled episodes verified",
             procs=(restarted,))
    restarted.stop()

    stored = Episode.objects.filter(robot=robot)
    assert stored.count() == len({str(e.id) for e in stored}), "no duplicates"
    for ep in stored.filter(id__in=pending):
        assert ep.status == Episode.Status.VERIFIED
        with EpisodeReader(settings.PAYLOAD_DIR / ep.payload_path) as reader:
            assert reader.steps == ep.steps


def test_agent_reconnects_and_carries_on_after_a_server_restart(launcher, short_task, tmp_path):
    robot, token = fleet.register_robot("arm-3")
    server, url = launcher.server()
    port = int(url.rsplit(":", 1)[1])
    agent = launcher.agent("agent", url, token, tmp_path / "spool", *FAST)
    wait_for(lambda: Robot.objects.get(pk=robot.pk).connected, 60, "robot connected", procs=(agent,))

    server.signal(signal.SIGKILL)  # a crash, not a clean shutdown
    server.popen.wait()
    before = {str(e.id) for e in verified(robot)}

    launcher.server(port=port)
    wait_for(lambda: len({str(e.id) for e in verified(robot)} - before) >= 2, 120,
             "new episodes after the restart", procs=(agent,))
    assert agent.alive()
    assert Robot.objects.get(pk=robot.pk).connected
    agent.stop()


def test_a_revoked_robot_is_disconnected_and_cannot_upload(launcher, short_task, tmp_path):
    robot, token = fleet.register_robot("arm-4")
    _, url = launcher.server()
    agent = launcher.agent("agent", url, token, tmp_path / "spool", *FAST)
    # Revoke only once the robot has its task and records (revoked before its assignment, it would idle forever).
    wait_for(lambda: Episode.objects.filter(robot=robot).exists(), 60, "first episode started", procs=(agent,))

    fleet.revoke_robot(Robot.objects.get(pk=robot.pk))
    wait_for(lambda: not Robot.objects.get(pk=robot.pk).connected, 20, "revoked robot disconnected", procs=(agent,))
    count = Episode.objects.filter(robot=robot, status=Episode.Status.VERIFIED).count()
    # The agent keeps recording into its spool; nothing more is accepted from it.
    wait_for(lambda: len(spooled_ids(tmp_path / "spool")) >= 1, 60, "episodes kept in the spool", procs=(agent,))
    assert Episode.objects.filter(robot=robot, status=Episode.Status.VERIFIED).count() == count
    sidecar = json.loads(next((tmp_path / "spool").glob("*.json")).read_text())
    assert sidecar["sha256"]


def test_an_idle_robot_socket_stays_open(launcher, short_task, tmp_path):
    """Regression: a channel-layer read timing out closed every robot socket with 1011 every ~5 s."""
    robot, token = fleet.register_robot("arm-5")
    Task.objects.filter(pk=short_task.pk).update(enabled=False)  # nothing to do: the socket only idles
    TaskAssignment.objects.all().delete()
    _, url = launcher.server()
    agent = launcher.agent("agent", url, token, tmp_path / "spool", *FAST)
    wait_for(lambda: Robot.objects.get(pk=robot.pk).connected, 60, "robot connected", procs=(agent,))
    first = Robot.objects.get(pk=robot.pk).connected_at
    import time

    time.sleep(12)
    current = Robot.objects.get(pk=robot.pk)
    assert current.connected and current.connected_at == first, "the socket was closed and reopened"
