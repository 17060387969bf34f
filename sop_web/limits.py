"""Request body limits: a 413 ``{"code": "too_large", ...}`` before an oversized body is read, under any server.

Two limits, by path (``body_limit``): ``SOP_MAX_UPLOAD_CHUNK_BYTES`` (16 MiB) for the robot payload PUT
(``/api/robot/episodes/<uuid>/payload``), ``SOP_MAX_REQUEST_BYTES`` (1 MiB) for every other request (JSON, forms).

Two places enforce them, because ASGI servers differ in when the app runs:

- ``BodySizeLimit``, an ASGI middleware: refuses a declared ``Content-Length`` over the limit without reading the
  body, and counts the bytes of streamed ``http.request`` messages (servers that stream bodies to the app, e.g.
  uvicorn, and chunked bodies that declare no length): past the limit it answers 413 and tells the app the client
  went away, so Django never sees a truncated body.
- ``install_daphne_body_limit``: daphne (Twisted) reads the whole body into a buffer before the ASGI app runs, so a
  middleware only runs after a 17 MiB chunked body has been taken in (and Django then raised RequestDataTooBig, a
  500). The hook makes daphne's Twisted request refuse while the body arrives: at the headers for a declared length,
  at the first byte past the limit for a chunked body. sop_web/asgi.py installs it when daphne is the server.

Django's own DATA_UPLOAD_MAX_MEMORY_SIZE stays as a third line (robots/api.py answers its RequestDataTooBig with 413).
"""

from __future__ import annotations

import io
import json
import logging
import re
from urllib.parse import unquote

from django.conf import settings

log = logging.getLogger(__name__)

# The robot payload PUT (robots/urls.py "robot-episode-payload"); uuid as Django's <uuid:> converter matches it.
# Also what robots/ingest_http.py serves (its ``id`` group: the episode).
PAYLOAD_PATH = re.compile(
    r"/api/robot/episodes/(?P<id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/payload")
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,19}")  # fullmatch; int() of thousands of digits raises


def body_limit(method: str, path: str) -> int:
    """The largest request body, in bytes, for ``method`` on ``path`` (the decoded path, no query string)."""
    if method.upper() == "PUT" and PAYLOAD_PATH.fullmatch(path):
        return settings.SOP_MAX_UPLOAD_CHUNK_BYTES
    return settings.SOP_MAX_REQUEST_BYTES


def too_large_body(length: int | None, limit: int) -> bytes:
    detail = (f"request body of {length} bytes exceeds {limit}" if length is not None
              else f"request body exceeds {limit} bytes")
    return json.dumps({"code": "too_large", "detail": detail}).encode()


# ---------------------------------------------------------------- ASGI middleware (every server)


class BodySizeLimit:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = body_limit(scope["method"], scope["path"])
        lengths = {value.strip() for name, value in scope.get("headers", []) if name.lower() == b"content-length"}
        if len(lengths) > 1 or any(not _CONTENT_LENGTH.fullmatch(v) for v in lengths):
            return await _reply(send, 400, "bad_request", "invalid Content-Length")
        length = int(next(iter(lengths))) if lengths else None
        if length is not None and length > limit:  # refused from the header: not one byte of the body is read
            return await _reply(send, 413, "too_large", too_large_body(length, limit))

        received = 0
        refused = False
        response_started = False

        async def limited_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not response_started:
                        await _reply(send, 413, "too_large", too_large_body(None, limit))
                    # The app sees the client leave (Django raises RequestAborted and answers nothing).
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal response_started
            if refused:
                return  # the 413 was the reply
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        return await self.app(scope, limited_receive, guarded_send)


async def _reply(send, status, code, detail):
    body = detail if isinstance(detail, bytes) else json.dumps({"code": code, "detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- daphne: refuse while the body arrives

# After the 413, the connection is half-closed (our FIN goes out after the reply) and what the client still sends is
# read and dropped, for at most this long / this much, then the socket is closed. Closing at once with unread bytes
# in the kernel's buffer would send a TCP reset, and a reset can destroy the 413 before the client reads it.
LINGER_S = 2.0
LINGER_BYTES = 64 * 1024 * 1024


def install_daphne_body_limit() -> bool:
    """Make daphne's HTTP requests enforce ``body_limit`` while the body arrives. Idempotent; False if daphne is not
    installed. Must run before daphne accepts connections (sop_web/asgi.py runs it at import, which daphne's CLI and
    runserver do before listening): daphne builds each connection's request objects from the module-level
    ``daphne.http_protocol.WebRequest``, which this replaces with a subclass."""
    try:
        from daphne import http_protocol
    except ImportError:
        return False
    if getattr(http_protocol.WebRequest, "sop_body_limit", False):
        return True
    http_protocol.WebRequest = _limited_request_class(http_protocol.WebRequest)
    return True


def _limited_request_class(base):
    class BodyLimitedWebRequest(base):
        """daphne's WebRequest (a twisted.web.http.Request) that refuses an oversized body as it arrives.

        Twisted's HTTPChannel calls, per request: ``gotLength(declared length or None)`` once the headers are in
        (from ``allHeadersReceived``, before any body byte and before it answers ``Expect: 100-continue``), then
        ``handleContentChunk(data)`` for every piece of the decoded body (chunked or not), then ``requestReceived``
        when the body is complete, which runs daphne's ``process`` and so the ASGI app. We check the limit in the
        first two and, once refused, drop the rest: the app never sees the request.
        """

        sop_body_limit = True
        _sop_limit = None  # bytes this request may carry; None until the headers are in
        _sop_received = 0
        _sop_refused = False
        _sop_linger = None  # the delayed call that closes the socket after the lingering close

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _guard_content_length(self.channel)

        def gotLength(self, length):
            channel = self.channel
            command = getattr(channel, "_command", b"") or b""  # the request line, parsed before the headers
            raw_path = (getattr(channel, "_path", b"") or b"").split(b"?", 1)[0]
            try:
                path = unquote(raw_path.decode("ascii"))
            except UnicodeDecodeError:
                path = ""  # daphne answers 400 for such a path later; the small limit applies meanwhile
            self._sop_limit = body_limit(command.decode("ascii", "replace"), path)
            if length is not None and length > self._sop_limit:
                self._sop_refuse(length)
                return
            super().gotLength(length)

        def handleContentChunk(self, data):
            if self._sop_refused:
                return
            self._sop_received += len(data)
            if self._sop_limit is not None and self._sop_received > self._sop_limit:
                self._sop_refuse(None)  # a chunked body (no Content-Length) that went past the limit
                return
            super().handleContentChunk(data)

        def requestReceived(self, command, path, version):
            if self._sop_refused:
                return  # the body of a refused request ended: nothing reaches daphne's process() or the app
            super().requestReceived(command, path, version)

        def connectionLost(self, reason):
            if self._sop_linger is not None and self._sop_linger.active():
                self._sop_linger.cancel()
            super().connectionLost(reason)

        def _sop_refuse(self, declared):
            self._sop_refused = True
            channel, transport = self.channel, self.channel.transport
            limit = self._sop_limit
            log.warning("refused a request body %s (limit %d bytes): 413",
                        f"of {declared} bytes" if declared is not None else "past the limit (chunked)", limit)
            if getattr(self, "content", None) is not None:
                self.content.close()  # a chunked body's spool file: nothing of the body is kept
            self.content = io.BytesIO()
            # allHeadersReceived answers "Expect: 100-continue" right after gotLength: not to a refused request.
            self.requestHeaders.removeHeader(b"expect")
            # From now on the connection is ours: what the client still sends is counted and dropped, never parsed
            # as a body or a next request, and a malformed chunk in it gets no second answer from Twisted.
            drained = 0

            def discard(data):
                nonlocal drained
                drained += len(data)
                if drained > LINGER_BYTES:
                    transport.abortConnection()

            channel.dataReceived = channel.rawDataReceived = discard
            channel._respondToBadRequestAndDisconnect = lambda: None
            channel.setTimeout(None)
            body = too_large_body(declared, limit)
            transport.write(b"HTTP/1.1 413 Content Too Large\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
            # Lingering close: FIN after the reply, keep reading (and dropping) until the client closes, at most
            # LINGER_S. Transports without half-close (TLS) close once the reply is written.
            from twisted.internet import reactor

            if hasattr(transport, "loseWriteConnection"):
                transport.loseWriteConnection()
            else:
                transport.loseConnection()
            self._sop_linger = reactor.callLater(LINGER_S, transport.abortConnection)

    return BodyLimitedWebRequest


def _guard_content_length(channel) -> None:
    """Twisted's HTTPChannel parses Content-Length with int() as the header arrives: past 4300 digits int() raises,
    the exception escapes into the reactor and the client is dropped without an answer. Once per connection (the
    channel creates a request per request line, before the headers), wrap that parser so that a Content-Length of
    more than 19 digits gets Twisted's own "400 Bad Request" (as a non-numeric one does)."""
    choose = getattr(channel, "_maybeChooseTransferDecoder", None)
    fail = getattr(channel, "_failChooseTransferDecoder", None)
    if choose is None or fail is None or getattr(choose, "sop_guarded", False):
        return

    def guarded(header, data):
        if header.lower() == b"content-length" and not _CONTENT_LENGTH.fullmatch(data):
            return fail()
        return choose(header, data)

    guarded.sop_guarded = True
    channel._maybeChooseTransferDecoder = guarded
