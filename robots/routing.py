"""Websocket URL patterns. sop_web/asgi.py wraps console_urlpatterns with session auth and an origin check."""

from django.urls import path

from .console import ConsoleConsumer
from .consumers import RobotConsumer

robot_urlpatterns = [path("ws/robots/", RobotConsumer.as_asgi())]
console_urlpatterns = [path("ws/console/", ConsoleConsumer.as_asgi())]
