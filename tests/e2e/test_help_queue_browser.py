"""Issue 16's story in a real browser: a robot whose policy stalls asks for help, the request tops the fleet page
within a heartbeat, an operator answers it (claim = takeover), drives, resolves it with a label, and the stored
episode's intervention segment carries the request; Esc e-stops; the Metrics page shows autonomous vs assisted success
and the help precision as the database has them. Debian's Chromium via Playwright, real daphne, worker and agents
(Meta-World) in a network namespace, as tests/e2e/test_console_browser.py."""

from __future__ import annotations

import datetime as dt
import sys
import tarfile
import time

import pytest
from django.conf import settings
from django.db.models import Q

from robots import fleet
from robots.models import (DatasetExport, Episode, HelpRequest, InterventionSegment, MediaJob, Robot, Task,
                           TaskAssignment)

from .conftest import free_port, wait_for
from .test_console_browser import (CHROMIUM, _user, browser, login, namespace, shot,  # noqa: F401 (fixtures)
                                   unnamed_controls)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


@pytest.fixture
def console(launcher, namespace, django_user_model, tmp_path):  # noqa: F811 - this module's cast
    """Two robots: arm-1 runs a random policy and never asks (its detector is off); arm-2's policy holds still, so its
    stall detector asks for help after 15 steps (1.5 s)."""
    task = Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the red goal"], max_steps=600)
    TaskAssignment.objects.create(robot=None, task=task)
    arm1, token1 = fleet.register_robot("arm-1")
    arm2, token2 = fleet.register_robot("arm-2")
    users = {"op1": _user(django_user_model, "op1", "operator"), "op2": _user(django_user_model, "op2", "operator")}
    host = namespace.outer
    env = {"ALLOWED_HOSTS": f"{host},127.0.0.1,localhost", "CSRF_TRUSTED_ORIGINS": f"http://{host}"}
    server, url = launcher.server(port=free_port(), host=host, **env)
    worker = launcher.worker("worker", "-B", **env)
    common = ["--server", url, "--hz", "10", "--image-size", "64", "--video-fps", "10", "--video-size", "128"]
    busy = launcher.start("agent-1", namespace.wrap([
        sys.executable, "-m", "robots.agent", *common, "--spool", str(tmp_path / "spool-1"), "--policy", "random",
        "--help-stall-steps", "0"]), SOP_ROBOT_TOKEN=token1)
    stuck = launcher.start("agent-2", namespace.wrap([
        sys.executable, "-m", "robots.agent", *common, "--spool", str(tmp_path / "spool-2"), "--policy", "hold"]),
        SOP_ROBOT_TOKEN=token2)
    procs = (server, worker, busy, stuck)
    wait_for(lambda: Robot.objects.filter(state="running").count() == 2, 90, "both robots to run", procs=procs)
    return {"url": url, "robots": (arm1, arm2), "task": task, "users": users, "procs": procs,
            "browser": namespace.executable(CHROMIUM, tmp_path)}


def first_tile(page) -> str:
    return page.evaluate("document.querySelector('#tiles .tile[data-robot]').dataset.robot")


def test_a_stalled_robot_asks_an_operator_answers_drives_resolves_and_the_episode_carries_the_request(console,
                                                                                                     browser):
    url, (arm1, arm2), procs = console["url"], console["robots"], console["procs"]
    op1 = login(browser, url, "op1")
    op1.locator('#tiles .tile[data-robot="arm-1"]').wait_for()
    page_ready = time.time()  # the fleet page shows the fleet: its console socket is open

    # arm-2 stalls: its request is at the top of the queue and its tile first (arm-1 sorts first by name otherwise).
    item = op1.locator('[data-testid="help-item"][data-robot="arm-2"]')
    item.wait_for(timeout=60_000)
    shown_at = time.time()
    request = HelpRequest.objects.get(robot=arm2)
    assert (request.kind, request.status) == ("stall", "open") and "while the policy drove" in request.reason
    # "within one heartbeat": from the robot raising it (its clock; same host), or from the page opening when the
    # robot asked before (a loaded machine is slow to log in), to the page showing it
    assert request.robot_since is not None
    latency = shown_at - max(request.robot_since.timestamp(), page_ready)
    assert latency < settings.SOP_HEARTBEAT_S, f"the request took {latency:.2f} s to reach the page"
    assert len(request.trace) >= 15 and all(s["driver"] == "policy" for s in request.trace)
    op1.wait_for_function("document.querySelector('#tiles .tile[data-robot]').dataset.robot === 'arm-2'",
                          timeout=5000)
    assert "needs-help" in op1.locator('[data-robot="arm-2"].tile').get_attribute("class")
    assert op1.title().startswith("(1) ")
    assert "assigned to you" in item.inner_text()  # op1 is the one operator online
    assert first_tile(op1) == "arm-2"
    assert unnamed_controls(op1) == []
    shot(op1, "fleet-help-queue")

    # Answer: the robot page opens and claims it, which takes the robot over.
    item.get_by_role("link", name="Answer").click()
    op1.wait_for_url(f"{url}/robots/arm-2/**")
    wait_for(lambda: Robot.objects.get(pk=arm2.pk).operator_name == "op1", 20, "arm-2 to report op1 driving",
             procs=procs)
    request.refresh_from_db()
    assert (request.status, request.claimed_name) == ("claimed", "op1") and request.lease is not None
    op1.get_by_test_id("help-box").filter(has_text="answered by op1").wait_for()
    assert unnamed_controls(op1) == []
    assert op1.url.endswith("/robots/arm-2/")  # the ?help= is gone: a reload does not claim again
    episode_id = Robot.objects.get(pk=arm2.pk).current_episode

    # Drive +x for a second, then resolve it as a failure: the episode ends with op1's label, the robot goes back.
    op1.locator("body").focus()
    op1.keyboard.down("d")
    time.sleep(1.0)
    op1.keyboard.up("d")
    shot(op1, "robot-help")
    op1.get_by_test_id("help-resolve-failure").click()
    wait_for(lambda: HelpRequest.objects.get(pk=request.pk).status == "resolved", 20, "the request to be resolved",
             procs=procs)
    request.refresh_from_db()
    assert (request.outcome, request.closed_name) == ("failure", "op1")
    wait_for(lambda: Episode.objects.filter(pk=episode_id, status=Episode.Status.VERIFIED).exists(), 60,
             "the answered episode to be stored", procs=procs)
    episode = Episode.objects.get(pk=episode_id)
    assert (episode.outcome, episode.outcome_source, episode.outcome_by.username) == ("failure", "operator", "op1")
    segments = list(InterventionSegment.objects.filter(episode=episode, source="operator"))
    assert segments and all(s.help_request_id == request.pk and s.operator_name == "op1" for s in segments)
    assert op1.title().startswith("arm-2")  # no open request left: no count in the tab title

    # The episode's replay was made in the background once it was verified (robots/replay.py): the page plays it.
    op1.goto(f"{url}/episodes/{episode_id}/")
    op1.wait_for_function("document.getElementById('video').readyState >= 1", timeout=60_000)
    assert MediaJob.objects.get(episode_id=episode_id, kind="video").state == "done"
    assert unnamed_controls(op1) == []
    answered = op1.get_by_test_id("answered-help").first.inner_text()
    assert f"answered help request #{request.pk} (stall" in answered
    op1.goto(f"{url}/robots/arm-2/")
    # the live plot: the robot's last seconds from the data channel's hud (hand, action, who drove)
    op1.wait_for_function("window.sopConsole.live && window.sopConsole.live.length >= 10", timeout=30_000)
    sample = op1.evaluate("window.sopConsole.live[window.sopConsole.live.length - 1]")
    assert len(sample["hand"]) == 3 and sample["driver"] == "policy" and len(sample["action"]) == 4

    # Esc e-stops the robot on screen, from anywhere on the page.
    op1.keyboard.press("?")
    op1.get_by_test_id("shortcuts").wait_for()
    assert "E-STOP" in op1.get_by_test_id("shortcuts").inner_text()
    shot(op1, "robot-shortcuts")
    op1.keyboard.press("Escape")  # closes the list (an operator reading it does not stop the robot)
    op1.get_by_test_id("shortcuts").wait_for(state="hidden")
    time.sleep(0.5)
    assert Robot.objects.get(pk=arm2.pk).state != "estopped"
    op1.keyboard.press("Escape")  # and now e-stops, wherever the focus is
    wait_for(lambda: Robot.objects.get(pk=arm2.pk).state == "estopped", 20, "arm-2 to report e-stopped", procs=procs)
    assert Robot.objects.get(pk=arm2.pk).estopped_by == "op1"
    op1.get_by_test_id("estop-clear").click()
    wait_for(lambda: Robot.objects.get(pk=arm2.pk).state == "running", 30, "arm-2 to run again", procs=procs)

    # Metrics: autonomous vs assisted success and the help precision, as the episodes and requests say.
    now = dt.datetime.now(dt.timezone.utc)
    for iv in (0, 1):  # one success on its own and one an operator rescued, so that the two numbers differ
        Episode.objects.create(robot=arm1, task=console["task"], started_at=now - dt.timedelta(seconds=20),
                               ended_at=now, steps=100, outcome="success", success=True, intervention_count=iv,
                               intervention_steps=10 * iv, status=Episode.Status.VERIFIED)
    op1.goto(f"{url}/metrics/")
    op1.wait_for_function("document.querySelector('[data-total=\"episodes\"]').textContent !== '–'")
    rated = Episode.objects.filter(split="online", outcome__in=("success", "failure", "timeout"))
    alone = rated.filter(success=True, intervention_count=0).count()
    assisted = rated.filter(Q(success=True) & Q(intervention_count__gt=0)).count()
    expect = lambda n: f"{round(100 * n / rated.count())}%"  # noqa: E731
    assert op1.inner_text('[data-total="autonomous_success_rate"]') == expect(alone)
    assert op1.inner_text('[data-total="assisted_success_rate"]') == expect(assisted)
    decided = HelpRequest.objects.exclude(status__in=("open", "claimed"))
    answered = decided.filter(lease__isnull=False).count()
    assert op1.inner_text('[data-attn="precision"]') == f"{round(100 * answered / decided.count())}%"
    assert "op1" in op1.get_by_test_id("operators").inner_text()
    assert unnamed_controls(op1) == []
    shot(op1, "metrics-attention")

    # The Data page: arm-2's episodes exported as a LeRobotDataset by the real worker, progress, then the download.
    op1.goto(f"{url}/data/")
    op1.select_option("select[name=robots]", ["arm-2"])
    op1.get_by_test_id("export").click()
    op1.get_by_test_id("download").wait_for(timeout=120_000)
    assert unnamed_controls(op1) == []
    shot(op1, "data")
    with op1.expect_download() as download:
        op1.get_by_test_id("download").click()
    saved = download.value.path()
    with tarfile.open(saved) as tar:
        names = tar.getnames()
    assert any(n.endswith("meta/info.json") for n in names) and any(n.endswith(".mp4") for n in names)
    export = DatasetExport.objects.get()
    assert (export.state, export.filters["robots"]) == ("done", ["arm-2"])
    # arm-2's verified episodes when it was asked for (more may have been verified since)
    assert 1 <= export.episodes <= Episode.objects.filter(robot=arm2, status=Episode.Status.VERIFIED).count()
    op1.context.close()

    # The live pages in a dark system theme, for a person to look at (and the page background is the dark one).
    dark = login(browser, url, "op2", color_scheme="dark")
    dark.locator('#tiles .tile[data-robot="arm-1"]').wait_for()
    assert dark.evaluate("getComputedStyle(document.documentElement).backgroundColor") == "rgb(15, 20, 27)"
    shot(dark, "fleet-dark")
    dark.goto(f"{url}/robots/arm-1/")
    dark.get_by_test_id("takeover").wait_for()
    # the E-STOP stays red in the dark theme (a dark button rule once painted it grey)
    assert dark.get_by_test_id("estop").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(208, 31, 31)"
    shot(dark, "robot-dark")
    dark.context.close()
