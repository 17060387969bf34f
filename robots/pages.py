"""Console pages of the fleet beyond the live view: tasks and task mixes, episodes (replay, relabel), metrics, audit.

Server-rendered; every page needs a login, every change a role (403 otherwise) and a CSRF token. State changes go
through robots/tasking.py, ingest.py and control.py.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count, F, Max, Min, Q, Sum
from django.db.models.functions import TruncDay, TruncHour, TruncMinute
from django.http import FileResponse, Http404, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from sop_web.files import accel_redirect

from . import auth, catalog, control, events, exports, replay, tasking
from .exceptions import SopError
from .models import (ApiToken, AuditEvent, ControlLease, DatasetExport, Episode, HelpRequest, MediaJob, Robot, Task,
                     TaskAssignment)
from .replay import video_path  # noqa: F401  (tests and the proxy check import it from here)
from .protocol import RATED_OUTCOMES, ControlSource, Outcome, Split
from .roles import can_operate, is_admin

PAGE_SIZE = 50
RECENT_EPISODES = 50  # a task's "recent success rate" is over its last this many finished episodes
RATED = tuple(o.value for o in RATED_OUTCOMES)  # aborted episodes are not rated


def require_admin(request) -> None:
    if not is_admin(request.user):
        raise PermissionDenied("Only administrators can do this.")


def require_operator(request) -> None:
    if not can_operate(request.user):
        raise PermissionDenied("Only operators and administrators can do this.")


# ---------------------------------------------------------------- tasks


class TaskForm(forms.ModelForm):
    prompts = forms.CharField(widget=forms.Textarea(attrs={"rows": 4}), help_text="One instruction per line; "
                              "each episode picks one.")

    class Meta:
        model = Task
        fields = ["name", "env_id", "prompts", "max_steps", "enabled", "description"]
        widgets = {"env_id": forms.TextInput(attrs={"list": "env-ids", "autocomplete": "off"}),
                   "description": forms.Textarea(attrs={"rows": 3})}
        labels = {"env_id": "Simulator environment", "max_steps": "Max steps"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields["name"].disabled = True  # robots, episodes and runs refer to it
            self.initial["prompts"] = "\n".join(self.instance.prompts or [])
        self.fields["max_steps"].min_value = 1
        self.fields["max_steps"].widget.attrs.update(min=1, max=10000)

    def clean_prompts(self):
        lines = [line.strip() for line in self.cleaned_data["prompts"].splitlines()]
        prompts = [line for line in lines if line]
        if not prompts:
            raise forms.ValidationError("Give at least one prompt.")
        too_long = [p for p in prompts if len(p) > 500]
        if too_long:
            raise forms.ValidationError("A prompt can be at most 500 characters long.")
        return prompts

    def clean_env_id(self):
        env_id = self.cleaned_data["env_id"].strip()
        if not env_id or any(c.isspace() for c in env_id):
            raise forms.ValidationError("An environment id has no spaces, e.g. 'drawer-open-v3'.")
        return env_id

    def clean_max_steps(self):
        value = self.cleaned_data["max_steps"]
        if not 1 <= value <= 10000:
            raise forms.ValidationError("Between 1 and 10000 steps.")
        return value


def _task_rows():
    tasks = list(Task.objects.annotate(
        episode_count=Count("episodes", filter=Q(episodes__status=Episode.Status.VERIFIED)),
        online_count=Count("episodes", filter=Q(episodes__status=Episode.Status.VERIFIED,
                                                 episodes__split=Split.ONLINE.value)),
    ).order_by("name"))
    for task in tasks:
        recent = list(Episode.objects.filter(task=task, outcome__in=RATED, split=Split.ONLINE.value)
                      .order_by("-ended_at").values_list("success", flat=True)[:RECENT_EPISODES])
        task.recent_n = len(recent)
        task.recent_success = (sum(1 for s in recent if s) / len(recent)) if recent else None
    return tasks


class MixError(ValueError):
    pass


def _mix_rows(tasks, robots, data=None):
    """The assignment matrix: the fleet-wide row, then one per robot; cells are weights (blank = not in the mix)."""
    current: dict[tuple, TaskAssignment] = {(a.robot_id, a.task_id): a for a in TaskAssignment.objects.all()}
    rows = []
    for robot in [None, *robots]:
        key = "fleet" if robot is None else str(robot.pk)
        entries = [current[k] for k in current if k[0] == (robot.pk if robot else None)]
        split = data.get(f"split-{key}") if data else (entries[0].split if entries else Split.ONLINE.value)
        cells = []
        for task in tasks:
            entry = current.get((robot.pk if robot else None, task.pk))
            value = data.get(f"w-{key}-{task.pk}", "") if data else (f"{entry.weight:g}" if entry else "")
            cells.append({"task": task, "name": f"w-{key}-{task.pk}", "value": value})
        rows.append({"robot": robot, "key": key, "split": split, "cells": cells, "own": bool(entries)})
    return rows


def _parse_mix(row, data) -> dict[Task, tuple[float, str]]:
    split = data.get(f"split-{row['key']}", Split.ONLINE.value)
    if split not in (Split.ONLINE.value, Split.EVAL.value, Split.OFFLINE.value):
        raise MixError(f"unknown split {split!r}")
    entries = {}
    for cell in row["cells"]:
        raw = (data.get(cell["name"]) or "").strip()
        if not raw:
            continue
        try:
            weight = float(raw)
        except ValueError:
            raise MixError(f"{cell['task'].name}: '{raw}' is not a number") from None
        if not math.isfinite(weight) or weight < 0 or weight > 1e6:
            raise MixError(f"{cell['task'].name}: a weight is a number from 0 to 1000000")
        if weight > 0:
            entries[cell["task"]] = (weight, split)
    return entries


@login_required
def tasks(request):
    tasks = _task_rows()
    robots = list(Robot.objects.filter(revoked_at__isnull=True, recorder=False).order_by("name"))
    errors: dict[str, str] = {}
    data = None
    if request.method == "POST":
        require_admin(request)
        data = request.POST
        rows = _mix_rows(tasks, robots, data)
        parsed = {}
        for row in rows:
            try:
                parsed[row["key"]] = _parse_mix(row, data)
            except MixError as exc:
                errors[row["key"]] = str(exc)
        if not errors:
            for row in rows:
                tasking.set_assignments(row["robot"], parsed[row["key"]], actor=request.user)
            messages.success(request, "Task mixes saved. Robots run them from their next episode.")
            return redirect("tasks")
    rows = _mix_rows(tasks, robots, data)
    for row in rows:
        row["error"] = errors.get(row["key"], "")
    return render(request, "pages/tasks.html", {
        "tasks": tasks, "mix_rows": rows, "mix_tasks": tasks, "splits": [Split.ONLINE.value, Split.EVAL.value],
        "recent_n": RECENT_EPISODES, "can_edit": is_admin(request.user),
    }, status=400 if errors else 200)


def _task_form_page(request, task: Task | None):
    creating = task is None
    if request.method == "POST":
        require_admin(request)
        form = TaskForm(request.POST, instance=task or Task())
        if form.is_valid():
            saved = tasking.save_task(form.save(commit=False), actor=request.user, created=creating)
            messages.success(request, f"Task {saved.name} {'created' if creating else 'saved'}.")
            return redirect("task_edit", name=saved.name)
        status = 400
    else:
        if creating:
            require_admin(request)
        form = TaskForm(instance=task)
        status = 200
    context = {
        "form": form, "task": task, "creating": creating, "can_edit": is_admin(request.user),
        "env_ids": [spec.env_id for spec in catalog.MT10],
    }
    if task is not None:
        context["stats"] = Episode.objects.filter(task=task, status=Episode.Status.VERIFIED).aggregate(
            episodes=Count("id"), successes=Count("id", filter=Q(success=True)),
            interventions=Sum("intervention_count"))
        context["assignments"] = TaskAssignment.objects.filter(task=task).select_related("robot").order_by(
            F("robot__name").asc(nulls_first=True))
        context["recent"] = Episode.objects.filter(task=task).select_related("robot")[:10]
    if not context["can_edit"]:
        for field in form.fields.values():
            field.disabled = True
    return render(request, "pages/task_form.html", context, status=status)


@login_required
def task_new(request):
    return _task_form_page(request, None)


@login_required
def task_edit(request, name: str):
    return _task_form_page(request, get_object_or_404(Task, name=name))


# ---------------------------------------------------------------- episodes


class EpisodeFilter(forms.Form):
    task = forms.CharField(required=False)
    robot = forms.CharField(required=False)
    version = forms.IntegerField(required=False, min_value=0, label="Policy version")
    outcome = forms.ChoiceField(required=False, choices=[("", "any")] + [(o.value, o.value) for o in Outcome]
                                + [("none", "not ended")])
    intervened = forms.ChoiceField(required=False, choices=[("", "any"), ("yes", "yes"), ("no", "no")])
    split = forms.ChoiceField(required=False, choices=[("", "any")] + [(s.value, s.value) for s in Split])

    def apply(self, queryset):
        data = self.cleaned_data
        if data.get("task"):
            queryset = queryset.filter(task__name=data["task"])
        if data.get("robot"):
            queryset = queryset.filter(robot__name=data["robot"])
        if data.get("version") is not None:
            queryset = queryset.filter(policy_version=data["version"])
        if data.get("outcome") == "none":
            queryset = queryset.filter(outcome="")
        elif data.get("outcome"):
            queryset = queryset.filter(outcome=data["outcome"])
        if data.get("intervened") == "yes":
            queryset = queryset.filter(intervention_count__gt=0)
        elif data.get("intervened") == "no":
            queryset = queryset.filter(intervention_count=0)
        if data.get("split"):
            queryset = queryset.filter(split=data["split"])
        return queryset


@login_required
@require_GET
def episodes(request):
    form = EpisodeFilter(request.GET)
    queryset = Episode.objects.select_related("robot", "task").order_by("-started_at", "id")
    if form.is_valid():
        queryset = form.apply(queryset)
    else:
        queryset = queryset.none()
    page = Paginator(queryset, PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "pages/episodes.html", {
        "form": form, "page": page, "total": page.paginator.count,
        "task_names": Task.objects.order_by("name").values_list("name", flat=True),
        "robot_names": Robot.objects.order_by("name").values_list("name", flat=True),
        "versions": (Episode.objects.exclude(policy_version=None).order_by("-policy_version")
                     .values_list("policy_version", flat=True).distinct()[:500]),
    })


def _episode_or_404(episode_id) -> Episode:
    episode = (Episode.objects.select_related("robot", "task", "outcome_by")
               .prefetch_related("segments__operator").filter(pk=episode_id).first())
    if episode is None:
        raise Http404("No such episode.")
    return episode


_control_hz = replay.control_hz


@login_required
@require_GET
def episode(request, episode_id):
    episode = _episode_or_404(episode_id)
    steps = max(1, episode.steps)
    segments = [{
        "start": s.start_step, "end": s.end_step, "steps": s.steps, "source": s.source,
        "who": (s.operator.get_username() if s.operator else s.operator_name)
        or (f"{s.claimed_operator} (claimed by the robot, no lease on record)" if s.claimed_operator else "")
        or ("simulated operator" if s.source == ControlSource.SIM_OPERATOR.value else "operator"),
        "reason": s.reason, "left": 100 * s.start_step / steps, "width": 100 * s.steps / steps,
        "help": ({"id": s.help_request.pk, "kind": s.help_request.kind, "reason": s.help_request.reason}
                 if s.help_request else None),
    } for s in episode.segments.select_related("operator", "help_request")]
    relabels = AuditEvent.objects.filter(action="relabel", detail__episode=str(episode.pk)).order_by("-at")[:20]
    duration = (episode.ended_at - episode.started_at).total_seconds() if episode.ended_at else None
    return render(request, "pages/episode.html", {
        "episode": episode, "segments": segments, "relabels": relabels, "duration": duration,
        "control_hz": _control_hz(episode), "has_video": episode.status == Episode.Status.VERIFIED
        and bool(episode.payload_path), "outcomes": [o.value for o in Outcome],
        "can_relabel": can_operate(request.user),
        "intervened_share": episode.intervention_steps / episode.steps if episode.steps else None,
    })


@login_required
@require_POST
def episode_relabel(request, episode_id):
    require_operator(request)
    episode = _episode_or_404(episode_id)
    outcome = request.POST.get("outcome", "")
    reason = request.POST.get("reason", "").strip()
    if outcome not in {o.value for o in Outcome}:
        messages.error(request, "Choose an outcome.")
    elif not reason:
        messages.error(request, "Say why you relabel this episode.")
    elif outcome == episode.outcome:
        messages.info(request, f"The episode is already labelled {outcome}.")
    else:
        control.relabel_episode(episode, outcome, actor=request.user, reason=reason)
        messages.success(request, f"Relabelled as {outcome}.")
    return redirect("episode", episode_id=episode.pk)


@login_required
@require_GET
def episode_video(request, episode_id):
    """The episode's MP4 (with byte ranges, or by X-Accel-Redirect behind the proxy). Not made yet: ``202`` with the
    background job's progress (robots/replay.py), which the episode page shows and polls; the job is queued if
    nothing makes it (an episode verified before replays were made in the background, or a job that died)."""
    episode = _episode_or_404(episode_id)
    if episode.status != Episode.Status.VERIFIED or not episode.payload_path:
        raise Http404("This episode has no stored frames (yet).")
    target = replay.video_ready(episode)
    if target is None:
        job = replay.queue_video(episode)
        failed = job is not None and job.state == MediaJob.State.FAILED  # the page says why (tried again later)
        response = JsonResponse({**replay.job_view(job), **({"detail": f"The replay could not be made: {job.error}"}
                                                           if failed else {})}, status=404 if failed else 202)
        response["Retry-After"] = "1"
        response["Cache-Control"] = "no-store"
        return response
    response = accel_redirect(target, "video/mp4") or _ranged_file(request, target, "video/mp4")
    response["Cache-Control"] = "private, max-age=86400"
    return response


# One range, each end at most 19 digits (an int of thousands of digits is past int()'s limit: a 500). fullmatch:
# "$" would also accept a trailing newline.
_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")


def _ranged_file(request, path: Path, content_type: str) -> HttpResponse:
    """The file, or the single byte range asked for: browsers only let a user seek in media served with ranges.

    No Range header: the whole file (200). A range we cannot serve (malformed, several ranges, digits past 19, or
    past the end): 416 with ``Content-Range: bytes */size``."""
    size = path.stat().st_size
    header = request.headers.get("Range", "").strip()
    if not header:
        response = FileResponse(open(path, "rb"), content_type=content_type)
        response["Accept-Ranges"] = "bytes"
        return response
    match = _RANGE.fullmatch(header)
    first, last = match.groups() if match else ("", "")
    if first:
        start, end = int(first), min(int(last) if last else size - 1, size - 1)
    elif last:  # a suffix: the last N bytes
        start, end = max(0, size - int(last)), size - 1
    else:  # malformed, or "bytes=-"
        start, end = size, size - 1
    if start >= size or start > end:
        response = HttpResponse(status=416)
        response["Content-Range"] = f"bytes */{size}"
        return response
    with open(path, "rb") as fh:
        fh.seek(start)
        body = fh.read(end - start + 1)
    response = HttpResponse(body, status=206, content_type=content_type)
    response["Content-Range"] = f"bytes {start}-{end}/{size}"
    response["Accept-Ranges"] = "bytes"
    return response


# ---------------------------------------------------------------- metrics


@login_required
@require_GET
def metrics(request):
    return render(request, "pages/metrics.html", {"ranges": RANGES, "selected": request.GET.get("range", "all")})


RANGES = {"6h": dt.timedelta(hours=6), "24h": dt.timedelta(hours=24), "7d": dt.timedelta(days=7), "all": None}
# (bucket width, database truncation): the narrowest whose buckets number at most MAX_BUCKETS over the span
BUCKETS = [(dt.timedelta(minutes=m), TruncMinute) for m in (1, 2, 5, 10, 15, 30)] + \
          [(dt.timedelta(hours=h), TruncHour) for h in (1, 2, 3, 6, 12)] + \
          [(dt.timedelta(days=d), TruncDay) for d in (1, 7, 30)]
MAX_BUCKETS = 48


def _bucketing(span: dt.timedelta):
    for width, trunc in BUCKETS:
        if span / width <= MAX_BUCKETS:
            return width, trunc
    return BUCKETS[-1]


def _floor(moment: dt.datetime, width: dt.timedelta) -> dt.datetime:
    epoch = dt.datetime(2000, 1, 3, tzinfo=dt.timezone.utc)  # a Monday, so weekly buckets start on Mondays
    return epoch + ((moment - epoch) // width) * width


def _rate(num, den):
    return round(num / den, 4) if den else None


def metrics_payload(range_name: str = "all", now: dt.datetime | None = None) -> dict:
    """Everything the metrics page charts, from database aggregates over online episodes that ended.

    Success rate = successes / (success + failure + timeout): aborted episodes (shutdown, e-stop) are not rated.
    Autonomous success rate = successes without any intervention / the same rated episodes: what the policy achieves
    on its own, the number SOP improves; assisted success = successes with at least one intervention (an operator's
    rescue), so success = autonomous + assisted. Throughput counts every ended online episode per hour, failures,
    timeouts and aborts included.
    """
    now = now or timezone.now()
    ended = Episode.objects.filter(split=Split.ONLINE.value, ended_at__isnull=False).exclude(outcome="")
    since = RANGES.get(range_name)
    if since is not None:
        ended = ended.filter(ended_at__gte=now - since)
    span = ended.aggregate(first=Min("ended_at"), last=Max("ended_at"))
    tasks = list(Task.objects.filter(pk__in=ended.values("task")).order_by("name").values_list("id", "name"))
    names = dict(tasks)
    result = {"range": range_name, "tasks": [n for _, n in tasks], "bucket_s": None, "buckets": [],
              "success": {}, "autonomous": {}, "throughput": {}, "interventions": {},
              "versions": {"versions": [], "success": {}, "autonomous": {}}, "totals": {}}
    result["attention"] = attention_payload(ended, now - since if since is not None else None, now)
    if span["first"] is None:
        return result
    width, trunc = _bucketing(max(span["last"] - span["first"], dt.timedelta(minutes=1)))
    rated = Q(outcome__in=RATED)
    alone = Q(success=True, intervention_count=0) & rated
    rows = (ended.annotate(t=trunc("ended_at")).values("t", "task", "outcome")
            .annotate(n=Count("id"), ok=Count("id", filter=Q(success=True) & rated), auto=Count("id", filter=alone),
                      steps=Sum("steps"), iv=Sum("intervention_count"), iv_steps=Sum("intervention_steps"))
            .order_by())
    buckets: dict[dt.datetime, dict] = {}
    for row in rows:
        start = _floor(row["t"] if row["t"].tzinfo else row["t"].replace(tzinfo=dt.timezone.utc), width)
        b = buckets.setdefault(start, {"tasks": {}, "outcomes": {}, "n": 0, "steps": 0, "iv": 0, "iv_steps": 0})
        task = b["tasks"].setdefault(names[row["task"]], {"rated": 0, "ok": 0, "auto": 0})
        if row["outcome"] in RATED:
            task["rated"] += row["n"]
        task["ok"] += row["ok"]
        task["auto"] += row["auto"]
        b["outcomes"][row["outcome"]] = b["outcomes"].get(row["outcome"], 0) + row["n"]
        b["n"] += row["n"]
        b["steps"] += row["steps"] or 0
        b["iv"] += row["iv"] or 0
        b["iv_steps"] += row["iv_steps"] or 0
    order = []
    start = _floor(span["first"], width)
    while start <= span["last"]:  # every bucket of the span, empty ones too, so that time reads evenly
        order.append(start)
        start += width
    hours = width.total_seconds() / 3600
    empty = {"tasks": {}, "outcomes": {}, "n": 0, "steps": 0, "iv": 0, "iv_steps": 0}
    result["bucket_s"] = int(width.total_seconds())
    result["buckets"] = [b.isoformat() for b in order]
    cells = [(name, [buckets.get(b, empty)["tasks"].get(name, {}) for b in order]) for name in result["tasks"]]
    result["success"] = {name: [{"rate": _rate(t.get("ok", 0), t.get("rated", 0)), "n": t.get("rated", 0)}
                                for t in column] for name, column in cells}
    result["autonomous"] = {name: [{"rate": _rate(t.get("auto", 0), t.get("rated", 0)), "n": t.get("rated", 0)}
                                   for t in column] for name, column in cells}
    result["throughput"] = {o.value: [round(buckets.get(b, empty)["outcomes"].get(o.value, 0) / hours, 3)
                                      for b in order] for o in Outcome}
    result["interventions"] = {
        "per_episode": [_rate(buckets.get(b, empty)["iv"], buckets.get(b, empty)["n"]) for b in order],
        "step_share": [_rate(buckets.get(b, empty)["iv_steps"], buckets.get(b, empty)["steps"]) for b in order],
        "episodes": [buckets.get(b, empty)["n"] for b in order],
    }
    by_version = (ended.filter(rated, policy_version__isnull=False).values("policy_version", "task")
                  .annotate(n=Count("id"), ok=Count("id", filter=Q(success=True)), auto=Count("id", filter=alone))
                  .order_by())
    versions = sorted({row["policy_version"] for row in by_version})
    by_cell = {(row["policy_version"], names[row["task"]]): row for row in by_version}

    def per_version(key: str) -> dict:
        return {name: [{"rate": _rate(by_cell[(v, name)][key], by_cell[(v, name)]["n"]), "n": by_cell[(v, name)]["n"]}
                       if (v, name) in by_cell else {"rate": None, "n": 0} for v in versions]
                for name in result["tasks"]}

    result["versions"] = {"versions": versions, "success": per_version("ok"), "autonomous": per_version("auto")}
    totals = ended.aggregate(n=Count("id"), rated=Count("id", filter=rated), ok=Count("id", filter=rated & Q(success=True)),
                             auto=Count("id", filter=alone),
                             iv=Sum("intervention_count"), steps=Sum("steps"), iv_steps=Sum("intervention_steps"),
                             intervened=Count("id", filter=Q(intervention_count__gt=0)))
    result["totals"] = {
        "episodes": totals["n"], "rated_episodes": totals["rated"], "success_rate": _rate(totals["ok"], totals["rated"]),
        "autonomous_success_rate": _rate(totals["auto"], totals["rated"]),
        "assisted_success_rate": _rate(totals["ok"] - totals["auto"], totals["rated"]),
        "interventions_per_episode": _rate(totals["iv"] or 0, totals["n"]),
        "intervened_step_share": _rate(totals["iv_steps"] or 0, totals["steps"] or 0),
        "intervened_episode_share": _rate(totals["intervened"], totals["n"]),
        "episodes_per_hour": _rate(totals["n"], max((span["last"] - span["first"]).total_seconds() / 3600, hours)),
    }
    return result


def _seconds(start, end) -> float:
    return max((end - start).total_seconds(), 0.0) if start and end else 0.0


def attention_payload(ended, since: dt.datetime | None, now: dt.datetime) -> dict:
    """The human side (docs/console.md, "Metrics"): how well help requests predict takeovers, what each operator
    did, and how many robots one operator could look after at the fleet's current intervention rate.

    - precision = requests answered by a takeover / requests decided (answered, dismissed as false alarms, or withdrawn
      by the robot); recall = human takeovers that answered a request / all human takeovers.
    - coverage = 1 / (share of robot time driven by an operator + takeovers per robot-second x the median time from a
      request to its takeover): the robots one fully busy operator keeps up with; interventions of the simulated
      operator count as demand too (a human would have to make them).
    """
    requests = HelpRequest.objects.all()
    leases = ControlLease.objects.all()
    if since is not None:
        requests = requests.filter(raised_at__gte=since)
        leases = leases.filter(started_at__gte=since)
    counts = requests.aggregate(
        n=Count("id"), answered=Count("id", filter=Q(lease__isnull=False)),
        dismissed=Count("id", filter=Q(status=HelpRequest.Status.DISMISSED)),
        withdrawn=Count("id", filter=Q(status=HelpRequest.Status.WITHDRAWN)),
        open=Count("id", filter=Q(status=HelpRequest.Status.OPEN)))
    decided = counts["answered"] + counts["dismissed"] + counts["withdrawn"]
    takeovers = leases.count()
    requested = leases.filter(help_requests__isnull=False).distinct().count()
    waits = sorted(_seconds(r["raised_at"], r["claimed_at"]) for r in
                   requests.filter(claimed_at__isnull=False).values("raised_at", "claimed_at"))
    response_s = waits[len(waits) // 2] if waits else None

    operators: dict[str, dict] = {}
    for lease in leases.values("operator_name", "started_at", "ended_at"):
        row = operators.setdefault(lease["operator_name"], {"takeovers": 0, "driving_s": 0.0, "answered": 0,
                                                            "false_alarms": 0})
        row["takeovers"] += 1
        row["driving_s"] += _seconds(lease["started_at"], lease["ended_at"] or now)
    for name, n in requests.filter(lease__isnull=False).values_list("claimed_name").annotate(n=Count("id")):
        operators.setdefault(name, {"takeovers": 0, "driving_s": 0.0, "answered": 0, "false_alarms": 0})["answered"] = n
    for name, n in requests.filter(status=HelpRequest.Status.DISMISSED).values_list("closed_name").annotate(n=Count("id")):
        operators.setdefault(name, {"takeovers": 0, "driving_s": 0.0, "answered": 0, "false_alarms": 0})[
            "false_alarms"] = n

    work = ended.aggregate(steps=Sum("steps"), iv_steps=Sum("intervention_steps"), iv=Sum("intervention_count"))
    robot_s = sum(_seconds(a, b) for a, b in ended.values_list("started_at", "ended_at"))
    share = _rate(work["iv_steps"] or 0, work["steps"] or 0)
    per_hour = round((work["iv"] or 0) / (robot_s / 3600), 3) if robot_s else None
    busy = None
    if share is not None and robot_s:
        busy = share + ((work["iv"] or 0) / robot_s) * (response_s or 0.0)
    return {
        "requests": counts["n"], "answered": counts["answered"], "dismissed": counts["dismissed"],
        "withdrawn": counts["withdrawn"], "open": counts["open"],
        "precision": _rate(counts["answered"], decided), "takeovers": takeovers, "takeovers_with_request": requested,
        "recall": _rate(requested, takeovers), "median_response_s": round(response_s, 2) if response_s is not None else None,
        "operators": [{"name": name, **{k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}}
                      for name, row in sorted(operators.items())],
        "intervened_step_share": share, "interventions_per_robot_hour": per_hour,
        "robots_per_operator": round(1 / busy, 1) if busy else None,
    }


@login_required
@require_GET
def metrics_data(request):
    range_name = request.GET.get("range", "all")
    if range_name not in RANGES:
        return JsonResponse({"detail": f"range must be one of {', '.join(RANGES)}"}, status=400)
    return JsonResponse(metrics_payload(range_name))


# ---------------------------------------------------------------- audit


@login_required
@require_GET
def audit(request):
    events = AuditEvent.objects.select_related("robot", "actor").order_by("-at", "-id")
    action, robot, user = (request.GET.get(k, "").strip() for k in ("action", "robot", "user"))
    if action:
        events = events.filter(action=action)
    if robot:
        events = events.filter(robot__name=robot)
    if user:
        events = events.filter(actor_name=user)
    page = Paginator(events, PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "pages/audit.html", {
        "page": page, "total": page.paginator.count, "filters": {"action": action, "robot": robot, "user": user},
        "actions": AuditEvent.objects.order_by("action").values_list("action", flat=True).distinct(),
        "robot_names": Robot.objects.order_by("name").values_list("name", flat=True),
        "user_names": AuditEvent.objects.exclude(actor_name="").order_by("actor_name")
        .values_list("actor_name", flat=True).distinct(),
    })


# ---------------------------------------------------------------- data: dataset exports and API tokens

TOKEN_LIFETIMES = {"30": 30, "90": 90, "365": 365, "never": None}


def _data_page(request, **extra):
    return render(request, "pages/data.html", {
        "exports": DatasetExport.objects.all()[:50],
        "tokens": ApiToken.objects.filter(user=request.user),
        "task_names": Task.objects.order_by("name").values_list("name", flat=True),
        "robot_names": Robot.objects.order_by("name").values_list("name", flat=True),
        "versions": (Episode.objects.exclude(policy_version=None).order_by("-policy_version")
                     .values_list("policy_version", flat=True).distinct()[:500]),
        "lifetimes": TOKEN_LIFETIMES, "max_running": exports.MAX_RUNNING, "can_operate": can_operate(request.user),
        **extra,
    })


@login_required
@require_GET
def data(request):
    """Exports of verified episodes as LeRobotDataset v3.0 (made in the background, downloadable), and the signed-in
    person's API tokens for scripts (docs/lerobot.md)."""
    return _data_page(request)


@login_required
@require_POST
def data_export(request):
    if not can_operate(request.user):
        raise PermissionDenied("Operators and admins start exports.")
    raw = {"tasks": request.POST.getlist("tasks") or None, "robots": request.POST.getlist("robots") or None,
           "split": request.POST.get("split") or None, "versions": request.POST.getlist("versions") or None}
    try:
        export = exports.request_export(request.user, raw)
    except SopError as exc:
        messages.error(request, f"Not exported: {exc.detail}")
    else:
        messages.success(request, f"Export {export.pk} of {export.episodes} episodes is queued; it appears below "
                                  f"with its progress, then a download link.")
    return redirect("data")


@login_required
@require_POST
def token_create(request):
    name = (request.POST.get("name") or "").strip()[:100]
    lifetime = request.POST.get("lifetime", "90")
    if not name or lifetime not in TOKEN_LIFETIMES:
        messages.error(request, "Give the token a name (what it is for) and a lifetime.")
        return redirect("data")
    raw = auth.generate_user_token()
    days = TOKEN_LIFETIMES[lifetime]
    token = ApiToken.objects.create(user=request.user, name=name, token_hash=auth.hash_token(raw),
                                    prefix=raw[:auth.SHOWN_PREFIX_CHARS],
                                    expires_at=timezone.now() + dt.timedelta(days=days) if days else None)
    events.audit("api_token.created", actor=request.user,
                 detail={"token": token.pk, "name": name, "expires_at": str(token.expires_at or "")})
    # rendered, not redirected: the token is shown this once and never stored anywhere but the hash
    response = _data_page(request, new_token=raw, new_token_name=name)
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def token_revoke(request, token_id: int):
    token = ApiToken.objects.filter(pk=token_id, user=request.user).first()  # one's own tokens only
    if token is None:
        raise Http404("No such token of yours.")
    if token.revoked_at is None:
        ApiToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now())
        events.audit("api_token.revoked", actor=request.user, detail={"token": token.pk, "name": token.name})
        messages.success(request, f"Token {token.prefix}… ({token.name}) is revoked.")
    return redirect("data")
