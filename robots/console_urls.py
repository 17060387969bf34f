"""The live console pages: the fleet (a tile per robot) and one robot (video, HUD, takeover, teleop, e-stop)."""

from django.urls import path

from . import console_views

urlpatterns = [
    path("", console_views.fleet, name="fleet"),
    path("robots/<slug:name>/", console_views.robot, name="robot"),
]
