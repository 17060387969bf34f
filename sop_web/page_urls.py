"""Console pages beyond the live view: tasks, episodes, training, metrics, audit."""

from django.urls import path

from learner import pages as learner_pages
from robots import pages

urlpatterns = [
    path("tasks/", pages.tasks, name="tasks"),
    path("tasks/new", pages.task_new, name="task_new"),
    path("tasks/<slug:name>/", pages.task_edit, name="task_edit"),
    path("episodes/", pages.episodes, name="episodes"),
    path("episodes/<uuid:episode_id>/", pages.episode, name="episode"),
    path("episodes/<uuid:episode_id>/video.mp4", pages.episode_video, name="episode_video"),
    path("episodes/<uuid:episode_id>/value.json", learner_pages.episode_value, name="episode_value"),
    path("episodes/<uuid:episode_id>/relabel", pages.episode_relabel, name="episode_relabel"),
    path("training/", learner_pages.training, name="training"),
    path("training/start", learner_pages.training_start, name="training_start"),
    path("training/runs/<int:run_id>/", learner_pages.training_run, name="training_run"),
    path("training/runs/<int:run_id>/metrics.json", learner_pages.training_run_metrics, name="training_run_metrics"),
    path("training/runs/<int:run_id>/stop", learner_pages.training_stop, name="training_stop"),
    path("training/checkpoints/<int:version>/evaluate", learner_pages.checkpoint_evaluate, name="checkpoint_evaluate"),
    path("training/checkpoints/<int:version>/rollback", learner_pages.checkpoint_rollback, name="checkpoint_rollback"),
    path("metrics/", pages.metrics, name="metrics"),
    path("metrics/data.json", pages.metrics_data, name="metrics_data"),
    path("audit/", pages.audit, name="audit"),
    path("data/", pages.data, name="data"),
    path("data/export", pages.data_export, name="data_export"),
    path("data/tokens/new", pages.token_create, name="token_create"),
    path("data/tokens/<int:token_id>/revoke", pages.token_revoke, name="token_revoke"),
]
