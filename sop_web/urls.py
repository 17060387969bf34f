"""URL routes: console pages, the REST API (/api/), the admin, login.

Pages are split by owner: robots/console_urls.py (the live fleet and robot pages) and sop_web/page_urls.py (tasks,
episodes, training, metrics, audit)."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import JsonResponse
from django.urls import include, path
from django.views import defaults
from drf_spectacular.views import SpectacularJSONAPIView
from rest_framework.authentication import SessionAuthentication

from robots import views as robot_views
from robots.auth import IsOperator
from sop_web import observability


def _api(request) -> bool:
    return request.path.startswith("/api/")


# Under /api/ an error Django answers itself (no route matched, a bad request before any view) is JSON like every
# API error (robots/exceptions.py), never an HTML page; the console keeps Django's pages.
def not_found(request, exception):
    if _api(request):
        return JsonResponse({"code": "not_found", "detail": "No such API endpoint or object."}, status=404)
    return defaults.page_not_found(request, exception)


def bad_request(request, exception):
    if _api(request):
        return JsonResponse({"code": "bad_request", "detail": "Bad request."}, status=400)
    return defaults.bad_request(request, exception)


def server_error(request):
    if _api(request):
        return JsonResponse({"code": "server_error", "detail": "Internal server error."}, status=500)
    return defaults.server_error(request)


handler404 = not_found
handler400 = bad_request
handler500 = server_error


class SchemaView(SpectacularJSONAPIView):
    """The OpenAPI 3 schema of /api/ (docs/openapi.json is this, committed), for logged-in console users."""

    authentication_classes = [SessionAuthentication]
    permission_classes = [IsOperator]


urlpatterns = [
    path("", include("robots.console_urls")),
    path("", include("sop_web.page_urls")),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", robot_views.healthz, name="healthz"),
    path("readyz", observability.readyz, name="readyz"),
    path("metrics/prometheus", observability.prometheus, name="prometheus"),
    path("api/schema/", SchemaView.as_view(), name="api-schema"),
    path("api/", include("robots.urls")),
    path("api/", include("learner.urls")),
    path("admin/", admin.site.urls),
]
