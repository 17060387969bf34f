"""The ASGI body-limit middleware (sop_web/limits.py) in-process: servers that stream bodies to the app (uvicorn),
chunked bodies that declare no length, malformed Content-Length headers, and which limit applies to which path.
The same limits through a real daphne: tests/security/test_body_limits.py."""

from __future__ import annotations

import json
import uuid

import pytest

from sop_web.asgi import application
from sop_web.limits import body_limit

MiB = 1024 * 1024
EPISODES = "/api/robot/episodes/"


def _scope(method: str, path: str, headers=()):
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"testserver"), *headers], "client": ("127.0.0.1", 5000),
            "server": ("testserver", 80)}


@pytest.mark.django_db(transaction=True)
async def test_the_middleware_counts_streamed_body_bytes_and_refuses_past_the_limit(settings):
    settings.SOP_MAX_REQUEST_BYTES = 1000
    pieces = [b"x" * 400] * 5  # 2000 bytes, no Content-Length: a streamed (chunked) body
    received, sent = [], []

    async def receive():
        if not pieces:
            return {"type": "http.disconnect"}
        received.append(pieces.pop())
        return {"type": "http.request", "body": received[-1], "more_body": bool(pieces)}

    async def send(message):
        sent.append(message)

    await application(_scope("POST", EPISODES, [(b"content-type", b"application/json")]), receive, send)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [413]  # only our answer: the app saw a disconnect, never a body
    assert json.loads(sent[-1]["body"])["code"] == "too_large"
    assert len(received) == 3  # it stopped reading at the first piece past the limit


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("value", [b"9" * 5000, b"12x", b"-1", b""])
async def test_the_middleware_refuses_a_malformed_content_length(value):
    sent = []

    async def receive():
        raise AssertionError("the body must not be read")

    async def send(message):
        sent.append(message)

    await application(_scope("POST", EPISODES, [(b"content-length", value)]), receive, send)
    assert sent[0]["status"] == 400


def test_the_limit_depends_on_the_path(settings):
    payload = f"/api/robot/episodes/{uuid.uuid4()}/payload"
    assert body_limit("PUT", payload) == settings.SOP_MAX_UPLOAD_CHUNK_BYTES == 16 * MiB
    assert body_limit("POST", payload) == settings.SOP_MAX_REQUEST_BYTES == MiB
    for path in (EPISODES, "/login/", "/api/runs/", payload + "/x", "/x" + payload, payload.upper()):
        assert body_limit("PUT", path) == settings.SOP_MAX_REQUEST_BYTES, path
