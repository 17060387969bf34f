"""Console pages beyond the live view: tasks, episodes, training, metrics, audit."""

urlpatterns = []
