"""The fleet's metadata: robots, tasks, assignments, episodes and their intervention segments, the audit log.

Frames never live here: an Episode points at its payload file (robots/episode_file.py). State changes go through
robots/fleet.py, ingest.py, tasking.py and control.py.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from .protocol import HELP_KINDS, ControlSource, Outcome, RobotState, Split


def _choices(enum_cls):
    return [(m.value, m.value.replace("_", " ")) for m in enum_cls]


# Names travel in protocol messages, which accept only lowercase identifiers (robots/wire.py NAME_PATTERN).
validate_name = RegexValidator(
    # \Z, not $: "$" accepts a trailing newline ("sim-01\n")
    r"^[a-z0-9][a-z0-9_-]{0,99}\Z", "Use lowercase letters, digits, '-' and '_' (e.g. 'drawer-open', 'sim-01')."
)


class Task(models.Model):
    """Something the fleet can be asked to do: a simulator environment and the language prompts that describe it."""

    name = models.SlugField(max_length=100, unique=True, validators=[validate_name])
    env_id = models.CharField(max_length=100, help_text="Simulator environment, e.g. 'drawer-open-v3' (Meta-World)")
    prompts = models.JSONField(default=list, help_text="One or more language instructions; one is picked per episode")
    max_steps = models.PositiveIntegerField(default=150)
    enabled = models.BooleanField(default=True)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class Robot(models.Model):
    """One robot (or simulated robot) of the fleet. Authenticates with a per-robot token stored only as a hash."""

    name = models.SlugField(max_length=100, unique=True, validators=[validate_name])
    token_hash = models.CharField(max_length=64, unique=True, null=True, blank=True, editable=False)
    token_prefix = models.CharField(max_length=16, blank=True, editable=False, help_text="First characters, to tell tokens apart")
    token_created_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    # live state, written by the robot socket (robots/consumers.py via fleet.py)
    connected = models.BooleanField(default=False)
    state = models.CharField(max_length=16, choices=_choices(RobotState), default=RobotState.OFFLINE.value)
    last_seen = models.DateTimeField(null=True, blank=True)
    connected_at = models.DateTimeField(null=True, blank=True)
    current_task = models.ForeignKey(Task, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    current_prompt = models.CharField(max_length=500, blank=True)
    current_episode = models.UUIDField(null=True, blank=True)
    current_step = models.PositiveIntegerField(default=0)
    policy_version = models.PositiveIntegerField(null=True, blank=True, help_text="Checkpoint version the robot runs")
    policy_name = models.CharField(max_length=100, blank=True)
    policy_error = models.CharField(max_length=300, blank=True, help_text="Why the last checkpoint was rejected, if it was")
    control_source = models.CharField(max_length=16, choices=_choices(ControlSource), default=ControlSource.POLICY.value)
    loop_hz = models.FloatField(default=0.0)
    loop_p99_ms = models.FloatField(default=0.0)
    spool_pending = models.PositiveIntegerField(default=0)
    capabilities = models.JSONField(default=list, blank=True)
    cameras = models.JSONField(default=list, blank=True, help_text="What it records, the primary first (hello)")
    agent_version = models.CharField(max_length=50, blank=True)
    # operator console (docs/console.md): the server's e-stop latch (re-sent at every hello) and what status reports
    estopped = models.BooleanField(default=False, help_text="E-stop latched from the console; cleared only there")
    recorder = models.BooleanField(
        default=False, help_text="A data identity, not a machine: demonstrations (collect_demos) and imported datasets "
                                 "(import_lerobot) are recorded as it. It has no token, never connects and is not a "
                                 "fleet tile.")
    estopped_by = models.CharField(max_length=150, blank=True)
    estopped_at = models.DateTimeField(null=True, blank=True)
    estop_seq = models.PositiveIntegerField(default=0, help_text="Counts the server's e-stop changes of this robot")
    estop_changed_at = models.DateTimeField(null=True, blank=True, help_text="Last latch or clear on the server")
    # what the robot's last heartbeat reported, next to what the server asked for (docs/console.md "Reconciliation")
    reported_estopped = models.BooleanField(default=False)
    reported_lease = models.PositiveIntegerField(null=True, blank=True)
    deadman = models.BooleanField(default=False, help_text="Under a takeover without fresh commands: holding still")
    operator_name = models.CharField(max_length=150, blank=True, help_text="Operator driving, as the robot reports")
    video_fps = models.FloatField(default=0.0)
    viewers = models.PositiveIntegerField(default=0, help_text="Open WebRTC sessions")

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    @property
    def group_name(self) -> str:
        """Channel-layer group of this robot's socket(s)."""
        return f"robot.{self.pk}"


class TaskAssignment(models.Model):
    """A weighted entry of a robot's task mix. ``robot=None`` entries form the fleet-wide mix, used by robots
    that have no entries of their own."""

    robot = models.ForeignKey(Robot, null=True, blank=True, on_delete=models.CASCADE, related_name="assignments")
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="assignments")
    weight = models.FloatField(default=1.0)
    split = models.CharField(max_length=8, choices=_choices(Split), default=Split.ONLINE.value)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["robot", "task"], name="one_assignment_per_robot_task")]

    def __str__(self):
        return f"{self.robot or 'fleet'} -> {self.task} (x{self.weight})"


class Episode(models.Model):
    class Status(models.TextChoices):
        RECORDING = "recording"  # announced over the socket, still running on the robot
        UPLOADING = "uploading"  # upload opened, bytes arriving
        VERIFIED = "verified"  # payload stored, checksum and schema checked: visible to training
        REJECTED = "rejected"  # the last upload attempt failed verification; the robot keeps its copy and retries
        ABANDONED = "abandoned"  # announced, never uploaded within SOP_STALE_UPLOAD_HOURS (a later upload revives it)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, help_text="Made by the robot; makes uploads idempotent")
    robot = models.ForeignKey(Robot, on_delete=models.PROTECT, related_name="episodes")
    task = models.ForeignKey(Task, on_delete=models.PROTECT, related_name="episodes")
    prompt = models.CharField(max_length=500, blank=True)
    policy_version = models.PositiveIntegerField(null=True, blank=True)
    policy_name = models.CharField(max_length=100, blank=True)
    split = models.CharField(max_length=8, choices=_choices(Split), default=Split.ONLINE.value, db_index=True)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    steps = models.PositiveIntegerField(default=0)
    outcome = models.CharField(max_length=16, choices=_choices(Outcome), blank=True)
    success = models.BooleanField(null=True)
    outcome_source = models.CharField(max_length=16, blank=True, help_text="'robot' (environment), 'operator' (label)")
    outcome_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    intervention_count = models.PositiveIntegerField(default=0)
    intervention_steps = models.PositiveIntegerField(default=0)
    control_hz = models.FloatField(default=0.0)
    image_shape = models.JSONField(default=list, blank=True)
    cameras = models.JSONField(default=list, blank=True, help_text="Recorded cameras, the primary first")

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RECORDING, db_index=True)
    payload_path = models.CharField(max_length=300, blank=True, help_text="Relative to PAYLOAD_DIR")
    payload_size = models.BigIntegerField(default=0)
    payload_sha256 = models.CharField(max_length=64, blank=True)
    received_bytes = models.BigIntegerField(default=0)
    # the upload lock (robots/ingest.py): one request at a time writes an episode's bytes, across processes and hosts
    upload_token = models.CharField(max_length=32, blank=True, editable=False)
    upload_locked_until = models.DateTimeField(null=True, blank=True, editable=False)
    error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    verified_at = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        ordering = ["-started_at"]
        indexes = [models.Index(fields=["task", "split", "status"])]

    def __str__(self):
        return f"{self.id} ({self.task_id}, {self.outcome or self.status})"


class InterventionSegment(models.Model):
    """Steps [start_step, end_step) of an episode driven by a human operator or the simulated operator."""

    episode = models.ForeignKey(Episode, on_delete=models.CASCADE, related_name="segments")
    start_step = models.PositiveIntegerField()
    end_step = models.PositiveIntegerField()
    source = models.CharField(max_length=16, choices=_choices(ControlSource))
    operator = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    operator_name = models.CharField(max_length=150, blank=True,
                                     help_text="Who drove: the lease holder for a human, the robot's label otherwise")
    lease = models.ForeignKey("ControlLease", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
                              help_text="The takeover lease the robot obeyed, as the server granted it")
    claimed_operator = models.CharField(max_length=150, blank=True,
                                        help_text="The operator name the robot's file gives (not trusted)")
    reason = models.CharField(max_length=500, blank=True)
    help_request = models.ForeignKey("HelpRequest", null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="segments",
                                     help_text="The help request the takeover answered (through its lease)")

    class Meta:
        ordering = ["episode", "start_step"]

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step


class AuditEvent(models.Model):
    """Append-only record of safety- and data-relevant actions (takeovers, e-stops, relabels, tokens, deployments)."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    actor_name = models.CharField(max_length=150, blank=True, help_text="Kept if the user is deleted; 'system' for the server")
    action = models.CharField(max_length=50, db_index=True)
    robot = models.ForeignKey(Robot, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at"]

    def __str__(self):
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor_name} {self.action}"


class ControlLease(models.Model):
    """Exclusive control of one robot by one console operator (docs/console.md, "Leases").

    Active while ``ended_at`` is null; a partial unique constraint allows one active lease per robot, so two
    operators racing for a robot get one lease and one refusal. Ends on release, console disconnect, timeout
    (not renewed before ``expires_at``), forced takeover or the robot going offline (``end_reason``).
    """

    class EndReason(models.TextChoices):
        RELEASED = "released"
        DISCONNECTED = "disconnected"
        TIMEOUT = "timeout"
        FORCED = "forced"
        ROBOT_OFFLINE = "robot_offline"
        ROLE_CHANGED = "role_changed"  # the operator was demoted (or deactivated) while holding it

    robot = models.ForeignKey(Robot, on_delete=models.CASCADE, related_name="leases")
    operator = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                 related_name="+")
    operator_name = models.CharField(max_length=150, help_text="Kept if the user is deleted")
    reason = models.CharField(max_length=500, blank=True)
    channel_name = models.CharField(max_length=200, blank=True, help_text="The console socket holding the lease")
    forced = models.BooleanField(default=False, help_text="Taken from another operator by an admin")
    started_at = models.DateTimeField()
    renewed_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    end_reason = models.CharField(max_length=16, choices=EndReason.choices, blank=True)

    class Meta:
        ordering = ["-started_at"]
        constraints = [
            models.UniqueConstraint(fields=["robot"], condition=Q(ended_at__isnull=True), name="one_active_lease_per_robot")
        ]

    def __str__(self):
        return f"lease {self.pk}: {self.operator_name} on robot {self.robot_id}"

    @property
    def active(self) -> bool:
        return self.ended_at is None


class HelpRequest(models.Model):
    """A robot asking for an operator (docs/console.md, "Help queue").

    Raised by the robot's detectors (its heartbeat carries the request until it is answered or no longer needed), or by
    a button on the robot (the robot API). Operators claim one (which takes the robot's lease), then resolve it
    (release, optionally with the episode's outcome) or dismiss it as a false alarm; a request the robot stops
    reporting before anyone claimed it is withdrawn. A takeover of the robot by any path answers its open requests, and
    the intervention segment that lease drove points back here.
    """

    class Status(models.TextChoices):
        OPEN = "open"  # waiting for an operator
        CLAIMED = "claimed"  # an operator holds the robot because of it
        RESOLVED = "resolved"  # answered: the lease that claimed it ended
        DISMISSED = "dismissed"  # an operator judged it a false alarm
        WITHDRAWN = "withdrawn"  # the robot stopped asking before anyone claimed it

    ACTIVE = (Status.OPEN, Status.CLAIMED)

    robot = models.ForeignKey(Robot, on_delete=models.CASCADE, related_name="help_requests")
    request_id = models.UUIDField(default=uuid.uuid4, help_text="Made by the robot: its heartbeats repeat it")
    kind = models.CharField(max_length=16, choices=[(k, k) for k in HELP_KINDS])
    reason = models.CharField(max_length=200, blank=True)
    urgency = models.PositiveSmallIntegerField(default=2, help_text="1 low .. 3 high")
    escalated_at = models.DateTimeField(null=True, blank=True,
                                        help_text="Last time an unanswered request's urgency rose (SOP_HELP_ESCALATE_S)")
    episode_id = models.UUIDField(null=True, blank=True)
    step = models.PositiveIntegerField(default=0)
    trace = models.JSONField(default=list, blank=True, help_text="The robot's last seconds before it asked")
    robot_since = models.DateTimeField(null=True, blank=True, help_text="When the robot began asking (its clock)")
    raised_at = models.DateTimeField(db_index=True)

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN, db_index=True)
    assigned_to = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="+")
    assigned_at = models.DateTimeField(null=True, blank=True)
    claimed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    claimed_name = models.CharField(max_length=150, blank=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    lease = models.ForeignKey(ControlLease, null=True, blank=True, on_delete=models.SET_NULL, related_name="help_requests")
    closed_at = models.DateTimeField(null=True, blank=True)
    closed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                  related_name="+")
    closed_name = models.CharField(max_length=150, blank=True)
    outcome = models.CharField(max_length=16, blank=True, help_text="The episode outcome an operator gave at resolve")
    note = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-raised_at"]
        constraints = [models.UniqueConstraint(fields=["robot", "request_id"], name="one_help_request_per_robot_id")]
        indexes = [models.Index(fields=["status", "raised_at"])]

    def __str__(self):
        return f"help #{self.pk} {self.robot_id} {self.kind} ({self.status})"

    @property
    def active(self) -> bool:
        return self.status in self.ACTIVE


class OperatorPresence(models.Model):
    """An operator's open console socket: who can be assigned help requests now. ``seen_at`` moves with the console's
    pings; a row not seen for SOP_PRESENCE_S (its server died) no longer counts."""

    channel_name = models.CharField(max_length=200, unique=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    capacity = models.PositiveSmallIntegerField(default=1, help_text="Requests assigned at once (1 unless they ask)")
    connected_at = models.DateTimeField()
    seen_at = models.DateTimeField(db_index=True)


class MediaJob(models.Model):
    """A replay made in the background (robots/replay.py): an episode's MP4 or its value plot, with its progress, so
    that every web node can show how far it is."""

    class Kind(models.TextChoices):
        VIDEO = "video"
        VALUE = "value"

    class State(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    episode = models.ForeignKey(Episode, on_delete=models.CASCADE, related_name="media_jobs")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    key = models.CharField(max_length=300, help_text="What it makes: a storage key (MP4) or a cache key (values)")
    state = models.CharField(max_length=8, choices=State.choices, default=State.QUEUED)
    progress = models.FloatField(default=0.0)
    error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["episode", "kind", "key"], name="one_media_job_per_key")]

    def __str__(self):
        return f"{self.kind} of {self.episode_id}: {self.state}"


class ApiToken(models.Model):
    """A person's token for scripts (``Authorization: Bearer sopu_...``, robots/auth.py): the console HTTP API with the
    role of its user (reads, exports, and for an admin's token also starting and stopping runs); never the live
    console or the robot endpoints. Stored only as a sha256 hash; shown once when made; revocable; optionally
    expiring."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="What it is for, e.g. 'nightly export'")
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(max_length=16, editable=False, help_text="First characters, to tell tokens apart")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.prefix}… ({self.name}) of {self.user_id}"

    @property
    def active(self) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > timezone.now())


class DatasetExport(models.Model):
    """Verified episodes exported as a LeRobotDataset v3.0 in the background (robots/exports.py), downloadable as
    one .tar from the console or with an API token."""

    class State(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"
        EXPIRED = "expired"  # its file was deleted after SOP_EXPORT_RETENTION_DAYS

    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    requested_name = models.CharField(max_length=150)
    filters = models.JSONField(default=dict, help_text="tasks, split, robots, versions as asked")
    state = models.CharField(max_length=8, choices=State.choices, default=State.QUEUED)
    progress = models.FloatField(default=0.0)
    error = models.CharField(max_length=500, blank=True)
    episodes = models.PositiveIntegerField(default=0)
    frames = models.PositiveIntegerField(default=0)
    size = models.BigIntegerField(default=0, help_text="bytes of the .tar")
    key = models.CharField(max_length=300, blank=True, help_text="Storage key of the .tar")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"export {self.pk} ({self.state})"
