"""Console pages of the learner: training runs (start, stop, live curves) and checkpoints (evaluate, roll back).

Every page needs a login; starting and stopping runs and rolling the fleet back need an admin, evaluating an operator.
State changes go through learner/services.py.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from learner import services
from learner.algorithms import NAMES as ALGORITHMS
from learner.config import PRESETS
from learner.models import Checkpoint, Evaluation, TrainingMetric, TrainingRun
from robots.models import AuditEvent, Robot, Task
from robots.roles import can_operate, is_admin

CONTINUOUS_STEPS = 10_000_000  # "runs until stopped": the fleet page shows runs this long as continuous
MAX_METRIC_POINTS = 400


class StartRunForm(forms.Form):
    algorithm = forms.ChoiceField(choices=[(n, n) for n in ALGORITHMS], initial="hg_dagger")
    tasks = forms.ModelMultipleChoiceField(queryset=Task.objects.order_by("name"), to_field_name="name",
                                           widget=forms.CheckboxSelectMultiple)
    preset = forms.ChoiceField(choices=[(n, n) for n in PRESETS], initial="default")
    mode = forms.ChoiceField(choices=[("continuous", "Continuous (until stopped)"), ("steps", "Fixed number of steps")],
                             initial="continuous", widget=forms.RadioSelect)
    steps = forms.IntegerField(required=False, min_value=1, max_value=CONTINUOUS_STEPS - 1,
                               widget=forms.NumberInput(attrs={"placeholder": "learner steps, e.g. 3000"}))
    from_scratch = forms.BooleanField(required=False, label="From scratch (ignore the deployed checkpoint)")

    def clean(self):
        data = super().clean()
        if data.get("mode") == "steps" and not data.get("steps"):
            self.add_error("steps", "Give the number of learner steps.")
        return data


def _checkpoint_rows(queryset):
    deployed = services.current_checkpoint()
    robots_by_version: dict[int, list[str]] = {}
    for name, version in Robot.objects.filter(revoked_at__isnull=True).values_list("name", "policy_version"):
        if version is not None:
            robots_by_version.setdefault(version, []).append(name)
    rows = list(queryset.select_related("parent", "run").prefetch_related("evaluations__task"))
    for cp in rows:
        cp.is_deployed = deployed is not None and cp.pk == deployed.pk
        cp.robot_names = robots_by_version.get(cp.version, [])
        cp.evals = list(cp.evaluations.all())
    return rows, deployed


def _runs_page(request, form, status=200):
    runs = TrainingRun.objects.prefetch_related("tasks").select_related("created_by", "base_checkpoint")
    page = Paginator(runs, 20).get_page(request.GET.get("page"))
    checkpoints, deployed = _checkpoint_rows(Checkpoint.objects.all()[:30])
    return render(request, "learner/training.html", {
        "page": page, "form": form, "checkpoints": checkpoints, "deployed": deployed,
        "checkpoint_count": Checkpoint.objects.count(), "is_admin": is_admin(request.user),
        "can_operate": can_operate(request.user), "continuous": CONTINUOUS_STEPS,
        "active": [r for r in page if r.status in TrainingRun.ACTIVE],
    }, status=status)


@login_required
@require_GET
def training(request):
    return _runs_page(request, StartRunForm())


@login_required
@require_POST
def training_start(request):
    if not is_admin(request.user):
        raise PermissionDenied("Only administrators start training runs.")
    form = StartRunForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        steps = CONTINUOUS_STEPS if data["mode"] == "continuous" else data["steps"]
        try:
            run = services.start_run(data["algorithm"], list(data["tasks"]), preset=data["preset"], total_steps=steps,
                                     from_scratch=data["from_scratch"], user=request.user)
        except services.LearnerError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Run {run.pk} queued.")
            return redirect("training_run", run_id=run.pk)
    return _runs_page(request, form, status=400)


@login_required
@require_POST
def training_stop(request, run_id: int):
    if not is_admin(request.user):
        raise PermissionDenied("Only administrators stop training runs.")
    run = get_object_or_404(TrainingRun, pk=run_id)
    before = run.status
    run = services.stop_run(run, request.user)
    if run.status == before:
        messages.info(request, f"Run {run.pk} is {run.status}: nothing to stop.")
    else:
        messages.success(request, f"Run {run.pk}: {run.message}.")
    return redirect(_safe_next(request) or reverse("training_run", args=[run.pk]))


@login_required
@require_GET
def training_run(request, run_id: int):
    run = get_object_or_404(TrainingRun.objects.prefetch_related("tasks").select_related("created_by",
                                                                                          "base_checkpoint"), pk=run_id)
    checkpoints, deployed = _checkpoint_rows(run.checkpoints.all())
    return render(request, "learner/run.html", {
        "run": run, "checkpoints": checkpoints, "deployed": deployed, "is_admin": is_admin(request.user),
        "can_operate": can_operate(request.user), "continuous": run.total_steps >= CONTINUOUS_STEPS,
        "active": run.status in TrainingRun.ACTIVE, "train_config": (run.config or {}).get("train", {}),
    })


def _thin(rows: list, limit: int) -> list:
    if len(rows) <= limit:
        return rows
    stride = len(rows) / limit
    picked = [rows[int(i * stride)] for i in range(limit)]
    return picked if picked[-1] is rows[-1] else picked + [rows[-1]]


@login_required
@require_GET
def training_run_metrics(request, run_id: int):
    """The run's status and curves for the live page (polled every 2 s): loss, online fraction, per-task losses."""
    run = get_object_or_404(TrainingRun, pk=run_id)
    rows = list(TrainingMetric.objects.filter(run=run).order_by("step").values_list("step", "values"))
    rows = _thin(rows, MAX_METRIC_POINTS)
    tasks: dict[str, dict[str, list]] = {}
    for i, (_, values) in enumerate(rows):
        for name, info in ((values or {}).get("tasks") or {}).items():
            series = tasks.setdefault(name, {"loss_online": [None] * len(rows), "loss_offline": [None] * len(rows),
                                             "w_on": [None] * len(rows)})
            for key in series:
                series[key][i] = info.get(key) if isinstance(info, dict) else None
    checkpoints = list(run.checkpoints.order_by("version").values("version", "step"))
    return JsonResponse({
        "id": run.pk, "status": run.status, "message": run.message, "step": run.step, "total_steps": run.total_steps,
        "continuous": run.total_steps >= CONTINUOUS_STEPS, "progress": run.progress,
        "heartbeat_at": run.heartbeat_at.isoformat() if run.heartbeat_at else None,
        "steps": [step for step, _ in rows],
        "loss": [(values or {}).get("loss") for _, values in rows],
        "online_fraction": [(values or {}).get("online_fraction") for _, values in rows],
        "tasks": tasks, "checkpoints": checkpoints,
    })


@login_required
@require_POST
def checkpoint_evaluate(request, version: int):
    if not can_operate(request.user):
        raise PermissionDenied("Only operators and administrators start evaluations.")
    checkpoint = get_object_or_404(Checkpoint, version=version)
    tasks = list(checkpoint.run.tasks.all()) if checkpoint.run else []
    tasks = tasks or list(Task.objects.filter(pk__in=checkpoint.evaluations.values("task"))) or \
        list(Task.objects.filter(enabled=True))
    if not tasks:
        messages.error(request, "There is no task to evaluate on.")
        return redirect(_safe_next(request) or "training")
    from learner import tasks as celery_tasks

    names = [t.name for t in tasks]
    with transaction.atomic():
        for task in tasks:
            Evaluation.objects.update_or_create(checkpoint=checkpoint, task=task, defaults={
                "status": Evaluation.Status.QUEUED, "message": f"requested by {request.user.get_username()}"})
        AuditEvent.objects.create(actor=request.user, actor_name=request.user.get_username(),
                                  action="evaluation.requested", detail={"version": version, "tasks": names})
        transaction.on_commit(lambda: celery_tasks.evaluate_checkpoint.delay(checkpoint.pk, names))
    messages.success(request, f"Evaluation of v{version} queued on {', '.join(names)}.")
    return redirect(_safe_next(request) or "training")


@login_required
@require_POST
def checkpoint_rollback(request, version: int):
    if not is_admin(request.user):
        raise PermissionDenied("Only administrators roll the fleet back.")
    checkpoint = get_object_or_404(Checkpoint, version=version)
    previous = services.current_checkpoint()
    reason = request.POST.get("reason", "").strip() or f"rolled back from the console by {request.user.get_username()}"
    with transaction.atomic():
        services.deploy_checkpoint(checkpoint, user=request.user, reason=reason)
        AuditEvent.objects.create(actor=request.user, actor_name=request.user.get_username(), action="rollback",
                                  detail={"from": previous.version if previous else None, "to": version,
                                          "reason": reason})
    messages.success(request, f"The fleet now runs v{version}; robots swap at their next episode.")
    return redirect(_safe_next(request) or "training")


def _safe_next(request) -> str | None:
    target = request.POST.get("next", "")
    return target if target.startswith("/") and not target.startswith("//") else None
