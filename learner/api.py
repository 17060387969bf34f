"""The learner's REST API: checkpoint downloads for robots (token), training runs for operators (session)."""

from __future__ import annotations

from typing import Optional

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, serializers
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response
from rest_framework.views import APIView

from learner import services
from learner.models import Checkpoint, TrainingRun
from robots import roles
from robots.api import (
    CONSOLE_AUTH_ERRORS,
    JSON_BODY_ERRORS,
    PAGE_ERRORS,
    ROBOT_AUTH_ERRORS,
    EpisodePagination,
    OperatorAPIMixin,
    console_schema,
    error,
)
from robots.auth import IsRobot, RobotTokenAuthentication
from robots.exceptions import SopError
from robots.serializers import MAX_DB_INT
from sop_web import storage
from sop_web.files import send_stored


class NotFound(SopError):
    status_code = 404
    default_code = "not_found"


class RobotCheckpointFileView(APIView):
    """The weights file of a published checkpoint (robots verify size + sha256 from ``policy.updated``)."""

    authentication_classes = [RobotTokenAuthentication]
    permission_classes = [IsRobot]

    @extend_schema(
        operation_id="robot_checkpoint_file", tags=["robot ingest"],
        summary="The weights file of a published checkpoint (verify size + sha256 from policy.updated)",
        responses={
            (200, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY, description="the weights file"),
            302: OpenApiResponse(description="object storage (SOP_STORAGE=s3): a signed URL the bucket serves the "
                                             "weights from; follow it without the robot token"),
            **ROBOT_AUTH_ERRORS,
            404: error("no such checkpoint, or its file is missing (not_found)"),
        },
    )
    def get(self, request, version: int):
        try:
            checkpoint = services.checkpoint_row(version)
        except services.LearnerError as exc:
            raise NotFound(str(exc)) from None
        # Object storage: the bucket serves the bytes (a signed URL valid SOP_S3_URL_EXPIRE_S seconds); the robot
        # follows the redirect without its token and checks size and sha256 as always.
        response = send_stored(storage.checkpoint_key(checkpoint.path), checkpoint.path, "application/octet-stream",
                               lambda: services.checkpoint_local(checkpoint))
        if response is None:
            raise NotFound(f"checkpoint v{version} is registered but its file is missing")
        return response


class CheckpointSerializer(serializers.ModelSerializer):
    run = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)
    parent = serializers.SerializerMethodField(help_text="the version this one was trained from")
    deployed = serializers.SerializerMethodField(help_text="the checkpoint the fleet should run now")

    class Meta:
        model = Checkpoint
        fields = ["version", "run", "parent", "algorithm", "step", "size", "sha256", "deployed", "created_at"]
        read_only_fields = fields  # output only (and no database-specific integer bounds in the schema)

    def get_parent(self, checkpoint) -> Optional[int]:
        return checkpoint.parent.version if checkpoint.parent_id else None

    def get_deployed(self, checkpoint) -> bool:
        if "deployed_version" not in self.context:
            current = services.current_checkpoint()
            self.context["deployed_version"] = current.version if current else None
        return checkpoint.version == self.context["deployed_version"]


class RunSerializer(serializers.ModelSerializer):
    tasks = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)
    progress = serializers.FloatField(read_only=True, allow_null=True, help_text="null for a run without an end")

    class Meta:
        model = TrainingRun
        fields = ["id", "algorithm", "preset", "tasks", "status", "message", "step", "total_steps", "progress",
                  "attempts", "created_at", "started_at", "finished_at", "config"]
        read_only_fields = fields  # output only: runs are started with StartRunSerializer


class StartRunSerializer(serializers.Serializer):
    algorithm = serializers.CharField()
    tasks = serializers.ListField(child=serializers.CharField(), min_length=1)
    preset = serializers.CharField(default="default")
    steps = serializers.IntegerField(min_value=1, max_value=MAX_DB_INT, required=False)
    from_scratch = serializers.BooleanField(default=False)


class RunListView(OperatorAPIMixin, generics.ListAPIView):
    serializer_class = RunSerializer
    queryset = TrainingRun.objects.prefetch_related("tasks")
    pagination_class = EpisodePagination

    @console_schema(operation_id="runs_list", summary="Training runs, newest first, paginated",
                    responses={200: RunSerializer(many=True), **PAGE_ERRORS})
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    @extend_schema(
        operation_id="runs_start", tags=["console"], request=StartRunSerializer,
        summary="Start a training run (console admins: the admin role, staff or superuser)",
        responses={201: RunSerializer, **JSON_BODY_ERRORS,
                   400: error("a field is missing or wrong (invalid), an unknown algorithm, preset or task, or the "
                              "body is not strict JSON (parse_error)"),
                   **CONSOLE_AUTH_ERRORS},
    )
    def post(self, request):
        # The console's admin role (robots/roles.py), as on the training page: not Django's is_staff flag alone.
        if not roles.is_admin(request.user):
            raise PermissionDenied("Only administrators start training runs.")
        body = StartRunSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            run = services.start_run(body.validated_data["algorithm"], body.validated_data["tasks"],
                                     preset=body.validated_data["preset"], total_steps=body.validated_data.get("steps"),
                                     from_scratch=body.validated_data["from_scratch"], user=request.user)
        except services.LearnerError as exc:
            raise SopError(str(exc)) from None
        return Response(RunSerializer(run).data, status=201)


class RunStopView(OperatorAPIMixin, APIView):
    @extend_schema(
        operation_id="runs_stop", tags=["console"], request=None,
        summary="Stop a training run (console admins)",
        responses={200: RunSerializer, **CONSOLE_AUTH_ERRORS, 404: error("no such run (not_found)")},
    )
    def post(self, request, run_id: int):
        if not roles.is_admin(request.user):
            raise PermissionDenied("Only administrators stop training runs.")
        run = TrainingRun.objects.filter(pk=run_id).first()
        if run is None:
            raise NotFound(f"no training run {run_id}")
        return Response(RunSerializer(services.stop_run(run, request.user)).data)


class CheckpointListView(OperatorAPIMixin, generics.ListAPIView):
    serializer_class = CheckpointSerializer
    pagination_class = EpisodePagination

    @console_schema(
        operation_id="checkpoints_list", summary="Published checkpoints, paginated",
        parameters=[OpenApiParameter("deployed", OpenApiTypes.STR,
                                     description="1 or true: only the checkpoint the fleet should run now")],
        responses={200: CheckpointSerializer(many=True), **PAGE_ERRORS})
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        queryset = Checkpoint.objects.select_related("run", "parent")
        if self.request.query_params.get("deployed") in ("1", "true"):
            current = services.current_checkpoint()
            queryset = queryset.filter(pk=current.pk if current else None)
        return queryset
