"""Console pages of the learner: training runs (start, stop, live curves) and checkpoints (evaluate, roll back).

Every page needs a login; starting and stopping runs and rolling the fleet back need an admin, evaluating an operator.
State changes go through learner/services.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.http import Http404, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from learner import queue, services
from learner.algorithms import NAMES as ALGORITHMS
from learner.config import PRESETS
from learner.models import Checkpoint, Evaluation, TrainingMetric, TrainingRun
from learner.policy import available_policies
from robots import ingest, replay
from sop_web import storage
from robots.models import AuditEvent, Episode, MediaJob, Robot, Task
from robots.roles import can_operate, is_admin

log = logging.getLogger(__name__)

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
    policy = forms.ChoiceField(required=False, label="Policy", help_text="the preset's, or an installed plug-in "
                               "(docs/policy.md, \"Bring your own policy\"); another policy than the deployed "
                               "checkpoint's trains from scratch")

    cameras = forms.CharField(required=False, max_length=250, label="Cameras",
                              widget=forms.TextInput(attrs={"placeholder": "e.g. corner3, gripperPOV"}),
                              help_text="the cameras the policy reads, in order (robots must record them); empty: "
                                        "each robot's primary camera, or the deployed checkpoint's")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the packages installed now (a plug-in installed while the server runs shows up on the next page load)
        self.fields["policy"].choices = [("", "the preset's (small_vla)")] + [
            (name, f"{name} ({origin})") for name, origin in sorted(available_policies().items())]

    def clean_cameras(self):
        names = [c.strip() for c in self.cleaned_data["cameras"].split(",") if c.strip()]
        return names or None

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
                                     from_scratch=data["from_scratch"], policy=data["policy"] or None,
                                     cameras=data["cameras"], user=request.user)
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
    recap = run.algorithm == "recap"
    shares: dict[str, list] = {}
    for i, (_, values) in enumerate(rows):
        if recap:  # {task: share of positive advantages}; older rows only had it under tasks[task]
            per_task = (values or {}).get("positive_share") or {}
            for name, info in ((values or {}).get("tasks") or {}).items():
                share = per_task.get(name) if isinstance(per_task, dict) else None
                if share is None and isinstance(info, dict):
                    share = info.get("positive_share")
                if share is not None:
                    shares.setdefault(name, [None] * len(rows))[i] = share
            for name, share in (per_task.items() if isinstance(per_task, dict) else ()):
                shares.setdefault(name, [None] * len(rows))[i] = share
        for name, info in ((values or {}).get("tasks") or {}).items():
            series = tasks.setdefault(name, {"loss_online": [None] * len(rows), "loss_offline": [None] * len(rows),
                                             "w_on": [None] * len(rows)})
            for key in series:
                series[key][i] = info.get(key) if isinstance(info, dict) else None
    checkpoints = list(run.checkpoints.order_by("version").values("version", "step"))
    payload = {
        "id": run.pk, "algorithm": run.algorithm, "status": run.status, "message": run.message, "step": run.step, "total_steps": run.total_steps,
        "continuous": run.total_steps >= CONTINUOUS_STEPS, "progress": run.progress,
        "heartbeat_at": run.heartbeat_at.isoformat() if run.heartbeat_at else None,
        "steps": [step for step, _ in rows],
        "loss": [(values or {}).get("loss") for _, values in rows],
        "online_fraction": [(values or {}).get("online_fraction") for _, values in rows],
        "tasks": tasks, "checkpoints": checkpoints,
    }
    if recap:  # RECAP: the value function's loss (while it trains) and each task's share of positive advantages
        payload["value_loss"] = [(values or {}).get("value_loss") for _, values in rows]
        payload["positive_share"] = shares
    return JsonResponse(payload)


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
    names = [t.name for t in tasks]
    with transaction.atomic():
        for task in tasks:
            Evaluation.objects.update_or_create(checkpoint=checkpoint, task=task, defaults={
                "status": Evaluation.Status.QUEUED, "message": f"requested by {request.user.get_username()}"})
        AuditEvent.objects.create(actor=request.user, actor_name=request.user.get_username(),
                                  action="evaluation.requested", detail={"version": version, "tasks": names})
        queue.enqueue_evaluation(checkpoint.pk, names)
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
    r"""The form's ``next`` if it stays on this site, else None. Django's check, not a prefix test: browsers read
    ``/\evil.example`` and ``/\t/evil.example`` as ``//evil.example``, another host."""
    from django.utils.http import url_has_allowed_host_and_scheme

    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()},
                                                  require_https=request.is_secure()):
        return target
    return None


# -- the episode page's value plot: V(o_t) of the newest value function --------------------------------------------

NO_VALUE_MESSAGE = "no value function yet: start a RECAP run or run manage.py pretrain_value"
VALUE_CACHE_VERSION = 1
_value_lock = threading.Lock()
_loaded_value: dict[str, Any] = {}  # identity -> (ValueFunction, info): the last one loaded, kept for the next request


def _safetensors_meta(path: Path) -> Optional[dict[str, Any]]:
    """The JSON header (key ``sop``) of a safetensors file, reading only the header; None if unreadable."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                return None
            header = json.loads(f.read(length))
        return json.loads(header["__metadata__"]["sop"])
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def value_source() -> Optional[dict[str, Any]]:
    """The newest usable value function: a RECAP run's trainer state whose value network is ready
    (``algorithm.value.*``), or a pretrained ``sop-value`` file under CHECKPOINT_DIR/value/ (``manage.py
    pretrain_value``), whichever file is newer. None when there is neither. Reads file headers only."""
    candidates: list[tuple[float, Path, Optional[TrainingRun]]] = []
    for path in (settings.CHECKPOINT_DIR / "value").glob("*.safetensors"):
        candidates.append((path.stat().st_mtime, path, None))
    for run in TrainingRun.objects.filter(algorithm="recap"):
        path = services.trainer_state_path(run)
        try:
            fresh = storage.pull_mutable(storage.key_of(path))  # object storage: the newest one, whoever wrote it
        except storage.StorageError as exc:
            log.warning("trainer state of run %s not fetched: %s", run.pk, exc)
            fresh = path if path.exists() else None
        if fresh is not None:
            candidates.append((path.stat().st_mtime, path, run))
    for _, path, run in sorted(candidates, key=lambda c: c[0], reverse=True):
        meta = _safetensors_meta(path)
        if meta is None:
            continue
        stat = path.stat()
        if run is None:
            if meta.get("format") != "sop-value":
                continue
            scales = meta.get("task_max_steps") or {}
            return {"kind": "pretrained", "path": path, "run": None, "meta": meta,
                    "identity": f"file:{path.name}:{stat.st_mtime_ns}:{stat.st_size}",
                    "c_fail": float(meta.get("c_fail", 1.0)), "scales": dict(scales),
                    "label": f"pretrained {path.name}"}
        algo = meta.get("algorithm_state") or {}
        if meta.get("algorithm") != "recap" or not algo.get("value_ready"):
            continue  # the run is still pretraining its value function: not a value worth plotting yet
        train = meta.get("train_config") or {}
        scales = {**dict(algo.get("frozen_scales") or {}),
                  **{name: m for name, m in (train.get("task_max_steps") or [])}}
        # A run rewrites its state every round; its value network only changes with value updates.
        identity = f"run:{run.uid}:{algo.get('value_version')}:{algo.get('value_updates')}"
        return {"kind": "run", "path": path, "run": run.pk, "meta": meta, "identity": identity,
                "c_fail": float(train.get("c_fail", 1.0)), "scales": scales,
                "label": f"run {run.pk} · value v{algo.get('value_version')} · step {meta.get('step')}"}
    return None


def _load_value(source: dict[str, Any]):
    """The ValueFunction of a source, from safetensors only (never unpickles). Cached for the last identity."""
    import safetensors

    from learner.config import PolicyConfig, from_dict
    from learner.value import ValueFunction, load_value

    cached = _loaded_value.get(source["identity"])
    if cached is not None:
        return cached
    if source["kind"] == "pretrained":
        value, _ = load_value(source["path"])
    else:
        with safetensors.safe_open(str(source["path"]), framework="pt") as f:
            meta = json.loads(f.metadata()["sop"])
            config = from_dict(PolicyConfig, meta["policy"]["policy_config"])
            value = ValueFunction(config, int(meta["algorithm_state"]["value_bins"]))
            prefix = "algorithm.value."
            value.net.load_state_dict({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
            value.prompts.load_arrays(list(meta["policy"]["prompts"]), f.get_tensor("prompts.embeddings").numpy())
    value.eval()
    _loaded_value.clear()
    _loaded_value[source["identity"]] = value
    return value


def _value_cache_path(episode: Episode, source: dict[str, Any]) -> Path:
    key = hashlib.sha256(f"{VALUE_CACHE_VERSION}:{episode.payload_sha256}:{source['identity']}".encode()).hexdigest()
    return settings.DATA_DIR / "values" / f"{episode.pk}-{key[:16]}.json"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached_values(episode: Episode, source: dict[str, Any]) -> Optional[list[float]]:
    cache = _value_cache_path(episode, source)
    if not cache.exists() and storage.is_remote() and MediaJob.objects.filter(
            episode_id=episode.pk, kind=MediaJob.Kind.VALUE, key=storage.key_of(cache),
            state=MediaJob.State.DONE).exists():
        try:
            storage.ensure_local(storage.key_of(cache))  # another host computed it
        except storage.StorageError as exc:
            log.warning("value plot of episode %s not in the bucket: %s", episode.pk, exc)
    try:
        return json.loads(cache.read_text())["values"]
    except (OSError, ValueError, KeyError):
        return None


def episode_values(episode: Episode, source: dict[str, Any],
                   progress=lambda fraction: None) -> tuple[list[float], bool]:
    """V(o_t) for every step of a stored episode, and whether it came from the cache
    (DATA_DIR/values/<episode>-<key>.json, keyed by the payload and the value function's identity; the bucket too
    with object storage). Computed VALUE_BLOCK frames at a time, reporting ``progress``."""
    import torch

    from robots.episode_file import EpisodeReader

    cached = _cached_values(episode, source)
    if cached is not None:
        return cached, True
    cache = _value_cache_path(episode, source)
    with _value_lock:  # one model in memory and one computation at a time
        torch.set_num_threads(1)
        value = _load_value(source)
        values: list[float] = []
        with EpisodeReader(ingest.payload_file(episode)) as reader:
            prompt = reader.meta["prompt"] or episode.prompt or episode.task.name
            for start in range(0, reader.steps, VALUE_BLOCK):
                images = reader.column("observation/image", start, start + VALUE_BLOCK)
                states = reader.column("observation/state", start, start + VALUE_BLOCK)
                with torch.no_grad():
                    values += [round(float(v), 5) for v in value.predict(images, states, prompt)]
                progress(min(start + VALUE_BLOCK, reader.steps) / max(reader.steps, 1))
    _write_atomic(cache, json.dumps({"values": values, "identity": source["identity"]}))
    storage.upload(storage.key_of(cache), cache)
    return values, False


VALUE_BLOCK = 64  # frames per value-network call while a plot is computed


def render_episode_value(episode_id: str) -> Optional[str]:
    """The Celery task's body (learner.render_episode_value): the episode's value plot with progress, if there is a
    value function; its job row says how far it is (robots/replay.py)."""
    episode = Episode.objects.select_related("task").filter(pk=episode_id).first()
    source = value_source()
    if episode is None or source is None or episode.status != Episode.Status.VERIFIED or not episode.payload_path:
        return None
    key = storage.key_of(_value_cache_path(episode, source))
    job = replay.queue(episode, MediaJob.Kind.VALUE, key, replay.VALUE_TASK, [episode_id], send=False)
    done = replay.run(job.pk, lambda job, progress: episode_values(episode, source, progress))
    return done.state if done is not None else None


@login_required
@require_GET
def episode_value(request, episode_id):
    """V(o_t) over the episode's steps from the newest value function (``value_source``), with the episode's
    normalised return-to-go for comparison. Always 200 for an existing episode: ``available`` is false (with a
    ``reason`` and a ``message``) when there is no value function yet or the episode has no stored frames."""
    from learner import recap_math

    episode = Episode.objects.select_related("task").filter(pk=episode_id).first()
    if episode is None:
        raise Http404("No such episode.")
    if episode.status != Episode.Status.VERIFIED or not episode.payload_path:
        return JsonResponse({"available": False, "reason": "no_frames",
                             "message": "no stored frames yet: the value is computed from the verified upload"})
    source = value_source()
    if source is None:
        return JsonResponse({"available": False, "reason": "no_value_function", "message": NO_VALUE_MESSAGE})
    values, cached = _cached_values(episode, source), True
    if values is None:  # computed in the background (robots/replay.py): the page shows the progress and asks again
        key = storage.key_of(_value_cache_path(episode, source))
        job = replay.queue(episode, MediaJob.Kind.VALUE, key, replay.VALUE_TASK, [str(episode.pk)])
        if job.state == MediaJob.State.FAILED:
            return JsonResponse({"available": False, "reason": "error",
                                 "message": f"the value function could not be evaluated: {job.error}"})
        return JsonResponse({"available": False, "reason": "rendering", **replay.job_view(job),
                             "message": "computing V(o_t) in the background"})
    scale = int(source["scales"].get(episode.task.name) or episode.task.max_steps or len(values) or 1)
    returns = recap_math.episode_returns(len(values), episode.outcome or "", scale, source["c_fail"])
    return JsonResponse({
        "available": True, "episode": str(episode.pk), "steps": len(values), "values": values,
        "returns": [None if math.isnan(r) else round(float(r), 5) for r in returns],
        "outcome": episode.outcome, "max_steps": scale, "c_fail": source["c_fail"], "cached": cached,
        "source": {"kind": source["kind"], "run": source["run"], "label": source["label"],
                   "file": source["path"].name},
    })
