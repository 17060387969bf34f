"""The REST API of the fleet: the robot ingest (token auth only) and the operator read API (session auth only).

Each endpoint parses, authorises, calls one service or selector, replies. Errors are ``{"code", "detail"}``
(robots/exceptions.py). The ingest contract is documented in docs/protocol.md; the OpenAPI schema of every endpoint
(drf-spectacular, from the ``extend_schema`` annotations here and in learner/api.py) is served at /api/schema/ and
committed as docs/openapi.json.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import Http404
from django.urls import reverse
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response
from rest_framework.views import APIView

from sop_web.files import send_stored

from . import exports, helpqueue, ingest_http, selectors
from .auth import IsOperator, IsRobot, RobotTokenAuthentication, UserTokenAuthentication
from .exceptions import PayloadTooLarge
from .models import DatasetExport, Episode, Robot
from .parsers import StrictJSONParser
from .serializers import (
    EpisodeAnnouncementSerializer,
    EpisodeDetailSerializer,
    EpisodeFilterSerializer,
    EpisodeSerializer,
    RobotSerializer,
    TaskSerializer,
)

# ---------------------------------------------------------------- the schema's shared parts


class RobotTokenScheme(OpenApiAuthenticationExtension):
    """The robot token in the schema: ``Authorization: Bearer sop_...`` (robots/auth.py)."""

    target_class = RobotTokenAuthentication
    name = "robotToken"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "bearerFormat": "sop_ + 43 URL-safe characters",
                "description": "A robot's token (manage.py add_robot prints it once). Robot endpoints only."}


class UserTokenScheme(OpenApiAuthenticationExtension):
    """A person's API token for scripts: ``Authorization: Bearer sopu_...`` (robots/auth.py)."""

    target_class = UserTokenAuthentication
    name = "userToken"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "bearerFormat": "sopu_ + 43 URL-safe characters",
                "description": "A person's API token (made on the console's API tokens page, shown once): the "
                               "console API with that person's role."}


class ConsoleSessionScheme(OpenApiAuthenticationExtension):
    """The console's session cookie (drf-spectacular's own scheme, with what a client must also send)."""

    target_class = SessionAuthentication
    name = "cookieAuth"
    priority = 1  # over drf-spectacular's built-in SessionScheme

    def get_security_definition(self, auto_schema):
        return {"type": "apiKey", "in": "cookie", "name": settings.SESSION_COOKIE_NAME,
                "description": "A console user's session from logging in at /login/. POSTs also need the header "
                               "X-CSRFToken with the value of the csrftoken cookie."}


class ErrorSerializer(serializers.Serializer):
    """Every error body (robots/exceptions.py): a stable code, a readable line, sometimes extra fields."""

    code = serializers.CharField(help_text="stable, machine-readable: invalid, parse_error, not_authenticated, "
                                           "forbidden, not_found, offset_mismatch, too_large, ...")
    detail = serializers.CharField(help_text="one readable line")
    fields = serializers.JSONField(required=False, help_text="validation errors per field (code invalid)")
    offset = serializers.IntegerField(required=False, help_text="where to resume the upload (409 offset_mismatch, "
                                                                "422)")


def error(description: str) -> OpenApiResponse:
    return OpenApiResponse(ErrorSerializer, description=description)


# The errors every robot endpoint and every console endpoint may answer.
ROBOT_AUTH_ERRORS = {401: error("no robot token (not_authenticated) or an unknown or revoked one "
                                "(authentication_failed); the reply has WWW-Authenticate: Bearer")}
CONSOLE_AUTH_ERRORS = {403: error("not logged in (not_authenticated), a robot token, or a role that may not do this "
                                  "(permission_denied)")}
JSON_BODY_ERRORS = {
    400: error("a field is missing or wrong (invalid, with fields) or the body is not strict JSON (parse_error: "
               "not UTF-8, NaN/Infinity, nested over 32 levels, over SOP_MAX_REQUEST_BYTES)"),
    413: error("the body is over SOP_MAX_REQUEST_BYTES (too_large), refused by the server before it is read"),
    415: error("the body is not application/json (unsupported_media_type)"),
}
PAGE_ERRORS = {404: error("no such page (not_found)")}


class UploadStateSerializer(serializers.Serializer):
    """Where an episode upload stands: the body of every successful ingest reply."""

    id = serializers.UUIDField()
    status = serializers.ChoiceField(Episode.Status.choices)
    offset = serializers.IntegerField(min_value=0, help_text="bytes the server has: send the next chunk from here")
    size = serializers.IntegerField(min_value=0, help_text="the announced payload size in bytes")
    upload_url = serializers.CharField(help_text="PUT the payload bytes here")


# ---------------------------------------------------------------- robot ingest


class RobotAPIView(APIView):
    """Robot endpoints: a robot token, nothing else (an operator's session does not count here)."""

    authentication_classes = [RobotTokenAuthentication]
    permission_classes = [IsRobot]
    parser_classes = [StrictJSONParser]


class RobotEpisodesView(RobotAPIView):
    @extend_schema(
        operation_id="robot_episode_announce", tags=["robot ingest"], request=EpisodeAnnouncementSerializer,
        summary="Announce an episode payload (docs/protocol.md, HTTP ingest 1)",
        responses={
            201: OpenApiResponse(UploadStateSerializer, description="new episode: upload from offset 0"),
            200: OpenApiResponse(UploadStateSerializer, description="known episode: resume from offset (or it is "
                                                                     "verified already)"),
            **JSON_BODY_ERRORS,
            **ROBOT_AUTH_ERRORS,
            403: error("the UUID belongs to another robot (forbidden)"),
            409: error("already verified with a different sha256 (conflict)"),
            413: error("size over SOP_MAX_EPISODE_BYTES, or the body over SOP_MAX_REQUEST_BYTES (too_large)"),
            429: error("the robot already has SOP_MAX_OPEN_UPLOADS unfinished uploads with bytes on the server "
                       "(quota_exceeded): finish those first"),
        },
    )
    def post(self, request):
        """Announce a payload: 201 (new) or 200 (known) with the offset to upload from."""
        status, state = ingest_http.announce(request.auth, request.data)
        return Response(state, status=status)


class HelpButtonSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=200, help_text="What the person at the robot says is wrong")
    urgency = serializers.IntegerField(min_value=1, max_value=3, default=3, help_text="1 low .. 3 high")
    id = serializers.UUIDField(required=False, help_text="Made by the robot: pressing twice with one id is one request")


class HelpRequestStateSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    status = serializers.CharField()


class RobotHelpView(RobotAPIView):
    @extend_schema(
        operation_id="robot_help_request", tags=["robot ingest"], request=HelpButtonSerializer,
        summary="The robot's help button: ask for an operator (docs/console.md, Help queue)",
        responses={201: OpenApiResponse(HelpRequestStateSerializer, description="a new request, in the queue"),
                   200: OpenApiResponse(HelpRequestStateSerializer, description="this id was requested before"),
                   **JSON_BODY_ERRORS, **ROBOT_AUTH_ERRORS},
    )
    def post(self, request):
        """Put a help request of kind ``button`` in the queue (idempotent on ``id``)."""
        body = HelpButtonSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        robot = request.auth
        episode = Robot.objects.filter(pk=robot.pk).values_list("current_episode", flat=True).first()
        help_request, created = helpqueue.raise_request(
            robot, "button", data["reason"], urgency=data["urgency"], request_id=data.get("id"),
            episode_id=str(episode) if episode else None,
        )
        return Response({"id": help_request.pk, "status": help_request.status}, status=201 if created else 200)


class RobotEpisodeView(RobotAPIView):
    @extend_schema(
        operation_id="robot_episode_status", tags=["robot ingest"], summary="Where an episode upload stands",
        responses={200: UploadStateSerializer, **ROBOT_AUTH_ERRORS,
                   403: error("another robot's episode (forbidden)"), 404: error("no such episode (not_found)")},
    )
    def get(self, request, episode_id):
        return Response(ingest_http.upload_state(selectors.robot_episode(request.auth, episode_id)))


class RobotEpisodePayloadView(RobotAPIView):
    parser_classes = []  # the body is raw bytes, read once as request.body

    @extend_schema(
        operation_id="robot_episode_upload", tags=["robot ingest"],
        summary="Append payload bytes at Upload-Offset (docs/protocol.md, HTTP ingest 2)",
        description="The body is the bytes [Upload-Offset, Upload-Offset + Content-Length) of the episode file, at "
                    "most SOP_MAX_UPLOAD_CHUNK_BYTES (16 MiB) per request. The chunk that completes the file verifies "
                    "it.",
        parameters=[OpenApiParameter(
            "Upload-Offset", {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**63 - 1},
            OpenApiParameter.HEADER, required=True,
            description="where this chunk starts: the offset of the last reply (1 to 19 ASCII digits)")],
        request={"application/octet-stream": OpenApiTypes.BINARY},
        responses={
            200: OpenApiResponse(UploadStateSerializer, description="chunk stored (status uploading, send the next "
                                                                     "from offset) or the file verified"),
            400: error("Upload-Offset missing or not 1 to 19 digits (invalid)"),
            **ROBOT_AUTH_ERRORS,
            403: error("another robot's episode (forbidden)"),
            404: error("the episode was never announced (not_found)"),
            409: error("offset_mismatch (with offset: continue from there), upload_not_open (announce it first) or "
                       "upload_busy (another request is writing this episode: retry)"),
            413: error("the chunk is over SOP_MAX_UPLOAD_CHUNK_BYTES (refused by the server before it is read) or "
                       "would end past the announced size (too_large)"),
            422: error("the complete file failed verification (checksum_mismatch / invalid_payload, offset 0): "
                       "announce again and upload from 0"),
            429: error("the robot's storage quota is used up (quota_exceeded)"),
            507: error("the server's payload store is full (storage_full): retry later"),
        },
    )
    def put(self, request, episode_id):
        """Append the body at ``Upload-Offset``; the chunk that completes the payload verifies it."""
        try:
            body = request.body
        except RequestDataTooBig:  # a body without Content-Length (chunked) past DATA_UPLOAD_MAX_MEMORY_SIZE
            raise PayloadTooLarge(f"chunk exceeds {settings.SOP_MAX_UPLOAD_CHUNK_BYTES} bytes") from None
        status, state = ingest_http.append(request.auth, episode_id, request.headers.get("Upload-Offset", ""), body)
        return Response(state, status=status)


# ---------------------------------------------------------------- operator read API


class OperatorAPIMixin:
    """Console endpoints: a logged-in user's session, or their API token for scripts; never a robot token."""

    authentication_classes = [SessionAuthentication, UserTokenAuthentication]
    permission_classes = [IsOperator]


class EpisodePagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


def console_schema(**kwargs):
    """extend_schema for a console GET: its tag, the login error, and the caller's own responses."""
    responses = kwargs.pop("responses", {})
    return extend_schema(tags=["console"], responses={**responses, **CONSOLE_AUTH_ERRORS}, **kwargs)


class RobotListView(OperatorAPIMixin, generics.ListAPIView):
    """Every robot with its live state and episode counts."""

    serializer_class = RobotSerializer

    @console_schema(operation_id="robots_list", summary="Every robot with its live state and episode counts",
                    responses={200: RobotSerializer(many=True)})
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        return selectors.list_robots()


class TaskListView(OperatorAPIMixin, generics.ListAPIView):
    serializer_class = TaskSerializer

    @console_schema(operation_id="tasks_list", summary="Every task with its episode counts",
                    responses={200: TaskSerializer(many=True)})
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        return selectors.list_tasks()


class EpisodeListView(OperatorAPIMixin, generics.ListAPIView):
    """Episodes, newest first; filters ``task``, ``robot`` (names), ``split``, ``status``, ``outcome``; paginated."""

    serializer_class = EpisodeSerializer
    pagination_class = EpisodePagination

    @console_schema(operation_id="episodes_list", summary="Episodes, newest first, filtered and paginated",
                    parameters=[EpisodeFilterSerializer],
                    responses={200: EpisodeSerializer(many=True),
                               400: error("an unknown filter value (invalid, with fields)"), **PAGE_ERRORS})
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        filters = EpisodeFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        return selectors.list_episodes(**filters.validated_data)


class EpisodeDetailView(OperatorAPIMixin, generics.RetrieveAPIView):
    serializer_class = EpisodeDetailSerializer

    @console_schema(operation_id="episode_detail", summary="One episode with its intervention segments",
                    responses={200: EpisodeDetailSerializer, 404: error("no such episode (not_found)")})
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def get_object(self):
        return selectors.episode_detail(self.kwargs["episode_id"])


# ---------------------------------------------------------------- dataset exports (robots/exports.py)


class ExportRequestSerializer(serializers.Serializer):
    tasks = serializers.ListField(child=serializers.CharField(max_length=100), required=False, max_length=1000,
                                  help_text="task names (default: all)")
    robots = serializers.ListField(child=serializers.CharField(max_length=100), required=False, max_length=1000,
                                   help_text="robot names (default: all)")
    split = serializers.ChoiceField(choices=["offline", "online", "eval"], required=False)
    versions = serializers.ListField(child=serializers.IntegerField(min_value=0, max_value=2**31 - 1), required=False,
                                     max_length=1000,
                                     help_text="checkpoint versions the episodes ran (default: all)")


class ExportSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    state = serializers.ChoiceField(choices=["queued", "running", "done", "failed", "expired"])
    progress = serializers.FloatField()
    error = serializers.CharField()
    filters = serializers.DictField()
    episodes = serializers.IntegerField()
    frames = serializers.IntegerField()
    size = serializers.IntegerField(help_text="bytes of the .tar")
    requested_by = serializers.CharField()
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    download_url = serializers.CharField(allow_null=True)


def _export_view(export, request) -> dict:
    return exports.view(export, reverse("api-export-download", args=[export.pk]))


class ExportListView(OperatorAPIMixin, APIView):
    @console_schema(operation_id="exports_list", summary="Dataset exports, newest first",
                    responses={200: ExportSerializer(many=True)})
    def get(self, request):
        return Response([_export_view(e, request) for e in DatasetExport.objects.all()[:100]])

    @extend_schema(operation_id="exports_create", tags=["console"], request=ExportRequestSerializer,
                   summary="Export verified episodes as a LeRobotDataset v3.0 (operators, admins)",
                   responses={202: ExportSerializer, **JSON_BODY_ERRORS, **CONSOLE_AUTH_ERRORS,
                              429: error("MAX_RUNNING exports of yours are queued or running (quota_exceeded)")})
    def post(self, request):
        body = ExportRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        export = exports.request_export(request.user, dict(body.validated_data))
        return Response(_export_view(export, request), status=202)


class ExportDetailView(OperatorAPIMixin, APIView):
    @console_schema(operation_id="export_detail", summary="One export: its state and progress",
                    responses={200: ExportSerializer, 404: error("no such export (not_found)")})
    def get(self, request, export_id):
        export = DatasetExport.objects.filter(pk=export_id).first()
        if export is None:
            raise Http404("no such export")
        return Response(_export_view(export, request))


class ExportDownloadView(OperatorAPIMixin, APIView):
    @console_schema(operation_id="export_download", summary="The export as one .tar (a LeRobotDataset v3.0 folder)",
                    responses={(200, "application/x-tar"): OpenApiTypes.BINARY,
                               302: OpenApiResponse(description="object storage: a signed URL of the bucket"),
                               404: error("no such export, or not made (yet) (not_found)")})
    def get(self, request, export_id):
        export = DatasetExport.objects.filter(pk=export_id).first()
        if export is None or export.state != DatasetExport.State.DONE:
            raise Http404("no such export, or it is not made (yet)")
        response = send_stored(export.key, exports.filename(export), "application/x-tar",
                               lambda: exports.local_file(export), attachment=True)
        if response is None:
            raise Http404("the export's file is gone")
        return response
