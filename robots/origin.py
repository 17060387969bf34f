"""Which web pages may open a console socket: the console's own origin, exactly (scheme, host AND port).

Browsers send cookies to every port of a host, so a page served by another program on the same host (say
http://localhost:9999) could open /ws/console/ with the operator's session and drive robots. Channels'
AllowedHostsOriginValidator compares only the host name against ALLOWED_HOSTS; this check wants the Origin to be the
origin the socket was requested on: ``Origin`` scheme and host:port must equal the handshake's ``Host`` header (and
the socket's scheme: ws <- http, wss <- https; behind a TLS proxy that sets X-Forwarded-Proto, daphne's
--proxy-headers makes the scope's scheme wss). The host must be in ALLOWED_HOSTS. CSRF_TRUSTED_ORIGINS, when set, are
accepted too (a console served from another origin on purpose). No Origin header: refused (every browser sends one;
robots use /ws/robots/, which has its own token check).
"""

from __future__ import annotations

import logging
from typing import Optional
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

log = logging.getLogger(__name__)


def _header(scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            try:
                return value.decode("ascii")
            except UnicodeDecodeError:
                return None
    return None


def origin_allowed(scope) -> bool:
    origin, host = _header(scope, b"origin"), _header(scope, b"host")
    if not origin:
        return False
    if origin in settings.CSRF_TRUSTED_ORIGINS:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.path or parts.query or parts.fragment or parts.username or parts.password or not parts.hostname:
        return False
    expected_scheme = "https" if scope.get("scheme") == "wss" else "http"
    if parts.scheme != expected_scheme or host is None or parts.netloc.lower() != host.lower():
        return False
    domain, _ = split_domain_port(host)
    return bool(domain) and validate_host(domain, settings.ALLOWED_HOSTS)


class SameOriginValidator:
    """ASGI middleware for browser sockets: the handshake is refused (HTTP 403) unless ``origin_allowed``."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not origin_allowed(scope):
            log.warning("console socket refused: origin %r is not this console's (host %r)",
                        _header(scope, b"origin"), _header(scope, b"host"))
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)
