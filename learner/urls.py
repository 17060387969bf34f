"""API routes of the learner, mounted under /api/."""

from django.urls import path

from learner import api

urlpatterns = [
    path("robot/checkpoints/<int:version>", api.RobotCheckpointFileView.as_view(), name="robot-checkpoint-file"),
    path("runs/", api.RunListView.as_view(), name="api-runs"),
    path("runs/<int:run_id>/stop", api.RunStopView.as_view(), name="api-run-stop"),
    path("checkpoints/", api.CheckpointListView.as_view(), name="api-checkpoints"),
]
