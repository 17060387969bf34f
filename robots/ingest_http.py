"""The robot ingest's two hot requests, served by a plain ASGI route in front of Django: announcing a payload
(``POST /api/robot/episodes/``) and appending its bytes (``PUT /api/robot/episodes/<uuid>/payload``).

Why a route of its own: an upload is two requests per episode, and through Django each paid for a thread of its own
(asgiref starts one per request), the middleware stack, DRF's request wrapping and negotiation, and two copies of the
body (into Django's spooled request file, then out of it as ``request.body``; a chunk is 4 MiB). Here the body stays
the bytes daphne received, the work runs in a small pool of long-lived threads, and nothing else happens per request
(issue 14, item 9; benchmarks/README.md, "Against the floor").

The same door and the same checks as the DRF views in robots/api.py, by construction: both call ``announce`` and
``append`` below (the robot token through ``robots.auth.robot_from_authorization``, the strict JSON parser, the
announcement serializer, ``ingest.open_upload`` / ``append_upload``), errors go through the API's exception handler
(one ``{"code", "detail"}`` body), responses carry the security headers Django's middleware would add, and the
upload metrics count them. The views stay: they describe these endpoints in the OpenAPI schema and serve them when
Django is mounted alone (the test client). tests/robots/test_ingest_http.py holds the two paths to the same answers.

What the route does not take (Django answers, as before): other methods and paths, a deployment under a URL prefix
(``root_path`` / ``FORCE_SCRIPT_NAME``), and plain-HTTP requests while ``SECURE_SSL_REDIRECT`` is on (Django
redirects them). Body limits are enforced outside, by ``sop_web.limits`` (the route sits inside BodySizeLimit).
"""

from __future__ import annotations

import codecs
import io
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.urls import reverse
from django.utils.http import parse_header_parameters
from rest_framework.exceptions import APIException, UnsupportedMediaType
from rest_framework.renderers import JSONRenderer
from rest_framework.utils.mediatypes import media_type_matches

from . import ingest, metrics
from .auth import ROBOT_AUTH_HEADER, robot_from_authorization
from .exceptions import SopError, api_exception_handler
from .models import Episode, Robot
from .parsers import StrictJSONParser
from .serializers import EpisodeAnnouncementSerializer
from sop_web.limits import PAYLOAD_PATH

EPISODES_PATH = "/api/robot/episodes/"
# At most 19 ASCII digits: every offset a payload can have, and never near int()'s 4300-digit limit (a 500).
# fullmatch, not ^...$: "$" also matches before a trailing newline.
_OFFSET = re.compile(r"[0-9]{1,19}")

# Threads that run the ingest work (database, fsync, sha256, the payload check's round trip). Long-lived, so each
# request does not start one; a handful is plenty on any host (the work is I/O-bound or holds the GIL) and stays
# well inside the per-process database pool (SOP_DB_POOL_MAX, default 20).
INGEST_THREADS = 8


# ---------------------------------------------------------------- the endpoints' logic (both paths call these)


def upload_state(episode: Episode) -> dict:
    """Where an episode upload stands: the body of every successful ingest reply."""
    verified = episode.status == Episode.Status.VERIFIED
    return {
        "id": str(episode.id),
        "status": episode.status,
        "offset": episode.payload_size if verified else episode.received_bytes,
        "size": episode.payload_size,
        "upload_url": reverse("robot-episode-payload", args=[episode.id]),
    }


def announce(robot: Robot, data) -> tuple[int, dict]:
    """``POST /api/robot/episodes/`` with its parsed JSON body: 201 (new) or 200 (known) and the upload state."""
    announcement = EpisodeAnnouncementSerializer(data=data)
    announcement.is_valid(raise_exception=True)
    episode, created = ingest.open_upload(robot, announcement.validated_data)
    return (201 if created else 200), upload_state(episode)


def append(robot: Robot, episode_id, offset_header: str, body: bytes) -> tuple[int, dict]:
    """``PUT .../payload``: ``body`` at the offset the ``Upload-Offset`` header names."""
    if not _OFFSET.fullmatch(offset_header):
        raise SopError("Upload-Offset header must be a non-negative integer of at most 19 digits.")
    episode = ingest.append_upload(robot, episode_id, int(offset_header), body)
    metrics.inc("sop_ingest_bytes_total", len(body))
    return 200, upload_state(episode)


# ---------------------------------------------------------------- the ASGI route


class IngestRoute:
    """ASGI middleware: the two ingest requests here, everything else to ``app`` (Django)."""

    def __init__(self, app):
        self.app = app
        self._executor: Optional[ThreadPoolExecutor] = None  # made on the first request, in the serving process

    async def __call__(self, scope, receive, send):
        handler = self._handler(scope) if scope["type"] == "http" else None
        if handler is None:
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        if body is None:  # the client went away (or the body limit refused it and answered already)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(INGEST_THREADS, thread_name_prefix="ingest")
        status, payload, headers = await sync_to_async(_serve, thread_sensitive=False, executor=self._executor)(
            handler, _headers(scope), body, _secure(scope))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    @staticmethod
    def _handler(scope) -> Optional[Callable]:
        if scope.get("root_path") or settings.FORCE_SCRIPT_NAME:
            return None
        if settings.SECURE_SSL_REDIRECT and not _secure(scope):
            return None  # Django's SecurityMiddleware redirects it to https
        method, path = scope["method"], scope["path"]
        if method == "POST" and path == EPISODES_PATH:
            return _announce
        if method == "PUT":
            match = PAYLOAD_PATH.fullmatch(path)
            if match:
                episode_id = uuid.UUID(match["id"])  # as Django's <uuid:> converter hands it to the view
                return lambda robot, headers, body: append(robot, episode_id, headers.get(b"upload-offset", ""),
                                                           body)
        return None


def _announce(robot: Robot, headers: dict, body: bytes) -> tuple[int, dict]:
    """The JSON body parsed as DRF parses it for the view (its parser selection, charset and empty-body rules)."""
    content_type = headers.get(b"content-type", "")
    if body:
        parser = StrictJSONParser()
        if not media_type_matches(parser.media_type, content_type):
            raise UnsupportedMediaType(content_type)
        data = parser.parse(io.BytesIO(body), content_type, {"encoding": _charset(content_type)})
    else:
        data = {}  # an empty body is an empty object (the serializer says what is missing)
    return announce(robot, data)


def _serve(handler: Callable, headers: dict, body: bytes, secure: bool) -> tuple[int, bytes, list]:
    """One request, in an ingest thread: database connections handled as Django handles a request's."""
    close_old_connections()
    try:
        try:
            robot = robot_from_authorization(headers.get(b"authorization"))
            status, data = handler(robot, headers, body)
            extra = []
        except Exception as exc:  # noqa: BLE001  every error answers as the API's exception handler says
            status, data, extra = _error(exc)
        metrics.inc("sop_robot_upload_responses_total", code=f"{status // 100}xx")
        payload = JSONRenderer().render(data)
        return status, payload, [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload)),
                                 *extra, *_security_headers(secure)]
    finally:
        close_old_connections()


def _error(exc: Exception) -> tuple[int, dict, list]:
    if isinstance(exc, APIException) and exc.status_code == 401:
        exc.auth_header = ROBOT_AUTH_HEADER
    response = api_exception_handler(exc, {})
    headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in response.items()
               if name.lower() in ("www-authenticate", "retry-after")]
    return response.status_code, response.data, headers


def _headers(scope) -> dict[bytes, str]:
    """Request headers by lower-case name, repeated ones joined with "," (as Django's request.headers has them)."""
    out: dict[bytes, str] = {}
    for name, value in scope.get("headers", []):
        name = name.lower()
        text = value.decode("latin-1")
        out[name] = f"{out[name]},{text}" if name in out else text
    return out


def _charset(content_type: str) -> str:
    """request.encoding as Django sets it: the declared charset if Python knows it, else DEFAULT_CHARSET."""
    charset = parse_header_parameters(content_type)[1].get("charset")
    if charset:
        try:
            codecs.lookup(charset)
            return charset
        except LookupError:
            pass
    return settings.DEFAULT_CHARSET


def _secure(scope) -> bool:
    """request.is_secure() as Django decides it (SECURE_PROXY_SSL_HEADER, when set, is the only word)."""
    proxy = settings.SECURE_PROXY_SSL_HEADER
    if proxy:
        header, secure_value = proxy
        wanted = header.removeprefix("HTTP_").replace("_", "-").lower().encode()
        for name, value in scope.get("headers", []):
            if name.lower() == wanted:
                return value.decode("latin-1").split(",", 1)[0].strip() == secure_value
    return scope.get("scheme") == "https"


def _security_headers(secure: bool) -> list[tuple[bytes, bytes]]:
    """What SecurityMiddleware and XFrameOptionsMiddleware add to a response of Django's."""
    headers = []
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        headers.append((b"x-content-type-options", b"nosniff"))
    if settings.SECURE_REFERRER_POLICY:
        policy = settings.SECURE_REFERRER_POLICY
        policy = policy if isinstance(policy, str) else ",".join(policy)
        headers.append((b"referrer-policy", policy.encode()))
    if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
        headers.append((b"cross-origin-opener-policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY.encode()))
    if secure and settings.SECURE_HSTS_SECONDS:
        hsts = f"max-age={settings.SECURE_HSTS_SECONDS}"
        if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS:
            hsts += "; includeSubDomains"
        if settings.SECURE_HSTS_PRELOAD:
            hsts += "; preload"
        headers.append((b"strict-transport-security", hsts.encode()))
    headers.append((b"x-frame-options", settings.X_FRAME_OPTIONS.encode()))
    return headers


async def _read_body(receive) -> Optional[bytes]:
    """The whole request body (daphne hands it over in one message: no copy then), or None on a disconnect."""
    pieces = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        pieces.append(message.get("body", b""))
        if not message.get("more_body", False):
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
