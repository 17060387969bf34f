"""/readyz and /metrics/prometheus: what an orchestrator and a Prometheus scraper get, and who gets it."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from robots import fleet, metrics
from robots.models import Robot

pytestmark = pytest.mark.django_db

SAMPLE = re.compile(r'^[a-z_][a-z0-9_]*(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? -?[0-9.e+-]+$|^[a-z_]+ (nan|[+-]inf)$')


def _parse(text: str) -> dict[str, float]:
    """Every line is a HELP/TYPE comment or a valid sample; returns {sample name with labels: value}."""
    samples = {}
    for line in text.strip().splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        assert SAMPLE.match(line), f"not a Prometheus sample: {line!r}"
        name, _, value = line.rpartition(" ")
        samples[name] = float(value)
    return samples


def test_ready_when_database_channel_layer_broker_and_storage_answer(payload_dir, settings, tmp_path):
    settings.CHECKPOINT_DIR = tmp_path / "checkpoints"
    resp = Client().get("/readyz")
    body = resp.json()
    assert resp.status_code == 200 and body["ok"], body
    assert set(body["checks"]) == {"database", "channel_layer", "broker", "storage"}


def test_not_ready_names_the_failing_check_and_nothing_else(settings, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    settings.PAYLOAD_DIR = blocker / "payloads"  # mkdir fails: the store is not writable
    settings.CHECKPOINT_DIR = tmp_path / "checkpoints"
    resp = Client().get("/readyz")
    body = resp.json()
    assert resp.status_code == 503 and not body["ok"]
    assert body["checks"]["storage"]["ok"] is False and body["checks"]["database"]["ok"] is True
    assert "a-file" not in resp.content.decode(), "no paths or error text leave the server"
    assert Client().post("/readyz").status_code == 405


def test_metrics_need_a_console_login_or_the_scrape_token(settings, operator):
    settings.SOP_METRICS_TOKEN = "scrape-secret-1"
    assert Client().get("/metrics/prometheus").status_code == 401
    assert Client(HTTP_AUTHORIZATION="Bearer wrong").get("/metrics/prometheus").status_code == 401
    _, robot_token = fleet.register_robot("arm-1")
    assert Client(HTTP_AUTHORIZATION=f"Bearer {robot_token}").get("/metrics/prometheus").status_code == 401
    assert Client(HTTP_AUTHORIZATION="Bearer scrape-secret-1").get("/metrics/prometheus").status_code == 200
    browser = Client()
    browser.force_login(operator)
    assert browser.get("/metrics/prometheus").status_code == 200
    settings.SOP_METRICS_TOKEN = ""
    assert Client(HTTP_AUTHORIZATION="Bearer ").get("/metrics/prometheus").status_code == 401


def test_metrics_report_the_fleet_and_this_process_counters(operator):
    robot, token = fleet.register_robot("arm-1")
    fleet.register_robot("arm-2")
    Robot.objects.filter(pk=robot.pk).update(connected=True, state="running", loop_hz=9.5, loop_p99_ms=104.0,
                                             spool_pending=3, policy_version=7)
    before = metrics.value("sop_robot_upload_responses_total", code="4xx")
    bad = Client(HTTP_AUTHORIZATION=f"Bearer {token}").put(
        "/api/robot/episodes/00000000-0000-4000-8000-000000000000/payload", b"x",
        content_type="application/octet-stream")  # no Upload-Offset: a 400
    assert bad.status_code == 400
    browser = Client()
    browser.force_login(operator)
    resp = browser.get("/metrics/prometheus")
    assert resp["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = _parse(resp.content.decode())
    assert samples["sop_robots_online"] == 1
    assert samples['sop_robot_loop_hz{robot="arm-1"}'] == 9.5
    assert samples['sop_robot_loop_p99_ms{robot="arm-1"}'] == 104.0
    assert samples['sop_robot_spool_pending{robot="arm-1"}'] == 3
    assert samples['sop_robot_policy_version{robot="arm-1"}'] == 7
    assert 'sop_robot_loop_hz{robot="arm-2"}' not in samples, "offline robots report no live values"
    assert samples['sop_robot_upload_responses_total{code="4xx"}'] == before + 1
    assert samples["sop_policy_deployed_version"] == 0


def test_label_values_are_escaped():
    from sop_web.observability import _sample

    assert _sample("x", 1, [("robot", 'a"b\\c\nd')]) == 'x{robot="a\\"b\\\\c\\nd"} 1.0'
    assert SAMPLE.match(_sample("x", 1, [("robot", 'a"b\\c\nd')]))
