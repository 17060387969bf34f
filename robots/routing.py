"""Websocket URL patterns (placeholder until the consumers land)."""

robot_urlpatterns = []
console_urlpatterns = []
