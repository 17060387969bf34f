"""ASGI middleware that refuses oversized request bodies from the Content-Length header, before reading any body.

Django's ASGI handler spools the whole body before a view runs, so a size check in the view is too late.
"""

import json

from django.conf import settings


class BodySizeLimit:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            limit = settings.SOP_MAX_UPLOAD_CHUNK_BYTES
            length = None
            for name, value in scope.get("headers", []):
                if name == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        return await _reply(send, 400, "bad_request", "invalid Content-Length")
            if length is not None and length > limit:
                return await _reply(send, 413, "too_large", f"request body of {length} bytes exceeds {limit}")
        return await self.app(scope, receive, send)


async def _reply(send, status, code, detail):
    body = json.dumps({"code": code, "detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
