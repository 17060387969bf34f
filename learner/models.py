"""The learner's metadata: training runs, their metrics, checkpoints, fleet deployments and evaluations.

Weights live in files under CHECKPOINT_DIR (safetensors + JSON, learner/checkpoints.py); rows point at them.
State changes go through learner/services.py.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from learner.stats import wilson_interval
from robots.models import Task


class TrainingRun(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        STOPPING = "stopping"  # asked to stop; the worker stops at its next step boundary
        STOPPED = "stopped"
        FINISHED = "finished"
        FAILED = "failed"
        WAITING = "waiting"  # no trainable data yet: a clear status, retried later

    ACTIVE = (Status.QUEUED, Status.RUNNING, Status.STOPPING, Status.WAITING)

    # Names the run's files (trainer state). Never reused, unlike a primary key after a database reset.
    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    algorithm = models.CharField(max_length=32, help_text="Registry name: bc, hg_dagger, recap")
    preset = models.CharField(max_length=32, default="default")
    tasks = models.ManyToManyField(Task, related_name="training_runs")
    config = models.JSONField(default=dict, help_text="The full training config, so the run can be reproduced")
    base_checkpoint = models.ForeignKey("Checkpoint", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    message = models.CharField(max_length=500, blank=True, help_text="What the run is doing or why it stopped")
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0, help_text="0 = run until stopped")
    attempts = models.PositiveIntegerField(default=0, help_text="Times a worker claimed this run (restarts)")
    worker = models.CharField(max_length=200, blank=True, help_text="The claim: worker name + a token unique per claim")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    next_round_at = models.DateTimeField(null=True, blank=True,
                                         help_text="When the queued round is due; overdue and unclaimed = lost, resumed")
    failures = models.PositiveIntegerField(default=0, help_text="Transient errors in a row (database, broker, disk)")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"run {self.pk} ({self.algorithm}, {self.status})"

    @property
    def progress(self) -> float | None:
        return min(1.0, self.step / self.total_steps) if self.total_steps else None


class TrainingMetric(models.Model):
    """One point of a run's curves (loss, sampler mix, throughput), written every few learner steps."""

    run = models.ForeignKey(TrainingRun, on_delete=models.CASCADE, related_name="metrics")
    step = models.PositiveIntegerField()
    at = models.DateTimeField(auto_now_add=True)
    values = models.JSONField(default=dict)

    class Meta:
        ordering = ["run", "step"]
        constraints = [models.UniqueConstraint(fields=["run", "step"], name="one_metric_row_per_run_step")]


class Checkpoint(models.Model):
    """A published policy. ``version`` is global and monotonic: assigned only when the row commits, so a killed
    worker can neither skip nor duplicate a version."""

    version = models.PositiveIntegerField(unique=True)
    run = models.ForeignKey(TrainingRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="checkpoints")
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children")
    algorithm = models.CharField(max_length=32)
    step = models.PositiveIntegerField(default=0, help_text="Learner step of the run when written")
    path = models.CharField(max_length=300, help_text="Weights file, relative to CHECKPOINT_DIR")
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    config = models.JSONField(default=dict)
    metrics = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-version"]

    def __str__(self):
        return f"v{self.version}"


class Deployment(models.Model):
    """Which checkpoint the fleet should run. The newest row wins; rollbacks append a row (an audit trail)."""

    checkpoint = models.ForeignKey(Checkpoint, on_delete=models.PROTECT, related_name="deployments")
    at = models.DateTimeField(auto_now_add=True)
    by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    reason = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-at", "-id"]


class Evaluation(models.Model):
    """Success of one checkpoint on one task, measured without interventions."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    checkpoint = models.ForeignKey(Checkpoint, on_delete=models.CASCADE, related_name="evaluations")
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="evaluations")
    episodes = models.PositiveIntegerField(default=0)
    successes = models.PositiveIntegerField(default=0)
    mean_length = models.FloatField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    message = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-checkpoint__version", "task__name"]
        constraints = [models.UniqueConstraint(fields=["checkpoint", "task"], name="one_evaluation_per_checkpoint_task")]

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.episodes if self.episodes else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95 % Wilson interval of the success rate."""
        return wilson_interval(self.successes, self.episodes) if self.episodes else None

    @property
    def interval_label(self) -> str:
        lo_hi = self.interval
        return f"95 % interval {lo_hi[0]:.0%}-{lo_hi[1]:.0%}" if lo_hi else ""
