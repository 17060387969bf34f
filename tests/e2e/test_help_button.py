"""The robot's help button (``python -m robots.agent.help``) against a real daphne: one request per press id, a clear
refusal for a bad token, a distinct exit code when the server cannot be reached."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from robots import fleet
from robots.models import HelpRequest

from .conftest import ROOT, child_env, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def press(server: str, token: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robots.agent.help", "--server", server, *args],
                          env=child_env(SOP_ROBOT_TOKEN=token), cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_help_button_puts_one_request_in_the_queue_per_press(launcher):
    robot, token = fleet.register_robot("arm-1")
    _, url = launcher.server()
    pressed = str(uuid.uuid4())
    first = press(url, token, "--reason", "gripper jammed on the drawer handle", "--id", pressed)
    assert first.returncode == 0, first.stderr
    request = HelpRequest.objects.get(robot=robot)
    assert first.stdout.strip() == f"help request #{request.pk} is open"
    assert (request.kind, request.urgency, request.reason) == ("button", 3, "gripper jammed on the drawer handle")
    again = press(url, token, "--reason", "gripper jammed on the drawer handle", "--id", pressed)
    assert again.returncode == 0 and HelpRequest.objects.count() == 1  # a bounce of the button is the same request

    refused = press(url, "sop_not-a-real-token", "--reason", "x")
    assert refused.returncode == 1 and "refused (401)" in refused.stderr
    unreachable = press(f"http://127.0.0.1:{free_port()}", token, "--reason", "x", "--timeout", "2")
    assert unreachable.returncode == 2 and "could not be reached" in unreachable.stderr
    assert HelpRequest.objects.count() == 1
