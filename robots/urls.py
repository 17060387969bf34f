"""API URL patterns under /api/ (placeholder until the API lands)."""

urlpatterns = []
