"""The live console pages: the fleet (a tile per robot) and one robot (video, HUD, takeover, teleop, e-stop)."""

from django.urls import path

from . import views

urlpatterns = [
    path("", views.fleet, name="fleet"),
]
