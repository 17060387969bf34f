"""The learner's REST API: checkpoint downloads for robots (token), training runs for operators (session)."""

from __future__ import annotations

from django.http import FileResponse
from rest_framework import generics, serializers
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response
from rest_framework.views import APIView

from learner import services
from learner.models import Checkpoint, TrainingRun
from robots.api import EpisodePagination, OperatorAPIMixin
from robots.auth import IsRobot, RobotTokenAuthentication
from robots.exceptions import SopError


class NotFound(SopError):
    status_code = 404
    default_code = "not_found"


class RobotCheckpointFileView(APIView):
    """The weights file of a published checkpoint (robots verify size + sha256 from ``policy.updated``)."""

    authentication_classes = [RobotTokenAuthentication]
    permission_classes = [IsRobot]

    def get(self, request, version: int):
        try:
            path = services.checkpoint_file(version)
        except services.LearnerError as exc:
            raise NotFound(str(exc)) from None
        if not path.exists():
            raise NotFound(f"checkpoint v{version} is registered but its file is missing")
        return FileResponse(open(path, "rb"), content_type="application/octet-stream", filename=path.name)


class CheckpointSerializer(serializers.ModelSerializer):
    run = serializers.PrimaryKeyRelatedField(read_only=True)
    parent = serializers.SlugRelatedField(slug_field="version", read_only=True)
    deployed = serializers.SerializerMethodField(help_text="the checkpoint the fleet should run now")

    class Meta:
        model = Checkpoint
        fields = ["version", "run", "parent", "algorithm", "step", "size", "sha256", "deployed", "created_at"]

    def get_deployed(self, checkpoint) -> bool:
        if "deployed_version" not in self.context:
            current = services.current_checkpoint()
            self.context["deployed_version"] = current.version if current else None
        return checkpoint.version == self.context["deployed_version"]


class RunSerializer(serializers.ModelSerializer):
    tasks = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)
    progress = serializers.FloatField(read_only=True)

    class Meta:
        model = TrainingRun
        fields = ["id", "algorithm", "preset", "tasks", "status", "message", "step", "total_steps", "progress",
                  "attempts", "created_at", "started_at", "finished_at", "config"]


class StartRunSerializer(serializers.Serializer):
    algorithm = serializers.CharField()
    tasks = serializers.ListField(child=serializers.CharField(), min_length=1)
    preset = serializers.CharField(default="default")
    steps = serializers.IntegerField(min_value=1, required=False)
    from_scratch = serializers.BooleanField(default=False)


class RunListView(OperatorAPIMixin, generics.ListAPIView):
    serializer_class = RunSerializer
    queryset = TrainingRun.objects.prefetch_related("tasks")
    pagination_class = EpisodePagination

    def post(self, request):
        if not request.user.is_staff:
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
    def post(self, request, run_id: int):
        if not request.user.is_staff:
            raise PermissionDenied("Only administrators stop training runs.")
        run = TrainingRun.objects.filter(pk=run_id).first()
        if run is None:
            raise NotFound(f"no training run {run_id}")
        return Response(RunSerializer(services.stop_run(run, request.user)).data)


class CheckpointListView(OperatorAPIMixin, generics.ListAPIView):
    serializer_class = CheckpointSerializer
    pagination_class = EpisodePagination

    def get_queryset(self):
        queryset = Checkpoint.objects.select_related("run", "parent")
        if self.request.query_params.get("deployed") in ("1", "true"):
            current = services.current_checkpoint()
            queryset = queryset.filter(pk=current.pk if current else None)
        return queryset
