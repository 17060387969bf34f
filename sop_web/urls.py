"""URL routes: console pages, the REST API (/api/), the admin, login.

Pages are split by owner: robots/console_urls.py (the live fleet and robot pages) and sop_web/page_urls.py (tasks,
episodes, training, metrics, audit)."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from robots import views as robot_views

urlpatterns = [
    path("", include("robots.console_urls")),
    path("", include("sop_web.page_urls")),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", robot_views.healthz, name="healthz"),
    path("api/", include("robots.urls")),
    path("api/", include("learner.urls")),
    path("admin/", admin.site.urls),
]
