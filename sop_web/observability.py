"""Operations endpoints: ``/readyz`` (can this web process serve: database, channel layer, broker, storage) and
``/metrics/prometheus`` (Prometheus text format 0.0.4, written by hand: a few counters need no client library).

Counters are per process (heartbeats received, robot upload responses by status class, payload bytes accepted):
Prometheus scrapes every web process on its own and sums. Gauges are read from the database at scrape time, so
every process reports the same fleet (robots online, per-robot loop rate and p99, spool backlog, deployed version,
learner step and rate). docs/deploy.md lists them.

Access: ``/readyz`` is public and says only which check failed (no error text). ``/metrics/prometheus`` needs a
console login or ``Authorization: Bearer $SOP_METRICS_TOKEN`` (a scraper has no session); without that setting only
console users get it.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections import Counter
from typing import Iterable

from django.conf import settings
from django.db import connection
from django.http import HttpResponse, JsonResponse
from django.views.decorators.http import require_safe

from robots import metrics
from robots.roles import role_of

log = logging.getLogger(__name__)

class UploadMetricsMiddleware:
    """Counts responses to the robot ingest routes (/api/robot/episodes...) by status class: 4xx and 5xx rates are
    the first sign of a misbehaving robot or a full disk."""

    PREFIX = "/api/robot/episodes"

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if request.path.startswith(self.PREFIX):
            metrics.inc("sop_robot_upload_responses_total", code=f"{response.status_code // 100}xx")
        return response


# ---------------------------------------------------------------- /readyz


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _check_channel_layer() -> None:
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer")
    name = f"readyz.{uuid.uuid4().hex}"  # a message to ourselves, through Redis and back
    async_to_sync(layer.send)(name, {"type": "readyz"})
    received = async_to_sync(layer.receive)(name)
    if received.get("type") != "readyz":
        raise RuntimeError("channel layer returned something else")


def _check_broker() -> None:
    from sop_web.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _check_storage() -> None:
    from sop_web import storage

    storage.check()


CHECKS = {"database": _check_database, "channel_layer": _check_channel_layer, "broker": _check_broker,
          "storage": _check_storage}


@require_safe
def readyz(request):
    """200 when every dependency answers, else 503; each check's result and time, never an error message."""
    results, ok = {}, True
    for name, check in CHECKS.items():
        started = time.monotonic()
        try:
            check()
            passed = True
        except Exception:  # noqa: BLE001 - any failure means "not ready"; the reason goes to the log
            log.warning("readiness check %s failed", name, exc_info=True)
            passed = False
        ok &= passed
        results[name] = {"ok": passed, "ms": round(1000 * (time.monotonic() - started), 1)}
    return JsonResponse({"ok": ok, "checks": results}, status=200 if ok else 503)


# ---------------------------------------------------------------- /metrics/prometheus


def _authorised(request) -> bool:
    if role_of(request.user) is not None:
        return True
    token = getattr(settings, "SOP_METRICS_TOKEN", "")
    header = request.headers.get("Authorization", "")
    return bool(token) and header.startswith("Bearer ") and hmac.compare_digest(header[7:].encode(), token.encode())


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(name: str, value: float, labels: Iterable[tuple[str, str]] = ()) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return f"{name}{{{inner}}} {float(value)!r}" if inner else f"{name} {float(value)!r}"


def render() -> str:
    """The whole exposition: this process's counters, then gauges from the database."""
    from django.db.models import Count
    from django.utils import timezone

    from learner.models import TrainingMetric, TrainingRun
    from learner.services import current_checkpoint
    from robots.models import Episode, Robot

    out: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
        out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

    counters = metrics.snapshot()
    for name, help_text in metrics.COUNTERS.items():
        samples = [_sample(name, v, labels) for (n, labels), v in sorted(counters.items()) if n == name]
        family(name, "counter", help_text, samples or [_sample(name, 0.0)])

    robots = list(Robot.objects.filter(revoked_at__isnull=True).values(
        "name", "connected", "state", "loop_hz", "loop_p99_ms", "spool_pending", "policy_version", "last_seen"))
    now = timezone.now()
    family("sop_robots_online", "gauge", "Robots with an open socket.",
           [_sample("sop_robots_online", sum(r["connected"] for r in robots))])
    family("sop_robots", "gauge", "Registered robots (not revoked) by state.",
           [_sample("sop_robots", n, [("state", s)]) for s, n in sorted(Counter(r["state"] for r in robots).items())])
    online = [r for r in robots if r["connected"]]
    for name, field, help_text in (
            ("sop_robot_loop_hz", "loop_hz", "Control loop rate a robot reports (its last heartbeat)."),
            ("sop_robot_loop_p99_ms", "loop_p99_ms", "99th percentile control period a robot reports, ms."),
            ("sop_robot_spool_pending", "spool_pending", "Episodes waiting in a robot's upload spool."),
            ("sop_robot_policy_version", "policy_version", "Checkpoint version a robot runs (-1: none).")):
        family(name, "gauge", help_text, [_sample(name, r[field] if r[field] is not None else -1, [("robot", r["name"])])
                                          for r in online])
    family("sop_robot_last_seen_seconds", "gauge", "Seconds since a connected robot's last heartbeat.",
           [_sample("sop_robot_last_seen_seconds", (now - r["last_seen"]).total_seconds(), [("robot", r["name"])])
            for r in online if r["last_seen"]])
    family("sop_episodes", "gauge", "Stored episodes by status and split.",
           [_sample("sop_episodes", n, [("status", st), ("split", sp)]) for st, sp, n in
            sorted(Episode.objects.values_list("status", "split").annotate(n=Count("id")))])
    deployed = current_checkpoint()
    family("sop_policy_deployed_version", "gauge", "Checkpoint version the fleet is told to run (0: none).",
           [_sample("sop_policy_deployed_version", deployed.version if deployed else 0)])
    runs = list(TrainingRun.objects.filter(status__in=("queued", "running", "waiting")).values("pk", "algorithm",
                                                                                                "step"))
    steps, rates = [], []
    for run in runs:
        labels = [("run", str(run["pk"])), ("algorithm", run["algorithm"])]
        steps.append(_sample("sop_learner_step", run["step"], labels))
        last = list(TrainingMetric.objects.filter(run_id=run["pk"]).order_by("-step").values("step", "at")[:2])
        if len(last) == 2 and last[0]["at"] > last[1]["at"]:
            rate = (last[0]["step"] - last[1]["step"]) / (last[0]["at"] - last[1]["at"]).total_seconds()
            rates.append(_sample("sop_learner_steps_per_second", rate, labels))
    family("sop_learner_step", "gauge", "Learner step of an active training run.", steps)
    family("sop_learner_steps_per_second", "gauge", "Learner steps per second of an active run (last metrics).",
           rates)
    return "\n".join(out) + "\n"


@require_safe
def prometheus(request):
    if not _authorised(request):
        response = HttpResponse("console login or Authorization: Bearer $SOP_METRICS_TOKEN required\n",
                                status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="sop-metrics"'
        return response
    return HttpResponse(render(), content_type="text/plain; version=0.0.4; charset=utf-8")
