"""The REST API of the fleet: the robot ingest (token auth only) and the operator read API (session auth only).

Each endpoint parses, authorises, calls one service or selector, replies. Errors are ``{"code", "detail"}``
(robots/exceptions.py). The ingest contract is documented in docs/protocol.md.
"""

from __future__ import annotations

from django.urls import reverse
from rest_framework import generics
from rest_framework.authentication import SessionAuthentication
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
from rest_framework.views import APIView

from . import ingest, selectors
from .auth import IsOperator, IsRobot, RobotTokenAuthentication
from .exceptions import SopError
from .models import Episode
from .serializers import (
    EpisodeAnnouncementSerializer,
    EpisodeDetailSerializer,
    EpisodeFilterSerializer,
    EpisodeSerializer,
    RobotSerializer,
    TaskSerializer,
)

# ---------------------------------------------------------------- robot ingest


class RobotAPIView(APIView):
    """Robot endpoints: a robot token, nothing else (an operator's session does not count here)."""

    authentication_classes = [RobotTokenAuthentication]
    permission_classes = [IsRobot]
    parser_classes = [JSONParser]


def _upload_state(episode: Episode) -> dict:
    verified = episode.status == Episode.Status.VERIFIED
    return {
        "id": str(episode.id),
        "status": episode.status,
        "offset": episode.payload_size if verified else episode.received_bytes,
        "size": episode.payload_size,
        "upload_url": reverse("robot-episode-payload", args=[episode.id]),
    }


class RobotEpisodesView(RobotAPIView):
    def post(self, request):
        """Announce a payload: 201 (new) or 200 (known) with the offset to upload from."""
        announcement = EpisodeAnnouncementSerializer(data=request.data)
        announcement.is_valid(raise_exception=True)
        episode, created = ingest.open_upload(request.auth, announcement.validated_data)
        return Response(_upload_state(episode), status=201 if created else 200)


class RobotEpisodeView(RobotAPIView):
    def get(self, request, episode_id):
        return Response(_upload_state(selectors.robot_episode(request.auth, episode_id)))


class RobotEpisodePayloadView(RobotAPIView):
    parser_classes = []  # the body is raw bytes, read once as request.body

    def put(self, request, episode_id):
        """Append the body at ``Upload-Offset``; the chunk that completes the payload verifies it."""
        raw = request.headers.get("Upload-Offset", "")
        if not raw.isascii() or not raw.isdigit():
            raise SopError("Upload-Offset header must be a non-negative integer.")
        episode = ingest.append_upload(request.auth, episode_id, int(raw), request.body)
        return Response(_upload_state(episode))


# ---------------------------------------------------------------- operator read API


class OperatorAPIMixin:
    """Console endpoints: a logged-in user's session, never a robot token."""

    authentication_classes = [SessionAuthentication]
    permission_classes = [IsOperator]


class EpisodePagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class RobotListView(OperatorAPIMixin, generics.ListAPIView):
    """Every robot with its live state and episode counts."""

    serializer_class = RobotSerializer

    def get_queryset(self):
        return selectors.list_robots()


class TaskListView(OperatorAPIMixin, generics.ListAPIView):
    serializer_class = TaskSerializer

    def get_queryset(self):
        return selectors.list_tasks()


class EpisodeListView(OperatorAPIMixin, generics.ListAPIView):
    """Episodes, newest first; filters ``task``, ``robot`` (names), ``split``, ``status``, ``outcome``; paginated."""

    serializer_class = EpisodeSerializer
    pagination_class = EpisodePagination

    def get_queryset(self):
        filters = EpisodeFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        return selectors.list_episodes(**filters.validated_data)


class EpisodeDetailView(OperatorAPIMixin, generics.RetrieveAPIView):
    serializer_class = EpisodeDetailSerializer

    def get_object(self):
        return selectors.episode_detail(self.kwargs["episode_id"])
