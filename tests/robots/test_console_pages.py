"""The live console pages render for every role: fleet tiles and the robot page, with the hooks the browser uses."""

import json
import re

import pytest
from django.urls import reverse

from robots import fleet
from robots.models import Robot
from robots.roles import set_role

pytestmark = pytest.mark.django_db


@pytest.fixture
def viewer_user(django_user_model):
    user = django_user_model.objects.create_user("vera", password="vera-password-1")
    set_role(user, "viewer")
    return user


@pytest.fixture
def operator_user(operator):
    set_role(operator, "operator")
    return operator


def _json_script(html: str, element_id: str):
    match = re.search(rf'<script id="{element_id}" type="application/json">(.*?)</script>', html, re.S)
    assert match, f"no json_script {element_id}"
    return json.loads(match.group(1))


def test_pages_need_a_login(client, robot):
    robot, _ = robot
    for url in (reverse("fleet"), reverse("robot", args=[robot.name])):
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"]


def test_fleet_renders_a_tile_per_robot_with_the_users_role(client, operator_user, robot, other_robot, task):
    robot, _ = robot
    Robot.objects.filter(pk=robot.pk).update(connected=True, state="running", current_task=task)
    revoked = fleet.register_robot("sim-09")[0]
    Robot.objects.filter(pk=revoked.pk).update(token_hash=None)
    client.force_login(operator_user)
    response = client.get(reverse("fleet"))
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-robot="sim-01"' in html and 'data-robot="sim-02"' in html
    assert 'data-robot="sim-09"' not in html, "revoked robots have no tile"
    assert 'data-role="operator"' in html and 'data-can-operate="true"' in html and 'data-is-admin="false"' in html
    assert 'data-max-videos="6"' in html
    assert 'data-testid="video"' in html and 'data-testid="control-badge"' in html  # in the tile template
    assert "frontend/fleet.js" in html and "css/live.css" in html
    assert 'id="learning"' in html and 'id="episodes"' in html
    initial = _json_script(html, "initial-robots")
    assert [r["name"] for r in initial] == ["sim-01", "sim-02"]
    assert (initial[0]["connected"], initial[0]["state"], initial[0]["current_task"]) == (True, "running", "drawer-open")
    assert 'href="/robots/sim-01/"' in html


def test_fleet_without_robots_says_how_to_add_one(client, operator_user):
    client.force_login(operator_user)
    html = client.get(reverse("fleet")).content.decode()
    assert "add_robot" in html


def test_robot_page_for_an_operator_has_enabled_controls(client, operator_user, robot):
    robot, _ = robot
    client.force_login(operator_user)
    response = client.get(f"/robots/{robot.name}/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-robot="sim-01"' in html and 'data-role="operator"' in html and 'data-user="alice"' in html
    for testid in ("video", "takeover", "release", "estop", "estop-clear", "mark-success", "mark-failure",
                   "control-badge", "hud-fps", "hud-rtt", "hud-deadman", "held-by", "error"):
        assert f'data-testid="{testid}"' in html, testid
    takeover = re.search(r'<button[^>]*data-testid="takeover"[^>]*>', html).group(0)
    estop = re.search(r'<button[^>]*data-testid="estop"[^>]*>', html).group(0)
    assert "disabled" not in takeover and "disabled" not in estop
    assert 'data-testid="force-takeover"' not in html, "forced takeover is for admins"
    for reason in ("about to fail", "collision risk", "stuck", "other"):
        assert f'<option value="{reason}">' in html
    assert _json_script(html, "initial-robot")["name"] == "sim-01"
    assert "frontend/robot.js" in html


def test_robot_page_for_a_viewer_disables_controls(client, viewer_user, robot):
    robot, _ = robot
    client.force_login(viewer_user)
    html = client.get(f"/robots/{robot.name}/").content.decode()
    assert 'data-role="viewer"' in html and 'data-can-operate="false"' in html
    for testid in ("takeover", "estop", "mark-success", "mark-failure"):
        tag = re.search(rf'<button[^>]*data-testid="{testid}"[^>]*>', html, re.S).group(0)
        assert "disabled" in tag and "Operators only" in tag, testid
    assert 'data-testid="video"' in html, "viewers watch"


def test_a_user_in_no_group_is_a_viewer(client, django_user_model, robot):
    robot, _ = robot
    client.force_login(django_user_model.objects.create_user("nobody", password="nobody-password-1"))
    html = client.get(f"/robots/{robot.name}/").content.decode()
    assert 'data-role="viewer"' in html


def test_robot_page_for_an_admin_offers_forced_takeover(client, admin_user, robot):
    robot, _ = robot
    client.force_login(admin_user)
    html = client.get(f"/robots/{robot.name}/").content.decode()
    assert 'data-role="admin"' in html and 'data-is-admin="true"' in html
    assert 'data-testid="force-takeover"' in html


def test_unknown_robot_is_404(client, operator_user):
    client.force_login(operator_user)
    assert client.get("/robots/no-such-robot/").status_code == 404
    assert client.get(reverse("robot", args=["nope"])).status_code == 404
