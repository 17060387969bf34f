"""API shapes: the robot's episode announcement (input) and the operator read API (output)."""

from __future__ import annotations

import math
import re

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from .models import Episode, InterventionSegment, Robot, Task
from .protocol import ControlSource, Outcome, Split

MAX_DB_INT = 2**31 - 1


class FiniteFloatField(serializers.FloatField):
    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if not math.isfinite(value):
            self.fail("invalid")
        return value


_SHA256 = re.compile(r"[0-9a-f]{64}")


@extend_schema_field({"type": "string", "pattern": "^[0-9a-f]{64}$", "minLength": 64, "maxLength": 64})
class Sha256Field(serializers.CharField):
    """64 lowercase hex characters and nothing else. Not a RegexField: Django's RegexValidator uses re.search, and
    ``^...$`` accepts a trailing newline; a CharField also strips whitespace first. Here the value must fullmatch."""

    default_error_messages = {"invalid": "must be 64 lowercase hex characters"}

    def __init__(self, **kwargs):
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if not _SHA256.fullmatch(value):
            self.fail("invalid")
        return value


class InterventionAnnouncementSerializer(serializers.Serializer):
    start = serializers.IntegerField(min_value=0, max_value=MAX_DB_INT)
    end = serializers.IntegerField(min_value=1, max_value=MAX_DB_INT)
    source = serializers.ChoiceField([ControlSource.OPERATOR.value, ControlSource.SIM_OPERATOR.value])
    operator = serializers.CharField(max_length=150, allow_blank=True, default="")
    reason = serializers.CharField(max_length=500, allow_blank=True, default="")

    def validate(self, attrs):
        if attrs["end"] <= attrs["start"]:
            raise serializers.ValidationError("end must be greater than start")
        return attrs


class EpisodeAnnouncementSerializer(serializers.Serializer):
    """``POST /api/robot/episodes/``: what the robot is about to upload (docs/protocol.md, "HTTP ingest")."""

    id = serializers.UUIDField()
    task = serializers.CharField(max_length=100)
    prompt = serializers.CharField(max_length=500, allow_blank=True, default="")
    policy = serializers.CharField(max_length=100, allow_blank=True, default="")
    policy_version = serializers.IntegerField(min_value=-1, max_value=MAX_DB_INT, allow_null=True, default=None)
    split = serializers.ChoiceField([s.value for s in Split])
    started_at = FiniteFloatField(min_value=0)
    ended_at = FiniteFloatField(min_value=0, allow_null=True, default=None)
    steps = serializers.IntegerField(min_value=0, max_value=MAX_DB_INT, default=0)
    outcome = serializers.ChoiceField([o.value for o in Outcome], allow_blank=True, default="")
    success = serializers.BooleanField(allow_null=True, default=None)
    control_hz = FiniteFloatField(min_value=0, default=0.0)
    camera = serializers.CharField(max_length=100, allow_blank=True, default="")
    size = serializers.IntegerField(min_value=1)
    sha256 = Sha256Field()
    interventions = serializers.ListField(child=InterventionAnnouncementSerializer(), max_length=10000, default=list)


class RobotSerializer(serializers.ModelSerializer):
    """A robot as every console user sees it (the API and, through selectors.robot_states, the console sockets).
    Never the token's hash or its shown prefix: only the Django admin shows the prefix, to admins."""

    current_task = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    revoked = serializers.SerializerMethodField()
    episode_count = serializers.IntegerField(read_only=True)
    verified_episode_count = serializers.IntegerField(read_only=True)
    successful_episode_count = serializers.IntegerField(read_only=True)
    rated_online_count = serializers.IntegerField(
        read_only=True, help_text="online episodes that ended in success, failure or timeout")
    autonomous_success_count = serializers.IntegerField(
        read_only=True, help_text="of those, successes without any intervention (docs/console.md, Metrics)")

    class Meta:
        model = Robot
        fields = [
            "id", "name", "connected", "state", "last_seen", "connected_at", "current_task", "current_prompt",
            "current_episode", "current_step", "policy_version", "policy_name", "policy_error", "control_source", "loop_hz",
            "loop_p99_ms", "spool_pending", "capabilities", "cameras", "agent_version", "revoked", "revoked_at",
            "episode_count", "verified_episode_count", "successful_episode_count", "rated_online_count",
            "autonomous_success_count", "estopped", "estopped_by", "estopped_at", "deadman", "operator_name", "video_fps", "viewers",
        ]
        read_only_fields = fields

    def get_revoked(self, robot) -> bool:
        return robot.revoked_at is not None or robot.token_hash is None


class TaskSerializer(serializers.ModelSerializer):
    episode_count = serializers.IntegerField(read_only=True)
    verified_episode_count = serializers.IntegerField(read_only=True)
    successful_episode_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = Task
        fields = [
            "id", "name", "env_id", "prompts", "max_steps", "enabled", "description",
            "episode_count", "verified_episode_count", "successful_episode_count",
        ]
        read_only_fields = fields


class EpisodeSerializer(serializers.ModelSerializer):
    robot = serializers.SlugRelatedField(slug_field="name", read_only=True)
    task = serializers.SlugRelatedField(slug_field="name", read_only=True)
    # "" until the episode has ended (a read-only model field would not say it may be blank)
    outcome = serializers.ChoiceField(Episode._meta.get_field("outcome").choices, allow_blank=True, read_only=True)

    class Meta:
        model = Episode
        fields = [
            "id", "robot", "task", "prompt", "policy_name", "policy_version", "split", "started_at", "ended_at",
            "steps", "outcome", "success", "outcome_source", "intervention_count", "intervention_steps", "control_hz",
            "image_shape", "cameras", "status", "payload_size", "received_bytes", "verified_at", "created_at", "error",
        ]
        read_only_fields = fields


class InterventionSegmentSerializer(serializers.ModelSerializer):
    operator = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True,
                                            help_text="the lease holder's account, from the server's lease record")
    lease = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True,
                                               help_text="the takeover lease the robot obeyed, if the server granted it")
    steps = serializers.IntegerField(read_only=True)

    class Meta:
        model = InterventionSegment
        fields = ["start_step", "end_step", "steps", "source", "operator", "operator_name", "lease",
                  "claimed_operator", "reason"]
        read_only_fields = fields


class EpisodeDetailSerializer(EpisodeSerializer):
    outcome_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    segments = InterventionSegmentSerializer(many=True, read_only=True)

    class Meta(EpisodeSerializer.Meta):
        fields = [*EpisodeSerializer.Meta.fields, "outcome_by", "segments"]
        read_only_fields = fields


class EpisodeFilterSerializer(serializers.Serializer):
    """Query parameters of ``GET /api/episodes/``: an unknown value is a 400, not an empty page."""

    task = serializers.CharField(max_length=100, required=False, allow_blank=True)
    robot = serializers.CharField(max_length=100, required=False, allow_blank=True)
    split = serializers.ChoiceField([s.value for s in Split], required=False, allow_blank=True)
    status = serializers.ChoiceField(Episode.Status.values, required=False, allow_blank=True)
    outcome = serializers.ChoiceField([o.value for o in Outcome], required=False, allow_blank=True)
