"""API URL patterns under /api/: robot/... is the robot ingest (token auth), the rest the operator read API."""

from django.urls import path

from . import api

urlpatterns = [
    path("robot/episodes/", api.RobotEpisodesView.as_view(), name="robot-episodes"),
    path("robot/episodes/<uuid:episode_id>", api.RobotEpisodeView.as_view(), name="robot-episode"),
    path(
        "robot/episodes/<uuid:episode_id>/payload", api.RobotEpisodePayloadView.as_view(), name="robot-episode-payload"
    ),
    path("robot/help", api.RobotHelpView.as_view(), name="robot-help"),
    path("exports/", api.ExportListView.as_view(), name="api-exports"),
    path("exports/<int:export_id>/", api.ExportDetailView.as_view(), name="api-export"),
    path("exports/<int:export_id>/download", api.ExportDownloadView.as_view(), name="api-export-download"),
    path("robots/", api.RobotListView.as_view(), name="api-robots"),
    path("tasks/", api.TaskListView.as_view(), name="api-tasks"),
    path("episodes/", api.EpisodeListView.as_view(), name="api-episodes"),
    path("episodes/<uuid:episode_id>/", api.EpisodeDetailView.as_view(), name="api-episode"),
]
