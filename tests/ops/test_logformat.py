"""SOP_LOG_FORMAT=json: one parseable object a line, with the ids a fleet operator filters by."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from sop_web.logformat import JsonFormatter, ids

from tests.e2e.conftest import ROOT


def _record(**extra) -> logging.LogRecord:
    record = logging.getLogger("robots.ingest").makeRecord(
        "robots.ingest", logging.INFO, __file__, 1, "episode %s verified", ("e-1",), None, extra=extra)
    return record


def test_a_line_is_one_json_object_with_the_ids_given():
    line = JsonFormatter().format(_record(**ids(robot="arm-1", episode="e-1", run=None, lease="")))
    out = json.loads(line)
    assert out["message"] == "episode e-1 verified" and out["level"] == "INFO" and out["logger"] == "robots.ingest"
    assert out["robot"] == "arm-1" and out["episode"] == "e-1"
    assert "run" not in out and "lease" not in out, "empty ids are left out"
    assert out["ts"].endswith("+00:00")


def test_a_traceback_stays_inside_the_object():
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line and "ValueError" in json.loads(line)["exc"]


def test_the_setting_switches_the_console_handler():
    code = "import django, logging; django.setup(); logging.getLogger('robots.ingest').warning('hi', extra={'robot': 'r'})"
    env = {"SOP_LOG_FORMAT": "json", "DJANGO_SETTINGS_MODULE": "sop_web.settings", "PATH": "/usr/bin:/bin",
           "SOP_DATA_DIR": os.environ.get("SOP_DATA_DIR", str(ROOT / "var" / "test"))}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(line["message"] == "hi" and line["robot"] == "r" for line in lines), done.stderr[-2000:]
