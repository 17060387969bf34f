"""The operator console in a real browser: Debian's Chromium driven by Playwright, against a real daphne server, a real
Celery worker (with beat) and a real simulated robot (Meta-World), inside a network namespace (tests/e2e/netns.py).

One story per test (starting the processes costs ~20 s): log in, watch live video, take over, drive with the keyboard,
release, e-stop, label, a second operator refused; then every page is screenshotted under the test output folder.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings

from robots import fleet, ingest, roles
from robots.episode_file import EpisodeReader
from robots.models import AuditEvent, ControlLease, Episode, InterventionSegment, Robot, Task, TaskAssignment
from robots.protocol import CONTROL_SOURCE_CODES, ControlSource

from . import netns
from .conftest import ROOT, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(os.environ.get("SOP_TEST_OUTPUT", ROOT / "test-output")) / "console"
PASSWORD = "correct-horse-battery-staple"


def _skip_reason() -> str:
    ok, why = netns.available()
    if not ok:
        return why
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return ""


@pytest.fixture
def namespace():
    reason = _skip_reason()
    if reason:
        if os.environ.get("SOP_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests required but cannot run: {reason}")
        pytest.skip(reason)
    ns = netns.NetNamespace().create()
    yield ns
    ns.delete()


def _user(django_user_model, name: str, role: str):
    user = django_user_model.objects.create_user(name, password=PASSWORD)
    roles.set_role(user, role)  # creates the groups too: transactional tests flush the migration's rows
    return user


@pytest.fixture
def console(launcher, namespace, django_user_model, tmp_path):
    """daphne + worker on the host side of the veth pair, one simulated robot inside the namespace."""
    task = Task.objects.create(name="reach", env_id="reach-v3", prompts=["reach the red goal"], max_steps=600)
    TaskAssignment.objects.create(robot=None, task=task)
    robot, token = fleet.register_robot("arm-1")
    users = {"op1": _user(django_user_model, "op1", "operator"), "op2": _user(django_user_model, "op2", "operator"),
             "watcher": _user(django_user_model, "watcher", "viewer")}
    host = namespace.outer
    env = {"ALLOWED_HOSTS": f"{host},127.0.0.1,localhost", "CSRF_TRUSTED_ORIGINS": f"http://{host}"}
    server, url = launcher.server(port=free_port(), host=host, **env)
    worker = launcher.worker("worker", "-B", **env)
    agent = launcher.start("agent", namespace.wrap([
        sys.executable, "-m", "robots.agent", "--server", url, "--spool", str(tmp_path / "spool"),
        "--policy", "random", "--hz", "10", "--image-size", "64", "--video-fps", "15", "--video-size", "192",
        "--extra-cameras", "gripperPOV",  # the scene and the wrist view, streamed side by side
    ]), SOP_ROBOT_TOKEN=token)
    wait_for(lambda: Robot.objects.get(pk=robot.pk).state == "running", 90, "the robot to run an episode",
             procs=(server, worker, agent))
    return {"url": url, "robot": robot, "task": task, "users": users, "procs": (server, worker, agent),
            "browser": namespace.executable(CHROMIUM, tmp_path)}


@pytest.fixture
def browser(console, monkeypatch):
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; the ORM reads below are plain sync code between its
    # calls (Django's documented escape hatch for exactly this).
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(console["browser"]),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-features=WebRtcHideLocalIpsWithMdns",
                  "--autoplay-policy=no-user-gesture-required"],
        )
        yield browser
        browser.close()


def login(browser, url: str, username: str, **context_options):
    context = browser.new_context(viewport={"width": 1400, "height": 900}, **context_options)
    page = context.new_page()
    page.goto(f"{url}/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit], input[type=submit]")
    page.wait_for_url(f"{url}/")
    return page


def shot(page, name: str):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def frames_decoded(page, robot: str) -> int:
    return page.evaluate(
        """async (name) => {
             const v = window.sopConsole && window.sopConsole.viewers.get(name);
             if (!v || !v.pc) return 0;
             let n = 0;
             (await v.pc.getStats()).forEach(s => { if (s.type === 'inbound-rtp' && s.kind === 'video') n = s.framesDecoded || 0; });
             return n;
           }""",
        robot,
    )


UNNAMED = """() => [...document.querySelectorAll('button, a[href], input, select, textarea, video, canvas')]
  .filter((el) => !el.closest('[hidden]') && el.type !== 'hidden')
  .filter((el) => !((el.getAttribute('aria-label') || el.getAttribute('title') || el.textContent || el.value || '').trim()
                    || (el.labels && el.labels.length) || el.getAttribute('aria-labelledby')))
  .map((el) => el.outerHTML.slice(0, 160))"""


def unnamed_controls(page) -> list[str]:
    """Controls a screen reader could not name (no text, label, aria-label or title)."""
    return page.evaluate(UNNAMED)


def robot_row(robot: Robot) -> Robot:
    return Robot.objects.get(pk=robot.pk)


def test_operator_takes_over_drives_releases_estops_and_labels(console, browser):
    url, robot, procs = console["url"], console["robot"], console["procs"]
    op1 = login(browser, url, "op1")
    shot(op1, "fleet")

    # Live video on the fleet page: the browser decodes frames and keeps decoding.
    tile = op1.locator(f'#tiles .tile[data-robot="{robot.name}"]')  # not its help-queue item, if it asks for help
    tile.wait_for()
    first = wait_for(lambda: frames_decoded(op1, robot.name) > 5 and frames_decoded(op1, robot.name), 60,
                     "decoded video frames on the fleet page", interval=0.5, procs=procs)
    time.sleep(2.0)
    assert frames_decoded(op1, robot.name) >= first + 15  # >= 15 fps source, decoded continuously
    shot(op1, "fleet-live")

    # Robot page: take over.
    op1.goto(f"{url}/robots/{robot.name}/")
    wait_for(lambda: frames_decoded(op1, robot.name) > 5, 60, "video on the robot page", interval=0.5, procs=procs)
    op1.get_by_test_id("takeover").click()
    wait_for(lambda: robot_row(robot).operator_name == "op1", 20, "the robot to report op1 driving", procs=procs)
    episode_under_takeover = robot_row(robot).current_episode

    # A second operator sees who holds the robot and is refused.
    op2 = login(browser, url, "op2")
    op2.goto(f"{url}/robots/{robot.name}/")
    op2.get_by_test_id("held-by").filter(has_text="op1").wait_for()
    op2.get_by_test_id("takeover").click()
    op2.get_by_test_id("error").filter(has_text="op1").wait_for()
    shot(op2, "robot-held-by-other")
    assert robot_row(robot).operator_name == "op1"

    # Drive: +x with 'd' for about 1.5 s, then let go.
    op1.locator("body").focus()
    op1.keyboard.down("d")
    time.sleep(1.5)
    op1.keyboard.up("d")
    shot(op1, "robot-takeover")
    time.sleep(0.6)  # past the deadman: the HUD says the robot holds still
    op1.get_by_test_id("hud-deadman").filter(has_text="hold").wait_for(timeout=5000)

    # Release: the policy drives again.
    op1.get_by_test_id("release").click()
    wait_for(lambda: robot_row(robot).control_source == ControlSource.POLICY.value and not robot_row(robot).operator_name,
             20, "the robot to go back to its policy", procs=procs)

    # Mark the running episode a failure: it ends at once with the operator's label.
    labelled = wait_for(lambda: robot_row(robot).current_episode, 30, "a running episode", procs=procs)
    op1.get_by_test_id("mark-failure").click()
    wait_for(lambda: Episode.objects.filter(pk=labelled, status=Episode.Status.VERIFIED).exists(), 60,
             "the labelled episode to be stored", procs=procs)
    episode = Episode.objects.get(pk=labelled)
    assert (episode.outcome, episode.outcome_source, episode.outcome_by.username) == ("failure", "operator", "op1")

    # The driven episode has an intervention segment by op1 whose steps moved the hand along +x.
    wait_for(lambda: Episode.objects.filter(pk=episode_under_takeover, status=Episode.Status.VERIFIED).exists(), 90,
             "the driven episode to be stored", procs=procs)
    segments = InterventionSegment.objects.filter(episode_id=episode_under_takeover, operator_name="op1")
    assert segments.exists()
    assert segments.first().operator.username == "op1"
    with EpisodeReader(Path(settings.PAYLOAD_DIR) / ingest.stored_path(episode_under_takeover)) as reader:
        data = reader.load()
    source, actions, states = data.control_source, data.actions, data.states
    driven = np.flatnonzero((source == CONTROL_SOURCE_CODES[ControlSource.OPERATOR]) & (actions[:, 0] > 0.5))
    assert driven.size >= 5, "the key press reached the robot as +x operator actions"
    hand_x = states[:, 0]
    assert hand_x[driven[-1]] - hand_x[driven[0]] > 0.02, "the arm moved along +x under the operator's commands"

    # E-stop halts the robot (latched until cleared), and it is audited.
    op1.get_by_test_id("estop").click()
    wait_for(lambda: robot_row(robot).state == "estopped", 20, "the robot to report e-stopped", procs=procs)
    time.sleep(1.5)
    assert robot_row(robot).state == "estopped" and robot_row(robot).current_episode is None
    shot(op1, "robot-estopped")
    op1.get_by_test_id("estop-clear").click()
    wait_for(lambda: robot_row(robot).state == "running", 30, "the robot to run again after clearing", procs=procs)
    actions = set(AuditEvent.objects.filter(robot=robot).values_list("action", flat=True))
    assert {"takeover", "release", "estop", "estop_cleared", "label"} <= actions

    # The console tab closes mid-takeover: the lease ends with the socket and the robot goes back to its policy.
    op2.get_by_test_id("takeover").click()
    wait_for(lambda: robot_row(robot).operator_name == "op2", 20, "op2 to take over", procs=procs)
    op2.context.close()
    wait_for(lambda: robot_row(robot).control_source == ControlSource.POLICY.value and not robot_row(robot).operator_name,
             20, "the robot to resume its policy after op2's tab closed", procs=procs)
    # The page releases on unload when it can; otherwise the server ends the lease with the socket.
    lease = ControlLease.objects.get(robot=robot, operator__username="op2")
    assert lease.ended_at is not None and lease.end_reason in ("released", "disconnected")

    # Every page, for a person to look at.
    for name, path in [("tasks", "/tasks/"), ("episodes", "/episodes/"), ("episode", f"/episodes/{labelled}/"),
                       ("training", "/training/"), ("metrics", "/metrics/"), ("audit", "/audit/")]:
        op1.goto(url + path)
        op1.wait_for_load_state("networkidle")
        assert unnamed_controls(op1) == [], name  # every control has a name a screen reader can say
        shot(op1, name)


def test_a_viewer_watches_but_cannot_take_over(console, browser):
    url, robot, procs = console["url"], console["robot"], console["procs"]
    page = login(browser, url, "watcher")
    page.goto(f"{url}/robots/{robot.name}/")
    wait_for(lambda: frames_decoded(page, robot.name) > 5, 60, "video for a viewer", interval=0.5, procs=procs)
    assert page.get_by_test_id("takeover").is_disabled()
    # both cameras the robot records arrive in the one track, side by side (192 px each), and the page says which
    size = page.evaluate("() => { const v = document.querySelector('video'); return [v.videoWidth, v.videoHeight]; }")
    assert size == [384, 192], size
    assert page.get_by_test_id("cameras").inner_text() == "cameras: corner3, gripperPOV"
    shot(page, "robot-viewer")


def test_the_training_page_follows_evaluations_live_in_local_time_and_dark_mode(console, browser):
    """Issue 16's polish: an evaluation that finishes shows up without a reload; table times are the browser's own
    zone, labelled (the UTC value in the tooltip); a dark system theme gets the dark console."""
    import datetime as dt

    from learner.models import Checkpoint, Evaluation

    checkpoint = Checkpoint.objects.create(version=1, algorithm="bc", step=10, path="policy-v1-test.safetensors",
                                           size=1, sha256="0" * 64)
    page = login(browser, console["url"], "op1", color_scheme="dark", timezone_id="Asia/Tokyo")
    page.goto(f"{console['url']}/training/")
    assert "not evaluated" in page.inner_text("table.checkpoints")

    Evaluation.objects.create(checkpoint=checkpoint, task=console["task"], episodes=10, successes=7,
                              status=Evaluation.Status.DONE, finished_at=dt.datetime.now(dt.timezone.utc))
    page.wait_for_function("document.querySelector('table.checkpoints').innerText.includes('70%')", timeout=25_000)

    stamp = page.locator("table.checkpoints time").first
    tokyo = checkpoint.created_at.astimezone(dt.timezone(dt.timedelta(hours=9)))
    assert stamp.inner_text() == f"{tokyo:%m-%d %H:%M} GMT+9"
    assert stamp.get_attribute("title").endswith("UTC")
    background = page.evaluate("getComputedStyle(document.documentElement).backgroundColor")
    assert background == "rgb(15, 20, 27)", background
    shot(page, "training-dark")
    page.context.close()
