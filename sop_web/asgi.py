"""ASGI entry point: HTTP (Django, with static files for one-machine deployments) and the websocket routes.

/ws/robots/  robot agents, authenticated by per-robot token (robots/auth.py)
/ws/console/ browsers, authenticated by session, origin-checked: scheme, host and port (robots/origin.py)
POST /api/robot/episodes/ and PUT /api/robot/episodes/<uuid>/payload: the ingest route (robots/ingest_http.py)

Request bodies are limited by path (sop_web/limits.py): by the BodySizeLimit middleware under any server, and, under
daphne, already by daphne's Twisted request while the body arrives (daphne buffers whole bodies before the app runs).
"""

import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sop_web.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_http = get_asgi_application()  # must run before importing anything that touches models

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from robots import routing as robot_routing  # noqa: E402
from robots.ingest_http import IngestRoute  # noqa: E402
from robots.origin import SameOriginValidator  # noqa: E402
from sop_web.limits import BodySizeLimit, install_daphne_body_limit  # noqa: E402

# daphne's CLI and its runserver import daphne.server before they import this module and before they listen.
if "daphne.server" in sys.modules:
    install_daphne_body_limit()

# The robot ingest's two hot requests (announce, append bytes) are served beside Django, with the same checks
# (robots/ingest_http.py); every other request goes to Django.
http_app = BodySizeLimit(IngestRoute(ASGIStaticFilesHandler(django_http) if settings.SOP_SERVE_STATIC else django_http))

application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": URLRouter(
            [
                *robot_routing.robot_urlpatterns,  # robots are not browsers: token auth, no Origin header
                *[
                    # browser sockets: session auth + origin check against ALLOWED_HOSTS
                    type(p)(p.pattern, SameOriginValidator(AuthMiddlewareStack(p.callback)), name=p.name)
                    for p in robot_routing.console_urlpatterns
                ],
            ]
        ),
    }
)
